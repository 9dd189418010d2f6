"""Quick start (reduced grid through ``quickstart.config``), the committed quick-start
report, and the command line's help and user errors.

The real quick start (4 methods x 3 budgets x 5 seeds, 60 epochs) takes a minute; here
its module constants are shrunk to 2 methods x 1 budget x 1 or 2 seeds x 2 or 3 epochs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_run import run_cli

from reference_experiments import __main__ as cli
from reference_experiments import engine, grid, methods, quickstart, report
from reference_experiments.rows import read_rows

ROOT = Path(__file__).resolve().parents[2]

COMMITTED = ROOT / "reference_experiments" / "results" / "quickstart"


@pytest.fixture
def restore_torch_globals():
    """quickstart.main sets torch's threads and deterministic mode for the process."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def test_quickstart_reduced(tmp_path, capsys, monkeypatch, restore_torch_globals):
    monkeypatch.setattr(quickstart, "METHODS", ("ce", "ckd_all"))
    monkeypatch.setattr(quickstart, "BUDGETS", (100,))
    monkeypatch.setattr(quickstart, "SEEDS", (0,))
    monkeypatch.setattr(quickstart, "MAX_EPOCHS", 2)
    monkeypatch.setattr(quickstart, "TEACHER_EPOCHS", 1)
    out = tmp_path / "qs"
    cfg = quickstart.config(out)
    runs = grid.expand(cfg)
    assert [(r.method, r.budget, r.seed, r.lr) for r in runs] == [
        ("ce", 100, 0, 0.05),
        ("ckd_all", 100, 0, 0.05),
    ]
    assert {(r.dataset, r.preset, r.teacher_view, r.max_epochs, r.device) for r in runs} == {
        ("digits", "paper", "clean", 2, "cpu")
    }

    path = quickstart.main(out)
    printed = capsys.readouterr().out
    assert path == out / "report.md" and path.is_file()
    assert "| CE only |" in printed and "| CKD (all pairs) |" in printed
    assert "quick start: 2 student runs" in printed
    assert list(out.glob("*.png"))
    teacher_files = sorted((out / "teacher").rglob("*.safetensors"))
    assert len(teacher_files) == 1
    results = out / "results.jsonl"
    rows = read_rows(results)
    assert sorted(r["run_id"] for r in rows) == sorted(r.run_id() for r in runs)
    for r in rows:
        assert (r["dataset"], r["student_arch"], r["teacher_arch"]) == (
            "digits",
            "digits_mlp",
            "digits_cnn",
        )
        assert r["grid"] == "quickstart" and r["lr_used"] == 0.05 and r["epoch_cap"] == 2
        assert r["n_train"] + r["n_val"] == 100 and r["n_val"] == 20
        assert r["teacher_calls"] == (0 if r["method"] == "ce" else r["n_train"])
        assert 0.0 <= r["test_acc"] <= 1.0 and 1 <= r["epochs"] <= 2
        assert r["teacher"] == (None if r["method"] == "ce" else str(teacher_files[0]))
        env = r["environment"]
        assert env["torch"] == torch.__version__ and env["numpy"] and env["cpu_model"]
        assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "Environment of the rows:" in path.read_text(encoding="utf-8")

    # a rerun reuses the teacher and every finished run: nothing trains, nothing is written
    blob, mtime = results.read_bytes(), teacher_files[0].stat().st_mtime_ns
    md = path.read_text(encoding="utf-8")

    def no_training(*a, **k):
        raise AssertionError("a rerun must not train")

    monkeypatch.setattr(engine, "train", no_training)
    monkeypatch.setattr(
        "reference_experiments.teacher.train_teacher", no_training
    )  # Teachers imports it at call time
    path2 = quickstart.main(out)
    assert path2 == path and path.read_text(encoding="utf-8") == md
    assert md in capsys.readouterr().out
    assert results.read_bytes() == blob
    assert teacher_files[0].stat().st_mtime_ns == mtime


def _table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_committed_quickstart_report_reproduces(tmp_path):
    """Re-reporting the committed results gives the committed tables."""
    results = COMMITTED / "results.jsonl"
    if not results.is_file():
        pytest.skip(f"{results} is not committed")
    rows = read_rows(results)
    if not rows or any("lr_used" not in r for r in rows):
        pytest.skip(
            "committed quick-start results are from the old (v1) row format (no `lr_used`); "
            "regenerate them with `python -m reference_experiments quickstart`"
        )
    committed = _table_lines((COMMITTED / "report.md").read_text(encoding="utf-8"))
    assert committed, "the committed report.md has no tables"
    path = report.make_report([results], tmp_path)
    assert _table_lines(path.read_text(encoding="utf-8")) == committed


# ------------------------------------------------------------------ command line


def test_cli_help(capsys):
    rc, out, _ = run_cli(["--help"], capsys)
    assert rc == 0
    for cmd in ("train-teacher", "student", "grid", "report", "quickstart"):
        assert cmd in out


def test_student_help_lists_every_method(capsys):
    rc, out, _ = run_cli(["student", "--help"], capsys)
    assert rc == 0
    described = methods.describe()
    assert set(described) == set(methods.names()) and len(described) >= 20
    for name, text in described.items():
        assert text, f"method {name!r} has no description"
        assert any(line.split() == [name, *text.split()] for line in out.splitlines()), name
    for option in ("--dataset", "--student-arch", "--method", "--budget", "--teacher",
                   "--preset", "--lr", "--max-epochs", "--device", "--results"):  # fmt: skip
        assert option in out, option


@pytest.mark.parametrize(
    "args,match",
    [
        (["--method", "nope"], "error: unknown method 'nope'; choose from ce, kd, "),
        (["--dataset", "nope"], "error: unknown dataset 'nope'; choose from .*digits"),
        (["--student-arch", "nope"], "error: unknown student_arch 'nope'; choose from "),
        (["--preset", "nope"], "error: unknown preset 'nope'; choose from paper, fast"),
        (["--budget", "1"], "error: budget must be >= 2"),
        (["--lr", "-1"], "error: lr must be > 0"),
        (["--method", "kd"], "error: --teacher PATH is required for method 'kd'"),
        (["--teacher", "missing.safetensors"], "error: teacher file missing.safetensors"),
        (["--results", "afile/rows.jsonl"], "error: results path afile/rows.jsonl: a parent"),
        (["--device", "cuda:7"], "error: device 'cuda:7' requested but CUDA is not available"),
    ],
)
def test_student_user_errors(tmp_path, capsys, monkeypatch, args, match):
    import re

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file, not a folder")
    if "cuda:7" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    base = {"--dataset": "digits", "--student-arch": "digits_mlp", "--method": "ce",
            "--budget": "100", "--device": "cpu"}  # fmt: skip
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    monkeypatch.setattr(engine, "train", lambda *a, **k: pytest.fail("must not train"))
    rc, out, err = run_cli(["student", *[x for kv in base.items() for x in kv]], capsys)
    assert rc == 2 and not out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.match(match, lines[0]), err


def test_student_unknown_method_lists_every_method(capsys):
    rc, _, err = run_cli(["student", "--dataset", "digits", "--student-arch", "digits_mlp",
                       "--method", "nope", "--budget", "100"], capsys)  # fmt: skip
    assert rc == 2
    for name in methods.names():
        assert name in err


def test_readme_quickstart_table_is_the_committed_report():
    """The README's quick start table is Table 2 of the committed report."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- quickstart-table -->\n", "<!-- /quickstart-table -->"
    table = readme[readme.index(start) + len(start) : readme.index(end)].strip().splitlines()
    md = (COMMITTED / "report.md").read_text(encoding="utf-8")
    after = md[md.index("**Table 2") :]
    committed = _table_lines(after)[: len(table)]
    assert table and table == committed


@pytest.mark.parametrize(
    "args,match",
    [
        (["--budget", "100000"], "error: budget n=100000 must be in \\[2, 1438\\]"),
        (["--method", "kd", "--teacher", "bad.safetensors"], "error: .*bad.safetensors is not a"),
    ],
)
def test_student_errors_found_while_loading(tmp_path, capsys, monkeypatch, args, match):
    """Mistakes only the data or the teacher file reveal: still one line, exit 2."""
    import re

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    base = {"--dataset": "digits", "--student-arch": "digits_mlp", "--method": "ce",
            "--budget": "100", "--device": "cpu"}  # fmt: skip
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    rc, out, err = run_cli(["student", *[x for kv in base.items() for x in kv]], capsys)
    assert rc == 2 and not out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.match(match, lines[0]), err


def test_progress_lines_are_rate_limited_off_a_terminal(monkeypatch, capsys):
    """Not a tty: one line per interval, no carriage returns; a tty: every line."""
    monkeypatch.setattr(cli.sys.stderr, "isatty", lambda: False, raising=False)
    clock = iter([0.0, 1.0, 29.0, 31.0, 40.0, 62.0])
    monkeypatch.setattr(cli.time, "monotonic", lambda: next(clock))
    progress = cli.Progress(every_s=30.0)
    for i in range(6):
        progress(f"epoch {i}")
    err = capsys.readouterr().err
    assert err.splitlines() == ["epoch 0", "epoch 3", "epoch 5"] and "\r" not in err


# ------------------------------------------------------------------ kernel ISA
def test_pin_kernel_isa_respects_the_users_choice(monkeypatch):
    monkeypatch.setattr(quickstart.platform, "machine", lambda: "x86_64")
    environ = {
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    assert quickstart.pin_kernel_isa(environ) == {
        "ATEN_CPU_CAPABILITY": "avx2",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_cpu_max_isa=AVX2",
    }
    assert environ["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE"
    assert quickstart.pin_kernel_isa(environ) == {}  # all set now
    monkeypatch.setattr(quickstart.platform, "machine", lambda: "aarch64")
    assert quickstart.pin_kernel_isa({}) == {}  # other architectures: other kernels


#: a reduced quick start through the command line; 3 teacher epochs suffice for AVX-512 and
#: AVX2 kernels to give different rows when nothing pins them (measured on an AVX-512 CPU)
_REDUCED_QUICKSTART = """
import sys
from reference_experiments import quickstart
from reference_experiments.__main__ import main
quickstart.METHODS, quickstart.BUDGETS, quickstart.SEEDS = ("ce", "ckd_all"), (100,), (0, 1)
quickstart.MAX_EPOCHS, quickstart.TEACHER_EPOCHS = 3, 3
sys.exit(main(["quickstart", "--out", sys.argv[1]]))
"""
#: what depends on the machine's speed or the clock, not on the arithmetic
_TIMING = {"wall_s", "train_images_per_s", "stack_images_per_s", "finished_at", "teacher"}


@pytest.mark.slow
@pytest.mark.skipif(
    quickstart.platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 kernels"
)
def test_quickstart_rows_identical_under_every_kernel_isa(tmp_path):
    """The command's rows do not depend on the CPU's own ISA: this CPU as it is (its
    default kernels: AVX-512 where it has it) and as an AVX2 machine
    (``ATEN_CPU_CAPABILITY=avx2``, what torch runs on such a CPU)."""
    runs = {"default": None, "avx2": "avx2"}
    rows = {}
    for name, capability in runs.items():
        env = {k: v for k, v in os.environ.items()
               if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}  # fmt: skip
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        out = tmp_path / name
        proc = subprocess.run([sys.executable, "-c", _REDUCED_QUICKSTART, str(out)], env=env,
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = (out / "results.jsonl").read_text(encoding="utf-8").splitlines()
        rows[name] = [{k: v for k, v in json.loads(x).items() if k not in _TIMING} for x in lines]
        assert len(rows[name]) == 4
        assert {r["environment"]["torch_cpu_capability"] for r in rows[name]} == {"AVX2"}
    first, *others = rows.values()
    assert all(other == first for other in others)


def test_describe_environment_one_line_per_environment():
    from reference_experiments.rows import describe_environment

    avx2 = {"torch": "2.13.0", "torch_cpu_capability": "AVX2", "cpu_model": "X", "jax": None}
    rows = [{"environment": avx2}, {"environment": dict(avx2)}, {"run_id": "old"}]
    rows.append({"environment": {**avx2, "torch_cpu_capability": "AVX512"}})
    lines = describe_environment(rows).splitlines()[2:]
    assert lines == [
        "- torch 2.13.0; torch CPU kernels AVX2; CPU X",
        "- (rows without a recorded environment)",
        "- torch 2.13.0; torch CPU kernels AVX512; CPU X",
    ]
