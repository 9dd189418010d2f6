"""Grid runner: config expansion and validation, stable run ids, shards, stacks,
atomic resumable results (``kill -9`` test), failure logging, the grid CLI."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from reference_experiments import __main__ as cli
from reference_experiments import grid, rows
from reference_experiments.config import RunConfig
from reference_experiments.rows import ResultRow

ROOT = Path(__file__).resolve().parents[2]

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
N_RUNS = 2 * 4 * 3 * 3  # block 2 repeats runs of block 1


def _write_cfg(tmp_path: Path, text: str = CONFIG) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(text)
    return p


def _runs(tmp_path: Path, text: str = CONFIG) -> list[RunConfig]:
    return grid.expand(grid.load_config(_write_cfg(tmp_path, text)))


def fake_row(run: RunConfig, acc: float | None = None, spectrum_len: int = 0) -> ResultRow:
    """A finished run's row as engine.train would return it (accuracy from seed/lr)."""
    if acc is None:
        acc = 0.5 + 0.0001 * run.budget + 0.01 * run.seed + (run.lr or 0.0)
    n_val = round(0.2 * run.budget)
    n_train = run.budget - n_val
    calls = 0 if run.method == "ce" else n_train
    return ResultRow(
        run_id=run.run_id(),
        teacher_calls=calls,
        new_teacher_calls=calls,
        lr_used=run.lrs[0],
        lrs_tried=list(run.lrs),
        best_val_by_lr=[acc] * len(run.lrs),
        lrs_diverged=[] if math.isfinite(acc) else list(run.lrs),
        best_val_acc=acc,
        test_acc=acc,
        best_epoch=1,
        epochs=1,
        epoch_cap=run.epoch_cap,
        phases_reached=1,
        steps=1,
        total_steps=1,
        n_train=n_train,
        n_val=n_val,
        train_images_per_s=1.0,
        stack_images_per_s=1.0,
        stacked_runs=1,
        wall_s=0.0,
        ran_on="cpu",
        spectrum=[0.5] * spectrum_len,
    )


def fake_trainer(calls: list | None = None, fail: set[str] = frozenset(), nan: set[str] = ()):
    """A stand-in for grid.Runner: one row per config, in order."""

    def trainer(chunk):
        if calls is not None:
            calls.append([r.run_id() for r in chunk])
        if any(r.run_id() in fail for r in chunk):
            raise RuntimeError("boom")
        return [(r, fake_row(r, math.nan if r.run_id() in nan else None)) for r in chunk]

    return trainer


# ------------------------------------------------------------------ expansion, ids
def test_expand_counts_and_stable_ids(tmp_path):
    runs = _runs(tmp_path)
    assert len(runs) == N_RUNS and all(isinstance(r, RunConfig) for r in runs)
    ids = [r.run_id() for r in runs]
    assert len(set(ids)) == len(ids)
    assert ids == [r.run_id() for r in _runs(tmp_path)]  # same config, same ids and order
    r = runs[0]
    assert (r.dataset, r.method, r.budget, r.seed, r.preset) == ("digits", "ce", 100, 0, "fast")
    assert (r.teacher_arch, r.student_arch) == ("digits_cnn", "digits_mlp")
    assert r.teacher_key.startswith("cnn@")
    # where it runs does not change the id; what it computes does
    where = replace(r, device="cuda", data_dir="/x", teacher="t.safetensors", eval_batch_size=7)
    assert where.run_id() == r.run_id()
    for k, v in [
        ("seed", 9),
        ("budget", 7),
        ("method", "kd"),
        ("preset", "paper"),
        ("lr", 0.1),
        ("teacher_view", "clean"),
        ("max_epochs", 5),
        ("batch_size", 32),
        ("weights", (("kd", 2.0),)),
        ("teacher_key", "other@00000000"),
    ]:
        assert replace(r, **{k: v}).run_id() != r.run_id(), k
    # a row's config fields give back the same id
    assert RunConfig.from_dict(fake_row(r).to_json(r)).run_id() == r.run_id()


def test_teacher_identity_enters_the_ids(tmp_path):
    ids = {r.run_id() for r in _runs(tmp_path)}
    # a retrained teacher (other epochs) gives other ids; the 'other' (path) teacher's runs
    # keep theirs
    ids2 = {
        r.run_id() for r in _runs(tmp_path, CONFIG.replace("train_epochs = 3", "train_epochs = 4"))
    }
    assert len(ids2 & ids) == len(ids) // 2
    # a trained teacher depends on the dataset it is trained on
    cfg = grid.load_config(_write_cfg(tmp_path))
    assert grid._teacher_key(cfg, "cnn", "digits") != grid._teacher_key(cfg, "cnn", "cars64")
    assert grid._teacher_key(cfg, "other", "digits") == grid._teacher_key(cfg, "other", "cars64")


def test_bundled_configs_expand():
    paths = sorted((ROOT / "reference_experiments" / "configs").glob("*.toml"))
    assert paths
    for p in paths:
        cfg = grid.load_config(p)
        runs = grid.expand(cfg)
        assert runs and len({r.run_id() for r in runs}) == len(runs), p.name
        assert cfg["name"] and cfg["results"], p.name


def test_select_shard_partitions(tmp_path):
    runs = _runs(tmp_path)
    assert grid.select_shard(runs, None) == runs
    shards = [grid.select_shard(runs, f"{i}/3") for i in range(3)]
    assert sorted(r.run_id() for sh in shards for r in sh) == sorted(r.run_id() for r in runs)
    assert all(shards)  # 72 ids over 3 shards: none empty
    # ids, not order, decide: a reversed list gives the same shard
    assert {r.run_id() for r in grid.select_shard(runs[::-1], "1/3")} == {
        r.run_id() for r in shards[1]
    }
    for bad in ("3/3", "-1/3", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="shard"):
            grid.select_shard(runs, bad)


def test_with_overrides(tmp_path):
    runs = _runs(tmp_path)[:4]
    same = grid.with_overrides(runs, device=None, dataset=None)
    assert same == runs
    moved = grid.with_overrides(runs, device="cpu", data_dir="/elsewhere")
    assert [r.run_id() for r in moved] == [r.run_id() for r in runs]
    assert {r.device for r in moved} == {"cpu"}
    capped = grid.with_overrides(runs, max_epochs=2)
    assert all(r.max_epochs == 2 and r.epoch_cap == 2 for r in capped)
    assert not {r.run_id() for r in capped} & {r.run_id() for r in runs}
    with pytest.raises(ValueError, match="unknown preset"):
        grid.with_overrides(runs, preset="nope")


# ------------------------------------------------------------------ validation
BLOCK = {"pairs": [["t", "digits_mlp"]], "methods": ["ce"], "budgets": [100], "seeds": [0]}
TEACHERS = {"t": {"arch": "digits_cnn", "train_epochs": 1}}


@pytest.mark.parametrize(
    "raw,match",
    [
        ({"teachers": TEACHERS}, "no \\[\\[runs\\]\\] block"),
        ({"teachers": TEACHERS, "runs": []}, "no \\[\\[runs\\]\\] block"),
        ({"teachers": {}, "runs": [BLOCK]}, "not \\[known teacher, student_arch\\]"),
        ({"teachers": TEACHERS, "runs": [{**BLOCK, "pairs": [["t"]]}]}, "not \\[known teacher"),
        ({"teachers": TEACHERS, "runs": [{**BLOCK, "method": "kd", "bogus": 1}]}, "bogus"),
        ({"teachers": TEACHERS, "defaults": {"budgtes": [1]}, "runs": [BLOCK]}, "\\[defaults\\]"),
        ({"teachers": TEACHERS, "runs": [{k: v for k, v in BLOCK.items() if k != "pairs"}]},
         "has no pairs"),
        ({"teachers": {"t": {"arch": "digits_cnn"}}, "runs": [BLOCK]}, "needs 'arch'"),
        ({"teachers": {"t": {"path": "x"}}, "runs": [BLOCK]}, "needs 'arch'"),
        ({"teachers": TEACHERS, "runs": [{**BLOCK, "teacher": "x.safetensors"}]}, "teacher"),
    ],
)  # fmt: skip
def test_config_validation(raw, match):
    with pytest.raises(ValueError, match=match):
        grid.parse_config(raw)


@pytest.mark.parametrize(
    "block,match",
    [
        ({"methods": ["nope"]}, "unknown method 'nope'; choose from .*ckd_all"),
        ({"datasets": ["nope"]}, "unknown dataset 'nope'; choose from .*digits"),
        ({"pairs": [["t", "nope"]]}, "unknown student_arch 'nope'"),
        ({"presets": ["slow"]}, "unknown preset 'slow'; choose from paper, fast"),
        ({"teacher_views": ["x"]}, "unknown teacher_view"),
        ({"budgets": [1]}, "budget must be >= 2"),
        ({"lrs": [0.0]}, "lr must be > 0"),
        ({"max_epochs": 0}, "max_epochs must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_expand_validates_values(block, match):
    cfg = grid.parse_config({"teachers": TEACHERS, "runs": [{**BLOCK, **block}]})
    with pytest.raises(ValueError, match=match):
        grid.expand(cfg)


def test_parse_config_defaults_and_axes():
    cfg = grid.parse_config(
        {
            "name": "g",
            "teachers": TEACHERS,
            "defaults": {"preset": "fast", "method": "kd", "lr": 0.1},
            "runs": [{**BLOCK, "methods": ["ce", "kd"], "lrs": [0.1, 0.05], "seeds": [0, 1]}],
        }
    )
    assert cfg["results"] == "runs/g/results.jsonl" and cfg["teachers_dir"] == "runs/teachers"
    runs = grid.expand(cfg)
    assert len(runs) == 2 * 2 * 2  # the plural axes override the scalar defaults
    assert {(r.method, r.lr, r.seed) for r in runs} == {
        (m, lr, s) for m in ("ce", "kd") for lr in (0.1, 0.05) for s in (0, 1)
    }
    assert {r.preset for r in runs} == {"fast"}


# ------------------------------------------------------------------ rows
def test_append_row_dedup(tmp_path):
    res = tmp_path / "r.jsonl"
    assert rows.append_row(res, {"run_id": "a", "test_acc": 0.1})
    assert not rows.append_row(res, {"run_id": "a", "test_acc": 0.2})
    assert rows.append_row(res, {"run_id": "b", "test_acc": 0.3})
    assert [r["test_acc"] for r in rows.read_rows(res)] == [0.1, 0.3]
    assert rows.finished_ids(res) == {"a", "b"}
    # a file whose last line lost its newline, and a malformed line, are tolerated
    res.write_bytes(res.read_bytes() + b'{"run_id": "c"')
    assert rows.finished_ids(res) == {"a", "b"}
    assert rows.append_row(res, {"run_id": "d", "test_acc": 0.4})
    assert rows.finished_ids(res) == {"a", "b", "d"}
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob("*.tmp"))
    assert rows.read_rows(tmp_path / "missing.jsonl") == []


def test_atomic_write_bytes(tmp_path):
    p = tmp_path / "sub" / "f.bin"
    rows.atomic_write_bytes(p, b"one")
    rows.atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert sorted(x.name for x in p.parent.iterdir()) == ["f.bin"]


def test_result_row_json_round_trip(tmp_path):
    run = _runs(tmp_path)[5]
    row = fake_row(run)
    obj = json.loads(json.dumps(row.to_json(run)))
    config, back = ResultRow.split(obj)
    assert back == row and RunConfig.from_dict(config) == run
    assert not row.diverged and fake_row(run, math.nan).diverged


# ------------------------------------------------------------------ run_grid
def test_run_grid_resume(tmp_path):
    runs = _runs(tmp_path)[:5]
    res = tmp_path / "out" / "r.jsonl"
    calls: list = []
    c = grid.run_grid(runs, res, fake_trainer(calls), max_runs=2, progress=False)
    assert c == {"total": 5, "skipped": 3, "ran": 2, "failed": 0} and len(calls) == 2
    c = grid.run_grid(runs, res, fake_trainer(calls), progress=False, grid_name="tiny",
                      paper_dataset="cifar100")  # fmt: skip
    assert c == {"total": 5, "skipped": 2, "ran": 3, "failed": 0}
    assert sorted(i for chunk in calls for i in chunk) == sorted(r.run_id() for r in runs)

    def must_not_run(chunk):
        pytest.fail("finished runs must be skipped")

    c = grid.run_grid(runs, res, must_not_run, progress=False)
    assert c == {"total": 5, "skipped": 5, "ran": 0, "failed": 0}
    c = grid.run_grid(runs, res, must_not_run, max_runs=0, progress=False)
    assert c["ran"] == 0
    got = rows.read_rows(res)
    assert [r["run_id"] for r in got] == [r.run_id() for r in runs]  # config order
    for r, run in zip(got, runs, strict=True):
        # the stored config gives back the run; "ran_on" is where it ran
        assert RunConfig.from_dict(r) == run and r["finished_at"]
        assert r["run_id"] == run.run_id() and r["ran_on"] == "cpu"
        assert r["test_acc"] == fake_row(run).test_acc
    assert [r["grid"] for r in got] == [None, None, "tiny", "tiny", "tiny"]
    assert got[-1]["paper_dataset"] == "cifar100"
    assert not list(res.parent.glob(".*.tmp"))
    with pytest.raises(ValueError, match="max_runs"):
        grid.run_grid(runs, res, must_not_run, max_runs=-1, progress=False)


def test_keep_going_logs_failures(tmp_path):
    runs = _runs(tmp_path)[:3]
    trainer = fake_trainer(fail={runs[1].run_id()})
    res = tmp_path / "r.jsonl"
    failed = tmp_path / "r.failed.jsonl"
    with pytest.raises(RuntimeError, match="boom"):
        grid.run_grid(runs, res, trainer, progress=False)
    assert rows.finished_ids(res) == {runs[0].run_id()} and not failed.exists()
    c = grid.run_grid(runs, res, trainer, progress=False, keep_going=True)
    assert c == {"total": 3, "skipped": 1, "ran": 1, "failed": 1}
    assert rows.finished_ids(res) == {runs[0].run_id(), runs[2].run_id()}
    [f] = rows.read_rows(failed)
    assert f["run_id"] == runs[1].run_id() and f["method"] == runs[1].method
    assert "boom" in f["error"] and "RuntimeError" in f["traceback"]


def test_keep_going_fails_the_whole_stack(tmp_path):
    runs = [r for r in _runs(tmp_path) if r.method == "kd"][:3]  # seeds 0..2: one stack
    assert len({r.stack_key() for r in runs}) == 1
    res = tmp_path / "r.jsonl"
    c = grid.run_grid(runs, res, fake_trainer(fail={runs[0].run_id()}), stack=3,
                      keep_going=True, progress=False)  # fmt: skip
    assert c == {"total": 3, "skipped": 0, "ran": 0, "failed": 3}
    assert not res.exists() or not rows.read_rows(res)
    assert rows.finished_ids(tmp_path / "r.failed.jsonl") == {r.run_id() for r in runs}


def test_diverged_rows_go_to_the_failed_file(tmp_path):
    runs = _runs(tmp_path)[:4]
    nan = {runs[1].run_id(), runs[2].run_id()}
    res = tmp_path / "r.jsonl"
    c = grid.run_grid(runs, res, fake_trainer(nan=nan), progress=False)
    assert c == {"total": 4, "skipped": 0, "ran": 2, "failed": 2}
    assert rows.finished_ids(res) == {runs[0].run_id(), runs[3].run_id()}
    bad = rows.read_rows(tmp_path / "r.failed.jsonl")
    assert {r["run_id"] for r in bad} == nan
    assert all(r["error"] == "every lr diverged" and r["lrs_diverged"] for r in bad)
    assert all(not math.isfinite(r["test_acc"]) for r in bad)
    # diverged runs are not finished: a rerun tries them again
    calls: list = []
    c = grid.run_grid(runs, res, fake_trainer(calls), progress=False)
    assert c["ran"] == 2 and sorted(i for ch in calls for i in ch) == sorted(nan)


# ------------------------------------------------------------------ stacks
def test_stacks_group_by_stack_key(tmp_path):
    text = CONFIG.replace("seeds = [0, 1, 2]", "seeds = [0, 1, 2]\nlrs = [0.1, 0.05]")
    runs = _runs(tmp_path, text)
    assert len(runs) == N_RUNS * 2 + 1  # block 2 (lr None) is no longer a duplicate
    chunks = grid.stacks(runs, 4)
    assert sorted(r.run_id() for ch in chunks for r in ch) == sorted(r.run_id() for r in runs)
    assert all(len({r.stack_key() for r in ch}) == 1 for ch in chunks)
    # each (pair, method, budget) has 6 seed x lr runs: chunks of 4 and 2; block 2's run
    # (lr None) joins the stack of ckd_all at budget 100 with the cnn teacher
    assert sorted(len(ch) for ch in chunks) == [2] * (N_RUNS // 3 - 1) + [3] + [4] * (N_RUNS // 3)
    singles = grid.stacks(runs, 1)
    assert {len(ch) for ch in singles} == {1} and len(singles) == len(runs)
    assert sorted(len(ch) for ch in grid.stacks(runs, 100)) == [6] * (N_RUNS // 3 - 1) + [7]
    # first-appearance order of the keys
    firsts = [ch[0].stack_key() for ch in grid.stacks(runs, 100)]
    assert firsts == list(dict.fromkeys(r.stack_key() for r in runs))
    # seed and lr may differ within a stack; method, budget, teacher, device may not
    r = runs[0]
    assert replace(r, seed=5, lr=0.5).stack_key() == r.stack_key()
    for k, v in [("method", "kd"), ("budget", 3), ("teacher_key", "x@1"), ("device", "cuda:1")]:
        assert replace(r, **{k: v}).stack_key() != r.stack_key(), k


def test_run_grid_trains_stacks_and_matches_rows(tmp_path):
    text = CONFIG.replace("seeds = [0, 1, 2]", "seeds = [0, 1, 2]\nlrs = [0.1, 0.05]")
    runs = _runs(tmp_path, text)
    sizes = []

    def trainer(chunk):
        assert len({r.stack_key() for r in chunk}) == 1
        sizes.append(len(chunk))
        out = [(r, fake_row(r)) for r in chunk]
        return out[::-1]  # rows travel with their configs, whatever the order

    res = tmp_path / "r.jsonl"
    c = grid.run_grid(runs, res, trainer, stack=4, progress=False)
    assert c["ran"] == len(runs) and max(sizes) == 4 and sum(sizes) == len(runs)
    got = rows.read_rows(res)
    assert sorted(r["run_id"] for r in got) == sorted(r.run_id() for r in runs)
    for r in got:  # every row is stored with its own config
        run = RunConfig.from_dict(r)
        assert run.run_id() == r["run_id"]
        assert r["test_acc"] == pytest.approx(
            0.5 + 0.0001 * r["budget"] + 0.01 * r["seed"] + (r["lr"] or 0.0)
        )


# ------------------------------------------------------------------ kill -9
KILL_SCRIPT = """
import json, sys, time
from reference_experiments import grid
from reference_experiments.config import RunConfig
from reference_experiments.rows import ResultRow

SLEEP, SPECTRUM = {sleep!r}, {spectrum!r}

def trainer(chunk):
    time.sleep(SLEEP)
    out = []
    for r in chunk:
        acc = 0.5 + 0.0001 * r.budget + 0.01 * r.seed
        out.append((r, ResultRow(
            run_id=r.run_id(), teacher_calls=1, new_teacher_calls=1, lr_used=0.05,
            lrs_tried=[0.05], best_val_by_lr=[acc], lrs_diverged=[], best_val_acc=acc,
            test_acc=acc, best_epoch=1,
            epochs=1, epoch_cap=1, phases_reached=1, steps=1, total_steps=1, n_train=1,
            n_val=1, train_images_per_s=1.0, stack_images_per_s=1.0, stacked_runs=len(chunk),
            wall_s=SLEEP, ran_on="cpu", spectrum=[0.123456789] * SPECTRUM)))
    return out

# the configs as the grid expanded them (RunConfig.from_dict: no validation, so this
# process does not import torch); their ids are recomputed here
runs = [RunConfig.from_dict(d) for d in json.load(open(sys.argv[1]))]
print(grid.run_grid(runs, sys.argv[2], trainer, stack=int(sys.argv[3]), progress=False))
"""


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("sleep,spectrum,stack", [(0.03, 1, 1), (0.0, 2000, 1), (0.05, 1, 3)])
def test_kill9_mid_grid_then_resume(tmp_path, sleep, spectrum, stack):
    """SIGKILL a grid process mid-run (the second case: mostly inside writes), rerun it:
    every run present exactly once, no partial or duplicated rows, no temporary files."""
    runs = _runs(tmp_path)
    (tmp_path / "runs.json").write_text(json.dumps([r.as_dict() for r in runs]))
    script = tmp_path / "fake_grid.py"
    script.write_text(KILL_SCRIPT.format(sleep=sleep, spectrum=spectrum))
    res = tmp_path / "out" / "results.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), str(tmp_path / "runs.json"), str(res), str(stack)]
    expected = {r.run_id() for r in runs}
    kill_after = 6 if sleep else 25
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 90
    while len(_lines(res)) < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-3000:]
    first = rows.read_rows(res)
    assert 0 < len(first) < len(expected), "kill did not land mid-grid"
    for line in _lines(res):  # nothing partial: every line is a whole row
        json.loads(line)
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = rows.read_rows(res)
    ids = [r["run_id"] for r in got]
    # ids computed in another process match: run ids are stable
    assert len(ids) == len(set(ids)) == len(expected) and set(ids) == expected
    assert [r["run_id"] for r in got[: len(first)]] == [r["run_id"] for r in first]
    assert all(len(r["spectrum"]) == spectrum for r in got)
    assert all(RunConfig.from_dict(r).run_id() == r["run_id"] for r in got)
    assert not list(res.parent.glob(".*.tmp")) and not list(res.parent.glob("*.tmp"))
    assert not (res.parent / "results.failed.jsonl").exists()


# ------------------------------------------------------------------ CLI
def _cli(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse (--help, usage errors)
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_grid_dry_run_lists_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the dry run checks that the data exist (here: table1's cifar10-jpeg archive, empty)
    archive = tmp_path / "data" / "cifar10-jpeg" / "cifar10-jpeg.tar.xz"
    archive.parent.mkdir(parents=True)
    archive.touch()
    monkeypatch.setenv("CKD_DATA_DIR", str(tmp_path / "data"))
    rc, out, err = _cli(["grid", "table1", "--dry-run", "--data-dir", "data",
                         "--results", str(tmp_path / "r.jsonl")], capsys)  # fmt: skip
    cfg = grid.load_config(ROOT / "reference_experiments" / "configs" / "table1.toml")
    runs = grid.expand(cfg)
    lines = out.splitlines()
    assert rc == 0 and len(lines) == len(runs)
    assert [line.split()[0] for line in lines] == [r.run_id() for r in runs]
    assert all(line.split()[1] == "todo" for line in lines)
    assert f"{len(runs)} runs, 0 done" in err
    # finished runs show as done; shards list their part only
    rows.append_row(tmp_path / "r.jsonl", {"run_id": runs[0].run_id()})
    rc, out, err = _cli(["grid", "table1", "--dry-run", "--shard", "0/2", "--results",
                         str(tmp_path / "r.jsonl")], capsys)  # fmt: skip
    assert rc == 0
    assert [line.split()[0] for line in out.splitlines()] == [
        r.run_id() for r in grid.select_shard(runs, "0/2")
    ]
    done = {line.split()[0] for line in out.splitlines() if line.split()[1] == "done"}
    assert done == {runs[0].run_id()} & {r.run_id() for r in grid.select_shard(runs, "0/2")}
    # --device/--data-dir do not change ids; --preset does
    rc, out, _ = _cli(["grid", "table1", "--dry-run", "--device", "cpu", "--data-dir",
                       str(tmp_path / "data"), "--results", str(tmp_path / "none.jsonl")],
                      capsys)  # fmt: skip
    assert [line.split()[0] for line in out.splitlines()] == [r.run_id() for r in runs]
    rc, out, _ = _cli(["grid", "table1", "--dry-run", "--preset", "fast",
                       "--results", str(tmp_path / "none.jsonl")], capsys)  # fmt: skip
    assert rc == 0 and not {line.split()[0] for line in out.splitlines()} & {
        r.run_id() for r in runs
    }


@pytest.mark.parametrize(
    "argv,match",
    [
        (["grid", "table1", "--max-runs", "-1"], "max_runs must be >= 0"),
        (["grid", "table1", "--dry-run", "--shard", "5/2"], "bad shard"),
        (["grid", "table1", "--dry-run", "--preset", "nope"], "unknown preset 'nope'"),
        (["grid", "no_such_config", "--dry-run"], "not found \\(bundled: .*table1"),
    ],
)
def test_cli_grid_user_errors(tmp_path, capsys, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _cli([*argv, "--results", str(tmp_path / "r.jsonl")], capsys)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(match, lines[0]), lines[0]
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.slow
def test_cli_grid_error_subprocess(tmp_path):
    """The real entry point: exit status 2, one ``error:`` line, no traceback."""
    out = subprocess.run(
        [sys.executable, "-m", "reference_experiments", "grid", "table1", "--max-runs", "-1",
         "--results", str(tmp_path / "r.jsonl"), "--no-progress"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: max_runs must be >= 0, got -1"], out.stderr


def test_cli_grid_runs_a_config(tmp_path, capsys, monkeypatch):
    """``grid CONFIG`` passes the config's runs, results path and options to run_grid."""
    monkeypatch.chdir(tmp_path)
    seen = {}

    def fake_run_grid(runs, results, trainer, **kw):
        seen.update(runs=runs, results=results, trainer=trainer, **kw)
        return {"total": len(runs), "skipped": 0, "ran": len(runs), "failed": 0}

    monkeypatch.setattr(grid, "run_grid", fake_run_grid)
    cfg_path = _write_cfg(tmp_path)
    rc, _, err = _cli(["grid", str(cfg_path), "--stack", "3", "--max-runs", "4", "--keep-going",
                       "--device", "cpu", "--shard", "1/2", "--no-progress"], capsys)  # fmt: skip
    assert rc == 0, err
    runs = grid.select_shard(_runs(tmp_path), "1/2")
    assert [r.run_id() for r in seen["runs"]] == [r.run_id() for r in runs]
    assert {r.device for r in seen["runs"]} == {"cpu"}
    assert str(seen["results"]) == "runs/tiny/results.jsonl"
    assert (seen["stack"], seen["max_runs"], seen["keep_going"]) == (3, 4, True)
    assert (seen["grid_name"], seen["paper_dataset"], seen["progress"]) == (
        "tiny",
        "cifar100",
        False,
    )
    assert isinstance(seen["trainer"], grid.Runner)
    # failed runs make the exit status 1
    monkeypatch.setattr(
        grid, "run_grid", lambda runs, *a, **k: {"total": 1, "skipped": 0, "ran": 0, "failed": 1}
    )
    rc, _, _ = _cli(["grid", str(cfg_path), "--no-progress"], capsys)
    assert rc == 1
