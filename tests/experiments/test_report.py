"""Report: interpolation, Table 1/2 on hand-computed synthetic rows, figures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from reference_experiments import grid, report  # noqa: E402

BASE = {
    "dataset": "cifar10-jpeg",
    "paper_dataset": "cifar100",
    "teacher_arch": "wrn_40_2",
    "student_arch": "wrn_16_2",
    "preset": "fast",
    "teacher_view": "clean",
}
# mean test accuracy (%) per method and budget; two seeds each
ACC = {
    "ce": {100: (40, 42), 200: (50, 50), 400: (60, 62)},
    "kd": {100: (45, 45), 200: (55, 55), 400: (65, 65)},
    "ckd_all": {100: (50, 50), 200: (60, 60), 400: (70, 70)},
}


def _rows(**extra):
    rows = []
    for m, by in ACC.items():
        for b, accs in by.items():
            for seed, a in enumerate(accs):
                rows.append(
                    {
                        **BASE,
                        **extra,
                        "method": m,
                        "budget": b,
                        "seed": seed,
                        "lr": 0.05,
                        "test_acc": a / 100,
                        "best_val_acc": 0.5,
                        "teacher_calls": 0 if m == "ce" else int(0.8 * b),
                    }
                )
    return rows


def test_interpolate_calls():
    pts = [(80, 45.0), (160, 55.0), (320, 65.0)]
    assert report.interpolate_calls(pts, 52.0) == (pytest.approx(136.0), False)
    assert report.interpolate_calls(pts, 55.0) == (pytest.approx(160.0), False)
    assert report.interpolate_calls(pts, 65.0) == (pytest.approx(320.0), False)
    assert report.interpolate_calls(pts, 65.1) == (None, False)
    assert report.interpolate_calls(pts, 40.0) == (80.0, True)
    # non-monotone curve: first crossing counts
    assert report.interpolate_calls([(1, 10.0), (2, 30.0), (3, 20.0), (4, 40.0)], 25.0)[
        0
    ] == pytest.approx(1.75)


def test_curves_place_ce_at_budget_calls():
    cv = report.curves(_rows(), 100.0)
    assert [p["calls"] for p in cv["ce"]] == [80.0, 160.0, 320.0]
    ce0 = cv["ce"][0]
    assert ce0["mean"] == pytest.approx(41.0) and ce0["std"] == pytest.approx(2**0.5)
    assert ce0["n"] == 2


def test_table1_hand_computed():
    rows = _rows()
    key = next(iter(report.group_rows(rows)))
    md = report.table1(key, rows, targets=[52.0, 60.0, 66.0])
    lines = {
        ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
        for ln in md.splitlines()
        if ln.startswith("| ") and "---" not in ln
    }
    # CE: 160 + 2/11*160 = 189.09; 160 + 10/11*160 = 305.45; never
    assert lines["CE only"] == ["0.189", "0.305", "—"]
    # KD: 80 + 0.7*80 = 136; 160 + 0.5*160 = 240; never
    assert lines["KD"] == ["0.136", "0.24", "—"]
    # CKD: 96 (-29% vs 136), 160 (-33% vs 240), 256 (no baseline reaches 66%)
    assert lines["CKD (all pairs)"] == ["0.096 (-29%)", "0.16 (-33%)", "0.256 (baselines: —)"]
    assert lines["*best baseline*"] == ["0.136 (KD)", "0.24 (KD)", "—"]
    assert "CIFAR-10 (JPEG q75 copy) as stand-in for CIFAR-100" in md
    assert "preset `fast`" in md


def test_default_targets():
    cv = report.curves(_rows(), 100.0)
    # lo = best mean at the smallest budget (50), hi = best baseline at the largest (65)
    assert report.default_targets(cv) == [53.7, 57.5, 61.2, 65.0]


def test_table2_mean_std_and_lr_selection():
    rows = _rows()
    # a worse-validation lr with a higher test accuracy must be dropped
    rows.append({**rows[0], "lr": 0.1, "test_acc": 0.99, "best_val_acc": 0.1})
    # a better-validation lr replaces the 0.05 row for (ce, 100, seed 0)
    rows.append({**rows[0], "lr": 0.025, "test_acc": 0.44, "best_val_acc": 0.9})
    sel = report.select_lr(rows)
    assert len(sel) == len(rows) - 2
    key = next(iter(report.group_rows(sel)))
    md = report.table2(key, report.group_rows(sel)[key])
    ce = next(ln for ln in md.splitlines() if ln.startswith("| CE only"))
    assert "43.00 ± 1.41" in ce  # seeds 44 and 42
    ckd = next(ln for ln in md.splitlines() if ln.startswith("| CKD (all pairs)"))
    assert "**70.00 ± 0.00**" in ckd
    assert "0.32k (n=400)" in md


def test_make_report_writes_markdown_and_figures(tmp_path):
    res = tmp_path / "results.jsonl"
    rows = _rows() + [
        {**r, "method": m}
        for r in _rows()
        if r["method"] == "kd"
        for m in ("rkd", "rkd_d10", "rkd_d50")
    ]
    rows += [
        {
            **r,
            "dataset": "digits",
            "paper_dataset": None,
            "teacher_arch": "digits_cnn",
            "student_arch": "digits_mlp",
        }
        for r in _rows()
    ]
    for i, r in enumerate(rows):
        grid.append_row(res, {**r, "run_id": f"r{i}"})
    path = report.make_report(res, tmp_path / "rep")
    md = path.read_text()
    assert md.count("**Table 1") == 2 and md.count("**Table 2") == 2
    assert "scikit-learn digits" in md and "stand-in for CIFAR-100" in md
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("*.png"))
    assert len(pngs) == 3 and sum(p.startswith("fig4_rkd_d") for p in pngs) == 1
    for p in pngs:
        assert (tmp_path / "rep" / p).read_bytes()[:4] == b"\x89PNG"
        assert p in md


def test_two_teachers_of_one_arch_stay_apart():
    rows = [{**r, "teacher": t} for t in ("a", "b") for r in _rows()]
    sel = report.select_lr(rows)
    assert len(sel) == len(rows)  # not mistaken for lr variants of one run
    groups = report.group_rows(sel)
    assert len(groups) == 2
    titles = [report._group_header(k, g)[0] for k, g in groups.items()]
    assert titles == ["wrn_40_2 (teacher `a`) → wrn_16_2", "wrn_40_2 (teacher `b`) → wrn_16_2"]
