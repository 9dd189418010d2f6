"""The campaign on a tiny digits plan, through the GPU code path on the CPU:
deadline, skip of committed rows, resume after a SIGKILL, the GPU command's dry run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from reference_experiments import campaign, grid
from reference_experiments.rows import read_rows

ROOT = Path(__file__).resolve().parents[2]

TINY = {
    "name": "tiny",
    "defaults": {"dataset": "digits", "preset": "fast", "max_epochs": 2, "device": "cpu"},
    "teachers": {"cnn": {"arch": "digits_cnn", "train_epochs": 1}},
    "runs": [
        {
            "pairs": [["cnn", "digits_mlp"]],
            "methods": ["ce", "kd", "ckd_all"],
            "budgets": [60, 90],
            "seeds": [0, 1],
        }
    ],
}
PLAN = (campaign.Step("tiny", {"seed": (0,)}), campaign.Step("tiny", {}))


def _run(out: Path, minutes: float, committed: Path) -> dict[str, int]:
    return campaign.run_campaign(
        minutes, out, plan=PLAN, load=lambda name: TINY, committed=committed, stack=4
    )


def test_deadline_then_resume_completes_without_repeats(tmp_path: Path) -> None:
    out, committed = tmp_path / "out", tmp_path / "committed"
    assert _run(out, 0.0, committed) == {}  # no time: nothing starts
    first = _run(out, 0.002, committed)  # one stack fits the guess-free start, then stop
    rows = read_rows(out / "tiny" / "results.jsonl")
    total = len(grid.expand(grid.parse_config(TINY)))
    assert 0 < len(rows) < total and first["tiny"] == len(rows)
    _run(out, 10.0, committed)
    assert list((out / "teachers").rglob("*.safetensors")), "the teacher is kept in --out"
    rows = read_rows(out / "tiny" / "results.jsonl")
    ids = [r["run_id"] for r in rows]
    assert len(ids) == len(set(ids)) == total
    assert all(r["grid"] == "tiny" and r["test_acc"] >= 0 for r in rows)


def test_committed_rows_are_skipped(tmp_path: Path) -> None:
    out, committed = tmp_path / "out", tmp_path / "committed"
    _run(committed, 10.0, tmp_path / "nothing")  # a previous window, now "committed"
    (committed / "teachers").rename(tmp_path / "teachers_kept")
    assert _run(out, 10.0, committed) == {}
    assert not (out / "tiny" / "results.jsonl").exists()


SCRIPT = """
import sys
from reference_experiments import campaign
from tests.experiments.test_campaign import PLAN, TINY
campaign.run_campaign(10.0, sys.argv[1], plan=PLAN, load=lambda n: TINY,
                      committed=__import__("pathlib").Path(sys.argv[2]), stack=1)
"""


def test_sigkill_mid_campaign_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KERAS_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", SCRIPT, str(out), str(tmp_path / "committed")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    results = out / "tiny" / "results.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if results.exists() and len(read_rows(results)) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cut = len(read_rows(results))
    total = len(grid.expand(grid.parse_config(TINY)))
    assert 0 < cut < total, "the kill did not land mid-campaign"
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    ids = [r["run_id"] for r in read_rows(results)]
    assert len(ids) == len(set(ids)) == total


def test_gpu_command_dry_run(tmp_path: Path) -> None:
    script = ROOT / "reference_experiments" / "gpu" / "campaign.sh"
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), "PATH": os.environ["PATH"]}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    log = (tmp_path / "log").read_text()
    assert "table1" in log and "to run" in log
