"""Teacher training: the engine's SGD step, a resumable checkpoint, a deadline.

``train_teacher`` trains a :class:`TeacherSpec` (its recipe's schedule, the preset's
momentum and weight decay through :func:`stack.sgd_step`, forward passes under the
spec's precision on CUDA, channels-last where :func:`devices.prefers_channels_last`
says so, batched on-device augmentation), then saves ``<out_dir>/<name>.json`` plus
its safetensors weights (:mod:`.teacher_files`: one file or < ``max_shard_bytes``
shards, optionally float16). The JSON records the spec's fields (recipe, precision,
schedule, ...), dataset, num_classes, in_channels, split_seed, test_accuracy
(fraction in [0, 1]) and the sha256 of the saved bytes. ``load_teacher`` verifies
every sha256 before loading with safetensors; nothing is ever unpickled.

After every epoch a resume checkpoint ``<name>.resume.safetensors`` is written
atomically; a call that finds it continues from it and ends with bit-identical
weights. With a ``deadline`` a call that cannot finish the next epoch in time keeps
the checkpoint and raises :class:`TeacherNotFinished`.

CLI (``python -m reference_experiments train-teacher``; its options are declared in
``cli_options.add_train_teacher_arguments``, derived from :class:`TeacherSpec`)::

    python -m reference_experiments train-teacher --arch wrn_40_2 --dataset cifar100 \\
        --recipe repdistiller --out teachers/

Under ``torchrun --nproc_per_node=N`` (see ``reference_experiments/distributed.py``)
the model is wrapped in ``DistributedDataParallel``: every rank draws the same
permutation and takes rows ``rank::N`` of each global batch of ``batch_size``
(the hyperparameters keep their single-process meaning); rank 0 evaluates and
saves, and every rank returns the same path. No resume checkpoint is written there
(each rank's augmentation generator differs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .augment import augment
from .config import Preset
from .data import ImageDataset
from .devices import autocast, prefers_channels_last, resolve_device
from .evaluation import evaluate, top1_hits
from .models import create_model
from .stack import sgd_step
from .teacher_files import (
    FORMAT_VERSION,
    load_resume,
    load_teacher,
    remove_resume,
    save_resume,
    save_teacher,
)
from .teacher_spec import TeacherSpec

__all__ = [
    "FORMAT_VERSION",
    "TeacherNotFinished",
    "evaluate",
    "load_teacher",
    "save_teacher",
    "teacher_name",
    "train_teacher",
]


class TeacherNotFinished(RuntimeError):
    """Training stopped before the deadline; the resume checkpoint holds ``epochs_done``
    of ``epochs`` epochs."""

    def __init__(self, epochs_done: int, epochs: int) -> None:
        super().__init__(f"teacher stopped for its deadline after {epochs_done}/{epochs} epochs")
        self.epochs_done = epochs_done
        self.epochs = epochs


def teacher_name(spec: TeacherSpec, dataset: ImageDataset) -> str:
    """File stem of a trained teacher (other recipes than ``fast`` end in the recipe)."""
    split = f"_split{dataset.split_seed}" if dataset.split_seed is not None else ""
    recipe = "" if spec.recipe == "fast" else f"_{spec.recipe}"
    return f"{spec.arch}_{dataset.name}{split}_ep{spec.epochs}_seed{spec.seed}{recipe}"


@dataclass
class _TeacherRun:
    """One teacher's training state: the model (and its DDP wrapper), data on the
    device, generators, momentum and where it stands."""

    model: nn.Module
    net: nn.Module
    x_train: torch.Tensor
    y_train: torch.Tensor
    batch_size: int
    steps_per_epoch: int
    gen: torch.Generator
    perm_gen: torch.Generator
    momentum: dict[str, torch.Tensor]
    preset: Preset
    loss_scale: float
    step: int = 0
    epoch: int = 0
    train_seconds: float = 0.0


def _start(spec: TeacherSpec, dataset: ImageDataset, dev: torch.device) -> _TeacherRun:
    """Model (seeded init), data, generators, DDP wrapper (under torchrun), momentum."""
    from . import distributed as rdist

    world, rank = rdist.world_size(), rdist.rank()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = create_model(spec.arch, dataset.num_classes, dataset.in_channels)
    model.to(dev)
    if prefers_channels_last(dev, model):
        # torch's stubs lack Module.to(memory_format=...), which exists at runtime
        cast(Any, model).to(memory_format=torch.channels_last)
    bs = spec.batch_for(len(dataset.y_train))
    gen = torch.Generator(device=dev).manual_seed(spec.seed)
    perm_gen, net = gen, model
    if world > 1:  # same permutation everywhere, per-rank augmentation
        perm_gen = torch.Generator(device=dev).manual_seed(spec.seed)
        gen.manual_seed(spec.seed + 1_000_003 * rank)
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if bs < world:
        raise ValueError(f"batch_size {bs} < world size {world}")
    return _TeacherRun(
        model,
        net,
        torch.from_numpy(dataset.x_train).to(dev),
        torch.from_numpy(dataset.y_train).to(dev),
        bs,
        spec.steps_per_epoch(len(dataset.y_train)),
        gen,
        perm_gen,
        {k: torch.zeros_like(p) for k, p in model.named_parameters()},
        spec.optimiser,
        # DDP averages per-rank gradients: weigh a shard of n_r of bs rows by n_r * world / bs
        loss_scale=rdist.shard_size(bs) * world / bs,
    )


def _sgd_step(run: _TeacherRun, lr: torch.Tensor) -> None:
    """:func:`stack.sgd_step` on the gradients ``backward`` left (a missing one is 0)."""
    named = list(run.model.named_parameters())
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for _, p in named]
    sgd_step(
        [p.detach() for _, p in named], grads, [run.momentum[k] for k, _ in named], lr, run.preset
    )
    for _, p in named:
        p.grad = None


def _epoch(run: _TeacherRun, spec: TeacherSpec, dataset: ImageDataset) -> tuple[float, float]:
    """One epoch over a fresh seeded permutation (the incomplete last batch dropped);
    ``(mean loss, training accuracy)`` over all ranks' rows."""
    from . import distributed as rdist

    dev, bs, steps = run.x_train.device, run.batch_size, run.steps_per_epoch
    lrs = torch.tensor(  # the epoch's lrs: one copy to the device, none per step
        [spec.lr * spec.lr_factor(run.step + s, steps) for s in range(steps)], device=dev
    )
    perm = torch.randperm(len(run.y_train), device=dev, generator=run.perm_gen)
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    for s in range(steps):
        idx = rdist.shard(perm[s * bs : (s + 1) * bs])
        xb = augment(run.x_train[idx], dataset, run.gen)
        yb = run.y_train[idx]
        with autocast(dev, spec.precision):
            logits = run.net(xb)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=spec.label_smoothing)
        (loss * run.loss_scale if run.loss_scale != 1.0 else loss).backward()
        _sgd_step(run, lrs[s])
        loss_sum += loss.detach()
        correct += top1_hits(logits.detach(), yb)
    run.step += steps
    run.epoch += 1
    world = rdist.world_size()
    if world > 1:  # all ranks' rows (one all-reduce per epoch)
        loss_sum = rdist.sum_over_ranks(loss_sum * run.loss_scale) / world
        correct = rdist.sum_over_ranks(correct)
    return loss_sum.item() / max(1, steps), correct.item() / max(1, steps * bs)


def _identity(spec: TeacherSpec, dataset: ImageDataset, run: _TeacherRun) -> dict[str, Any]:
    """What a resume checkpoint must have been made by: the spec and the data."""
    return {
        **spec.metadata(run.batch_size),
        "data": dataset.name,
        "split_seed": dataset.split_seed,
        "n_train": len(dataset.y_train),
    }


def _save_checkpoint(
    run: _TeacherRun, spec: TeacherSpec, dataset: ImageDataset, out_dir: Path, name: str
) -> None:
    """The resume checkpoint after ``run.epoch`` epochs: weights, momentum, generator."""
    tensors = {f"model.{k}": v for k, v in run.model.state_dict().items()}
    tensors |= {f"momentum.{k}": v for k, v in run.momentum.items()}
    tensors["generator"] = run.gen.get_state()
    state = {
        "identity": _identity(spec, dataset, run),
        "epochs_done": run.epoch,
        "step": run.step,
        "train_seconds": run.train_seconds,
    }
    save_resume(out_dir, name, tensors, state)


@torch.no_grad()
def _resume(
    run: _TeacherRun, spec: TeacherSpec, dataset: ImageDataset, out_dir: Path, name: str
) -> None:
    """Continue ``run`` from ``name``'s resume checkpoint, if there is one."""
    found = load_resume(out_dir, name)
    if found is None:
        return
    tensors, state = found
    if state["identity"] != _identity(spec, dataset, run):
        raise ValueError(
            f"{out_dir}/{name}.resume.safetensors was made by another teacher spec or data "
            "set; delete it to start afresh"
        )
    model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    run.model.load_state_dict(model, strict=True)
    for k, buf in run.momentum.items():
        buf.copy_(tensors[f"momentum.{k}"])
    run.gen.set_state(tensors["generator"])
    run.epoch, run.step = int(state["epochs_done"]), int(state["step"])
    run.train_seconds = float(state["train_seconds"])


def _check_deadline(
    deadline: float | None, epoch_seconds: list[float], run: _TeacherRun, epochs: int
) -> None:
    """Raise :class:`TeacherNotFinished` if the next epoch would end after ``deadline``
    (a ``time.monotonic()`` value) at the mean epoch time of this call (before its first
    epoch: of the resumed epochs' training, if any)."""
    if deadline is None:
        return
    if epoch_seconds:
        mean = sum(epoch_seconds) / len(epoch_seconds)
    else:
        mean = run.train_seconds / run.epoch if run.epoch else 0.0
    if time.monotonic() + mean > deadline:
        raise TeacherNotFinished(run.epoch, epochs)


def train_teacher(
    spec: TeacherSpec,
    dataset: ImageDataset,
    *,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    progress: bool = True,
    deadline: float | None = None,
    log: Callable[[str], None] | None = None,
    save_dtype: torch.dtype = torch.float32,
    max_shard_bytes: int | None = None,
) -> Path:
    """Trains the teacher ``spec`` describes on ``dataset``, saves it (``save_dtype``,
    ``max_shard_bytes``: see :func:`teacher_files.save_teacher`) and returns the path
    :func:`load_teacher` takes.

    One epoch = ``len(x_train) // batch_size`` steps over a fresh seeded permutation;
    the lr follows :meth:`TeacherSpec.lr_factor`; cross-entropy with
    ``label_smoothing``. Data stay as uint8 on ``device``; augmentation is batched
    there. After every epoch the resume checkpoint is written (then ``log`` gets a
    line: epoch, loss, train accuracy, lr, seconds); a call that finds one resumes it,
    bit-identically. ``deadline`` (``time.monotonic()``): before an epoch that would
    end after it, :class:`TeacherNotFinished` is raised (the checkpoint kept). The
    checkpoint is deleted once the teacher is saved.
    """
    from . import distributed as rdist

    spec.validate()
    rdist.init_from_env()
    dev = rdist.device_for(resolve_device(device))  # cuda -> cuda:LOCAL_RANK under torchrun
    out, name = Path(out_dir), teacher_name(spec, dataset)
    run = _start(spec, dataset, dev)
    resumable = rdist.world_size() == 1
    if resumable:
        _resume(run, spec, dataset, out, name)
    bar = None
    if progress and rdist.is_main():
        from tqdm.auto import tqdm

        desc = f"teacher {spec.arch}/{dataset.name}"
        bar = tqdm(total=spec.epochs, initial=run.epoch, desc=desc, unit="epoch")
    epoch_seconds: list[float] = []
    run.model.train()
    while run.epoch < spec.epochs:
        _check_deadline(deadline, epoch_seconds, run, spec.epochs)
        t0 = time.perf_counter()
        loss, train_acc = _epoch(run, spec, dataset)  # ends in a host sync (the loss)
        run.train_seconds += time.perf_counter() - t0
        if resumable:
            _save_checkpoint(run, spec, dataset, out, name)
        epoch_seconds.append(time.perf_counter() - t0)
        lr = spec.lr * spec.lr_factor(run.step - 1, run.steps_per_epoch)
        line = (
            f"teacher {name} epoch {run.epoch}/{spec.epochs} loss {loss:.4f} "
            f"train_acc {train_acc:.4f} lr {lr:.4g} {epoch_seconds[-1]:.1f} s"
        )
        if log is not None and rdist.is_main():
            log(line)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", train_acc=f"{train_acc:.3f}", lr=f"{lr:.4f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    saved = None
    if rdist.is_main():  # rank 0 evaluates and saves
        meta = _metadata(run, spec, dataset)
        saved = save_teacher(
            run.model, out, name, meta, dtype=save_dtype, max_shard_bytes=max_shard_bytes
        )
        remove_resume(out, name)
    return Path(rdist.broadcast_object(str(saved)))  # on one rank, the path as it is


def _metadata(run: _TeacherRun, spec: TeacherSpec, dataset: ImageDataset) -> dict[str, Any]:
    """The trained teacher's JSON: the spec's fields, the data, test accuracy, timing."""
    from . import distributed as rdist

    dev = run.x_train.device
    meta: dict[str, Any] = {
        "format": FORMAT_VERSION,
        **spec.metadata(run.batch_size),
        "precision": spec.precision if dev.type == "cuda" else "fp32",  # the CPU: float32
        "dataset": dataset.name,
        "num_classes": int(dataset.num_classes),
        "in_channels": int(dataset.in_channels),
        "split_seed": dataset.split_seed,
        "test_accuracy": evaluate(run.model, dataset, dev, precision=spec.precision),
        "train_seconds": round(run.train_seconds, 3),
        "train_images_per_s": round(
            spec.epochs * run.steps_per_epoch * run.batch_size / max(run.train_seconds, 1e-9), 1
        ),
        "device": str(dev),
        "torch": torch.__version__,
    }
    if rdist.world_size() > 1:
        meta["world_size"] = rdist.world_size()
    return meta
