"""Table 1's range and method: budgets spanning the paper's calls, the paper's targets
on CIFAR-100 (derived elsewhere), five seeds in the figure configs; the report reads
results from a folder, a glob or a single file."""

from __future__ import annotations

import pytest
from test_report import ACC, base_rows, cells, write

from reference_experiments import __main__ as cli
from reference_experiments import grid, report
from reference_experiments.report_rows import PAPER_TARGETS, curves, default_targets
from reference_experiments.result_files import finished_run_ids, job_parts_dir, result_files


def test_table1_uses_the_papers_targets_on_cifar100():
    rows = base_rows(dataset="cifar100")
    key = next(iter(report.group_rows(rows)))
    md = report.table1(key, rows)
    header = md.splitlines()[2]
    assert (
        header
        == "| method | " + " | ".join(f"to {t:.1f}%" for t in PAPER_TARGETS["cifar100"]) + " |"
    )
    assert PAPER_TARGETS["cifar100"] == (30.0, 35.0, 40.0, 45.0, 50.0, 55.0)
    assert "Targets: the paper's Table 1 targets" in md
    # KD: 45% at 80 calls, 55% at 160: 50% is reached at 120 (interpolated)
    assert cells(md)["KD"][4] == "0.12"


def test_table1_derives_targets_on_other_data_sets():
    rows = base_rows()  # cifar10-jpeg
    key = next(iter(report.group_rows(rows)))
    md = report.table1(key, rows)
    wanted = default_targets(curves(rows))
    assert md.splitlines()[2] == "| method | " + " | ".join(f"to {t:.1f}%" for t in wanted) + " |"
    assert "Targets: derived from these curves" in md
    # --targets wins everywhere
    cifar100 = base_rows(dataset="cifar100")
    md = report.table1(next(iter(report.group_rows(cifar100))), cifar100, targets=[47.0])
    assert "| to 47.0% |" in md and "Targets: given" in md


def test_report_reads_a_folder_a_glob_or_a_file(tmp_path):
    rows = base_rows({"kd": ACC["kd"], "ce": ACC["ce"]})
    kd = [r for r in rows if r["method"] == "kd"]
    ce = [r for r in rows if r["method"] == "ce"]
    results = tmp_path / "grid" / "results.jsonl"
    write(results, kd)
    parts = job_parts_dir(results)
    parts.mkdir()
    write(parts / "stack-a.jsonl", ce[:3])
    write(parts / "stack-b.jsonl", ce[3:] + kd[:1])  # a run written twice counts once
    write(parts / "stack-b.failed.jsonl", ce[:1])  # failure logs are not results
    folder = result_files([tmp_path / "grid"])
    assert [p.name for p in folder] == ["results.jsonl", "stack-a.jsonl", "stack-b.jsonl"]
    assert result_files([str(parts / "*.jsonl")]) == folder[1:]
    assert result_files([results, tmp_path / "grid"]) == folder
    assert finished_run_ids(results) == {r["run_id"] for r in rows}
    md = report.make_report(tmp_path / "grid", tmp_path / "rep").read_text()
    assert f"{len(rows)} rows" in md and "CE only" in cells(md)
    one = report.make_report(results, tmp_path / "rep1").read_text()
    assert f"{len(kd)} rows" in one and "CE only" not in cells(one)
    with pytest.raises(FileNotFoundError, match="holds no results file"):
        result_files([str(tmp_path / "none*.jsonl")])
    with pytest.raises(FileNotFoundError, match="not found"):
        result_files([tmp_path / "missing.jsonl"])


def _cli(argv, capsys) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_grid_table1_dry_run_spans_the_papers_calls(tmp_path, capsys, monkeypatch):
    """Table 1's cells span 1.62k-6.34k teacher calls (0.8 n): the dry run lists a budget
    n <= 2,025 and one n >= 7,925, for every pair, method and seed."""
    monkeypatch.chdir(tmp_path)
    archive = tmp_path / "data" / "cifar10-jpeg" / "cifar10-jpeg.tar.xz"
    archive.parent.mkdir(parents=True)
    archive.touch()
    rc, out, _ = _cli(["grid", "table1", "--dry-run", "--data-dir", "data",
                       "--results", str(tmp_path / "r.jsonl")], capsys)  # fmt: skip
    budgets = [int(line.split()[5].removeprefix("n=")) for line in out.splitlines()]
    assert rc == 0 and min(budgets) <= 2025 and max(budgets) >= 7925
    cells = {tuple(line.split()[3:7:2]) for line in out.splitlines()}  # (pair, budget)
    assert {b for _, b in cells} >= {"n=2000", "n=8000"} and len(cells) == 3 * len(set(budgets))


def test_figure_configs_run_five_seeds():
    for name in ("fig3_cars", "fig4_rkd_d", "table1", "table2"):
        runs = grid.expand(grid.load_config(grid.resolve_config(name)))
        assert {r.seed for r in runs} == {0, 1, 2, 3, 4}, name
    # Fig. 3: the official Cars setting where it exists, the car-crop copy by default
    fig3 = grid.load_config(grid.resolve_config("fig3_cars"))
    assert fig3["paper_dataset"] == "cars" and fig3["defaults"]["dataset"] == "cars64"
    official = grid.with_overrides(grid.expand(fig3), dataset="cars")
    assert {r.dataset for r in official} == {"cars"}
