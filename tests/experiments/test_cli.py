"""The command line: help without torch, one-line user errors (exit 2, no traceback) before
any training, the student's summary line, ``grid --dry-run`` and ``prepare-data``."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import run_cli

from reference_experiments import __main__ as cli
from reference_experiments import cli_options, data, engine, methods, models
from reference_experiments.prepare_data import CIFAR10_CLASSES

ROOT = Path(__file__).resolve().parents[2]

COMMANDS = tuple(cli.COMMANDS)
STUDENT = ["student", "--dataset", "digits", "--student-arch", "digits_mlp", "--method", "ce",
           "--budget", "40", "--device", "cpu", "--preset", "fast",
           "--max-epochs", "1"]  # fmt: skip


def _one_line_error(rc: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def no_training(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a user mistake must be found before training")

    monkeypatch.setattr(engine, "train", fail)
    monkeypatch.setattr("reference_experiments.teacher.train_teacher", fail)


# ----------------------------------------------------------------------- help
@pytest.mark.slow
def test_help_imports_neither_torch_nor_keras():
    """Every ``--help`` is answered by a parser built from torch-free modules."""
    script = (
        "import sys\nfrom reference_experiments.__main__ import main\n"
        f"for cmd in {['', *COMMANDS]!r}:\n"
        "    try:\n        main([cmd, '--help'] if cmd else ['--help'])\n"
        "    except SystemExit as e:\n        assert e.code == 0, (cmd, e.code)\n"
        "heavy = sorted({'torch', 'keras', 'jax', 'tensorflow', 'numpy'} & set(sys.modules))\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stderr, proc.stderr[-2000:]


def test_option_names_are_the_engines():
    """The torch-free lists the parser is built from equal the engine's registries."""
    assert cli_options.DATASET_NAMES == data.DATASET_NAMES
    assert cli_options.MODEL_NAMES == models.MODEL_NAMES
    assert cli_options.METHOD_DESCRIPTIONS == methods.describe()


@pytest.mark.parametrize("option", ["--device", "--data-dir", "--preset"])
def test_shared_options_have_one_help_text(option):
    _, subs = cli._parser()
    texts = {
        (name, a.help)
        for name, sub in subs.items()
        for a in sub._actions
        if option in a.option_strings
    }
    assert len(texts) >= 2 and len({help for _, help in texts}) == 1, texts


# --------------------------------------------------------------- user mistakes
@pytest.mark.parametrize(
    "args,match",
    [
        (["--device", "tpu7"], r"argument --device: unknown device 'tpu7'"),
        (["--seed", "-1"], r"argument --seed: must be an integer in \[0, 4294967295\]"),
        (["--seed", str(2**64)], r"argument --seed: must be an integer in \[0, 4294967295\]"),
        (["--seed", "2**64"], r"argument --seed: must be an integer"),
        (["--patience", "-1"], r"argument --patience: must be an integer >= 0, got '-1'"),
        (["--max-epochs", "0"], r"argument --max-epochs: must be an integer >= 1"),
        (["--budgte", "100"], r"unrecognized option --budgte; did you mean --budget\?"),
        (["--sed=3"], r"unrecognized option --sed; did you mean --seed\?"),
    ],
)
def test_student_option_mistakes(args, match, capsys, no_training):
    rc, out, err = run_cli([*STUDENT, *args], capsys)
    assert re.fullmatch("error: " + match + ".*", _one_line_error(rc, err)) and not out


def test_threads_before_or_after_the_subcommand(capsys, no_training):
    for argv in (["--threads", "-1", *STUDENT], [*STUDENT, "--threads", "-1"]):
        rc, _, err = run_cli(argv, capsys)
        assert _one_line_error(rc, err).startswith("error: argument --threads: must be")


def test_typo_in_a_global_option(capsys):
    rc, _, err = run_cli(["--debgu", "report", "x.jsonl"], capsys)
    assert _one_line_error(rc, err) == "error: unrecognized option --debgu; did you mean --debug?"


def test_unknown_dataset_same_line_for_teacher_and_student(tmp_path, capsys, no_training):
    args = ["--dataset", "nope"]
    rc, _, student = run_cli([*STUDENT, *args], capsys)
    student = _one_line_error(rc, student)
    teacher = ["train-teacher", "--arch", "digits_cnn", "--epochs", "1", "--out", str(tmp_path)]
    rc, _, err = run_cli([*teacher, *args], capsys)
    assert _one_line_error(rc, err) == student
    assert student.startswith("error: unknown dataset 'nope'; choose from cifar100")


def test_train_teacher_missing_data(tmp_path, capsys, no_training):
    empty = tmp_path / "data"
    empty.mkdir()
    argv = ["train-teacher", "--arch", "wrn_16_2", "--dataset", "cifar10-jpeg", "--epochs", "1",
            "--out", str(tmp_path / "t"), "--device", "cpu", "--data-dir", str(empty)]  # fmt: skip
    line = _one_line_error(*run_cli(argv, capsys)[::2])
    assert "cifar10-jpeg not found in " + str(empty) in line and "prepare-data" in line
    missing = tmp_path / "nowhere"
    line = _one_line_error(*run_cli([*argv[:-1], str(missing)], capsys)[::2])
    assert f"--data-dir {missing} does not exist" in line


def test_missing_data_messages_name_only_existing_folders(tmp_path, monkeypatch):
    """Wherever the data folder comes from, a path in the message exists or is said not to."""
    from reference_experiments.prepare_data import check_dataset_files

    monkeypatch.delenv("CKD_DATA_DIR", raising=False)
    monkeypatch.setattr("reference_experiments.datafiles.default_data_dir", lambda: None)
    for dataset in ("cifar10-jpeg", "cars64"):
        with pytest.raises(FileNotFoundError) as e:
            check_dataset_files(dataset, None)
        assert "/" not in str(e.value), e.value
        with pytest.raises(FileNotFoundError) as e:
            check_dataset_files(dataset, tmp_path)
        paths = re.findall(r"(/[^\s;,()]+)", str(e.value))
        assert paths and all(Path(p).exists() for p in paths if p.startswith(str(tmp_path)))


@pytest.mark.parametrize("name", ["cifar10-jpeg", "cars64"])
def test_loader_names_the_shared_copy_only_where_it_exists(tmp_path, monkeypatch, name):
    from reference_experiments import datafiles
    from reference_experiments.datasets import dataset_spec

    monkeypatch.setattr(datafiles, "_repo_root", lambda: tmp_path / "repo")
    copy = tmp_path / "shared" / "data" / str(dataset_spec(name).shared_copy)
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError) as absent:
        data.load_dataset(name, tmp_path / "d")
    assert str(copy) not in str(absent.value)
    if name == "cifar10-jpeg":
        assert "prepare-data --source cifar-10-python.tar.gz" in str(absent.value)
    copy.mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as present:
        data.load_dataset(name, tmp_path / "d")
    assert f"copy the folder {copy} into {tmp_path / 'd'}" in str(present.value)


@pytest.mark.parametrize(
    "content,match",
    [
        (None, r"error: results file .*rows.jsonl not found"),
        ("", r"error: results file .*rows.jsonl holds no rows"),
        ('{"run_id": "a"}\nnot json\n', r"error: .*rows.jsonl:2: not a result row .*"),
        ("[1, 2]\n", r"error: .*rows.jsonl:1: not a result row .*"),
    ],
)
def test_report_on_missing_or_malformed_results(tmp_path, capsys, content, match):
    path = tmp_path / "rows.jsonl"
    if content is not None:
        path.write_text(content)
    rc, out, err = run_cli(["report", str(path)], capsys)
    assert re.fullmatch(match, _one_line_error(rc, err)) and not out
    assert not (tmp_path / "report").exists()


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(FileNotFoundError):
        cli.main(["report", str(tmp_path / "missing.jsonl"), "--debug"])
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "report", str(tmp_path / "missing.jsonl")])


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_unwritable_results_path_refused_before_training(capsys, no_training):
    """/proc refuses new files even to root (a chmod'ed folder would not)."""
    rc, out, err = run_cli([*STUDENT, "--results", "/proc/ckd/rows.jsonl"], capsys)
    assert "error: results path /proc/ckd/rows.jsonl: cannot" in _one_line_error(rc, err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_results_folder_refused_before_training(tmp_path, capsys, no_training):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        rc, _, err = run_cli([*STUDENT, "--results", str(folder / "rows.jsonl")], capsys)
    finally:
        folder.chmod(0o755)
    assert "cannot write in" in _one_line_error(rc, err)


@pytest.mark.slow
def test_mistake_in_a_fresh_interpreter_prints_one_line():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    argv = [sys.executable, "-m", "reference_experiments", *STUDENT, "--budgte", "9"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: unrecognized option --budgte; did you mean --budget?\n"


# ------------------------------------------------------------------ good runs
def test_student_ends_with_a_readable_line(tmp_path, capsys):
    rc, out, err = run_cli([*STUDENT, "--results", str(tmp_path / "rows.jsonl")], capsys)
    assert rc == 0
    row = json.loads(out)
    assert row["environment"]["torch"] == torch.__version__
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"student ce, budget n=40 \(0 teacher calls\): test accuracy \d+\.\d\d% "
        r"\(lr 0\.05, 1 epochs\) in \d+\.\d s",
        last,
    ), last
    assert f"{100 * row['test_acc']:.2f}%" in last


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_grid_dry_run_creates_nothing_and_checks_data(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.toml"
    config.write_text(
        'name = "tiny"\nresults = "out/rows.jsonl"\nteachers_dir = "out/teachers"\n'
        '[defaults]\ndataset = "digits"\npreset = "fast"\ndevice = "cpu"\n'
        '[teachers.cnn]\narch = "digits_cnn"\ntrain_epochs = 1\n'
        '[[runs]]\npairs = [["cnn", "digits_mlp"]]\nmethods = ["ce", "kd"]\nbudgets = [60]\n'
    )
    before = _tree(tmp_path)
    rc, out, err = run_cli(["grid", str(config), "--dry-run"], capsys)
    assert rc == 0 and _tree(tmp_path) == before
    assert len(out.splitlines()) == 2 and "teacher cnn@" in err and "to train (1 epochs)" in err
    rc, _, err = run_cli(["grid", str(config), "--dry-run", "--dataset", "cifar10-jpeg",
                       "--data-dir", str(tmp_path)], capsys)  # fmt: skip
    assert "dataset cifar10-jpeg not found in" in _one_line_error(rc, err)
    assert _tree(tmp_path) == before


def test_grid_dry_run_names_a_missing_teacher_file(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(
        f'name = "tiny"\nresults = "{tmp_path}/rows.jsonl"\n'
        '[defaults]\ndataset = "digits"\ndevice = "cpu"\n'
        f'[teachers.cnn]\narch = "digits_cnn"\npath = "{tmp_path}/gone.safetensors"\n'
        '[[runs]]\npairs = [["cnn", "digits_mlp"]]\nmethods = ["kd"]\nbudgets = [60]\n'
    )
    rc, _, err = run_cli(["grid", str(config), "--dry-run"], capsys)
    assert "gone.safetensors not found" in _one_line_error(rc, err)


# ---------------------------------------------------------------- prepare-data
def _official_cifar10(root: Path, monkeypatch, n: int = 3) -> tuple[Path, dict]:
    """A tiny folder in the official ``cifar-10-batches-py`` layout, md5s registered."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        ramp = np.linspace(0, 1, 32)[None, :, None, None] * rng.uniform(0, 255, (n, 1, 1, 3))
        x = np.broadcast_to(ramp, (n, 32, 32, 3)).astype(np.uint8)  # smooth: JPEG keeps it
        y = rng.integers(0, 10, size=n).tolist()
        batch = {b"labels": y, b"data": x.transpose(0, 3, 1, 2).reshape(n, 3072)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        arrays[name] = (x, y)
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    for f in folder.iterdir():
        monkeypatch.setitem(data.CIFAR10_MD5, f.name, hashlib.md5(f.read_bytes()).hexdigest())
    return folder, arrays


def test_prepare_data_builds_a_loadable_cifar10_jpeg(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CKD_CACHE_DIR", str(tmp_path / "cache"))
    folder, _ = _official_cifar10(tmp_path / "official", monkeypatch)
    argv = ["prepare-data", "--source", str(folder), "--data-dir", str(tmp_path / "d")]
    rc, out, _ = run_cli(argv, capsys)
    assert rc == 0 and "--dataset cifar10-jpeg" in out and str(tmp_path / "cache") in out
    ds = data.load_dataset("cifar10-jpeg", tmp_path / "d")
    official = data.load_dataset("cifar10", folder.parent)
    assert ds.y_train.tolist() == official.y_train.tolist()
    assert ds.y_test.tolist() == official.y_test.tolist()
    diff = np.abs(ds.x_train.astype(int) - official.x_train.astype(int))
    assert diff.mean() < 4  # JPEG q75: lossy, but the same pictures
    assert (tmp_path / "d" / "cifar10-jpeg" / "SHA256SUMS").is_file()


def test_prepare_data_refuses_an_archive_with_other_md5s(tmp_path, capsys, monkeypatch):
    folder, _ = _official_cifar10(tmp_path / "official", monkeypatch)
    (folder / "test_batch").write_bytes(b"changed")
    argv = ["prepare-data", "--source", str(folder), "--data-dir", str(tmp_path)]
    rc, _, err = run_cli(argv, capsys)
    assert "md5" in _one_line_error(rc, err)
    assert not (tmp_path / "cifar10-jpeg" / "cifar10-jpeg.tar.xz").exists()
