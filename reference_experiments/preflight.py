"""The GPU window's checks before any training, one log line each.

Inside the one GPU command (``reference_experiments/gpu/campaign.sh``), before the
campaign trains anything, :func:`run_preflight` checks that

* ``keras`` imports (it travels as wheels; the machine has none);
* CUDA is there (skipped, with a line, under a dry run or on the CPU);
* every planned data set's files match their ``SHA256SUMS``;
* every planned method steps one epoch as a stack of its real number of trials at
  the run's precision, falling back when it fails: BatchNorm in float32
  (:data:`devices.BATCHNORM_FP32`), then no autocast (``fp32``); the epoch's time
  per step is what the campaign's time guard predicts from (:func:`measure_stack`);
* on CUDA, the step loop makes no host sync (one epoch under
  ``torch.cuda.set_sync_debug_mode("error")``).

A failed check is a ``FAIL`` line and the campaign goes on where it can (a method that
cannot step is left out); no keras, or no CUDA on a real window, ends it. The module
imports without keras (the engine's modules are imported where they are used).
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import devices
from .config import RunConfig

if TYPE_CHECKING:  # the engine imports keras: this module imports without it
    from .data import ImageDataset
    from .stack import Teacher
    from .teacher_spec import TeacherSpec

__all__ = [
    "Check",
    "Preflight",
    "StackTiming",
    "check_cuda",
    "check_data",
    "check_keras",
    "measure_stack",
    "measure_teacher_step",
    "run_preflight",
    "timing_key",
]

Log = Callable[[str], None]
#: steps of the measured epoch (a small subset: the step time does not depend on it)
MEASURED_STEPS = 4


@dataclass(frozen=True)
class Check:
    """One preflight check: ``status`` is ``ok``, ``FAIL`` or ``skipped``."""

    name: str
    status: str
    detail: str = ""

    def line(self) -> str:
        return f"preflight: {self.name}: {self.status}" + (
            f" ({self.detail})" if self.detail else ""
        )


@dataclass(frozen=True)
class StackTiming:
    """A stack's measured cost: seconds per training step (all its trials at once),
    per validation image (all trials) and to set it up (models, teacher cache)."""

    step_s: float
    eval_s_per_image: float
    setup_s: float


@dataclass
class Preflight:
    """The checks, the precision the campaign runs at and the measured stack timings."""

    precision: str
    checks: list[Check] = field(default_factory=list)
    timings: dict[str, StackTiming] = field(default_factory=dict)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "FAIL"]


def timing_key(cfg: RunConfig, trials: int) -> str:
    """What a step's time depends on: data, models, method, precision, trials."""
    return (
        f"{cfg.dataset}/{cfg.teacher_arch or '-'}->{cfg.student_arch}/{cfg.method}/"
        f"{cfg.precision}/bs{cfg.batch_size}/x{trials}"
    )


def check_keras() -> Check:
    try:
        keras = importlib.import_module("keras")
    except ImportError as e:
        return Check("keras", "FAIL", str(e))
    return Check("keras", "ok", f"keras {keras.__version__}, backend {keras.backend.backend()}")


def check_cuda(device: str, dry_run: bool) -> Check:
    """CUDA where ``device`` asks for it; ``auto`` without CUDA runs on the CPU."""
    if dry_run:
        return Check("cuda", "skipped", "dry run")
    if not torch.cuda.is_available() and device == "auto":
        return Check("cuda", "skipped", "device auto: no CUDA, the CPU runs")
    if not device.startswith(("cuda", "auto")):
        return Check("cuda", "skipped", f"device {device}")
    if not torch.cuda.is_available():
        return Check("cuda", "FAIL", "torch.cuda.is_available() is False")
    return Check("cuda", "ok", f"{torch.cuda.get_device_name()}, torch {torch.__version__}")


def _sha256sums(folder: Path) -> dict[str, str]:
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    return {n.strip().lstrip("*"): d.lower() for d, _, n in (x.partition(" ") for x in lines) if n}


def check_data(datasets: Iterable[str], data_dir: str | None) -> list[Check]:
    """Every file a planned data set's ``SHA256SUMS`` lists, hashed and compared."""
    from .datafiles import DataDir, sha256_file
    from .datasets import dataset_spec

    out = []
    for name in sorted(set(datasets)):
        spec = dataset_spec(name)
        if not spec.uses_data_dir:
            out.append(Check(f"data {name}", "skipped", "built in, no files"))
            continue
        root = DataDir.resolve(data_dir).path or Path(".")
        folder = next(
            (f for f in (root / (spec.shared_copy or name), root / name, root) if f.is_dir()
             and (f / "SHA256SUMS").is_file()),
            None,
        )  # fmt: skip
        if folder is None:
            out.append(Check(f"data {name}", "FAIL", f"no SHA256SUMS for it under {root}"))
            continue
        bad = [n for n, d in _sha256sums(folder).items() if sha256_file(folder / n) != d]
        detail = f"{folder}: " + (f"mismatch: {', '.join(bad)}" if bad else "every file matches")
        out.append(Check(f"data {name}", "FAIL" if bad else "ok", detail))
    return out


def _small(cfg: RunConfig, num_train: int) -> RunConfig:
    """``cfg`` on a subset of :data:`MEASURED_STEPS` steps, for one epoch (and a warm-up)."""
    budget = min(num_train, math.ceil(MEASURED_STEPS * cfg.batch_size / 0.8) + 1)
    return replace(cfg, budget=max(budget, 2 * cfg.batch_size), max_epochs=2, patience=None)


def measure_stack(
    configs: Sequence[RunConfig], dataset: ImageDataset, teacher: Teacher | None
) -> StackTiming:
    """One warm-up epoch, then one timed epoch of ``configs`` (as one stack) on a small
    subset: seconds per step and per validation image, and the set-up time."""
    from . import engine
    from .stack import build_stack
    from .stepping import runner_for

    t0 = time.perf_counter()
    stack = build_stack([_small(c, len(dataset.x_train)) for c in configs], dataset, teacher)
    setup = time.perf_counter() - t0
    runners: dict = {}
    for _ in range(2):  # the first epoch warms up (kernels, vmap, allocator)
        active = stack.active
        runner = runner_for(stack, active, runners)
        before = stack.train_time
        losses = engine.run_epoch(stack, runner, active)
        t1 = time.perf_counter()
        engine.evaluate_epoch(stack, runner, active, losses)
        eval_s = time.perf_counter() - t1
    step_s = (stack.train_time - before) / stack.steps_per_epoch
    n_val = sum(stack.runs[t.run].y_val.numel() for t in active)
    return StackTiming(step_s, eval_s / max(1, n_val), setup)


def check_no_host_sync(
    configs: Sequence[RunConfig], dataset: ImageDataset, teacher: Teacher | None
) -> Check:
    """On CUDA: one epoch's step loop under ``set_sync_debug_mode("error")``."""
    from . import engine
    from .stack import build_stack
    from .stepping import runner_for

    device = devices.resolve_device(configs[0].device)
    if device.type != "cuda":
        return Check("no host sync per step", "skipped", f"device {device}")
    stack = build_stack([_small(c, len(dataset.x_train)) for c in configs], dataset, teacher)
    active = stack.active
    runner = runner_for(stack, active, {})
    orders = [t.learner.method.epoch_order(t.generator) for t in active]
    lrs = engine.epoch_lrs(stack, active)
    runner.begin_epoch(stack, active)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.step_loop(stack, runner, active, orders, lrs)
    except RuntimeError as e:
        return Check("no host sync per step", "FAIL", str(e).splitlines()[0])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return Check("no host sync per step", "ok", f"{stack.steps_per_epoch} steps")


#: the preflight's fallbacks under reduced precision: (what, precision, BatchNorm fp32)
def _attempts(precision: str) -> list[tuple[str, str, bool]]:
    if precision == "fp32":
        return [("fp32", "fp32", devices.BATCHNORM_FP32)]
    return [
        (f"{precision} as asked", precision, False),
        (f"{precision}, BatchNorm in float32", precision, True),
        ("no autocast (fp32)", "fp32", True),
    ]


def check_methods(
    stacks: Sequence[Sequence[RunConfig]],
    dataset: ImageDataset,
    teachers: Callable[[RunConfig], Teacher | None],
    precision: str,
    log: Log,
) -> Preflight:
    """One epoch of every stack at ``precision`` (a line each), falling back as
    :func:`_attempts` says until every method steps; the precision chosen and every
    stack's timing."""
    for what, prec, bn_fp32 in _attempts(precision):
        devices.BATCHNORM_FP32 = bn_fp32
        result = Preflight(prec)
        for chunk in stacks:
            chunk = [replace(c, precision=prec) for c in chunk]
            key = timing_key(chunk[0], len(chunk) * len(chunk[0].lrs))
            try:
                t = result.timings[key] = measure_stack(chunk, dataset, teachers(chunk[0]))
                check = Check(f"epoch {key}", "ok", f"{1e3 * t.step_s:.1f} ms/step")
            except RuntimeError as e:
                check = Check(f"epoch {key}", "FAIL", str(e).splitlines()[0])
            result.checks.append(check)
            log(check.line())
        if not result.failed or prec == "fp32":
            log(f"preflight: precision: {what}")
            return result
        log(f"preflight: {what}: {len(result.failed)} stacks failed, falling back")
    raise AssertionError("the last attempt returns")  # pragma: no cover


def run_preflight(
    stacks: Sequence[Sequence[RunConfig]],
    dataset: ImageDataset,
    teachers: Callable[[RunConfig], Teacher | None],
    *,
    precision: str,
    device: str | None,
    data_dir: str | None,
    dry_run: bool,
    log: Log,
) -> Preflight:
    """Every check above, logged one line each; ``stacks``: one per planned method."""
    first = [check_keras(), check_cuda(device or stacks[0][0].device, dry_run)]
    for c in first:
        log(c.line())
    if any(c.status == "FAIL" for c in first):
        return Preflight(precision, first)
    data = check_data({c.dataset for s in stacks for c in s}, data_dir)
    for c in data:
        log(c.line())
    result = check_methods(stacks, dataset, teachers, precision, log)
    result.checks[:0] = first + data
    if stacks:
        sync = check_no_host_sync(stacks[0], dataset, teachers(stacks[0][0]))
        log(sync.line())
        result.checks.append(sync)
    return result


def measure_teacher_step(spec: TeacherSpec, dataset: ImageDataset, device: str | None) -> float:
    """Seconds per training step of ``spec``'s teacher (forward, backward, SGD at its
    batch size and precision; two warm-up steps, then three timed)."""
    from .augment import augment
    from .models import create_model

    dev = devices.resolve_device(device)
    model = create_model(spec.arch, dataset.num_classes, dataset.in_channels).to(dev)
    if devices.prefers_channels_last(dev, model):
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs lack memory_format
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=spec.momentum)
    bs = spec.batch_for(len(dataset.y_train))
    x = torch.from_numpy(dataset.x_train[:bs]).to(dev)
    y = torch.from_numpy(dataset.y_train[:bs]).to(dev).long()
    gen = torch.Generator(device=dev).manual_seed(0)
    for i in range(5):
        if i == 2:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
        with devices.autocast(dev, spec.precision):
            logits = model(augment(x, dataset, gen))
        torch.nn.functional.cross_entropy(logits.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return (time.perf_counter() - t0) / 3
