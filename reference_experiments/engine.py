"""The training engine: one loop for every student run, alone or stacked.

:func:`train` trains a *stack* of runs -- configs that agree on
:meth:`RunConfig.stack_key` (they may differ in seed and lr) -- and a single
run is a stack of one. Each run's candidate lrs are *trials*
(:class:`stack.Trial`: learner, momentum, generator, schedule, best
checkpoint). The phases, each a function of the stack:

1. :func:`stack.build_stack` -- trials, data on the device, teacher caches;
2. per epoch, :func:`run_epoch` -- per trial, the method draws the step
   (:meth:`Method.epoch_order`, :meth:`Method.sample`) and the crops
   (:func:`augment.draw_crops`) from the trial's generator, seeded by the run's
   seed alone (a trial draws the same numbers alone or stacked; the lrs of one
   seed share init and data order); the runner (:mod:`.stepping`: trial by trial
   on the CPU, vmapped on CUDA) takes one SGD step (momentum 0.9, weight decay
   5e-4) per trial at its own lr (:class:`protocol.Schedule`);
3. :func:`evaluate_epoch` -- every trial on its validation split; a trial whose
   epoch loss, a parameter or a validation output is not finite is *diverged*:
   it leaves the stack and its lr is not selectable;
4. :func:`apply_events` -- the protocol (:mod:`.protocol`): new best ->
   checkpoint; plateau -> reload the best checkpoint, lr x 0.1, momentum kept;
   done -> the trial leaves the stack;
5. :func:`rows` -- each run's row reports the trial with the best validation
   accuracy (:func:`protocol.best_on_validation`), its test accuracy and its
   representation spectrum (:mod:`.spectrum`).

The only host syncs are once per epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from .augment import draw_crops
from .config import RunConfig
from .data import ImageDataset
from .devices import compute_precision
from .protocol import Event, best_on_validation
from .rows import ResultRow
from .spectrum import flat_dims, within_class_spectrum
from .stack import Learner, Stack, Teacher, Trial, build_stack, to_device
from .stepping import Draw, TrialByTrial, runner_for

__all__ = ["Learner", "OutOfTime", "train"]


class OutOfTime(RuntimeError):
    """The deadline came before a stack could keep anything (see :func:`train`)."""


def train(
    configs: Sequence[RunConfig],
    *,
    dataset: ImageDataset | None = None,
    teacher: Teacher | None = None,
    log: Callable[[str], None] | None = None,
    deadline: float | None = None,
) -> list[tuple[RunConfig, ResultRow]]:
    """Trains ``configs`` (one stack) and returns ``(config, row)`` per config, in order.

    ``dataset``/``teacher`` (``(model, metadata)``) may be given to skip loading
    them; ``log`` receives one line per epoch. ``deadline`` (a ``time.monotonic()``
    value): no epoch starts that would end after it (judged by the epochs so far);
    a stack of the plateau protocol cut after E epochs returns the rows of its configs
    capped at E epochs (``max_epochs=E``: their own run ids, ``epoch_cap`` E, the same
    numbers as such a capped run), any other stack raises :class:`OutOfTime`.
    """
    stack = build_stack(configs, dataset, teacher)
    runners: dict[str, TrialByTrial] = {}
    while active := stack.active:
        if deadline is not None and not _next_epoch_fits(stack, deadline):
            _cut(stack)
            break
        runner = runner_for(stack, active, runners)
        losses = run_epoch(stack, runner, active)
        vals = evaluate_epoch(stack, runner, active, losses)
        apply_events(stack, active, vals)
        if log is not None:
            log(epoch_line(stack, active, vals))
    return rows(stack, runner_for(stack, stack.trials, runners))


def _next_epoch_fits(stack: Stack, deadline: float) -> bool:
    """Whether one more epoch (and the test evaluation) ends before ``deadline``."""
    if stack.epoch == 0:
        return time.monotonic() < deadline
    epoch_s = (time.perf_counter() - stack.started) / stack.epoch
    return time.monotonic() + 2 * epoch_s <= deadline


def _cut(stack: Stack) -> None:
    """Ends the stack after its epochs so far: every config capped there."""
    if stack.epoch == 0 or stack.preset.schedule != "plateau":
        raise OutOfTime(
            f"deadline reached after {stack.epoch} epochs of a {stack.preset.name} stack"
        )
    stack.configs = [replace(c, max_epochs=stack.epoch) for c in stack.configs]
    for t in stack.active:
        t.schedule.max_epochs, t.schedule.done = stack.epoch, True


def _draw(stack: Stack, trial: Trial, order: torch.Tensor) -> Draw:
    batch = trial.learner.method.sample(trial.generator, order)
    x = stack.runs[trial.run].x_train
    crops = draw_crops(
        batch["idx"].shape[0], (x.shape[1], x.shape[2]), stack.dataset, trial.generator
    )
    return Draw(batch, crops)


def epoch_lrs(stack: Stack, active: list[Trial]) -> torch.Tensor:
    """``(steps, R)``: every step's lr of the epoch ahead per active trial, in one copy
    to the device (the schedule changes phase only between epochs)."""
    factors = [
        [t.schedule.lr_factor(stack.step_no + s) for t in active]
        for s in range(stack.steps_per_epoch)
    ]
    lr_base = torch.tensor([t.lr for t in active], device=stack.device)
    return lr_base * torch.tensor(factors, device=stack.device).view(-1, len(active))


def run_epoch(stack: Stack, runner: TrialByTrial, active: list[Trial]) -> torch.Tensor:
    """One epoch of steps for every active trial; their mean losses ``(R,)``."""
    device = stack.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    stack.epoch += 1
    orders = [t.learner.method.epoch_order(t.generator) for t in active]
    lrs = epoch_lrs(stack, active)
    runner.begin_epoch(stack, active)
    loss_sum = step_loop(stack, runner, active, orders, lrs)
    runner.end_epoch(stack, active)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stack.train_time += time.perf_counter() - t0
    return loss_sum / stack.steps_per_epoch


def step_loop(
    stack: Stack,
    runner: TrialByTrial,
    active: list[Trial],
    orders: Sequence[torch.Tensor],
    lrs: torch.Tensor,
) -> torch.Tensor:
    """The epoch's steps (nothing in it waits for the device); the summed losses ``(R,)``."""
    loss_sum = torch.zeros(len(active), device=stack.device)
    for s in range(stack.steps_per_epoch):
        draws = [_draw(stack, t, orders[a][s]) for a, t in enumerate(active)]
        loss_sum += runner.step(stack, active, draws, lrs[s])
        stack.step_no += 1
    stack.images += stack.steps_per_epoch * draws[0].batch["idx"].shape[0] * len(active)
    return loss_sum


def evaluate_epoch(
    stack: Stack, runner: TrialByTrial, active: list[Trial], losses: torch.Tensor
) -> list[float]:
    """Validation accuracy per active trial; NaN for a trial that diverged (its
    epoch loss, a parameter or a validation output is not finite)."""
    runs = [stack.runs[t.run] for t in active]
    outputs = runner.predict(stack, active, [r.x_val for r in runs])
    acc = torch.stack(
        [
            (lg.argmax(-1) == r.y_val).float().mean()
            for (lg, _), r in zip(outputs, runs, strict=True)
        ]
    )
    finite = torch.stack(
        [
            torch.isfinite(lg).all()
            & torch.stack([p.isfinite().all() for p in t.params().values()]).all()
            for (lg, _), t in zip(outputs, active, strict=True)
        ]
    )
    finite &= torch.isfinite(losses)
    return torch.where(finite, acc, torch.nan).tolist()


def apply_events(stack: Stack, active: list[Trial], vals: list[float]) -> None:
    """The protocol per trial: checkpoint a new best, reload it on a plateau, leave when
    done or diverged."""
    for t, val in zip(active, vals, strict=True):
        if not math.isfinite(val):
            t.diverged = True
            t.schedule.done, t.schedule.epoch = True, stack.epoch
            continue
        event = t.schedule.update(val)
        if t.schedule.best_epoch == t.schedule.epoch:
            t.save_best()
        if event is Event.NEXT_PHASE:
            t.load_best()


def epoch_line(stack: Stack, active: list[Trial], vals: list[float]) -> str:
    """The log line of an epoch: per trial, its lr now and its validation accuracy."""
    cap = max(t.schedule.max_epochs for t in active)
    elapsed = time.perf_counter() - stack.started
    eta = elapsed / stack.epoch * (cap - stack.epoch)
    parts = []
    for t, val in zip(active, vals, strict=True):
        cfg = stack.configs[t.run]
        now = t.lr * t.schedule.lr_factor(stack.step_no)
        parts.append(f"{cfg.method} s{cfg.seed} lr {t.lr:g} (now {now:.3g}) val {val:.3f}")
    head = f"epoch {stack.epoch}/{cap} ({elapsed:.0f} s, at most {eta:.0f} s left)"
    return f"{head}: {', '.join(parts)}"


def rows(stack: Stack, runner: TrialByTrial) -> list[tuple[RunConfig, ResultRow]]:
    """Every trial's best checkpoint on the test split, then one row per config."""
    for t in stack.trials:
        t.load_best()
    x_test = to_device(stack.device, stack.dataset.x_test)
    y_test = to_device(stack.device, stack.dataset.y_test).long()
    outputs = runner.predict(stack, stack.trials, [x_test] * len(stack.trials))
    test = [((lg.argmax(-1) == y_test).float().mean(), f) for lg, f in outputs]
    return [(cfg, _row(stack, i, test, y_test)) for i, cfg in enumerate(stack.configs)]


def _row(stack: Stack, i: int, test: list, y_test: torch.Tensor) -> ResultRow:
    """Config ``i``'s row: its trial with the best validation accuracy."""
    cfg, run = stack.configs[i], stack.runs[i]
    mine = [j for j, t in enumerate(stack.trials) if t.run == i]
    trials = stack.trials
    chosen = best_on_validation(
        [j for j in mine if not trials[j].diverged], lambda j: trials[j].schedule.best_val
    )
    spec: list[float] = []
    dims = None
    if chosen is not None and bool(torch.isfinite(test[chosen][1]).all()):
        sv = within_class_spectrum(test[chosen][1], y_test)
        spec, dims = [round(v, 6) for v in sv[:64].tolist()], flat_dims(sv)
    sched = trials[chosen if chosen is not None else mine[0]].schedule
    n_trials, train_time = len(trials), max(stack.train_time, 1e-9)
    return ResultRow(
        run_id=cfg.run_id(),
        teacher_calls=run.calls,
        new_teacher_calls=run.new_calls,
        lr_used=trials[chosen if chosen is not None else mine[0]].lr,
        lrs_tried=[trials[q].lr for q in mine],
        best_val_by_lr=[
            math.nan if trials[q].diverged else trials[q].schedule.best_val for q in mine
        ],
        lrs_diverged=[trials[q].lr for q in mine if trials[q].diverged],
        best_val_acc=sched.best_val if chosen is not None else math.nan,
        test_acc=float(test[chosen][0]) if chosen is not None else math.nan,
        best_epoch=sched.best_epoch,
        epochs=sched.epoch,
        epoch_cap=cfg.epoch_cap,
        phases_reached=sched.phase + 1,
        steps=sched.epoch * stack.steps_per_epoch,
        total_steps=sum(trials[q].schedule.epoch for q in mine) * stack.steps_per_epoch,
        n_train=run.y_train.numel(),
        n_val=run.y_val.numel(),
        train_images_per_s=stack.images / n_trials / train_time,
        stack_images_per_s=stack.images / train_time,
        stacked_runs=n_trials,
        wall_s=round(time.perf_counter() - stack.started, 3),
        ran_on=str(stack.device),
        ran_precision=compute_precision(stack.device, cfg.precision),
        teacher_test_acc=stack.teacher_meta.get("test_accuracy"),
        teacher_recipe=stack.teacher_meta.get("recipe"),
        flat_dims=dims,
        spectrum=spec,
    )
