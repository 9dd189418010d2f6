"""``python -m reference_experiments {train-teacher,student,grid,report,quickstart} ...``

Knowledge distillation under a teacher-call budget: the teacher may be called
on only n training images (its outputs are cached), and students train on
those outputs. Examples::

    python -m reference_experiments quickstart                   # CPU, digits, < 2 min
    python -m reference_experiments student --help               # every method, one line each
    python -m reference_experiments student --dataset digits --teacher runs/t.safetensors \\
        --student-arch digits_mlp --method ckd_all --budget 500 --preset fast
    python -m reference_experiments grid table1 --dry-run
    python -m reference_experiments report runs/table1/results.jsonl

A user mistake (unknown name, missing file, bad number) prints one line
``error: ...`` and exits with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .config import add_arguments, from_arguments


def _parser() -> argparse.ArgumentParser:
    from .methods import describe

    p = argparse.ArgumentParser(
        prog="python -m reference_experiments",
        description="Distillation under a teacher-call budget (the CKD paper's experiments).",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train-teacher", add_help=False, help="train a teacher (see its --help)")

    s = sub.add_parser(
        "student",
        help="one student run under a teacher-call budget",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods:\n" + "\n".join(f"  {k:<14} {v}" for k, v in describe().items()),
    )
    add_arguments(s, required=("dataset", "student_arch", "method", "budget"))
    s.add_argument("--results", default=None, help="also append the row to this JSONL")

    g = sub.add_parser("grid", help="run a TOML grid resumably (one JSONL row per run)")
    g.add_argument("config", help="TOML path or bundled name (table1, table2, fig3_cars, ...)")
    g.add_argument("--results", default=None, help="results JSONL (default: from the config)")
    g.add_argument("--device", default=None, help="auto (cuda if available), cpu, cuda:N")
    g.add_argument("--data-dir", default=None)
    g.add_argument("--dataset", default=None, help="override every run's dataset")
    g.add_argument("--preset", default=None, help="override every run's preset")
    g.add_argument("--max-epochs", type=int, default=None, help="cap every run's epochs")
    g.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    g.add_argument("--shard", default=None, metavar="I/N", help="run only shard I of N")
    g.add_argument("--stack", type=int, default=32, metavar="N", help="runs per stacked step")
    g.add_argument("--keep-going", action="store_true", help="log failed stacks, continue")
    g.add_argument("--dry-run", action="store_true", help="validate and list the runs")
    g.add_argument("--no-progress", action="store_true")

    r = sub.add_parser("report", help="Markdown tables + PNG figures from results JSONL")
    r.add_argument("results", nargs="+")
    r.add_argument("--out", default=None, help="output dir (default: <results dir>/report)")
    r.add_argument("--targets", default=None, help="comma-separated target accuracies (%%)")

    c = sub.add_parser("campaign", help="the paper's grids in priority order, time-limited")
    c.add_argument("--minutes", type=float, required=True, help="end cleanly before this")
    c.add_argument("--out", required=True, help="rows and teachers go here, at once")
    c.add_argument("--device", default=None, help="auto (cuda if available), cpu, cuda:N")
    c.add_argument("--data-dir", default=None)
    c.add_argument("--stack", type=int, default=32, metavar="N", help="runs per stacked step")
    c.add_argument("--dry-run", action="store_true", help="validate the plan, train nothing")

    q = sub.add_parser("quickstart", help="CPU digits demo (< 2 min): teacher, 4 methods, table")
    q.add_argument(
        "--out", default=None, help="default: runs/quickstart (keras: runs/keras_quickstart)"
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
    return p


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


def _results_folder(path: str) -> Path:
    """Creates the results file's folder up front, so that a bad path fails before training."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"results path {path}: a parent of it is a file") from None
    return p


def _cmd_student(a: argparse.Namespace) -> int:
    from . import engine, methods
    from .devices import resolve_device
    from .rows import append_row

    cfg = from_arguments(a)
    resolve_device(cfg.device)  # a CUDA device that is not there fails here, not later
    if a.results:
        _results_folder(a.results)
    if methods.get(cfg.method).uses_teacher and not cfg.teacher:
        raise ValueError(f"--teacher PATH is required for method {cfg.method!r}")
    if cfg.teacher and not Path(cfg.teacher).is_file():
        raise FileNotFoundError(f"teacher file {cfg.teacher} not found")
    [(cfg, row)] = engine.train([cfg], log=Progress())
    obj = row.to_json(cfg)
    print(json.dumps(obj, sort_keys=True))
    if row.diverged:
        raise FloatingPointError(f"every lr diverged ({row.lrs_diverged}); try a smaller --lr")
    if a.results:
        append_row(a.results, obj)
    return 0


def _cmd_grid(a: argparse.Namespace) -> int:
    from . import grid
    from .rows import finished_ids

    cfg = grid.load_config(grid.resolve_config(a.config))
    runs = grid.with_overrides(
        grid.expand(cfg),
        dataset=a.dataset,
        preset=a.preset,
        max_epochs=a.max_epochs,
        device=a.device,
        data_dir=a.data_dir,
    )
    runs = grid.select_shard(runs, a.shard)
    results = _results_folder(a.results or cfg["results"])
    if a.dry_run:
        done = finished_ids(results)
        for r in runs:
            print(
                f"{r.run_id()} {'done' if r.run_id() in done else 'todo'} {r.dataset} "
                f"{r.teacher_arch}->{r.student_arch} {r.method} n={r.budget} seed={r.seed} "
                f"{r.preset}" + (f" lr={r.lr}" if r.lr is not None else "")
            )
        print(f"{len(runs)} runs, {sum(r.run_id() in done for r in runs)} done", file=sys.stderr)
        return 0
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


def _cmd_report(a: argparse.Namespace) -> int:
    from . import report

    out = Path(a.out) if a.out else Path(a.results[0]).parent / "report"
    targets = [float(t) for t in a.targets.split(",")] if a.targets else None
    path = report.make_report(a.results, out, targets=targets)
    print(path.read_text(encoding="utf-8"))
    print(f"\nwrote {path} and figures in {out}", file=sys.stderr)
    return 0


def _cmd_campaign(a: argparse.Namespace) -> int:
    from .campaign import run_campaign

    counts = run_campaign(
        a.minutes,
        a.out,
        device=a.device,
        data_dir=a.data_dir,
        stack=a.stack,
        dry_run=a.dry_run,
    )
    print(f"campaign: new rows {counts}", file=sys.stderr)
    return 0


def _cmd_quickstart(a: argparse.Namespace) -> int:
    if a.framework == "keras":
        # a fresh interpreter: this one already runs Keras on the torch backend (ckd_torch)
        import os
        import subprocess

        out = a.out or "runs/keras_quickstart"
        cmd = [sys.executable, "-m", "reference_experiments.keras_quickstart", "--out", out]
        env = {**os.environ, "KERAS_BACKEND": a.backend}
        return subprocess.run([*cmd, "--backend", a.backend], env=env, check=False).returncode
    from . import quickstart

    quickstart.main(out=a.out or "runs/quickstart")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if argv and argv[0] == "train-teacher":
        from . import teacher

        teacher.main(argv[1:])
        return 0
    a = _parser().parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    command = {
        "student": _cmd_student,
        "grid": _cmd_grid,
        "report": _cmd_report,
        "quickstart": _cmd_quickstart,
        "campaign": _cmd_campaign,
    }[a.cmd]
    try:
        return command(a)
    except (
        ValueError,
        FileNotFoundError,
        FloatingPointError,
        NotADirectoryError,
        FileExistsError,
    ) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
