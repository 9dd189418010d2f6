"""``python -m reference_experiments {train-teacher,student,grid,report,quickstart} ...``

Examples::

    python -m reference_experiments quickstart                   # CPU, digits, < 2 min
    python -m reference_experiments train-teacher --help
    python -m reference_experiments student --dataset digits --teacher runs/t.safetensors \\
        --student-arch digits_mlp --method ckd_all --budget 500 --preset fast
    python -m reference_experiments grid reference_experiments/configs/table1.toml --dry-run
    python -m reference_experiments grid reference_experiments/configs/table1.toml --device cuda
    python -m reference_experiments report runs/table1/results.jsonl --out runs/table1/report

``student`` and ``train-teacher`` also run data-parallel under ``torchrun
--nproc_per_node=N -m reference_experiments ...`` (DDP; rank 0 queries the
teacher, evaluates and writes; see ``reference_experiments/distributed.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _resolve_config(name: str) -> Path:
    """A path, or the name of a bundled config (``table1`` -> configs/table1.toml)."""
    p = Path(name)
    if p.exists():
        return p
    for cand in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.toml"):
        if cand.exists():
            return cand
    raise SystemExit(
        f"config not found: {name} (bundled: "
        f"{', '.join(sorted(c.stem for c in CONFIG_DIR.glob('*.toml')))})"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m reference_experiments",
        description="RTI-KD reference experiments (teacher-call budget).",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    sub.add_parser(
        "train-teacher", add_help=False, help="train a teacher (see `train-teacher --help`)"
    )

    s = sub.add_parser("student", help="one student run under a teacher-call budget")
    s.add_argument("--dataset", required=True)
    s.add_argument("--teacher", default=None, help="teacher .safetensors (not needed for ce)")
    s.add_argument("--student-arch", required=True)
    s.add_argument("--method", required=True)
    s.add_argument("--budget", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--preset", choices=["paper", "fast"], default="paper")
    s.add_argument("--teacher-view", choices=["clean", "augmented-once"], default="clean")
    s.add_argument("--lr", type=float, default=None)
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--max-epochs", type=int, default=None)
    s.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    s.add_argument("--data-dir", default=None)
    s.add_argument("--results", default=None, help="also append the row to this JSONL")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument(
        "--sync-bn", action="store_true", help="under torchrun: SyncBatchNorm over all ranks"
    )

    g = sub.add_parser("grid", help="run a TOML grid resumably (one JSONL row per run)")
    g.add_argument(
        "config", help="TOML path or bundled name (table1, table2, fig3_cars, fig4_rkd_d)"
    )
    g.add_argument("--results", default=None, help="results JSONL (default: from the config)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    g.add_argument("--data-dir", default=None)
    g.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    g.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="run only shard I of N (several processes can share one results file)",
    )
    g.add_argument(
        "--dataset",
        default=None,
        help="override every run's dataset (e.g. cifar100 where it exists)",
    )
    g.add_argument(
        "--preset", choices=["paper", "fast"], default=None, help="override every run's preset"
    )
    g.add_argument(
        "--stack",
        type=int,
        default=1,
        metavar="N",
        help="train up to N compatible runs (seeds, lrs) in one stacked vmap step "
        "(students.run_students); 1 = one run at a time",
    )
    g.add_argument(
        "--keep-going",
        action="store_true",
        help="log failed runs to <results>.failed.jsonl and continue",
    )
    g.add_argument("--dry-run", action="store_true", help="list the runs, run nothing")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--run-fn", default=None, help=argparse.SUPPRESS)  # module:function (tests)

    r = sub.add_parser("report", help="Markdown tables + PNG figures from results JSONL")
    r.add_argument("results", nargs="+")
    r.add_argument("--out", default=None, help="output dir (default: <results dir>/report)")
    r.add_argument(
        "--targets", default=None, help="comma-separated target accuracies in %% for Table 1"
    )

    q = sub.add_parser("quickstart", help="CPU digits demo (< 2 min): teacher, 4 methods, table")
    q.add_argument("--out", default="runs/quickstart")
    q.add_argument("--budgets", default=None, help="comma-separated budgets")
    q.add_argument("--seeds", type=int, default=None)
    q.add_argument("--methods", default=None, help="comma-separated methods")
    q.add_argument("--teacher-epochs", type=int, default=None)
    q.add_argument("--max-epochs", type=int, default=None)
    q.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    return p


def _cmd_student(a: argparse.Namespace) -> int:
    from reference_experiments import distributed as rdist
    from reference_experiments import grid

    if a.teacher is None and a.method != "ce":
        raise SystemExit(f"--teacher is required for method {a.method!r}")
    spec = {
        "dataset": a.dataset,
        "student_arch": a.student_arch,
        "method": a.method,
        "budget": a.budget,
        "seed": a.seed,
        "preset": a.preset,
        "teacher_view": a.teacher_view,
        "lr": a.lr,
        "batch_size": a.batch_size,
        "max_epochs": a.max_epochs,
        "teacher_path": a.teacher,
        "teacher_id": {"path": str(a.teacher)},
    }
    if a.sync_bn:
        spec["sync_bn"] = True
    spec["run_id"] = grid.run_id(spec)
    runner = grid.StudentRunner({"teachers": {}}, device=a.device, data_dir=a.data_dir)
    row = dict(runner(spec))
    row.setdefault("run_id", spec["run_id"])
    if rdist.is_main():  # under torchrun every rank has rank 0's row; one writes it
        print(json.dumps(row, sort_keys=True, default=str))
        if a.results:
            grid.append_row(a.results, row)
    return 0


def _cmd_grid(a: argparse.Namespace) -> int:
    from reference_experiments import grid

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit(
            "grid does not run under torchrun (every rank would run every spec); "
            "use `student` under torchrun, or `grid --shard I/N` in N processes"
        )
    cfg = grid.load_config(_resolve_config(a.config))
    if a.dataset:
        cfg["defaults"]["dataset"] = a.dataset
        for block in cfg["runs"]:
            block.pop("datasets", None)
            block["dataset"] = a.dataset
    if a.preset:
        cfg["defaults"]["preset"] = a.preset
        for block in cfg["runs"]:
            block.pop("presets", None)
            block["preset"] = a.preset
    specs = grid.select_shard(grid.expand(cfg), a.shard)
    results = Path(a.results or cfg["results"])
    if a.dry_run:
        done = grid.finished_ids(results)
        for s in specs:
            flag = "done" if s["run_id"] in done else "todo"
            print(
                f"{s['run_id']} {flag} {s['dataset']} {s['teacher_arch']}->{s['student_arch']}"
                f" {s['method']} n={s['budget']} seed={s['seed']} {s['preset']}"
                + (f" lr={s['lr']}" if s.get("lr") is not None else "")
            )
        print(f"{len(specs)} runs, {sum(s['run_id'] in done for s in specs)} done", file=sys.stderr)
        return 0
    run_fn = (
        grid.load_run_fn(a.run_fn)
        if a.run_fn
        else grid.StudentRunner(cfg, device=a.device, data_dir=a.data_dir)
    )
    counts = grid.run_grid(
        specs,
        results,
        run_fn,
        max_runs=a.max_runs,
        keep_going=a.keep_going,
        progress=not a.no_progress,
        grid_name=cfg["name"],
        stack=a.stack,
    )
    print(f"grid {cfg['name']}: {counts} -> {results}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def _cmd_report(a: argparse.Namespace) -> int:
    from reference_experiments import report

    out = Path(a.out) if a.out else Path(a.results[0]).parent / "report"
    targets = [float(t) for t in a.targets.split(",")] if a.targets else None
    path = report.make_report(
        a.results if len(a.results) > 1 else a.results[0], out, targets=targets
    )
    print(path.read_text(encoding="utf-8"))
    print(f"\nwrote {path} and figures in {out}", file=sys.stderr)
    return 0


def _cmd_quickstart(a: argparse.Namespace) -> int:
    from reference_experiments import quickstart

    kw = {}
    if a.budgets:
        kw["budgets"] = [int(b) for b in a.budgets.split(",")]
    if a.seeds is not None:
        kw["seeds"] = list(range(a.seeds))
    if a.methods:
        kw["methods"] = a.methods.split(",")
    if a.teacher_epochs is not None:
        kw["teacher_epochs"] = a.teacher_epochs
    if a.max_epochs is not None:
        kw["max_epochs"] = a.max_epochs
    quickstart.main(out=a.out, threads=a.threads, **kw)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train-teacher":
        from reference_experiments import teacher

        with _process_group():
            return int(teacher.main(argv[1:]) or 0)
    a = _parser().parse_args(argv)
    if getattr(a, "threads", None) and a.cmd != "quickstart":
        import torch

        torch.set_num_threads(a.threads)
    if a.cmd == "student":
        with _process_group():
            return _cmd_student(a)
    return {
        "grid": _cmd_grid,
        "report": _cmd_report,
        "quickstart": _cmd_quickstart,
    }[a.cmd](a)


class _ProcessGroup:
    """Joins torchrun's process group on entry (no-op without torchrun) and
    leaves it on exit."""

    def __enter__(self) -> None:
        from reference_experiments import distributed as rdist

        rdist.init_from_env()

    def __exit__(self, *exc: object) -> None:
        from reference_experiments import distributed as rdist

        if exc[0] is None:
            rdist.barrier()  # rank 0 has written its row / weights
        rdist.cleanup()


def _process_group() -> _ProcessGroup:
    return _ProcessGroup()


if __name__ == "__main__":
    sys.exit(main())
