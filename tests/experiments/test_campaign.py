"""The campaign on a tiny digits plan, through the GPU code path on the CPU: the order,
the time guard, keep-going, the returned files and teachers, resume after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reference_experiments import campaign, campaign_window, engine, grid
from reference_experiments.config import RunConfig
from reference_experiments.preflight import StackTiming
from reference_experiments.rows import read_rows

ROOT = Path(__file__).resolve().parents[2]

TINY = {
    "name": "tiny",
    "defaults": {"dataset": "digits", "preset": "fast", "max_epochs": 1, "device": "cpu"},
    "teachers": {"cnn": {"arch": "digits_cnn", "train_epochs": 1}},
    "runs": [
        {
            "pairs": [["cnn", "digits_mlp"]],
            "methods": ["ce", "kd"],
            "budgets": [60, 90],
            "seeds": [0, 1],
        }
    ],
}
PLAN = (campaign.Step("tiny", {}, by="budget"),)
TOTAL = len(grid.expand(grid.parse_config(TINY)))


def _run(out: Path, minutes: float = 10.0, **kw) -> tuple[dict[str, int], list[str]]:
    lines: list[str] = []
    kw = {"plan": PLAN, "load": lambda name: TINY, "committed": out.parent / "none", **kw}
    counts = campaign.run_campaign(minutes, out, stack=4, log=lines.append, **kw)
    return counts, lines


# --------------------------------------------------------------------------- order
def test_spread_covers_the_range_first():
    assert campaign.spread([2000, 2500, 3000, 3500, 4000]) == [2000, 4000, 3000, 2500, 3500]
    assert campaign.spread([5, 1]) == [1, 5]


def test_the_first_step_is_every_table1_method_of_the_wrn_pair_per_budget():
    cfg = grid.load_config(grid.resolve_config("table1"))
    step = campaign.PLAN[0]
    parts = step.parts(step.runs(cfg))
    budgets = [p[0].budget for p in parts]
    assert budgets == campaign.spread(budgets)  # smallest, largest, then the middles
    first = grid.stacks(parts[0], 32)
    assert {r.student_arch for c in first for r in c} == {"wrn_16_2"}
    assert {c[0].method for c in first} >= {"ce", "kd", "rkd", "dist", "mixup", "crd", "ckd_pn2"}
    assert all(sorted(r.seed for r in c) == [0, 1, 2, 3, 4] for c in first)  # 5 seeds stacked


# --------------------------------------------------------------------------- guard
def test_guard_predicts_from_steps_and_step_time():
    fast = RunConfig(dataset="digits", preset="fast", max_epochs=3, budget=200, batch_size=10)
    paper = RunConfig(dataset="digits", preset="paper", budget=200, batch_size=10, patience=4)
    assert campaign.Guard.min_epochs(fast) == 3
    assert campaign.Guard.min_epochs(paper) == 1 + 3 * 4  # the plateau protocol's shortest
    assert campaign.Guard.min_epochs(RunConfig(preset="paper", max_epochs=5)) == 5
    timing = StackTiming(step_s=0.5, eval_s_per_image=0.01, setup_s=2.0)
    now = [100.0]
    guard = campaign.Guard(deadline=200.0, clock=lambda: now[0])
    # 160 training images / 10 = 16 steps; 40 validation images x 2 runs x 1 lr
    epoch = 16 * 0.5 + 40 * 2 * 0.01
    need = guard.stack_seconds([fast, fast], timing)
    assert need == pytest.approx(campaign.SAFETY * (2.0 + (3 + 1) * epoch))
    assert guard.fits(need) and guard.left() == 100.0
    now[0] = 200.0 - need + 1.0
    assert not guard.fits(need)


def test_nothing_starts_without_time(tmp_path):
    counts, lines = _run(tmp_path / "out", minutes=0.0)
    assert counts == {}
    assert not (tmp_path / "out" / "rows.jsonl").exists()
    assert any("not started" in line for line in lines)


# --------------------------------------------------------------------------- a window
def test_a_window_then_the_next_reuses_its_teacher(tmp_path, monkeypatch):
    monkeypatch.setattr(campaign_window, "SHARD_BYTES", 160_000)  # the digits teacher in shards
    out = tmp_path / "out"
    counts, lines = _run(out)
    assert counts == {"tiny": TOTAL}
    rows = read_rows(out / "rows.jsonl")
    assert len(rows) == TOTAL and all(r["grid"] == "tiny" for r in rows)
    assert sum(line.startswith("epoch ") for line in lines) >= 4  # a line per epoch
    # what comes back: at most 8 files, none deeper than one folder below $OUT
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert len(files) <= campaign_window.MAX_FILES
    assert all(len(p.parts) <= 2 for p in files)
    shards = [p for p in files if "-of-" in p.name]
    assert len(shards) >= 2 and any(p.suffix == ".json" for p in files)
    assert all((out / p).stat().st_size < campaign_window.MAX_FILE_BYTES for p in files)
    # carried in as the next window's teachers: loaded from there, not trained again
    carried = tmp_path / "carried"
    (carried / shards[0].parent).mkdir(parents=True)
    for p in files:
        if p.parent == shards[0].parent:
            (carried / p).write_bytes((out / p).read_bytes())
    from reference_experiments.teacher import load_teacher
    from reference_experiments.teacher_files import find_teacher

    found = [find_teacher(d) for d in (carried / shards[0].parent, out / shards[0].parent)]
    assert None not in found
    (model, meta), (ref, _) = (load_teacher(p) for p in found)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model(x), ref(x)) and meta["arch"] == "digits_cnn"
    (out / "rows.jsonl").unlink()
    for p in out.rglob("*.safetensors"):
        p.unlink()
    _, again = _run(out, teachers_in=[carried], work=tmp_path / "work2")
    assert not any("training teacher" in line for line in again)
    assert len(read_rows(out / "rows.jsonl")) == TOTAL


def test_keep_going_after_an_injected_failure(tmp_path, monkeypatch):
    real = engine.train

    def failing(configs, **kw):
        if configs[0].method == "kd" and configs[0].budget == 60:
            raise RuntimeError("injected")
        return real(configs, **kw)

    monkeypatch.setattr(engine, "train", failing)
    out = tmp_path / "out"
    counts, lines = _run(out, preflight=False)
    failures = read_rows(out / "failures.jsonl")
    assert {(f["method"], f["budget"]) for f in failures} == {("kd", 60)}
    assert "injected" in failures[0]["error"] and any("FAILED" in line for line in lines)
    assert counts == {"tiny": TOTAL - 2}  # every other stack ran after it
    with pytest.raises(RuntimeError, match="injected"):
        _run(tmp_path / "stop", preflight=False, keep_going=False)


def test_the_deadline_keeps_capped_plateau_rows_and_nothing_of_a_fixed_schedule(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(engine, "_next_epoch_fits", lambda stack, deadline: stack.epoch < 1)
    ce = {"methods": ["ce"], "budgets": [60], "seeds": [0, 1]}  # no teacher needed
    fast = {**TINY, "defaults": {**TINY["defaults"], "max_epochs": 2}}
    fast["runs"] = [{**TINY["runs"][0], **ce}]
    counts, lines = _run(tmp_path / "fast", load=lambda name: fast, preflight=False)
    assert counts == {} and not (tmp_path / "fast" / "failures.jsonl").exists()
    assert any(line.endswith("nothing kept") for line in lines)
    paper = {**fast, "defaults": {**fast["defaults"], "preset": "paper", "patience": 2}}
    paper["defaults"].pop("max_epochs")
    counts, _ = _run(tmp_path / "paper", load=lambda name: paper, preflight=False)
    rows = read_rows(tmp_path / "paper" / "rows.jsonl")
    assert counts == {"tiny": 2} and len(rows) == 2
    assert all(r["max_epochs"] == 1 and r["epoch_cap"] == 1 and r["epochs"] == 1 for r in rows)
    uncapped = {r.run_id() for r in grid.expand(grid.parse_config(paper))}
    assert not uncapped & {r["run_id"] for r in rows}  # the full runs stay pending


def test_a_step_whose_data_is_missing_is_logged_and_the_next_runs(tmp_path):
    missing = {**TINY, "name": "missing", "defaults": {**TINY["defaults"], "dataset": "cars64"}}
    plan = (campaign.Step("missing"), campaign.Step("tiny"))
    configs = {"missing": missing, "tiny": TINY}
    counts, lines = _run(
        tmp_path / "out", plan=plan, load=configs.__getitem__, data_dir=str(tmp_path / "none"),
        preflight=False,
    )  # fmt: skip
    assert counts == {"tiny": TOTAL}
    assert any(line.startswith("campaign: missing {} FAILED") for line in lines)


def test_a_teacher_returned_in_one_step_serves_the_next_from_the_work_folder(tmp_path):
    """Loading a one-file teacher rebuilds its JSON beside it: never in ``$OUT``."""
    out = tmp_path / "out"
    plan = (campaign.Step("tiny", {"budget": (60,)}), campaign.Step("tiny", {"budget": (90,)}))
    counts, lines = _run(out, plan=plan, preflight=False)
    assert counts == {"tiny": TOTAL}
    assert sum("training teacher" in line for line in lines) == 1
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert sorted(p.suffix for p in files if len(p.parts) == 2) == [".safetensors"]


def test_the_file_budget_holds_back_teachers_that_do_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(campaign_window, "MAX_FILES", 3)  # the log, rows and failures only
    out = tmp_path / "out"
    counts, lines = _run(out, preflight=False)
    assert counts == {"tiny": TOTAL}  # trained and used, just not returned
    assert not list(out.rglob("*.safetensors"))
    assert any("not returned" in line for line in lines)


#: a teacher of 12 epochs and one student run (kd needs the teacher)
KILLED = {
    **TINY,
    "teachers": {"cnn": {"arch": "digits_cnn", "train_epochs": 12}},
    "runs": [{**TINY["runs"][0], "methods": ["kd"], "budgets": [60], "seeds": [0]}],
}
SCRIPT = """
import sys, pathlib
from reference_experiments import campaign
from tests.experiments.test_campaign import KILLED, PLAN
campaign.run_campaign(10.0, sys.argv[1], plan=PLAN, load=lambda n: KILLED, stack=4,
                      committed=pathlib.Path(sys.argv[2]), work=sys.argv[3], preflight=False)
"""


def test_a_kill_mid_teacher_resumes_there(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    paths = os.pathsep.join(str(ROOT / p) for p in ("src", "adapters", ""))
    env = {**os.environ, "PYTHONPATH": paths, "KERAS_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", SCRIPT, str(out), str(tmp_path / "none"), str(work)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if list(work.rglob("*.resume.json")):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(work.rglob("*.resume.safetensors")), "the kill did not land mid-teacher"
    lines: list[str] = []
    counts = campaign.run_campaign(
        10.0, out, plan=PLAN, load=lambda n: KILLED, stack=4, committed=tmp_path / "none",
        work=work, preflight=False, log=lines.append,
    )  # fmt: skip
    first_epoch = next(line for line in lines if line.startswith("teacher "))
    assert "epoch 1/12" not in first_epoch, "the teacher started over"
    assert counts == {"tiny": 1} and len(read_rows(out / "rows.jsonl")) == 1
    assert not list(work.rglob("*.resume.safetensors"))


def test_gpu_command_dry_run(tmp_path):
    plan = tmp_path / "plan.toml"
    config = tmp_path / "tiny.toml"
    config.write_text(
        'name = "tiny"\n[defaults]\ndataset = "digits"\npreset = "fast"\nmax_epochs = 1\n'
        'device = "cpu"\n[teachers.cnn]\narch = "digits_cnn"\ntrain_epochs = 1\n'
        '[[runs]]\npairs = [["cnn", "digits_mlp"]]\nmethods = ["ce", "kd"]\n'
        "budgets = [60]\nseeds = [0, 1]\n"
    )
    plan.write_text(f'[[steps]]\nconfig = "{config}"\nby = "budget"\n')
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "gpu"), "PLAN": str(plan)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    script = ROOT / "reference_experiments" / "gpu" / "campaign.sh"
    done = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    log = (tmp_path / "gpu" / "log").read_text()
    for check in ("keras: ok", "cuda: skipped", "data digits", "epoch digits/digits_cnn"):
        assert check in log, log
    assert "4 runs to run" in log
    assert not (tmp_path / "gpu" / "rows.jsonl").exists()
