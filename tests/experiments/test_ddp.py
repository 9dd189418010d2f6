"""``torchrun --nproc_per_node=2`` smoke run of teacher training (CPU, gloo).

One teacher trained data-parallel (``train-teacher``, an uneven 33/32 split of a
global batch of 65): it exits 0, rank 0 alone prints and writes (one teacher file
with its metadata, ``world_size`` 2), and the file loads with its sha256 checked.
Students no longer run under torchrun (they stack runs on one device instead). The
loss and gradient equalities under DDP are checked in ``tests/test_distributed.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)


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
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


@pytest.mark.slow
def test_torchrun_teacher(tmp_path: Path) -> None:
    teachers = tmp_path / "teachers"
    out = _torchrun(
        [
            "train-teacher",
            "--arch=digits_cnn",
            "--dataset=digits",
            "--epochs=1",
            f"--out={teachers}",
            "--batch-size=65",  # shards of 33 and 32
            "--no-progress",
            "--device=cpu",
        ],
        tmp_path,
    )
    weights = sorted(teachers.glob("*.safetensors"))
    assert len(weights) == 1, weights
    assert sorted(p.name for p in teachers.iterdir()) == [
        weights[0].with_suffix(".json").name,
        weights[0].name,
    ]  # no temporary files left
    printed = [line for line in out.stdout.splitlines() if "test_accuracy=" in line]
    assert len(printed) == 1, out.stdout  # rank 0 prints, rank 1 stays silent
    meta = json.loads(weights[0].with_suffix(".json").read_text())
    assert meta["world_size"] == 2 and meta["batch_size"] == 65
    assert 0.0 <= meta["test_accuracy"] <= 1.0

    from reference_experiments.teacher import load_teacher

    model, meta2 = load_teacher(weights[0])
    assert meta2 == meta and not model.training
