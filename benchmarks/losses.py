"""Benchmark of the ckd-core losses: forward + backward time and peak memory.

Every figure is a ratio against a reference measured in the same run:

- ``ckd``: the loss through the torch adapter (``ckd_torch``), i.e. Keras core
  on Keras' torch backend; ``keras-jax`` / ``keras-tensorflow``: the same core
  function under ``jax.jit`` / ``tf.function`` (other processes, since Keras
  fixes its backend per process);
- ``native``: a hand-written pure-torch closed form (the cost floor);
- ``naive``: brute force that builds the ``(n, n, d)`` differences; when that
  does not fit the memory budget it runs in row chunks (same arithmetic, one
  backward per chunk) and its unchunked peak is reported analytically as
  4 tensors of ``n*n*d`` elements (differences of student and teacher, their
  difference and its square: a lower bound);
- ``repdistiller``: RepDistiller's ``RKDLoss`` (``(n, n, d)`` normalized
  differences and the ``(n, n, n)`` angle tensor), skipped with a recorded
  reason when its estimated memory exceeds the budget.

Each case (loss, n, d, dtype) runs in a fresh child process, so peak memory is
the resident-set high-water mark of one forward + backward (reset through
``/proc/self/clear_refs``, baseline subtracted; glibc's mmap threshold is
pinned so freed memory goes back to the OS) or ``torch.cuda.max_memory_allocated``
on CUDA. Times are medians over interleaved rounds (the implementations of a
case take turns) after warm-up.

Usage::

    python benchmarks/losses.py --quick            # small grid (CI, ``nox -s bench``)
    python benchmarks/losses.py --full             # the grid of docs/performance.md
    python benchmarks/losses.py --full --only rkd  # one loss family
    python benchmarks/losses.py --adapter          # adapter vs peers at training sizes

Writes ``benchmarks/results/<name>.json`` and ``<name>.md`` (``--name``,
default ``cpu-quick`` / ``cpu-full`` / ``cpu-adapter``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

from harness import MARK, ROOT, Case, git_commit, load, machine, run_child, versions
from readme import readme_section
from report import fmt_time, markdown
from runners import run_keras_case, run_torch_case
from targets import ADAPTER_DS, ADAPTER_NS, targets

RESULTS = ROOT / "benchmarks" / "results"


def _cases(
    loss: str,
    ns: list[int],
    ds: list[int],
    dtypes: list[str],
    impls: list[str],
    backend: str = "torch",
) -> list[Case]:
    """Every (dtype, d, n) combination as a case."""
    return [
        {"loss": loss, "n": n, "d": d, "dtype": dt, "impls": impls, "backend": backend}
        for dt in dtypes
        for d in ds
        for n in ns
    ]


def _merged(cases: list[Case]) -> list[Case]:
    """One case per (backend, loss, n, d, dtype), first-seen order, implementations joined."""
    out: dict[tuple[Any, ...], Case] = {}
    for case in cases:
        key = (case["backend"], case["loss"], case["n"], case["d"], case["dtype"])
        if key in out:
            out[key]["impls"] += [i for i in case["impls"] if i not in out[key]["impls"]]
        else:
            out[key] = {**case, "impls": list(case["impls"])}
    return list(out.values())


def adapter_grid() -> list[Case]:
    """Targets 5a/5b: the torch adapter against its peers at training sizes."""
    ns, ds, f32 = list(ADAPTER_NS), list(ADAPTER_DS), ["float32"]
    return [
        *_cases("comparative", ns, ds, f32, ["ckd", "native"]),
        *_cases("rkd", ns, ds, f32, ["ckd", "repdistiller"]),
    ]


def grid(name: str) -> list[Case]:
    """Cases of the ``quick`` (CI), ``full`` and ``adapter`` (targets 5a/5b) grids."""
    if name == "adapter":
        return adapter_grid()
    f32, bf16 = ["float32"], ["bfloat16"]
    pairwise = ["ckd", "native", "naive"]
    projected = ["ckd", "native", "naive", "comparative"]
    rkd = ["ckd", "repdistiller"]
    if name == "quick":
        return [
            *_cases("comparative", [64, 1024], [100], f32, pairwise),
            *_cases("comparative", [1024], [100], ["bfloat16"], pairwise),
            *_cases("projected", [1024], [640], f32, ["ckd", "native", "comparative"]),
            *_cases("rkd", [64, 256], [100], f32, ["ckd", "repdistiller"]),
            *_cases("kd", [1024], [100], f32, ["ckd", "native"]),
            *_cases("dist", [1024], [100], f32, ["ckd", "native"]),
            *_cases("comparative", [1024], [100], f32, ["keras"], backend="jax"),
            *_cases("comparative", [1024], [100], f32, ["keras"], backend="tensorflow"),
        ]
    if name == "full":
        # Sized for a shared 2-core CPU (about 45 minutes); the performance
        # target cases come first. bfloat16 computes in float32 inside the losses.
        return _merged(
            [
                *_cases("comparative", [64, 4096], [100], f32, pairwise),
                *_cases("projected", [4096], [640], f32, projected),
                *_cases("rkd", [256], [640], f32, rkd),
                *_cases("rkd", [1024], [640], f32, rkd),
                *_cases("comparative", [64, 4096], [10], f32, pairwise),
                *_cases("comparative", [256, 1024, 16384], [100], f32, pairwise),
                *_cases("comparative", [1024, 16384], [640], f32, pairwise),
                *_cases("comparative", [64, 4096], [100], bf16, pairwise),
                *_cases("projected", [256, 1024], [640], f32, projected),
                *_cases("rkd", [64, 256], [100], f32, rkd),
                *_cases("rkd", [64], [640], f32, rkd),
                *_cases("rkd", [4096], [640], f32, rkd),
                *_cases("kd", [16384], [640], f32, ["ckd", "native"]),
                *_cases("dist", [16384], [640], f32, ["ckd", "native"]),
                *[
                    c
                    for b in ("jax", "tensorflow")
                    for c in (
                        _cases("comparative", [4096], [100], f32, ["keras"], backend=b)
                        + _cases("rkd", [256], [640], f32, ["keras"], backend=b)
                    )
                ],
                *adapter_grid(),
            ]
        )
    raise ValueError(name)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``child_args`` keeps it to pass on to the child processes."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small grid (default)")
    g.add_argument("--full", action="store_true", help="full grid")
    g.add_argument(
        "--adapter", action="store_true", help="adapter grid (targets 5a/5b; also in --full)"
    )
    p.add_argument("--only", default="", help="comma-separated loss families to run")
    p.add_argument("--backends", default="torch,jax,tensorflow")
    p.add_argument("--device", default="cpu", help="torch device for the torch cases")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default=None, help="output basename (default cpu-quick/cpu-full)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--round-s", type=float, default=0.2, help="time per implementation per round")
    p.add_argument("--max-calls", type=int, default=200, help="calls per round at most")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--slow-s", type=float, default=2.0, help="a call slower than this is 'slow'")
    p.add_argument("--slow-rounds", type=int, default=1, help="timing rounds for slow calls")
    p.add_argument("--mem-budget-gb", type=float, default=4.0)
    p.add_argument("--chunk-mb", type=float, default=256.0, help="naive row chunk size")
    p.add_argument("--naive-max-work", type=float, default=2e9, help="max n*n*d for naive")
    p.add_argument("--rkd-max-entries", type=float, default=2e9, help="max n^3 for RKDLoss")
    p.add_argument("--case-timeout", type=float, default=1800)
    p.add_argument(
        "--readme",
        type=Path,
        default=None,
        help="write results/README_performance.md from this JSON and exit",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="time", choices=["time", "memory"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # options forwarded to the children
    args.child_args = list(argv if argv is not None else sys.argv[1:])
    return args


def main(argv: list[str] | None = None) -> int:
    """Write the README section (``--readme``), run one case (child), or run the grid."""
    args = parse(argv)
    if args.readme:
        report = json.loads(args.readme.read_text())
        source = args.readme.resolve().relative_to(ROOT).as_posix()
        target = args.out / "README_performance.md"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(readme_section(report, source))
        print(f"wrote {target}")
        return 0
    if args.child:
        case = json.loads(args.child)
        run = run_torch_case if case["backend"] == "torch" else run_keras_case
        print(MARK + json.dumps(run(case, args)), flush=True)
        return 0
    name = "full" if args.full else "adapter" if args.adapter else "quick"
    only = {x for x in args.only.split(",") if x}
    backends = set(args.backends.split(","))
    cases = [c for c in grid(name) if (not only or c["loss"] in only) and c["backend"] in backends]
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.name or f"{'cuda' if args.device.startswith('cuda') else 'cpu'}-{name}"
    meta = {
        "grid": name,
        "device": args.device,
        "threads": args.threads,
        "command": "python benchmarks/losses.py " + " ".join(args.child_args),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine(),
        "versions": versions(),
        "load_before": load(),
        "options": {k: v for k, v in vars(args).items() if k not in ("child", "child_args", "out")},
    }
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i, case in enumerate(cases):
        label = (
            f"[{i + 1}/{len(cases)}] {case['backend']} {case['loss']} n={case['n']} "
            f"d={case['d']} {case['dtype']}"
        )
        print(label, end=" ", flush=True)
        case_rows = run_child(case, args)
        rows += case_rows
        partial = {"meta": {**meta, "partial": f"{i + 1}/{len(cases)} cases"}, "results": rows}
        partial["targets"] = targets(rows)
        (args.out / f"{base}.partial.json").write_text(json.dumps(partial, indent=1, default=str))
        print(
            " ".join(
                f"{r['impl']}={'skip' if r.get('skipped') else fmt_time(r['median_s'])}"
                for r in case_rows
            ),
            flush=True,
        )
    meta["load_after"] = load()
    meta["total_s"] = round(time.perf_counter() - t0, 1)
    report = {"meta": meta, "targets": targets(rows), "results": rows}
    json_path, md_path = args.out / f"{base}.json", args.out / f"{base}.md"
    json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    (args.out / f"{base}.partial.json").unlink(missing_ok=True)
    md_path.write_text(markdown(report))
    print(f"wrote {json_path} and {md_path} in {meta['total_s']} s")
    for t in report["targets"]:
        print(
            f"target {t['target']}: {t['what']}: {t['measured']} ({t['threshold']}) "
            f"{'met' if t['met'] else 'NOT MET'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
