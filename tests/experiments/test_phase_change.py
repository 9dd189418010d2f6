"""The engine at a plateau (official protocol): the best checkpoint is reloaded
(parameters and BatchNorm buffers), the lr is multiplied by 0.1, and the SGD momentum
is kept as it was (neither reset nor reloaded).

``engine.train`` runs a digits student's three-lr sweep with one step per epoch, trial
by trial (the CPU's runner) and vmapped (CUDA's); the validation accuracies are
scripted, and a recording runner snapshots every trial's state and lr around each step.
"""

from __future__ import annotations

import pytest
import torch

from reference_experiments import engine, stepping
from reference_experiments.config import RunConfig
from reference_experiments.data import load_dataset

torch.set_num_threads(1)

LRS = (0.1, 0.05, 0.025)  # the paper preset's sweep: three trials, stepped together
#: epoch 1 best; 2 plateau -> phase 1; 3 best; 4 plateau -> phase 2; 5 plateau -> done
VALS = [0.5, 0.4, 0.6, 0.3, 0.2]
FACTORS = [1.0, 1.0, 0.1, 0.1, 0.01]


def recording(runner: type[stepping.TrialByTrial]):
    """``runner`` recording every trial's state (parameters and buffers), momentum and lr
    before and after each step."""

    class Recording(runner):  # type: ignore[valid-type,misc]
        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.before: list[list[dict]] = []
            self.after: list[list[dict]] = []
            self.lrs: list[list[float]] = []

        def snapshot(self, trials) -> list[dict]:
            if isinstance(self, stepping.Vmapped):  # the stacked copy is the live one
                sources = [
                    ({**self.params, **self.buffers}, self.momentum, r) for r in range(len(trials))
                ]
                return [
                    {
                        "state": {k: v[r].clone() for k, v in state.items()},
                        "momentum": {k: v[r].clone() for k, v in momentum.items()},
                    }
                    for state, momentum, r in sources
                ]
            return [
                {
                    "state": {k: v.clone() for k, v in {**t.params(), **t.buffers()}.items()},
                    "momentum": {k: v.clone() for k, v in t.momentum.items()},
                }
                for t in trials
            ]

        def step(self, stack, trials, draws, lrs):
            self.before.append(self.snapshot(trials))
            self.lrs.append(lrs.tolist())
            loss = super().step(stack, trials, draws, lrs)
            self.after.append(self.snapshot(trials))
            return loss

    return Recording


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("runner", [stepping.TrialByTrial, stepping.Vmapped])
def test_phase_change_reloads_best_decays_lr_keeps_momentum(monkeypatch, runner):
    digits = load_dataset("digits")
    cfg = RunConfig(
        dataset="digits",
        student_arch="digits_cnn",  # BatchNorm buffers are reloaded too
        method="ce",
        budget=50,  # 40 training images: one step of 64 per epoch
        preset="paper",
        patience=1,
        device="cpu",
    )
    recorder_cls = recording(runner)
    runners: dict = {}

    def runner_for(stack, trials, cache):
        if "recorder" not in runners:
            runners["recorder"] = (
                recorder_cls(stack) if runner is stepping.Vmapped else recorder_cls()
            )
        return runners["recorder"]

    scripted = iter(VALS)
    monkeypatch.setattr(engine, "runner_for", runner_for)
    monkeypatch.setattr(
        engine,
        "evaluate_epoch",
        lambda stack, runner, active, losses: [next(scripted)] * len(active),
    )
    results = engine.train([cfg], dataset=digits)
    recorder = runners["recorder"]
    before, after = recorder.before, recorder.after
    assert len(before) == len(VALS) and all(len(b) == len(LRS) for b in before)
    for lrs, factor in zip(recorder.lrs, FACTORS, strict=True):
        assert lrs == pytest.approx([lr * factor for lr in LRS], rel=1e-6)
    for r in range(len(LRS)):
        for first_of_phase, best, plateau in ((2, 0, 1), (4, 2, 3)):  # step indices
            # the step starts from the best epoch's state (the end of step `best`) ...
            assert equal(before[first_of_phase][r]["state"], after[best][r]["state"])
            assert not equal(after[plateau][r]["state"], after[best][r]["state"])
            # ... with the momentum the plateau epoch left, neither reset nor reloaded
            kept = after[plateau][r]["momentum"]
            assert equal(before[first_of_phase][r]["momentum"], kept)
            assert not equal(kept, after[best][r]["momentum"])
            assert all(float(v.abs().max()) > 0 for v in kept.values())
    assert any(k.endswith("running_mean") for k in before[0][0]["state"])
    [(_, row)] = results
    assert row.epochs == len(VALS) and row.best_epoch == 3 and row.phases_reached == 3
