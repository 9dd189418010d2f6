"""The engine at a plateau (official protocol): the best checkpoint is reloaded
(parameters and BatchNorm buffers), the lr is multiplied by 0.1, and the SGD momentum
is kept as it was (neither reset nor reloaded).

``engine.train`` runs a digits student with one step per epoch; its validation
accuracies are scripted, and a recording runner snapshots every trial's state and lr
around each step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("runs in the torch session (KERAS_BACKEND=torch)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from reference_experiments import engine, stepping  # noqa: E402
from reference_experiments.config import RunConfig  # noqa: E402
from reference_experiments.data import load_dataset  # noqa: E402

torch.set_num_threads(1)

LR = 0.05
#: epoch 1 best; 2 plateau -> phase 1; 3 best; 4 plateau -> phase 2; 5 plateau -> done
VALS = [0.5, 0.4, 0.6, 0.3, 0.2]


class Recording(stepping.TrialByTrial):
    """Trial-by-trial steps, recording the state and lr before and after each."""

    def __init__(self) -> None:
        self.before: list[dict] = []
        self.after: list[dict] = []
        self.lrs: list[float] = []

    @staticmethod
    def snapshot(trial) -> dict:
        state = {**trial.params(), **trial.buffers()}
        momentum = {k: v.clone() for k, v in trial.momentum.items()}
        return {"state": {k: v.clone() for k, v in state.items()}, "momentum": momentum}

    def step(self, stack, trials, draws, lrs):
        [trial] = trials
        self.before.append(self.snapshot(trial))
        self.lrs.append(float(lrs[0]))
        loss = super().step(stack, trials, draws, lrs)
        self.after.append(self.snapshot(trial))
        return loss


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_phase_change_reloads_best_decays_lr_keeps_momentum(monkeypatch):
    digits = load_dataset("digits")
    cfg = RunConfig(
        dataset="digits",
        student_arch="digits_cnn",  # BatchNorm buffers are reloaded too
        method="ce",
        budget=50,  # 40 training images: one step of 64 per epoch
        preset="paper",
        patience=1,
        lr=LR,
        device="cpu",
    )
    recorder = Recording()
    scripted = iter(VALS)
    monkeypatch.setattr(engine, "runner_for", lambda stack, trials, cache: recorder)
    monkeypatch.setattr(
        engine, "evaluate_epoch", lambda stack, runner, active, losses: [next(scripted)]
    )
    [(_, row)] = engine.train([cfg], dataset=digits)
    before, after = recorder.before, recorder.after
    assert len(before) == len(VALS) and row.epochs == len(VALS)
    assert recorder.lrs == pytest.approx([LR, LR, 0.1 * LR, 0.1 * LR, 0.01 * LR], rel=1e-6)
    for first_of_phase, best, plateau in ((2, 0, 1), (4, 2, 3)):  # step indices
        # the state the step starts from is the best epoch's (the end of step `best`) ...
        assert equal(before[first_of_phase]["state"], after[best]["state"])
        assert not equal(after[plateau]["state"], after[best]["state"])
        # ... and the momentum the plateau epoch left, not reset or reloaded
        kept = after[plateau]["momentum"]
        assert equal(before[first_of_phase]["momentum"], kept)
        assert not equal(kept, after[best]["momentum"])
        assert all(float(v.abs().max()) > 0 for v in kept.values())
    assert any(k.endswith("running_mean") for k in before[0]["state"])
    assert row.best_epoch == 3 and row.phases_reached == 3 and row.lr_used == LR
