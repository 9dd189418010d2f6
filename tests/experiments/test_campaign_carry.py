"""What a window carries in (by plan, under the 64 MiB limit) and what it brought back."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from reference_experiments import carry
from reference_experiments.rows import read_rows

FOLDERS = (".gpu_wheels", ".gpu_data", ".gpu_teachers", ".gpu_rows")


def _repo(tmp: Path, ignored: bool = True) -> Path:
    root = tmp / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    (root / "code.py").write_text("print(1)\n")
    if ignored:
        (root / ".gitignore").write_text("".join(f"/{f}/\n" for f in FOLDERS))
    (root / ".gpu_wheels").mkdir()
    for name in carry.WHEELS:
        (root / ".gpu_wheels" / f"{name}-1.0-py3-none-any.whl").write_bytes(b"w")
    return root


def _shared(tmp: Path) -> Path:
    data = tmp / "shared" / "cifar10-jpeg"
    data.mkdir(parents=True)
    (data / "cifar10-jpeg.tar.xz").write_bytes(b"x" * 1000)
    (data / "unlisted.txt").write_text("not carried")
    digest = hashlib.sha256(b"x" * 1000).hexdigest()
    (data / "SHA256SUMS").write_text(f"{digest}  cifar10-jpeg.tar.xz\n")
    return tmp / "shared"


def _window(tmp: Path, name: str, rows: list[dict]) -> Path:
    out = tmp / name
    for key, dataset in (("wrn_40_2_aa", "cifar10-jpeg"), ("wrn_40_2_cars_bb", "cars64")):
        (out / key).mkdir(parents=True)
        meta = {"ckd_teacher": json.dumps({"dataset": dataset})}
        (out / key / "t.safetensors").write_bytes(save({"w": torch.ones(2)}, metadata=meta))
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_prepare_carries_the_plan_s_data_teachers_and_rows(tmp_path):
    root, shared = _repo(tmp_path), _shared(tmp_path)
    window = _window(tmp_path, "out1", [{"run_id": "a", "grid": "table1"}])
    got = carry.prepare("cifar", [window], root=root, shared=shared)
    assert got == list(FOLDERS)
    assert sorted(p.name for p in (root / ".gpu_data" / "cifar10-jpeg").iterdir()) == [
        "SHA256SUMS",
        "cifar10-jpeg.tar.xz",
    ]
    assert [p.name for p in (root / ".gpu_teachers").iterdir()] == ["wrn_40_2_aa"]
    assert read_rows(root / ".gpu_rows" / "0.jsonl") == [{"run_id": "a", "grid": "table1"}]


def test_prepare_refuses_over_the_limit_or_unignored_folders(tmp_path, monkeypatch):
    shared = _shared(tmp_path)
    monkeypatch.setattr(carry, "CARRY_LIMIT", 500)
    with pytest.raises(ValueError, match="MiB to carry"):
        carry.prepare("cifar", [], root=_repo(tmp_path), shared=shared)
    monkeypatch.setattr(carry, "CARRY_LIMIT", 64 * 2**20)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ValueError, match="does not ignore"):
        carry.prepare("cifar", [], root=_repo(other, ignored=False), shared=shared)


def test_commit_splits_rows_by_grid_without_repeats(tmp_path):
    root = _repo(tmp_path)
    rows = [{"run_id": "a", "grid": "table1"}, {"run_id": "b", "grid": "table2"}]
    first = _window(tmp_path, "out1", rows)
    second = _window(tmp_path, "out2", rows[:1] + [{"run_id": "c", "grid": "table1"}])
    assert carry.commit([first, second], root=root) == {"table1": 2, "table2": 1}
    results = root / "reference_experiments" / "results"
    assert [r["run_id"] for r in read_rows(results / "table1" / "results.jsonl")] == ["a", "c"]
    assert (root / "reference_experiments" / "teachers" / "wrn_40_2_aa" / "t.safetensors").is_file()
