"""The submitit launcher: a tiny digits grid as a job array on submitit's local
executor, one results file per stack, resumable re-submission, the report over the
folder; job planning and the CLI's launcher options."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_run import run_cli

from reference_experiments import grid, launcher
from reference_experiments.result_files import finished_run_ids, job_parts_dir, result_files
from reference_experiments.rows import append_row, read_rows

submitit = pytest.importorskip("submitit")

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
name = "tiny_cluster"
[defaults]
dataset = "digits"
preset = "fast"
max_epochs = 1
[teachers.cnn]
arch = "digits_cnn"
train_epochs = 1
[[runs]]
pairs = [["cnn", "digits_mlp"]]
methods = ["ce"]
budgets = [100]
seeds = SEEDS
"""


def _config(tmp_path: Path, seeds: list[int]) -> Path:
    path = tmp_path / "tiny_cluster.toml"
    path.write_text(CONFIG.replace("SEEDS", str(seeds)))
    return path


def test_submitit_local_job_array_is_resumable_and_reported(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the jobs are fresh interpreters: they import this tree, one thread each
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    results = tmp_path / "out" / "results.jsonl"
    # stacks of one run, two per job (the first job trains its two at once): 2 jobs
    submit = ["--launcher", "submitit", "--submitit-cluster", "local", "--wait", "--stack", "1",
              "--gpus-per-job", "2", "--device", "cpu", "--results", str(results),
              "--no-progress"]  # fmt: skip
    rc, _, err = run_cli(["grid", str(_config(tmp_path, [0, 1, 2])), *submit], capsys)
    assert rc == 0, err
    assert "3 to run in 2 jobs" in err and "submitted 2 jobs" in err
    parts = sorted(job_parts_dir(results).glob("*.jsonl"))
    assert len(parts) == 3 and not results.exists()  # one file per stack, none shared
    assert [len(read_rows(p)) for p in parts] == [1, 1, 1]
    runs = grid.expand(grid.load_config(_config(tmp_path, [0, 1, 2])))
    assert finished_run_ids(results) == {r.run_id() for r in runs}
    assert (tmp_path / "out" / "submitit").is_dir()  # submitit's logs beside the results

    # re-submitting skips finished runs: nothing, then only the new seed
    rc, _, err = run_cli(["grid", str(_config(tmp_path, [0, 1, 2])), *submit], capsys)
    assert rc == 0 and "0 to run in 0 jobs" in err and "submitted" not in err
    rc, _, err = run_cli(["grid", str(_config(tmp_path, [0, 1, 2, 3])), *submit], capsys)
    assert rc == 0 and "3 done, 1 to run in 1 jobs" in err, err
    assert len(result_files([tmp_path / "out"])) == 4
    # the local launcher and the dry run see the cluster's rows as finished
    rc, out, _ = run_cli(["grid", str(_config(tmp_path, [0, 1, 2, 3])), "--dry-run",
                       "--results", str(results)], capsys)  # fmt: skip
    assert rc == 0 and [line.split()[1] for line in out.splitlines()] == ["done"] * 4

    # the report reads the folder (and a glob) of per-job files
    rc, out, _ = run_cli(["report", str(tmp_path / "out")], capsys)
    assert rc == 0 and "Source: " in out and ": 4 rows;" in out
    assert (tmp_path / "out" / "report" / "report.md").is_file()
    rc, out, _ = run_cli(["report", str(job_parts_dir(results) / "stack-*.jsonl"),
                       "--out", str(tmp_path / "rep")], capsys)  # fmt: skip
    assert rc == 0 and ": 4 rows;" in out


def test_plan_jobs_packs_pending_stacks_per_gpu(tmp_path):
    runs = grid.expand(grid.load_config(_config(tmp_path, [0, 1, 2, 3, 4])))
    results = tmp_path / "r.jsonl"
    jobs = launcher.plan_jobs(runs, results, stack=2, gpus_per_job=2)
    assert [[len(c) for c in job] for job in jobs] == [[2, 2], [1]]
    chunk = jobs[0][0]
    assert launcher.stack_results_path(results, chunk) == launcher.stack_results_path(
        results, list(chunk)
    )
    assert launcher.stack_results_path(results, chunk).parent == tmp_path / "r.parts"
    append_row(results, {"run_id": runs[0].run_id()})  # finished here: not planned
    append_row(job_parts_dir(results) / "stack-x.jsonl", {"run_id": runs[1].run_id()})
    jobs = launcher.plan_jobs(runs, results, stack=2, gpus_per_job=1)
    planned = [r.run_id() for job in jobs for c in job for r in c]
    assert planned == [r.run_id() for r in runs[2:]]


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--slurm-partition", "gpu"], "--slurm-partition: only with --launcher submitit"),
        (["--gpus-per-job", "2", "--wait"], "--gpus-per-job, --wait: only with --launcher"),
    ],
)
def test_local_launcher_rejects_cluster_options(tmp_path, capsys, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(["grid", str(_config(tmp_path, [0])), *argv, "--no-progress"], capsys)
    assert rc == 2 and match in err


def test_grid_help_documents_the_submitit_launcher(capsys):
    rc, out, _ = run_cli(["grid", "--help"], capsys)
    assert rc == 0
    for option in ("--launcher {local,submitit}", "--slurm-partition", "--gpus-per-job",
                   "--time-limit", "--array-parallelism", "--submitit-folder"):  # fmt: skip
        assert option in out, option
    assert "Slurm job array" in " ".join(out.split())


def test_submission_needs_the_teachers_first(tmp_path, monkeypatch):
    """Jobs never train a teacher: several would race for its file."""
    monkeypatch.chdir(tmp_path)
    cfg = grid.load_config(_config(tmp_path, [0, 1]))
    cfg["runs"][0]["methods"] = ["ce", "kd"]
    runs = grid.expand(cfg)
    options = launcher.ClusterOptions(folder=str(tmp_path / "logs"), cluster="local")
    with pytest.raises(ValueError, match=r"teacher\(s\) cnn@\w+ not trained yet"):
        launcher.submit_grid(cfg, runs, tmp_path / "r.jsonl", options, stack=2)
    assert not (tmp_path / "logs").exists()  # nothing submitted
    ce_only = [r for r in runs if r.method == "ce"]
    assert launcher.untrained_teachers(cfg, ce_only) == []  # CE queries no teacher
    trained = Path(cfg["teachers_dir"]) / runs[0].teacher_key.replace("@", "_")
    trained.mkdir(parents=True)
    (trained / "cnn.safetensors").touch()
    assert launcher.untrained_teachers(cfg, runs) == []
