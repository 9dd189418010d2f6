"""Grid runner: expansion, stable ids, atomic resumable results (kill -9 test)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from reference_experiments import grid  # noqa: E402

CONFIG = """
name = "tiny"
paper_dataset = "cifar100"
[defaults]
dataset = "digits"
preset = "fast"
[teachers.cnn]
arch = "digits_cnn"
train_epochs = 3
[teachers.other]
arch = "digits_cnn"
path = "does/not/matter.safetensors"
[[runs]]
pairs = [["cnn", "digits_mlp"], ["other", "digits_mlp"]]
methods = ["ce", "kd", "rkd", "ckd_all"]
budgets = [100, 200, 400]
seeds = [0, 1, 2]
[[runs]]
pairs = [["cnn", "digits_mlp"]]
methods = ["ckd_all"]          # duplicates of block 1: deduplicated by id
budgets = [100]
seeds = [0]
"""

FAKE = """
import time
def run(spec):
    time.sleep({sleep})
    acc = 0.5 + 0.001 * spec["budget"] / 10 + 0.01 * spec["seed"]
    return {{"test_acc": acc, "best_val_acc": acc, "teacher_calls": int(spec["budget"] * 0.8),
             "payload": "x" * {payload}}}
"""


def _write_cfg(tmp_path: Path, text: str = CONFIG) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(text)
    return p


def test_expand_counts_and_stable_ids(tmp_path):
    cfg = grid.load_config(_write_cfg(tmp_path))
    specs = grid.expand(cfg)
    assert len(specs) == 2 * 4 * 3 * 3  # block 2 is a duplicate of block 1
    ids = [s["run_id"] for s in specs]
    assert len(set(ids)) == len(ids)
    assert ids == [s["run_id"] for s in grid.expand(grid.load_config(_write_cfg(tmp_path)))]
    s = specs[0]
    assert s["paper_dataset"] == "cifar100" and s["teacher_arch"] == "digits_cnn"
    assert (s["dataset"], s["method"], s["budget"], s["seed"]) == ("digits", "ce", 100, 0)
    # where it runs does not change the id; what it computes does
    assert grid.run_id({**s, "device": "cuda", "data_dir": "/x"}) == s["run_id"]
    for k, v in [
        ("seed", 9),
        ("budget", 7),
        ("method", "kd"),
        ("preset", "paper"),
        ("lr", 0.1),
        ("teacher_view", "augmented-once"),
    ]:
        assert grid.run_id({**s, k: v}) != s["run_id"], k
    # teacher identity: a retrained teacher (other epochs) gives other ids
    cfg2 = grid.load_config(
        _write_cfg(tmp_path, CONFIG.replace("train_epochs = 3", "train_epochs = 4"))
    )
    ids2 = {x["run_id"] for x in grid.expand(cfg2)}
    assert len(ids2 & set(ids)) == len(ids) // 2  # only the 'other' (path) teacher's runs
    # shards partition the runs
    shards = [grid.select_shard(specs, f"{i}/3") for i in range(3)]
    assert sorted(x["run_id"] for sh in shards for x in sh) == sorted(ids)


def test_bundled_configs_expand():
    for p in sorted((ROOT / "reference_experiments" / "configs").glob("*.toml")):
        specs = grid.expand(grid.load_config(p))
        assert specs and len({s["run_id"] for s in specs}) == len(specs), p.name


def test_config_validation():
    with pytest.raises(ValueError, match="unknown teacher"):
        grid.parse_config(
            {
                "teachers": {},
                "runs": [{"pairs": [["x", "y"]], "methods": ["ce"], "budgets": [1], "seeds": [0]}],
            }
        )


def test_append_row_dedup_and_resume(tmp_path):
    res = tmp_path / "r.jsonl"
    assert grid.append_row(res, {"run_id": "a", "test_acc": 0.1})
    assert not grid.append_row(res, {"run_id": "a", "test_acc": 0.2})
    assert [r["test_acc"] for r in grid.read_results(res)] == [0.1]
    specs = grid.expand(grid.load_config(_write_cfg(tmp_path)))[:5]
    calls = []

    def fn(spec):
        calls.append(spec["run_id"])
        return {"test_acc": 0.5}

    c = grid.run_grid(specs, res, fn, max_runs=2, progress=False)
    assert c["ran"] == 2 and len(calls) == 2
    c = grid.run_grid(specs, res, fn, progress=False)
    assert c["ran"] == 3 and c["skipped"] == 2 and len(set(calls)) == 5
    c = grid.run_grid(specs, res, lambda s: pytest.fail("rerun"), progress=False)
    assert c == {"total": 5, "skipped": 5, "ran": 0, "failed": 0}
    rows = grid.read_results(res)
    assert len(rows) == 6 and all(r.get("method") for r in rows[1:])
    assert not list(tmp_path.glob(".*.tmp"))


def test_keep_going_logs_failures(tmp_path):
    specs = grid.expand(grid.load_config(_write_cfg(tmp_path)))[:3]

    def fn(spec):
        if spec["run_id"] == specs[1]["run_id"]:
            raise RuntimeError("boom")
        return {"test_acc": 0.5}

    res = tmp_path / "r.jsonl"
    with pytest.raises(RuntimeError):
        grid.run_grid(specs, res, fn, progress=False)
    c = grid.run_grid(specs, res, fn, progress=False, keep_going=True)
    assert c["failed"] == 1 and c["ran"] == 1
    assert "boom" in (tmp_path / "r.failed.jsonl").read_text()


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("sleep,payload", [(0.03, 10), (0.0, 20000)])
def test_kill9_mid_grid_then_resume(tmp_path, sleep, payload):
    """SIGKILL the CLI grid mid-run (the second case: mostly inside writes), rerun it:
    every run present exactly once, no partial or duplicated rows."""
    cfg_path = _write_cfg(tmp_path)
    (tmp_path / "slow_fake.py").write_text(FAKE.format(sleep=sleep, payload=payload))
    res = tmp_path / "out" / "results.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    cmd = [
        sys.executable,
        "-m",
        "reference_experiments",
        "grid",
        str(cfg_path),
        "--results",
        str(res),
        "--run-fn",
        "slow_fake:run",
        "--no-progress",
    ]
    expected = {s["run_id"] for s in grid.expand(grid.load_config(cfg_path))}
    kill_after = 5 if sleep else 25
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while len(_lines(res)) < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    first = grid.read_results(res)
    assert 0 < len(first) < len(expected), "kill did not land mid-grid"
    for line in _lines(res):  # nothing partial: every line is a whole row
        json.loads(line)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = grid.read_results(res)
    ids = [r["run_id"] for r in rows]
    assert len(ids) == len(set(ids)) == len(expected) and set(ids) == expected
    assert [r["run_id"] for r in rows[: len(first)]] == [r["run_id"] for r in first]
    assert not list(res.parent.glob(".*.tmp"))


def test_stacked_batches(tmp_path):
    specs = grid.expand(grid.load_config(_write_cfg(tmp_path)))
    sizes = []

    class Runner:
        def __call__(self, spec):
            raise AssertionError("stack > 1 must use run_batch")

        def batch_key(self, spec):
            return (spec["teacher"], spec["method"], spec["budget"])

        def run_batch(self, chunk):
            assert len({self.batch_key(s) for s in chunk}) == 1
            sizes.append(len(chunk))
            return [{"test_acc": 0.5, "seed_seen": s["seed"]} for s in chunk]

    res = tmp_path / "r.jsonl"
    c = grid.run_grid(specs, res, Runner(), stack=2, progress=False)
    assert c["ran"] == len(specs) and max(sizes) == 2 and sum(sizes) == len(specs)
    rows = grid.read_results(res)
    assert sorted(r["run_id"] for r in rows) == sorted(s["run_id"] for s in specs)
    assert all(r["seed_seen"] == r["seed"] for r in rows)  # rows matched to their specs
