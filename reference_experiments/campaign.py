"""The GPU campaign: the paper's grids in the order that fills a comparable table soonest,
one window (one GPU command) at a time, within its time and its returned files.

``reference_experiments/gpu/campaign.sh`` runs one window:
``python -m reference_experiments.campaign --minutes 8 --out $OUT``. In order:

1. the preflight (:mod:`.preflight`): keras, CUDA, data sha256, one epoch of each
   planned method of the first step as a stack at the run's precision (with its
   fallbacks) -- the measured time per step is what the guard predicts from;
2. per :data:`PLAN` step, its teachers first: found where an earlier window brought
   them back (``--teachers-in``), among the committed ones, or trained (the grid's
   recipe, fast by default) when :class:`Guard` predicts they finish in time, saved
   fp16 and in shards under 16 MiB, then copied to ``$OUT/<teacher key>/`` (one
   folder below ``$OUT``);
3. the step's stacks, per budget (spread: smallest, largest, middle, ...), every method
   of the step with its seeds in one stack; a stack starts only when the guard predicts
   its shortest protocol run ends in time, and the engine's ``deadline`` cuts a plateau
   stack at an epoch boundary (its rows are those of the same configs capped there:
   ``max_epochs``, ``epoch_cap``); a failing stack is logged and recorded in
   ``$OUT/failures.jsonl`` and the next one runs (``--stop-on-failure`` to end instead);
   a CUDA out-of-memory stack is retried as two halves. Every epoch logs a line.

What comes back is at most 8 files (:class:`.campaign_window.Window`): the log, one rows
file for every config (``rows.jsonl``; each row names its ``grid``), the failures file
and the teachers' weights; a one-file teacher travels without its JSON (``load_teacher``
rebuilds it from the weights' header), a sharded one with it. Rows already in
``--out``, in ``--rows-in`` or committed are skipped, so each window continues where the
last one stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import grid
from .campaign_window import Teachers, Window
from .config import RunConfig
from .rows import finished_ids

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]  # same API under another name

__all__ = ["PLAN", "PLANS", "Guard", "Step", "load_plan", "main", "run_campaign"]

PACKAGE = Path(__file__).resolve().parent
COMMITTED_RESULTS = PACKAGE / "results"
COMMITTED_TEACHERS = PACKAGE / "teachers"
#: predictions are multiplied by this before they are compared with the time left
SAFETY = 1.25
#: seconds kept free at the end of a window (rows written, the log flushed)
RESERVE_S = 15.0
Log = Callable[[str], None]


def spread(values: Sequence[Any]) -> list[Any]:
    """``values`` (sorted) in the order that covers their range soonest: first, last,
    then the middles of the widest gaps. ``spread([1, 2, 3, 4, 5]) == [1, 5, 3, 2, 4]``."""
    vals = sorted(set(values))
    if len(vals) <= 2:
        return vals
    order, gaps = [0, len(vals) - 1], [(0, len(vals) - 1)]
    while gaps:
        gaps.sort(key=lambda g: g[0] - g[1])  # widest first (stable: leftmost on ties)
        lo, hi = gaps.pop(0)
        if hi - lo < 2:
            continue
        mid = (lo + hi) // 2
        order.append(mid)
        gaps += [(lo, mid), (mid, hi)]
    return [vals[i] for i in order]


@dataclass(frozen=True)
class Step:
    """A grid config, narrowed to runs whose fields take the given values, run one value
    of ``by`` at a time (in :func:`spread` order)."""

    config: str
    only: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    by: str | None = None

    def runs(self, cfg: Mapping[str, Any]) -> list[RunConfig]:
        runs = grid.expand(cfg)
        return [r for r in runs if all(getattr(r, k) in v for k, v in self.only.items())]

    def parts(self, runs: Sequence[RunConfig]) -> list[list[RunConfig]]:
        if self.by is None:
            return [list(runs)] if runs else []
        values = spread([getattr(r, self.by) for r in runs])
        return [[r for r in runs if getattr(r, self.by) == v] for v in values]


#: per budget, every Table 1 method of the WRN pair (5 seeds stacked), then the other
#: pairs, Table 2, Fig. 3 and Fig. 4
PLAN: tuple[Step, ...] = (
    Step("table1", {"student_arch": ("wrn_16_2",)}, by="budget"),
    Step("table1", {}, by="budget"),
    Step("table2", {}, by="budget"),
    Step("fig3_cars", {}, by="budget"),
    Step("fig4_rkd_d", {}, by="budget"),
)


#: the built-in plans: every step, or those of one carried data set (``carry --plan``)
PLANS: dict[str, tuple[Step, ...]] = {"paper": PLAN, "cifar": PLAN[:3], "cars": PLAN[3:]}


def load_plan(name: str) -> tuple[Step, ...]:
    """A built-in plan (:data:`PLANS`) or a TOML file of ``[[steps]]`` (``config``,
    ``only``, ``by``)."""
    if name in PLANS:
        return PLANS[name]
    with open(name, "rb") as f:
        steps = tomllib.load(f).get("steps") or []
    if not steps:
        raise ValueError(f"plan {name}: no [[steps]]")
    return tuple(Step(s["config"], s.get("only", {}), s.get("by")) for s in steps)


@dataclass
class Guard:
    """Predicts a stack's and a teacher's seconds from measured step times; says what
    may start before ``deadline`` (``time.monotonic()``)."""

    deadline: float
    timings: dict[str, Any] = field(default_factory=dict)  # timing key -> StackTiming
    clock: Callable[[], float] = time.monotonic

    def left(self) -> float:
        return self.deadline - self.clock()

    @staticmethod
    def min_epochs(cfg: RunConfig) -> int:
        """The fewest epochs the run's protocol can take: its cap for a fixed schedule;
        for the plateau protocol the first epoch and ``patience`` per phase."""
        preset = cfg.preset_spec
        if preset.schedule != "plateau":
            return cfg.epoch_cap
        patience = preset.patience if cfg.patience is None else cfg.patience
        return min(cfg.epoch_cap, 1 + preset.phases * patience)

    def stack_seconds(self, chunk: Sequence[RunConfig], timing: Any) -> float:
        """Set-up, then the shortest protocol's epochs of steps and validation."""
        cfg = chunk[0]
        n_val = min(max(1, round(0.2 * cfg.budget)), cfg.budget - 1)
        steps = -(-(cfg.budget - n_val) // cfg.batch_size)
        epoch = steps * timing.step_s + n_val * len(chunk) * len(cfg.lrs) * timing.eval_s_per_image
        return SAFETY * (timing.setup_s + (self.min_epochs(cfg) + 1) * epoch)

    def teacher_seconds(self, spec: Any, n_train: int, step_s: float) -> float:
        """Training ``spec`` on ``n_train`` images at ``step_s`` seconds per step."""
        from .teacher_spec import teacher_seconds

        return SAFETY * teacher_seconds(spec, n_train, step_s)

    def fits(self, seconds: float) -> bool:
        return seconds <= self.left()


def _pending(step: Step, cfg: Mapping[str, Any], done: set[str], over: dict) -> list[RunConfig]:
    runs = grid.with_overrides(step.runs(cfg), **over)
    return [r for r in runs if r.run_id() not in done]


class StackTrainer(grid.LastLoaded):
    """Trains a stack with the engine (deadline, per-epoch log); a CUDA out-of-memory
    stack is retried as two halves."""

    def __init__(self, device: str | None, log: Log) -> None:
        super().__init__()
        self.device, self.log = device, log

    def run_teacher(self, run: RunConfig) -> Any:
        """``run``'s teacher, None for a run without one."""
        return self.teacher(run.teacher, run.device) if run.teacher else None

    def __call__(self, chunk: Sequence[RunConfig], deadline: float) -> list[tuple[RunConfig, Any]]:
        import torch

        from . import engine

        try:
            return engine.train(
                chunk,
                dataset=self.dataset(chunk[0]),
                teacher=self.run_teacher(chunk[0]),
                log=self.log,
                deadline=deadline,
            )
        except torch.cuda.OutOfMemoryError:
            if len(chunk) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(chunk) // 2
            self.log(f"campaign: out of memory with {len(chunk)} runs: two stacks of {half}")
            return [*self(chunk[:half], deadline), *self(chunk[half:], deadline)]


@dataclass
class Campaign:
    """One window's state: where things go, the guard, teachers and the stack trainer."""

    window: Window
    guard: Guard
    trainer: StackTrainer
    done: set[str]
    log: Log
    keep_going: bool = True
    counts: dict[str, int] = field(default_factory=dict)

    def timing(self, chunk: Sequence[RunConfig]) -> Any:
        """The chunk's measured timing; measured now (one short epoch) if missing."""
        from .preflight import measure_stack, timing_key

        trials = len(chunk) * len(chunk[0].lrs)
        key = timing_key(chunk[0], trials)
        if key not in self.guard.timings:
            ds, teacher = self.trainer.dataset(chunk[0]), self.trainer.run_teacher(chunk[0])
            self.guard.timings[key] = measure_stack(chunk, ds, teacher)
            self.log(
                f"campaign: measured {key}: {1e3 * self.guard.timings[key].step_s:.1f} ms/step"
            )
        return self.guard.timings[key]

    def run_stack(self, grid_name: str, chunk: Sequence[RunConfig]) -> None:
        """Trains ``chunk`` if its prediction fits; rows to ``rows.jsonl``, a failure to
        ``failures.jsonl`` (raised again without ``keep_going``)."""
        head = f"{grid_name} {chunk[0].method} n={chunk[0].budget} x{len(chunk)}"
        try:
            need = self.guard.stack_seconds(chunk, self.timing(chunk))
            if not self.guard.fits(need):
                self.log(f"campaign: {head} needs ~{need:.0f} s, {self.guard.left():.0f} s "
                         "left: not started")  # fmt: skip
                return
            self.log(f"campaign: {head} (~{need:.0f} s predicted, {self.guard.left():.0f} s left)")
            t0 = time.monotonic()
            outs = self.trainer(chunk, self.guard.deadline)
        except Exception as e:
            from .engine import OutOfTime

            if isinstance(e, OutOfTime):  # a fixed schedule cut: nothing to keep
                self.log(f"campaign: {head}: {e}; nothing kept")
                return
            self.log(f"campaign: {head} FAILED: {e!r}")
            for run in chunk:
                self.window.append(self.window.failures, {
                    "run_id": run.run_id(), **run.as_dict(), "grid": grid_name,
                    "error": repr(e), "traceback": traceback.format_exc(),
                })  # fmt: skip
            if not self.keep_going:
                raise
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for run, row in outs:
            row.grid, row.finished_at = grid_name, stamp
            if run.run_id() not in self.done:
                self.window.append(self.window.rows, row.to_json(run))
                self.done.add(run.run_id())
                self.counts[grid_name] = self.counts.get(grid_name, 0) + 1
        self.log(f"campaign: {head} done in {time.monotonic() - t0:.0f} s")


def _done_ids(window: Window, committed: Path, rows_in: Iterable[Path]) -> set[str]:
    done = finished_ids(window.rows)
    for path in [*committed.glob("*/results.jsonl"), *rows_in]:
        done |= finished_ids(path)
    return done


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _random_teacher(run: RunConfig, dataset: Any) -> Any:
    """A freshly initialised teacher of the run's arch: enough to time a step."""
    if not run.teacher_arch:
        return None
    import torch

    from .models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model(run.teacher_arch, dataset.num_classes, dataset.in_channels)
    return model.eval(), {}


def _first_stacks(step: Step, runs: list[RunConfig], size: int) -> list[list[RunConfig]]:
    """The first stack of every method in the step's first part (the preflight's)."""
    parts = step.parts(runs)
    chunks = grid.stacks(parts[0], size) if parts else []
    firsts: dict[str, list[RunConfig]] = {}
    for chunk in chunks:
        firsts.setdefault(chunk[0].method, chunk)
    return list(firsts.values())


def run_campaign(
    minutes: float,
    out: str | Path,
    *,
    plan: Sequence[Step] = PLAN,
    device: str | None = None,
    data_dir: str | None = None,
    precision: str = "fp32",
    stack: int = 32,
    load: Callable[[str], Mapping[str, Any]] | None = None,
    committed: Path = COMMITTED_RESULTS,
    teachers_in: Sequence[Path] = (),
    rows_in: Sequence[Path] = (),
    work: str | Path | None = None,
    log: Log = _stderr,
    dry_run: bool = False,
    keep_going: bool = True,
    preflight: bool = True,
) -> dict[str, int]:
    """Runs ``plan`` until ``minutes`` are spent (see the module docstring); returns the
    new rows per config. ``dry_run``: the preflight's CPU-checkable parts and each step's
    pending runs, nothing trained. The preflight's BatchNorm choice holds for the call."""
    window = Window(Path(out))
    window.out.mkdir(parents=True, exist_ok=True)
    work = Path(work) if work is not None else window.out.with_name(window.out.name + ".work")
    guard = Guard(time.monotonic() + 60.0 * minutes - RESERVE_S)
    trainer = StackTrainer(device, log)
    camp = Campaign(window, guard, trainer, _done_ids(window, committed, rows_in), log, keep_going)
    configs = {}
    for step in plan:
        raw = dict(
            load(step.config) if load else grid.load_config(grid.resolve_config(step.config))
        )
        configs[step.config] = grid.parse_config(raw)
    over: dict[str, Any] = {"device": device, "data_dir": data_dir, "precision": precision}
    with _batchnorm_choice_kept():
        if preflight and plan:
            checked = _preflight(camp, plan[0], configs[plan[0].config], over, stack, dry_run)
            if checked is None and not dry_run:
                return camp.counts
            over["precision"] = checked or precision
        for step in plan:
            cfg = configs[step.config]
            pending = _pending(step, cfg, camp.done, over)
            log(f"campaign: {step.config} {dict(step.only)}: {len(pending)} runs to run")
            if dry_run or not pending:
                continue
            try:
                _run_step(camp, step, cfg, pending, stack, teachers_in, work)
            except Exception as e:  # its data or a teacher: the next step may still run
                if not keep_going:
                    raise
                log(f"campaign: {step.config} {dict(step.only)} FAILED: {e!r}")
            if guard.left() <= 0:
                break
    log(f"campaign: new rows {camp.counts}; {guard.left():.0f} s left")
    return camp.counts


@contextlib.contextmanager
def _batchnorm_choice_kept() -> Iterator[None]:
    """The preflight's BatchNorm choice (:data:`devices.BATCHNORM_FP32`) undone after."""
    from . import devices

    saved = devices.BATCHNORM_FP32
    try:
        yield
    finally:
        devices.BATCHNORM_FP32 = saved


def _preflight(
    camp: Campaign, step: Step, cfg: Mapping[str, Any], over: dict, size: int, dry_run: bool
) -> str | None:
    """The preflight on the first stack of each method of ``step``; its timings go to the
    guard. Returns the precision to run at, None when keras or CUDA is missing."""
    from . import preflight as pf

    keras = pf.check_keras()
    if keras.status == "FAIL":
        camp.log(keras.line())
        return None
    stacks = _first_stacks(step, _pending(step, cfg, camp.done, over), size)
    if not stacks:
        return over["precision"]
    if dry_run:  # the CPU checks that each method steps: two trials (one lr) suffice
        stacks = [[replace(r, lr=r.lrs[0]) for r in s[:2]] for s in stacks]
    try:
        ds = camp.trainer.dataset(stacks[0][0])
    except (OSError, ValueError) as e:  # missing or corrupt data
        camp.log(pf.Check("data", "FAIL", str(e)).line())
        return None
    checked = pf.run_preflight(
        stacks, ds, lambda run: _random_teacher(run, ds), precision=over["precision"],
        device=over["device"], data_dir=over["data_dir"], dry_run=dry_run, log=camp.log,
    )  # fmt: skip
    camp.guard.timings.update(checked.timings)
    if any(c.name in ("keras", "cuda") for c in checked.failed):
        camp.log("campaign: no keras or no CUDA: nothing trained")
        return None
    return checked.precision


def _run_step(
    camp: Campaign,
    step: Step,
    cfg: Mapping[str, Any],
    pending: list[RunConfig],
    size: int,
    teachers_in: Sequence[Path],
    work: Path,
) -> None:
    """The step's teachers first, then its stacks part by part."""
    from . import methods

    # never loaded from the window's own copies: loading rebuilds a missing JSON there
    dirs = [*teachers_in, COMMITTED_TEACHERS]
    teachers = Teachers(cfg, dirs, work / "teachers", camp.window, camp.trainer.device, camp.log)
    paths: dict[str, Path | None] = {}
    for run in pending:
        if run.teacher_key and methods.get(run.method).uses_teacher:
            if run.teacher_key not in paths:
                ds = camp.trainer.dataset(run)
                paths[run.teacher_key] = teachers.ensure(run, ds, camp.guard)
    for part in step.parts(pending):
        for chunk in grid.stacks(part, size):
            if methods.get(chunk[0].method).uses_teacher and chunk[0].teacher_key in paths:
                path = paths[chunk[0].teacher_key]
                if path is None:
                    continue  # its teacher is not there (logged once)
                chunk = [replace(r, teacher=str(path)) for r in chunk]
            camp.run_stack(cfg["name"], chunk)
            if camp.guard.left() <= 0:
                return


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m reference_experiments.campaign ...`` (what ``gpu/campaign.sh`` runs)."""
    from .cli_options import Parser, add_campaign_arguments

    parser = Parser(prog="python -m reference_experiments.campaign", description=__doc__)
    add_campaign_arguments(parser)
    a = parser.parse_args(argv)
    counts = run_from_arguments(a)
    print(f"campaign: new rows {counts}", file=sys.stderr)
    return 0


def run_from_arguments(a: argparse.Namespace) -> dict[str, int]:
    """:func:`run_campaign` with ``cli_options.add_campaign_arguments``' options."""
    return run_campaign(
        a.minutes,
        a.out,
        plan=load_plan(a.plan),
        device=a.device,
        data_dir=a.data_dir,
        precision=a.precision,
        stack=a.stack,
        teachers_in=[Path(p) for p in a.teachers_in],
        rows_in=[Path(p) for p in a.rows_in],
        work=a.work,
        dry_run=a.dry_run,
        keep_going=not a.stop_on_failure,
        preflight=not a.skip_preflight,
    )


if __name__ == "__main__":
    raise SystemExit(main())
