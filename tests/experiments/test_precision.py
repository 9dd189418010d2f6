"""The run's precision: fp32 by default (the official code), bf16/fp16 on request,
recorded in every row; the stacked (vmapped) path under reduced precision, reached on
the CPU by letting it autocast as CUDA does."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference_experiments import devices, engine, methods
from reference_experiments.config import RunConfig

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
#: Table 1's kinds of step: labels only, logits, pairs (two passes), relations, contrast
STACKED_METHODS = ("ce", "kd", "ckd_pn2", "rkd", "crd")


@pytest.fixture
def cpu_as_cuda(monkeypatch):
    """The CPU steps stacks vmapped and autocasts, as CUDA does."""
    monkeypatch.setattr(devices, "VMAP_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(devices, "AUTOCAST_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(methods.get("crd"), "nce_k", 32)


def two_seeds(method: str, precision: str = "bf16") -> list[RunConfig]:
    base = RunConfig(
        dataset="digits",
        student_arch="digits_cnn",  # convolutions and BatchNorm
        method=method,
        budget=80,
        preset="fast",
        max_epochs=1,
        device="cpu",
        precision=precision,
    )
    return [base, RunConfig(**{**base.as_dict(), "weights": (), "seed": 1})]


def test_the_command_line_knows_the_precisions_without_torch():
    from reference_experiments.cli_options import RUN_CHOICES

    assert RUN_CHOICES["precision"] == tuple(devices.PRECISIONS)


def test_default_precision_is_fp32_and_stays_out_of_the_run_id():
    cfg = RunConfig()
    assert cfg.precision == "fp32"
    assert "precision" not in cfg.identity()  # the ids of rows before the field hold
    bf16 = RunConfig(precision="bf16")
    assert bf16.identity()["precision"] == "bf16" and bf16.run_id() != cfg.run_id()
    assert bf16.stack_key() != cfg.stack_key()
    with pytest.raises(ValueError, match="unknown precision"):
        RunConfig(precision="tf32").validate()


@pytest.mark.parametrize("method", STACKED_METHODS)
def test_stacked_trials_step_under_forced_bf16(digits, teacher, cpu_as_cuda, method):
    rows = engine.train(two_seeds(method), dataset=digits, teacher=teacher)
    assert len(rows) == 2
    for _, row in rows:
        assert row.stacked_runs == 2 and row.epochs == 1
        assert math.isfinite(row.test_acc)
        assert row.ran_precision == "bf16 (BatchNorm fp32)"


def test_stacked_bf16_batchnorm_fails_without_the_float32_inputs(
    digits, teacher, cpu_as_cuda, monkeypatch
):
    """The failure the float32 BatchNorm inputs fix (torch's vmap of batch_norm)."""
    monkeypatch.setattr(devices, "BATCHNORM_FP32", False)
    with pytest.raises(RuntimeError, match="expected scalar type BFloat16 but found Float"):
        engine.train(two_seeds("kd"), dataset=digits, teacher=teacher)


def test_cpu_computes_in_fp32_whatever_the_precision(digits, teacher):
    (_, asked), (_, default) = (
        engine.train(two_seeds("kd", p)[:1], dataset=digits, teacher=teacher)[0]
        for p in ("bf16", "fp32")
    )
    assert asked.ran_precision == default.ran_precision == "fp32"
    assert asked.test_acc == default.test_acc  # same numbers: nothing autocast


def test_student_paper_preset_row_records_fp32(tmp_path):
    """A digits ``student --preset paper`` row records the precision it asked and ran."""
    results = tmp_path / "rows.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "reference_experiments",
        "--threads",
        "1",
        "student",
        "--dataset",
        "digits",
        "--student-arch",
        "digits_mlp",
        "--method",
        "ce",
        "--budget",
        "60",
        "--preset",
        "paper",
        "--max-epochs",
        "1",
        "--device",
        "cpu",
        "--results",
        str(results),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("src", "adapters", "")),
        "KERAS_BACKEND": "torch",
    }
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert row["preset"] == "paper"
    assert row["precision"] == "fp32" and row["ran_precision"] == "fp32"


def test_grid_key_precision_and_axis_precisions():
    from reference_experiments import grid

    raw = {
        "name": "p",
        "defaults": {"dataset": "digits", "preset": "fast", "precision": "bf16"},
        "teachers": {"cnn": {"arch": "digits_cnn", "train_epochs": 1}},
        "runs": [
            {"pairs": [["cnn", "digits_mlp"]], "methods": ["kd"], "budgets": [60]},
            {"pairs": [["cnn", "digits_mlp"]], "methods": ["ce"], "budgets": [60],
             "precisions": ["fp32", "fp16"]},
        ],
    }  # fmt: skip
    runs = grid.expand(grid.parse_config(raw))
    assert [(r.method, r.precision) for r in runs] == [
        ("kd", "bf16"),
        ("ce", "fp32"),
        ("ce", "fp16"),
    ]
    assert len(grid.stacks(runs, 8)) == 3  # precision is part of the stack key
