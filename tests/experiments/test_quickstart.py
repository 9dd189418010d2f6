"""Quick start smoke test with tiny settings (the real one: 4 methods x 3 budgets x 3 seeds)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("runs in the torch session (KERAS_BACKEND=torch)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from reference_experiments import grid, quickstart  # noqa: E402


def test_quickstart_tiny(tmp_path, capsys):
    out = tmp_path / "qs"
    kw = dict(
        methods=["ce", "ckd_all"],
        budgets=[40, 80],
        seeds=[0],
        teacher_epochs=1,
        max_epochs=2,
        progress=False,
    )
    res = quickstart.main(out, **kw)
    printed = capsys.readouterr().out
    assert "| CE only |" in printed and "| CKD (all pairs) |" in printed
    assert "scikit-learn digits" in printed and "preset `paper`" in printed
    assert (out / "accuracy_vs_calls.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "report" / "report.md").exists()
    rows = grid.read_results(out / "results.jsonl")
    assert len(rows) == 4
    assert {(r["method"], r["budget"]) for r in rows} == {
        (m, b) for m in ("ce", "ckd_all") for b in (40, 80)
    }
    for r in rows:
        assert r["dataset"] == "digits" and r["student_arch"] == "digits_mlp"
        assert r["teacher_calls"] == (
            0 if r["method"] == "ce" else r["budget"] - round(0.2 * r["budget"])
        )
        assert 0.0 <= r["test_acc"] <= 1.0
    # a rerun reuses the teacher and every finished run
    teacher_files = sorted((out / "teacher").rglob("*.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in teacher_files]
    res2 = quickstart.main(out, **kw)
    assert len(grid.read_results(out / "results.jsonl")) == 4
    assert [p.stat().st_mtime_ns for p in teacher_files] == mtimes
    assert res2["table"] == res["table"]


def test_cli_help():
    out = subprocess.run(
        [sys.executable, "-m", "reference_experiments", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0
    for cmd in ("train-teacher", "student", "grid", "report", "quickstart"):
        assert cmd in out.stdout
