"""``python -m reference_experiments {quickstart,train-teacher,student,grid,report,...} ...``

Knowledge distillation under a teacher-call budget: the teacher may be called
on only n training images (its outputs are cached), and students train on
those outputs. Examples::

    python -m reference_experiments quickstart                   # CPU, digits, < 2 min
    python -m reference_experiments student --help               # every method, one line each
    python -m reference_experiments import-teacher --arch wrn_40_2 \\
        --checkpoint wrn_40_2_vanilla/ckpt_epoch_240.pth --dataset cifar100 --out teachers
    python -m reference_experiments student --dataset digits --teacher runs/t.safetensors \\
        --student-arch digits_mlp --method ckd_all --budget 500 --preset fast
    python -m reference_experiments grid table1 --dry-run
    python -m reference_experiments report runs/table1/results.jsonl
    python -m reference_experiments prepare-data --source cifar-10-python.tar.gz --data-dir data

A user mistake (unknown name or option, missing file, bad number, a results path that
cannot be written) prints one line ``error: ...`` and exits with status 2 before any
training; ``--debug`` (before or after the subcommand) shows the traceback. The parser
is built without importing torch or keras (``cli_options``), so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import cli_options as opts
from .prepare_data import check_dataset_files

DEBUG_HELP = "show tracebacks of errors"
THREADS_HELP = "torch CPU threads (the quick start always uses 1)"


def _parser() -> tuple[opts.Parser, dict[str, opts.Parser]]:
    """The command line and its subcommands' parsers."""
    common = opts.Parser(add_help=False)  # also accepted after the subcommand
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    common.add_argument(
        "--threads", type=opts.positive_int, default=argparse.SUPPRESS, help=THREADS_HELP
    )
    p = opts.Parser(
        prog="python -m reference_experiments",
        description="Distillation under a teacher-call budget (the CKD paper's experiments).",
    )
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    p.add_argument("--threads", type=opts.positive_int, default=None, help=THREADS_HELP)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    subs: dict[str, opts.Parser] = {}

    def add(name: str, text: str, **kw: Any) -> opts.Parser:
        subs[name] = sub.add_parser(name, help=text, description=text, parents=[common], **kw)
        return subs[name]

    q = add("quickstart", "CPU digits demo (< 2 min): teacher, 4 methods, table")
    q.add_argument(
        "--out", default=None, help="default: ./runs/quickstart (keras: keras_quickstart)"
    )
    q.add_argument(
        "--framework",
        choices=("torch", "keras"),
        default="torch",
        help="torch: the PyTorch pipeline; keras: ckd_core.distillation in Keras 3",
    )
    q.add_argument(
        "--backend",
        choices=("jax", "torch", "tensorflow"),
        default="jax",
        help="Keras backend for --framework keras",
    )

    opts.add_train_teacher_arguments(add("train-teacher", "train a teacher (safetensors + JSON)"))
    opts.add_import_teacher_arguments(
        add("import-teacher", "convert a RepDistiller/mdistiller teacher checkpoint")
    )

    s = add(
        "student",
        "one student run under a teacher-call budget",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=opts.describe_methods(),
    )
    opts.add_run_arguments(s, required=("dataset", "student_arch", "method", "budget"))
    s.add_argument("--results", default=None, help="also append the row to this JSONL")

    g = add("grid", "run a TOML grid resumably (one JSONL row per run)")
    g.add_argument("config", help="TOML path or bundled name (table1, table2, fig3_cars, ...)")
    g.add_argument("--results", default=None, help="results JSONL (default: from the config)")
    opts.add_device(g)
    opts.add_data_dir(g)
    opts.add_preset(g)
    opts.add_precision(g)
    g.add_argument("--dataset", default=None, help="override every run's dataset")
    g.add_argument(
        "--max-epochs", type=opts.positive_int, default=None, help="cap every run's epochs"
    )
    g.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    g.add_argument("--shard", default=None, metavar="I/N", help="run only shard I of N")
    g.add_argument(
        "--stack", type=opts.positive_int, default=32, metavar="N", help="runs per stacked step"
    )
    g.add_argument("--keep-going", action="store_true", help="log failed stacks, continue")
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, data and teachers, list the runs; create nothing",
    )
    g.add_argument("--no-progress", action="store_true")
    opts.add_launcher_arguments(g)

    r = add("report", "Markdown tables + PNG figures from results JSONL")
    r.add_argument("results", nargs="+", help="results JSONL files, folders or glob patterns")
    r.add_argument("--out", default=None, help="output folder (default: <results folder>/report)")
    r.add_argument("--targets", default=None, help="comma-separated target accuracies (%%)")

    c = add("campaign", "the paper's grids in priority order, time-limited")
    opts.add_campaign_arguments(c)

    d = add("prepare-data", "build the cifar10-jpeg folder from the official CIFAR-10 archive")
    d.add_argument(
        "--source",
        required=True,
        help="cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) "
        "or its extracted cifar-10-batches-py folder",
    )
    opts.add_data_dir(d)
    return p, subs


class Progress:
    """Epoch lines on stderr: every epoch on a terminal; in a log file (not a tty)
    one line per ``every_s`` seconds, so logs hold lines, never carriage-return floods."""

    def __init__(self, every_s: float = 30.0) -> None:
        self.every_s = 0.0 if sys.stderr.isatty() else every_s
        self.last = -math.inf

    def __call__(self, line: str) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            print(line, file=sys.stderr, flush=True)


def _writable(path: str | os.PathLike[str], what: str = "results path") -> Path:
    """Creates the file's folder and writes a probe file in it now, so that a path that
    cannot be written fails before training, not after it."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not a file")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"{what} {path}: a parent of it is a file") from None
    except OSError as e:
        raise PermissionError(f"{what} {path}: cannot create {p.parent} ({e.strerror})") from None
    try:
        with tempfile.TemporaryFile(dir=p.parent):
            pass
        if p.exists() and not os.access(p, os.W_OK):
            raise PermissionError(13, "permission denied")
    except OSError as e:
        raise PermissionError(f"{what} {path}: cannot write in {p.parent} ({e.strerror})") from None
    return p


def _cmd_quickstart(a: argparse.Namespace) -> int:
    from . import quickstart

    pinned = quickstart.pin_kernel_isa()  # before torch or jax is imported
    if pinned:
        print(
            "quick start: CPU kernels pinned (set them to override): "
            + " ".join(f"{k}={v}" for k, v in pinned.items()),
            file=sys.stderr,
        )
    if a.framework == "keras":
        import subprocess  # a fresh interpreter: Keras' backend is chosen at its import

        out = a.out or "runs/keras_quickstart"
        _writable(Path(out) / "results.jsonl")
        cmd = [sys.executable, "-m", "reference_experiments.keras_quickstart", "--out", out]
        env = {**os.environ, "KERAS_BACKEND": a.backend}
        return subprocess.run([*cmd, "--backend", a.backend], env=env, check=False).returncode
    out = a.out or "runs/quickstart"
    _writable(Path(out) / "results.jsonl")
    quickstart.main(out=out)
    return 0


def _cmd_train_teacher(a: argparse.Namespace) -> int:
    from .teacher_spec import TeacherSpec

    opts.check_choice("arch", a.arch, opts.MODEL_NAMES)
    opts.check_choice("dataset", a.dataset, opts.DATASET_NAMES)
    spec = TeacherSpec.from_arguments(a)
    _writable(Path(a.out) / "teacher.json", "--out")
    check_dataset_files(spec.dataset, a.data_dir)
    from . import distributed as rdist
    from .data import load_dataset
    from .devices import resolve_device
    from .teacher import train_teacher

    resolve_device(a.device)
    path = train_teacher(
        spec,
        load_dataset(spec.dataset, a.data_dir, seed=spec.split_seed),
        out_dir=a.out,
        device=a.device,
        progress=not a.no_progress,
    )
    if rdist.is_main():
        meta = json.loads(path.with_suffix(".json").read_text())
        print(
            f"{path}  test_accuracy={meta['test_accuracy']:.4f}  "
            f"({meta['train_seconds']:.1f} s, {meta['train_images_per_s']:.0f} img/s)"
        )
    return 0


def _cmd_import_teacher(a: argparse.Namespace) -> int:
    opts.check_choice("arch", a.arch, opts.MODEL_NAMES)
    opts.check_choice("dataset", a.dataset, opts.IMPORT_DATASETS)
    if not Path(a.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {a.checkpoint} not found")
    _writable(Path(a.out) / "teacher.json", "--out")
    from .data import ImageDataset, load_dataset
    from .devices import resolve_device
    from .import_teacher import import_teacher

    def data() -> ImageDataset | None:
        try:
            return load_dataset(a.dataset, a.data_dir)
        except FileNotFoundError as e:  # the import needs no data
            print(f"test accuracy not measured: {e}", file=sys.stderr)
            return None

    path = import_teacher(
        a.arch, a.checkpoint, a.out, dataset=a.dataset, data=data, device=resolve_device(a.device)
    )
    accuracy = json.loads(path.with_suffix(".json").read_text())["test_accuracy"]
    print(f"{path}  test_accuracy=" + ("not measured" if accuracy is None else f"{accuracy:.4f}"))
    return 0


def _cmd_student(a: argparse.Namespace) -> int:
    from .config import from_arguments

    cfg = from_arguments(a)
    check_dataset_files(cfg.dataset, cfg.data_dir)
    if a.results:
        _writable(a.results)
    if cfg.teacher and not Path(cfg.teacher).is_file():
        raise FileNotFoundError(f"teacher file {cfg.teacher} not found")
    from . import engine, methods
    from .devices import resolve_device
    from .rows import append_row

    resolve_device(cfg.device)  # a CUDA device that is not there fails here, not later
    if methods.get(cfg.method).uses_teacher and not cfg.teacher:
        raise ValueError(f"--teacher PATH is required for method {cfg.method!r}")
    t0 = time.perf_counter()
    [(cfg, row)] = engine.train([cfg], log=Progress())
    obj = row.to_json(cfg)
    print(json.dumps(obj, sort_keys=True, default=str))
    if row.diverged:
        raise FloatingPointError(f"every lr diverged ({row.lrs_diverged}); try a smaller --lr")
    if a.results:
        append_row(a.results, obj)
    print(
        f"student {cfg.method}, budget n={cfg.budget} ({row.teacher_calls} teacher calls): "
        f"test accuracy {100 * row.test_acc:.2f}% (lr {row.lr_used:g}, {row.epochs} epochs) "
        f"in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    return 0


def _dry_run(cfg: dict, runs: list, results: Path) -> int:
    """Checks that every run's data and teacher exist and lists the runs; writes nothing."""
    from .result_files import finished_run_ids
    from .teacher_files import find_teacher
    from .teacher_spec import RECIPES

    for dataset, data_dir in sorted({(r.dataset, r.data_dir) for r in runs}, key=str):
        check_dataset_files(dataset, data_dir)
    for key in sorted({r.teacher_key for r in runs if r.teacher_key}):
        spec = cfg["teachers"][key.split("@")[0]]
        if "path" in spec and not Path(spec["path"]).is_file():
            raise FileNotFoundError(f"teacher {key}: file {spec['path']} not found")
        found = find_teacher(Path(cfg["teachers_dir"]) / key.replace("@", "_"))
        epochs = spec.get("train_epochs", RECIPES[spec.get("recipe", "fast")].epochs)
        state = spec.get("path") or found or f"to train ({epochs} epochs)"
        print(f"teacher {key}: {state}", file=sys.stderr)
    done = finished_run_ids(results)
    for r in runs:
        print(
            f"{r.run_id()} {'done' if r.run_id() in done else 'todo'} {r.dataset} "
            f"{r.teacher_arch}->{r.student_arch} {r.method} n={r.budget} seed={r.seed} "
            f"{r.preset}" + (f" lr={r.lr}" if r.lr is not None else "")
        )
    print(f"{len(runs)} runs, {sum(r.run_id() in done for r in runs)} done", file=sys.stderr)
    return 0


def _cmd_grid(a: argparse.Namespace) -> int:
    from . import grid

    cfg = grid.load_config(grid.resolve_config(a.config))
    runs = grid.with_overrides(
        grid.expand(cfg),
        dataset=a.dataset,
        preset=a.preset,
        precision=a.precision,
        max_epochs=a.max_epochs,
        device=a.device,
        data_dir=a.data_dir,
    )
    runs = grid.select_shard(runs, a.shard)
    results = Path(a.results or cfg["results"])
    if a.dry_run:
        return _dry_run(cfg, runs, results)
    _writable(results)
    from .launcher import launch_from_cli

    if (status := launch_from_cli(a, cfg, runs, results)) is not None:
        return status
    counts = grid.run_grid(
        runs,
        results,
        grid.Runner(cfg),
        max_runs=a.max_runs,
        stack=a.stack,
        keep_going=a.keep_going,
        grid_name=cfg["name"],
        paper_dataset=cfg.get("paper_dataset"),
        progress=not a.no_progress,
    )
    print(f"grid {cfg['name']}: {counts} -> {results}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def _check_results_file(path: str) -> None:
    """A results file exists and every line is a JSON object with a ``run_id``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"results file {path} not found")
    rows = 0
    for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict) or "run_id" not in obj:
            raise ValueError(f"{path}:{n}: not a result row (a JSON object with a run_id)")
        rows += 1
    if not rows:
        raise ValueError(f"results file {path} holds no rows")


def _cmd_report(a: argparse.Namespace) -> int:
    from .result_files import result_files

    for path in result_files(a.results):
        _check_results_file(str(path))
    try:
        targets = [float(t) for t in a.targets.split(",")] if a.targets else None
    except ValueError:
        raise ValueError(f"--targets {a.targets!r}: not comma-separated numbers") from None
    from . import report

    first = Path(a.results[0])
    out = Path(a.out) if a.out else (first if first.is_dir() else first.parent) / "report"
    _writable(out / "report.md", "--out")
    path = report.make_report(a.results, out, targets=targets)
    print(path.read_text(encoding="utf-8"))
    print(f"\nwrote {path} and figures in {out}", file=sys.stderr)
    return 0


def _cmd_campaign(a: argparse.Namespace) -> int:
    from .campaign import run_from_arguments

    if not a.dry_run:
        _writable(Path(a.out) / "campaign.probe", "--out")
    counts = run_from_arguments(a)
    print(f"campaign: new rows {counts}", file=sys.stderr)
    return 0


def _cmd_prepare_data(a: argparse.Namespace) -> int:
    from .datafiles import cache_dir, default_data_dir
    from .prepare_data import build_cifar10_jpeg

    data_dir = a.data_dir or default_data_dir()
    if data_dir is None:
        raise ValueError("no data folder: pass --data-dir DIR (or set $CKD_DATA_DIR)")
    _writable(Path(data_dir) / "cifar10-jpeg" / "classes.txt", "--data-dir")
    folder = build_cifar10_jpeg(a.source, data_dir)
    print(
        f"wrote {folder}; use --data-dir {data_dir} --dataset cifar10-jpeg (the first "
        f"run decodes it once into {cache_dir()})"
    )
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "quickstart": _cmd_quickstart,
    "train-teacher": _cmd_train_teacher,
    "import-teacher": _cmd_import_teacher,
    "student": _cmd_student,
    "grid": _cmd_grid,
    "report": _cmd_report,
    "campaign": _cmd_campaign,
    "prepare-data": _cmd_prepare_data,
}
#: what a user mistake raises: one line ``error: ...``, exit 2 (``--debug``: traceback);
#: ImportError: a missing extra, or KERAS_BACKEND naming a backend other than torch
USER_ERRORS = (
    ImportError,
    ValueError,
    FileNotFoundError,
    FloatingPointError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
    PermissionError,
)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = _parser()
    command = next((t for t in argv if t in subs), None)
    known = opts.option_strings([parser, *([subs[command]] if command else [])])
    misspelt = opts.misspelt_option(argv, known)
    if misspelt:
        parser.error(misspelt)
    a = parser.parse_args(argv)
    try:
        if a.threads and a.cmd != "quickstart":
            import torch

            torch.set_num_threads(a.threads)
        return COMMANDS[a.cmd](a)
    except USER_ERRORS as e:
        if a.debug:
            raise
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
