"""``torchrun --nproc_per_node=2`` smoke runs of the reference experiments (CPU, gloo).

One teacher trained data-parallel (``train-teacher``), then one student run
(``student``, CKD all-pairs with the global-batch loss, an uneven 17/16
split of a batch of 33): both exit 0, rank 0 alone writes (one JSONL row,
one teacher), and the teacher is queried once for the whole job
(``teacher_calls`` = the training split <= budget). The loss and gradient
equalities under DDP are checked in ``tests/test_distributed.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("runs in the torch session (KERAS_BACKEND=torch)", allow_module_level=True)
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]


def _torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "KERAS_BACKEND": "torch",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",  # gloo on CPU even where a GPU exists
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TORCHELASTIC_ERROR_FILE": str(tmp_path / "torchelastic_error.json"),
    }
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "reference_experiments",
        *args,
    ]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


def test_torchrun_teacher_and_student(tmp_path: Path) -> None:
    teachers = tmp_path / "teachers"
    _torchrun(
        [
            "train-teacher",
            "--arch=digits_cnn",
            "--dataset=digits",
            "--epochs=1",
            f"--out={teachers}",
            "--batch-size=64",
            "--no-progress",
            "--device=cpu",
        ],
        tmp_path,
    )
    weights = sorted(teachers.glob("*.safetensors"))
    assert len(weights) == 1, weights
    meta = json.loads(weights[0].with_suffix(".json").read_text())
    assert meta["world_size"] == 2 and 0.0 <= meta["test_accuracy"] <= 1.0

    results = tmp_path / "results.jsonl"
    budget = 150
    out = _torchrun(
        [
            "student",
            "--dataset=digits",
            f"--teacher={weights[0]}",
            "--student-arch=digits_mlp",
            "--method=ckd_all",
            f"--budget={budget}",
            "--preset=fast",
            "--max-epochs=2",
            "--batch-size=33",  # shards of 17 and 16
            "--device=cpu",
            "--threads=1",
            f"--results={results}",
        ],
        tmp_path,
    )
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    assert len(rows) == 1, rows  # rank 0 only
    printed = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1, out.stdout  # rank 0 prints, rank 1 stays silent
    row = rows[0]
    assert row["world_size"] == 2
    assert row["method"] == "ckd_all" and row["budget"] == budget
    # counted once for the job: the 80% training split, not world_size times
    assert row["teacher_calls"] == row["new_teacher_calls"] == row["n_train"] <= budget
    assert row["n_train"] + row["n_val"] == budget
    assert row["epochs"] == 2 and row["steps"] == 2 * -(-row["n_train"] // 33)
    assert 0.0 <= row["test_acc"] <= 1.0
