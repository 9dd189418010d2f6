"""Keras quick start (``reference_experiments.keras_quickstart``), reduced to 1 budget x
1 seed x a few epochs: it writes the table and figure and never exceeds the budget."""

from __future__ import annotations

import json

import keras
import pytest

import ckd_core
from reference_experiments import keras_quickstart as qs


class RecordingBudget(ckd_core.TeacherBudget):
    instances: list[RecordingBudget] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        RecordingBudget.instances.append(self)


def test_keras_quickstart_reduced(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(qs, "BUDGETS", (100,))
    monkeypatch.setattr(qs, "SEEDS", (0,))
    monkeypatch.setattr(qs, "MAX_EPOCHS", 3)
    monkeypatch.setattr(qs, "TEACHER_EPOCHS", 1)
    monkeypatch.setattr(ckd_core, "TeacherBudget", RecordingBudget)
    RecordingBudget.instances = []

    path = qs.main(tmp_path / "qs", backend=keras.backend.backend())

    assert path == tmp_path / "qs" / "report.md"
    report = path.read_text(encoding="utf-8")
    assert "| method | 80 calls (n=100) |" in report
    for label in ("CE only", "KD", "RKD", "CKD (all pairs)"):
        assert f"| {label} | " in report
    assert report in capsys.readouterr().out
    assert (tmp_path / "qs" / "accuracy_vs_calls.png").stat().st_size > 0
    rows = [
        json.loads(line) for line in (tmp_path / "qs" / "results.jsonl").read_text().splitlines()
    ]
    assert [r["method"] for r in rows] == list(qs.METHODS)
    assert all(0 <= r["acc"] <= 1 and 1 <= r["epochs"] <= 3 for r in rows)
    assert [r["calls"] for r in rows] == [0, 80, 80, 80]
    # one budget per (n, seed): 80 training images, each sent to the teacher once
    (budget,) = RecordingBudget.instances
    assert (budget.budget, budget.used, budget.new_calls) == (80, 80, 80)


def test_select_backend_refuses_another_backend():
    other = next(b for b in qs.BACKENDS if b != keras.backend.backend())
    with pytest.raises(ValueError, match="already imported"):
        qs.select_backend(other)
    with pytest.raises(ValueError, match="backend must be one of"):
        qs.select_backend("numpy")
