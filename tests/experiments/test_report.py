"""Report (v2): interpolation, lr and CKD selection on validation, diverged rows,
capped-preset header, Tables 1/2 on hand-computed rows, Fig. 5, figures.

Rows are built as the engine writes them: ``RunConfig(...).as_dict() | asdict(ResultRow(...))``.
"""

from __future__ import annotations

import doctest
import math
from dataclasses import asdict
from pathlib import Path

import pytest

from reference_experiments import report, report_rows
from reference_experiments.config import RunConfig
from reference_experiments.datasets import DATASETS
from reference_experiments.rows import ResultRow, append_row

SETTING = {
    "dataset": "cifar10-jpeg",
    "student_arch": "wrn_16_2",
    "teacher_key": "wrn_40_2-0123abcd",
    "teacher_arch": "wrn_40_2",
    "preset": "fast",
    "teacher_view": "clean",
}
# test accuracy (%) per method and budget; two seeds each
ACC = {
    "ce": {100: (40, 42), 200: (50, 50), 400: (60, 62)},
    "kd": {100: (45, 45), 200: (55, 55), 400: (65, 65)},
    "ckd_all": {100: (50, 50), 200: (60, 60), 400: (70, 70)},
}


def make_row(
    method,
    budget,
    seed,
    test,
    val=0.5,
    *,
    lr=None,
    epochs=None,
    phases=1,
    flat=None,
    spectrum=(),
    paper_dataset="cifar100",
    **cfg,
):
    c = RunConfig(**{**SETTING, **cfg}, method=method, budget=budget, seed=seed, lr=lr)
    n_train = int(0.8 * budget)
    r = ResultRow(
        run_id=c.run_id(),
        teacher_calls=0 if method == "ce" else n_train,
        new_teacher_calls=0,
        lr_used=0.05 if lr is None else lr,
        lrs_tried=list(c.lrs),
        best_val_by_lr=[val] * len(c.lrs),
        lrs_diverged=[],
        best_val_acc=val,
        test_acc=test,
        best_epoch=1,
        epochs=c.epoch_cap if epochs is None else epochs,
        epoch_cap=c.epoch_cap,
        phases_reached=phases,
        steps=10,
        total_steps=10,
        n_train=n_train,
        n_val=budget - n_train,
        train_images_per_s=1.0,
        stack_images_per_s=1.0,
        stacked_runs=1,
        wall_s=1.0,
        ran_on="cpu",
        teacher_test_acc=0.9,
        flat_dims=flat,
        spectrum=list(spectrum),
        paper_dataset=paper_dataset,
    )
    return c.as_dict() | asdict(r)


def base_rows(acc=ACC, **kw):
    return [
        make_row(m, b, seed, a / 100, **kw)
        for m, by in acc.items()
        for b, accs in by.items()
        for seed, a in enumerate(accs)
    ]


def cells(md: str) -> dict[str, list[str]]:
    return {
        ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
        for ln in md.splitlines()
        if ln.startswith("| ") and "---" not in ln
    }


def write(path: Path, rows) -> Path:
    for r in rows:
        assert append_row(path, r), r["run_id"]
    return path


def test_interpolate_calls():
    result = doctest.testmod(report_rows)
    assert result.attempted > 0 and result.failed == 0
    pts = [(80, 45.0), (160, 55.0), (320, 65.0)]
    assert report.interpolate_calls(pts, 52.0) == (pytest.approx(136.0), False)
    assert report.interpolate_calls(pts, 55.0) == (pytest.approx(160.0), False)
    assert report.interpolate_calls(pts, 65.0) == (pytest.approx(320.0), False)
    assert report.interpolate_calls(pts, 65.1) == (None, False)  # never extrapolated
    assert report.interpolate_calls(pts, 40.0) == (80.0, True)  # a bound
    # non-monotone curve: the first crossing counts
    got = report.interpolate_calls([(1, 10.0), (2, 30.0), (3, 20.0), (4, 40.0)], 25.0)
    assert got[0] == pytest.approx(1.75)


def test_registry_order_labels_and_unknown_methods():
    ms = ["ckd_all", "zz_old", "ce", "kd", "best_on_val:ckd", "ckd_pairs"]
    assert sorted(ms, key=report.sort_key) == [
        "ce",
        "kd",
        "best_on_val:ckd",
        "ckd_pairs",
        "ckd_all",
        "zz_old",
    ]
    assert report.label("zz_old") == "zz_old" and not report.is_ours("zz_old")
    assert report.label("best_on_val:ckd") == "CKD (best on val)"
    assert report.is_ours("ckd_all") and not report.is_ours("kd")
    assert report.label(report.method_id({"method": "kd", "weights": {"kd": 2.0}})) == "KD (kd=2)"


def test_table1_hand_computed():
    rows = base_rows()
    key = next(iter(report.group_rows(rows)))
    md = report.table1(key, rows, targets=[52.0, 60.0, 66.0])
    got = cells(md)
    # CE: 160 + 2/11*160 = 189.09; 160 + 10/11*160 = 305.45; never
    assert got["CE only"] == ["0.189", "0.305", "—"]
    # KD: 80 + 0.7*80 = 136; 160 + 0.5*160 = 240; never
    assert got["KD"] == ["0.136", "0.24", "—"]
    # CKD: 96 (-29% vs 136), 160 (-33% vs 240), 256 (no baseline reaches 66%)
    assert got["CKD (all pairs)"] == ["0.096 (-29%)", "0.16 (-33%)", "0.256 (baselines: —)"]
    assert got["*best baseline*"] == ["0.136 (KD)", "0.24 (KD)", "—"]
    assert "linearly interpolated between the two budgets" in md and "never extrapolated" in md
    assert "“≤x”: reached at the smallest budget" in md and "Targets: given" in md
    # a target reached at the smallest budget: a marked bound, Δ only as a bound
    got = cells(report.table1(key, rows, targets=[47.0]))
    # KD: 80 + 0.2*80 = 96; CKD: ≤80, so Δ ≤ (80 - 96) / 96 = -17%
    assert got["KD"] == ["0.096"] and got["CKD (all pairs)"] == ["≤0.08 (≤-17%)"]


def test_lr_axis_selected_on_validation():
    rows = base_rows(lr=0.05)
    # a worse-validation lr with a higher test accuracy must be dropped
    rows.append(make_row("ce", 100, 0, 0.99, val=0.1, lr=0.1))
    # a better-validation lr replaces the 0.05 row for (ce, 100, seed 0)
    rows.append(make_row("ce", 100, 0, 0.44, val=0.9, lr=0.025))
    sel = report.select_lr(rows)
    assert len(sel) == len(rows) - 2
    picked = [r for r in sel if (r["method"], r["budget"], r["seed"]) == ("ce", 100, 0)]
    assert [r["lr"] for r in picked] == [0.025]
    key, grows = next(iter(report.group_rows(sel).items()))
    md = report.table2(key, grows)
    assert "43.00 ± 1.41" in cells(md)["CE only"][0]  # seeds 44 and 42
    assert cells(md)["CKD (all pairs)"][2] == "**70.00 ± 0.00**"
    assert "0.32k (n=400)" in md
    notes = " ".join(report.setting_notes(key, grows))
    assert "lr grid axis 0.025, 0.05" in notes


def test_ckd_best_on_validation_picks_on_validation_not_test(tmp_path):
    rows = base_rows({"kd": ACC["kd"]})
    # budget 200: ckd_pn2 has the better validation, ckd_pn3 the better test accuracy
    for seed in (0, 1):
        rows.append(make_row("ckd_pn2", 200, seed, 0.55, val=0.80))
        rows.append(make_row("ckd_pn3", 200, seed, 0.75, val=0.60))
    # budget 400: the other way round on validation, so each budget picks its own
    for seed in (0, 1):
        rows.append(make_row("ckd_pn2", 400, seed, 0.90, val=0.50))
        rows.append(make_row("ckd_pn3", 400, seed, 0.70, val=0.70))
    fam = report.family_rows(rows)
    assert {(r["budget"], r["picked"]) for r in fam} == {(200, "ckd_pn2"), (400, "ckd_pn3")}
    assert all(r["method"] == "best_on_val:ckd" for r in fam) and len(fam) == 4
    key, grows = next(iter(report.group_rows(rows).items()))
    grows = grows + fam
    t2 = cells(report.table2(key, grows))
    assert t2["CKD (best on val)"][1:] == ["55.00 ± 0.00", "70.00 ± 0.00"]
    assert "CKD (1 vs 1)" in t2 and "CKD (2 vs 1)" in t2  # variants listed as well
    assert "CKD (best on val)" in cells(report.table1(key, grows, targets=[60.0]))
    notes = " ".join(report.setting_notes(key, grows))
    assert "never chosen on test" in notes and "CKD (1 vs 1) ×2" in notes
    md = report.make_report(write(tmp_path / "r.jsonl", rows), tmp_path / "rep").read_text()
    assert "| CKD (best on val) |" in md and "best validation accuracy" in md.split("##")[0]


def test_ckd_row_chooses_only_among_the_official_variants(tmp_path):
    """ckd_all (ours) has the best validation accuracy everywhere, yet the CKD row picks
    ckd_pn2 / ckd_pn3 only; ckd_all keeps its own row."""
    rows = base_rows({"kd": ACC["kd"]})
    for budget, seed in ((200, 0), (200, 1), (400, 0), (400, 1)):
        rows.append(make_row("ckd_pn2", budget, seed, 0.50, val=0.40))
        rows.append(make_row("ckd_pn3", budget, seed, 0.52, val=0.45))
        rows.append(make_row("ckd_all", budget, seed, 0.90, val=0.95))
        rows.append(make_row("ckd_pairs", budget, seed, 0.80, val=0.90))
    fam = report.family_rows(rows)
    assert {r["picked"] for r in fam} == {"ckd_pn3"} and len(fam) == 4
    key, grows = next(iter(report.group_rows(rows).items()))
    t2 = cells(report.table2(key, grows + fam))
    assert t2["CKD (best on val)"][1:] == ["52.00 ± 0.00", "52.00 ± 0.00"]
    assert t2["CKD (all pairs)"][1:] == ["**90.00 ± 0.00**"] * 2


def test_diverged_rows_skipped(tmp_path):
    rows = base_rows()
    rows.append(make_row("kd", 100, 2, math.nan, val=math.nan))
    rows.append(make_row("ckd_all", 400, 2, math.nan, val=math.nan))
    assert len(report.group_rows(rows)[report.setting_key(rows[0])]) == len(rows) - 2
    md = report.make_report(write(tmp_path / "r.jsonl", rows), tmp_path / "rep").read_text()
    assert "2 diverged (test accuracy not finite) skipped" in md
    assert "2 diverged run(s) (test accuracy not finite) skipped" in md
    assert "nan ±" not in md and "± nan" not in md
    assert (
        cells(md)["KD"][0] == "45.00 ± 0.00"
    )  # Table 2: the two finite seeds only  # Table 2: the two finite seeds only


def test_capped_paper_preset_header(tmp_path):
    capped = base_rows(preset="paper", max_epochs=5, epochs=5, phases=1)
    notes = report.preset_note(capped)
    assert "capped at 5 epochs" in notes and "allows 1000" in notes
    assert "18 of 18 runs stopped at the epoch limit" in notes
    assert "lr phases reached: 1 of 3" in notes and "never reached" in notes
    assert "official protocol" not in notes
    full = base_rows(preset="paper", epochs=300, phases=3)
    notes = report.preset_note(full)
    assert "official protocol" in notes and "after 50 epochs" in notes
    assert "capped" not in notes
    assert "not the paper's protocol" in report.preset_note(base_rows())  # fast
    # an old row without epoch_cap / phases_reached: the config cap still shows
    old = [{k: v for k, v in r.items() if k not in ("epoch_cap", "phases_reached")} for r in capped]
    notes = report.preset_note(old)
    assert "capped at 5 epochs" in notes and "not recorded" in notes
    md = report.make_report(write(tmp_path / "r.jsonl", capped), tmp_path / "rep").read_text()
    assert "capped at 5 epochs" in md and "patience-50" in md


def test_dataset_stand_in_note():
    note = report.dataset_note("cifar10-jpeg", "cifar100")
    assert note.startswith("CIFAR-10 (JPEG q75 copy) — the paper uses CIFAR-100,")
    assert "cannot be obtained here" in note
    assert report.dataset_note("cars64", "cars64") == DATASETS["cars64"].title
    assert report.dataset_note("digits", None) == DATASETS["digits"].title


def test_fig5_table_and_spectrum_budget():
    rows = []
    for m, dims in (("kd", 3), ("ckd_all", 6)):
        for b in (100, 400):
            for seed in (0, 1):
                spec = [0.9 / k for k in range(1, 9)]
                rows.append(make_row(m, b, seed, 0.5, flat=dims + seed, spectrum=spec))
    rows.append(make_row("ce", 800, 0, 0.5, flat=2, spectrum=[0.9, 0.1]))  # one method only
    key, grows = next(iter(report.group_rows(rows).items()))
    md = report.flat_dims_table(key, grows)
    got = cells(md)
    assert got["KD"][:2] == ["3.5 ± 0.7", "3.5 ± 0.7"]
    assert got["CKD (all pairs)"][1] == "6.5 ± 0.7"
    assert got["CE only"] == ["", "", "2.0 ± 0.0"]
    assert report.spectrum_budget(grows) == 400  # the largest with several methods
    assert report.flat_dims_table(key, base_rows()) == ""


def test_make_report_writes_markdown_and_figures(tmp_path):
    spec = [0.8, 0.4, 0.2, 0.1]
    rows = base_rows(flat=4, spectrum=spec)
    rows += [
        make_row(m, r["budget"], r["seed"], r["test_acc"], flat=4, spectrum=spec)
        for r in rows
        if r["method"] == "kd"
        for m in ("rkd", "rkd_d10", "rkd_d50", "ckd_pairs")
    ]
    rows += base_rows(
        dataset="digits",
        paper_dataset=None,
        teacher_key="digits_cnn-1",
        teacher_arch="digits_cnn",
        student_arch="digits_mlp",
    )
    rows.append({**make_row("ckd_old_name", 100, 0, 0.3), "run_id": "old"})
    res = write(tmp_path / "results.jsonl", rows)
    path = report.make_report([res], tmp_path / "rep", targets=[55.0])
    assert path == tmp_path / "rep" / "report.md"
    md = path.read_text()
    assert md.count("**Table 1") == 2 and md.count("**Table 2") == 2
    assert md.count("**Fig. 5 table") == 1 and "flat_dims" in md
    assert "scikit-learn digits" in md and "the paper uses CIFAR-100" in md
    header = md.split("\n## ")[0]  # the rules, stated once
    assert "interpolated linearly in calls" in header and "never extrapolated" in header
    assert "within-class variance" in header and "best validation accuracy" in header
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("*.png"))
    assert len(pngs) == 4
    assert sum(p.startswith("fig4_rkd_d") for p in pngs) == 1
    assert sum(p.startswith("fig5_spectrum") for p in pngs) == 1
    for p in pngs:
        assert (tmp_path / "rep" / p).read_bytes()[:4] == b"\x89PNG"
        assert p in md
    # an unknown (old) method: its own name, last
    t2 = report.table2(*next(iter(report.group_rows(report.select_lr(rows)).items())))
    assert [ln.split("|")[1].strip() for ln in t2.splitlines() if ln.startswith("| ")][-1] == (
        "ckd_old_name"
    )


def test_two_teachers_of_one_arch_stay_apart():
    rows = [{**r, "teacher_key": t} for t in ("a", "b") for r in base_rows()]
    sel = report.select_lr(rows)
    assert len(sel) == len(rows)  # not mistaken for lr variants of one run
    groups = report.group_rows(sel)
    assert [report.setting_title(k) for k in groups] == [
        "wrn_40_2 → wrn_16_2 (teacher `a`)",
        "wrn_40_2 → wrn_16_2 (teacher `b`)",
    ]
