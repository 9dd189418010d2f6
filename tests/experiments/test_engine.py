"""The v2 training engine (:mod:`reference_experiments.engine`) and its protocol.

* a run trains the same alone or stacked with other runs (float64, bit for bit);
* the lr sweep reports every candidate and keeps the best on validation;
* :class:`protocol.Schedule` on hand-written validation sequences;
* diverging lrs are reported and never chosen;
* every registered method trains one epoch on digits within its teacher budget.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import replace

import pytest
import torch

from reference_experiments import config, devices, engine, methods, stepping
from reference_experiments.config import PRESETS, Preset, RunConfig
from reference_experiments.data import load_dataset
from reference_experiments.models import create_model
from reference_experiments.protocol import Event, Schedule, best_on_validation

torch.set_num_threads(1)

#: row fields that depend only on the run itself (not on the stack or the clock)
RUN_FIELDS = (
    "run_id",
    "teacher_calls",
    "new_teacher_calls",
    "lr_used",
    "lrs_tried",
    "lrs_diverged",
    "best_val_acc",
    "test_acc",
    "best_epoch",
    "epochs",
    "epoch_cap",
    "phases_reached",
    "steps",
    "total_steps",
    "n_train",
    "n_val",
    "flat_dims",
    "spectrum",
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def make_teacher(arch: str = "digits_cnn"):
    """An untrained teacher (in the current default dtype) with features."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = create_model(arch, 10, 1)
    return model.eval(), {}


@pytest.fixture(scope="module")
def teacher():
    return make_teacher()


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def cfg(**kw) -> RunConfig:
    base = dict(
        dataset="digits",
        student_arch="digits_mlp",
        method="kd",
        budget=100,
        preset="fast",
        max_epochs=2,
        device="cpu",
        seed=0,
    )
    base.update(kw)
    return RunConfig(**base)


def run_fields(row) -> dict:
    return {k: getattr(row, k) for k in RUN_FIELDS}


@pytest.fixture
def test_features(monkeypatch):
    """Records the test-set penultimate features of each row's chosen trial
    (the engine hands them to ``within_class_spectrum``), in row order."""
    seen: list[torch.Tensor] = []
    real = engine.within_class_spectrum

    def spy(feats, labels):
        seen.append(feats.detach().clone())
        return real(feats, labels)

    monkeypatch.setattr(engine, "within_class_spectrum", spy)
    return seen


# --------------------------------------------------------------------------- stacking
@pytest.mark.parametrize(
    "method, arch",
    [
        ("kd", "digits_mlp"),  # vmap(grad) path
        ("rkd", "digits_mlp"),  # per-trial autograd.grad path (not vmappable)
        ("ckd_pn3", "digits_cnn"),  # two student passes, BatchNorm buffers under vmap
    ],
)
@pytest.mark.parametrize("vmapped", [False, True], ids=["trial-by-trial", "vmapped"])
def test_stacked_equals_single(float64, digits, test_features, monkeypatch, method, arch, vmapped):
    assert methods.get(method).vmappable == (method != "rkd")
    # the stack steps as on CUDA (one vmapped call) or as on the CPU (trials in turn)
    monkeypatch.setattr(devices, "VMAP_DEVICE_TYPES", ("cpu",) if vmapped else ())
    teacher = make_teacher()  # float64, like the students
    a = cfg(method=method, student_arch=arch, max_epochs=3)
    b = replace(a, seed=1)
    ((ca, alone),) = engine.train([a], dataset=digits, teacher=teacher)
    # A second in the stack: nothing may depend on a trial's position
    stacked = engine.train([b, a], dataset=digits, teacher=teacher)
    assert [c for c, _ in stacked] == [b, a] and ca == a
    (_, row_b), (_, with_b) = stacked
    assert with_b.stacked_runs == 2 and alone.stacked_runs == 1
    assert run_fields(with_b) == run_fields(alone)  # exact: same numbers, same order
    assert math.isfinite(alone.test_acc) and alone.epochs == 3
    # the trained function itself: test features of A's best checkpoint
    f_alone, f_b, f_stacked = test_features
    assert f_alone.shape == f_stacked.shape
    assert torch.allclose(f_alone.double(), f_stacked.double(), rtol=0, atol=1e-10)
    # and the stack did train B as its own run (other seed: other subset and init)
    assert row_b.run_id != alone.run_id
    assert not torch.allclose(f_b.double(), f_alone.double(), rtol=0, atol=1e-3)


def test_cpu_stacks_step_trial_by_trial_and_cuda_stacks_vmapped(digits, teacher, monkeypatch):
    """The measured rule of :mod:`devices`: vmapped stacks lose to trials in turn on the
    CPU; a lone trial or a method functorch refuses never runs vmapped."""
    stack = engine.build_stack([cfg(seed=s) for s in (0, 1)], digits, teacher)
    cache: dict = {}
    assert type(stepping.runner_for(stack, stack.trials, cache)) is stepping.TrialByTrial
    monkeypatch.setattr(devices, "VMAP_DEVICE_TYPES", ("cpu",))
    assert type(stepping.runner_for(stack, stack.trials, cache)) is stepping.Vmapped
    assert type(stepping.runner_for(stack, stack.trials[:1], cache)) is stepping.TrialByTrial
    rkd = engine.build_stack([cfg(method="rkd", seed=s) for s in (0, 1)], digits, teacher)
    assert type(stepping.runner_for(rkd, rkd.trials, {})) is stepping.TrialByTrial


def test_lr_sweep_reports_every_lr_and_keeps_best_validation(digits):
    lines: list[str] = []
    # seed 1, n = 200: the lrs reach different accuracies, and the best is neither the
    # first lr nor unique (0.05 ties 0.025: the first of the ties is kept)
    c = cfg(method="ce", preset="paper", lr=None, budget=200, seed=1, max_epochs=2, patience=1)
    assert c.lrs == PRESETS["paper"].lrs
    ((_, row),) = engine.train([c], dataset=digits, log=lines.append)
    assert row.lrs_tried == list(PRESETS["paper"].lrs)
    assert row.stacked_runs == len(PRESETS["paper"].lrs) and row.lrs_diverged == []
    assert row.teacher_calls == 0
    # per-lr best validation accuracies, as the row reports them
    best = dict(zip(row.lrs_tried, row.best_val_by_lr, strict=True))
    assert lines and all("val" in line for line in lines)
    assert sorted(best) == sorted(PRESETS["paper"].lrs)
    assert len(set(best.values())) > 1, "the sweep cannot tell a wrong choice here"
    expected = best_on_validation(list(PRESETS["paper"].lrs), lambda lr: round(best[lr], 3))
    assert row.lr_used == expected
    assert row.best_val_acc == pytest.approx(best[expected], abs=6e-4)
    assert 1 <= row.epochs <= 2 and 1 <= row.best_epoch <= row.epochs
    assert row.epoch_cap == 2


# --------------------------------------------------------------------------- protocol
def feed(schedule: Schedule, values) -> list[str]:
    return [schedule.update(v).name for v in values]


def test_schedule_strict_improvement_and_patience_counts_evaluations():
    s = Schedule(patience=3, phases=1, max_epochs=100)
    assert feed(s, [0.5, 0.5, 0.6, 0.6, 0.59]) == [
        "IMPROVED",
        "WAIT",  # equal is not an improvement
        "IMPROVED",
        "WAIT",
        "WAIT",
    ]
    assert (s.best_val, s.best_epoch, s.epoch, s.since_best) == (0.6, 3, 5, 2)
    assert not s.done
    assert feed(s, [0.6]) == ["DONE"]  # the third evaluation without improvement
    assert s.done and s.epoch == 6 and s.best_epoch == 3
    # the first evaluation always improves (official best_acc starts at -1), even at 0%
    assert Schedule(patience=3, phases=1, max_epochs=100).update(0.0) is Event.IMPROVED


def test_schedule_phases_decay_lr_and_keep_the_best():
    s = Schedule(patience=2, phases=3, max_epochs=100)
    assert s.lr_factor() == 1.0
    assert feed(s, [0.3, 0.2, 0.2]) == ["IMPROVED", "WAIT", "NEXT_PHASE"]
    assert s.phase == 1 and s.since_best == 0 and s.lr_factor() == pytest.approx(0.1)
    # best_val is not reset: 0.25 < 0.3 is no improvement in the new phase
    assert feed(s, [0.25, 0.29]) == ["WAIT", "NEXT_PHASE"]
    assert s.best_val == 0.3 and s.best_epoch == 1
    assert s.phase == 2 and s.lr_factor() == pytest.approx(0.01)
    assert feed(s, [0.31, 0.31, 0.1]) == ["IMPROVED", "WAIT", "DONE"]  # third plateau
    assert s.done and s.phase == 2 and s.best_val == 0.31 and s.best_epoch == 6
    for phase in range(3):
        s.phase = phase
        assert s.lr_factor(12345) == pytest.approx(0.1**phase, rel=1e-12)


def test_schedule_max_epochs_ends_the_run():
    s = Schedule(patience=50, phases=3, max_epochs=3)
    assert feed(s, [0.1, 0.2, 0.3]) == ["IMPROVED", "IMPROVED", "DONE"]
    assert s.done and s.best_epoch == 3 and s.phase == 0
    fixed = Schedule(patience=None, phases=1, max_epochs=4)
    assert feed(fixed, [0.5, 0.1, 0.1, 0.1]) == ["IMPROVED", "WAIT", "WAIT", "DONE"]


def test_schedule_of_presets_and_cosine_factor():
    paper = Schedule.of(PRESETS["paper"], max_epochs=7, patience=None, steps=5)
    assert (paper.patience, paper.phases, paper.max_epochs, paper.cosine_steps) == (50, 3, 7, 0)
    assert Schedule.of(PRESETS["paper"], 7, 4, 5).patience == 4
    assert paper.lr_factor(0) == paper.lr_factor(10_000) == 1.0
    cos = Schedule.of(PRESETS["fast"], max_epochs=4, patience=None, steps=5)
    assert cos.patience is None and cos.cosine_steps == 20
    assert cos.lr_factor(0) == pytest.approx(1.0)
    assert cos.lr_factor(10) == pytest.approx(0.5)
    assert cos.lr_factor(5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cos.lr_factor(20) == pytest.approx(0.0, abs=1e-15)
    assert cos.lr_factor(25) == pytest.approx(0.0, abs=1e-15)  # clamped past the end


def test_best_on_validation_first_of_ties_and_skips_non_finite():
    vals = {"a": 0.5, "b": math.nan, "c": 0.7, "d": 0.7, "e": math.inf}
    assert best_on_validation(list(vals), vals.get) == "c"
    assert best_on_validation(["b"], vals.get) is None
    assert best_on_validation([], vals.get) is None


# --------------------------------------------------------------------------- divergence
def test_diverging_lr_is_reported_and_never_chosen(digits, monkeypatch):
    # seed 0, n = 200: lr 100 reaches the best validation accuracy of the sweep in
    # epoch 1, then diverges; lr 1e6 diverges in its first epoch
    monkeypatch.setitem(
        config.PRESETS, "diverge", Preset("diverge", "cosine", max_epochs=3, lrs=(0.05, 100.0))
    )
    sweep = cfg(method="ce", preset="diverge", lr=None, budget=200, max_epochs=3)
    alone = replace(sweep, lr=1e6)
    lines: list[str] = []
    (_, row), (_, bad) = engine.train([sweep, alone], dataset=digits, log=lines.append)
    vals: dict[str, list[float]] = {}
    for line in lines:
        for lr, val in re.findall(r"s0 lr ([0-9.e+-]+) \(now [^)]*\) val ([0-9.]+)", line):
            vals.setdefault(str(float(lr)), []).append(float(val))
    assert max(vals["100.0"]) > max(vals["0.05"]), "the diverging lr must look best here"
    assert len(vals["100.0"]) < 3 and len(vals["0.05"]) == 3  # it left the stack
    assert row.lrs_tried == [0.05, 100.0]
    assert row.lrs_diverged == [100.0]
    assert row.lr_used == 0.05
    assert row.best_val_acc == pytest.approx(max(vals["0.05"]), abs=6e-4)
    assert math.isnan(row.best_val_by_lr[1]) and row.best_val_by_lr[0] == row.best_val_acc
    assert math.isfinite(row.test_acc) and not row.diverged and row.epochs == 3
    # the run whose only lr diverges has no accuracy
    assert bad.lrs_tried == [1e6] and bad.lrs_diverged == [1e6]
    assert bad.diverged and math.isnan(bad.test_acc) and math.isnan(bad.best_val_acc)


def test_divergence_in_the_last_epoch_is_detected(digits):
    # n = 100: 2 steps per epoch; the loss of step 2 is still finite, its update is not
    ((_, row),) = engine.train([cfg(method="ce", lr=1e6, max_epochs=1)], dataset=digits)
    assert row.diverged and row.lrs_diverged == [1e6]


# --------------------------------------------------------------------------- every method
@pytest.mark.parametrize("name", methods.names())
def test_every_method_trains_one_epoch(digits, teacher, name):
    cls = methods.get(name)
    arch = "digits_cnn" if cls.whitebox else "digits_mlp"
    c = cfg(method=name, student_arch=arch, budget=100, max_epochs=1)
    ((_, row),) = engine.train([c], dataset=digits, teacher=teacher)
    assert math.isfinite(row.test_acc) and 0.0 <= row.test_acc <= 1.0
    assert row.lrs_diverged == [] and row.epochs == 1
    assert row.n_train == 80 and row.n_val == 20
    assert row.steps == math.ceil(80 / c.batch_size)
    assert row.teacher_calls <= c.budget
    if cls.uses_teacher:
        assert row.teacher_calls == row.new_teacher_calls == row.n_train
    else:
        assert name == "ce"
        assert row.teacher_calls == row.new_teacher_calls == 0


def test_uses_teacher_flags():
    """Only CE runs without the teacher (the budget accounting above relies on it)."""
    assert [n for n in methods.names() if not methods.get(n).uses_teacher] == ["ce"]


# --------------------------------------------------------------------------- host syncs
#: calls that copy between host and device (a sync on CUDA): Python numbers and lists in
#: or out of tensors
HOST_CALLS = {"tensor", "item", "tolist", "__bool__", "__int__", "__float__", "__index__"}


class HostCalls(torch.overrides.TorchFunctionMode):
    """Counts :data:`HOST_CALLS` by the module that made them."""

    def __init__(self) -> None:
        super().__init__()
        self.by_module: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_CALLS:
            module = sys._getframe(1).f_globals.get("__name__", "?")
            self.by_module[module] = self.by_module.get(module, 0) + 1
        return func(*args, **(kwargs or {}))


def _epoch_host_calls(digits, teacher, method: str, budget: int) -> tuple[int, dict[str, int]]:
    stack = engine.build_stack(
        [cfg(method=method, budget=budget, batch_size=8, seed=s) for s in (0, 1)], digits, teacher
    )
    runner = stepping.runner_for(stack, stack.active, {})
    with HostCalls() as calls:
        engine.run_epoch(stack, runner, stack.active)
    return stack.steps_per_epoch, calls.by_module


@pytest.mark.parametrize("method", ["kd", "crd", "rkd"])
def test_an_epoch_copies_between_host_and_device_per_epoch_not_per_step(digits, teacher, method):
    """Twice the steps, the same host<->device copies: none is made per step (on CUDA
    each would wait for the device)."""
    steps_short, short = _epoch_host_calls(digits, teacher, method, budget=60)
    steps_long, long = _epoch_host_calls(digits, teacher, method, budget=120)
    assert steps_long >= 2 * steps_short
    assert long == short


# --------------------------------------------------------------------------- deadline
def test_a_plateau_stack_cut_by_the_deadline_keeps_rows_of_the_capped_runs(
    digits, teacher, monkeypatch
):
    """Cut after 2 epochs: the rows are those of the same configs capped at 2 epochs."""
    runs = [cfg(preset="paper", max_epochs=None, patience=1, seed=s) for s in (0, 1)]
    capped = engine.train([replace(r, max_epochs=2) for r in runs], dataset=digits, teacher=teacher)
    monkeypatch.setattr(engine, "_next_epoch_fits", lambda stack, deadline: stack.epoch < 2)
    cut = engine.train(runs, dataset=digits, teacher=teacher, deadline=0.0)
    assert [c for c, _ in cut] == [c for c, _ in capped]
    assert all(c.max_epochs == 2 and row.epoch_cap == 2 for c, row in cut)
    assert [run_fields(r) for _, r in cut] == [run_fields(r) for _, r in capped]


def test_a_cosine_stack_out_of_time_raises(digits, teacher, monkeypatch):
    monkeypatch.setattr(engine, "_next_epoch_fits", lambda stack, deadline: stack.epoch < 1)
    with pytest.raises(engine.OutOfTime, match="fast"):
        engine.train([cfg(max_epochs=3)], dataset=digits, teacher=teacher, deadline=0.0)
