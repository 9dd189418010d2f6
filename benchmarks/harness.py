"""Measurement (timing rounds, peak memory) and the child processes that run one case each."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).with_name("losses.py")
MARK = "@@BENCH@@"

Case = dict[str, Any]


def case_row(case: Case, impl: str) -> dict[str, Any]:
    """A result row: the case without its ``impls``, and the implementation measured."""
    return {**{k: v for k, v in case.items() if k != "impls"}, "impl": impl}


class Memory:
    """Peak memory of one call: RSS high-water mark (CPU) or CUDA allocator peak."""

    def __init__(self, device: str, torch: Any = None) -> None:
        self.cuda = device.startswith("cuda")
        self.torch = torch

    @staticmethod
    def _status(key: str) -> int:
        """A size field of ``/proc/self/status`` in bytes."""
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def peak(self, fn: Callable[[], Any]) -> tuple[int, str]:
        """``(peak bytes of one call of fn above the baseline, how it was measured)``."""
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            base = self.torch.cuda.memory_allocated()
            fn()
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() - base, "cuda_max_memory_allocated"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            base = self._status("VmRSS")
            fn()
            return max(self._status("VmHWM") - base, 0), "rss_hwm_delta"
        except OSError:  # no clear_refs: getrusage high-water mark (fresh process)
            import resource

            base = self._status("VmRSS")
            fn()
            return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, 0), (
                "ru_maxrss_delta"
            )


def time_impls(
    steps: dict[str, Callable[[], Any]],
    sync: Callable[[], None],
    first_s: dict[str, float],
    args: argparse.Namespace,
) -> dict[str, list[float]]:
    """Interleaved rounds: each round runs every implementation in turn."""
    samples: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    for r in range(args.rounds if names else 0):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            calls = max(1, min(args.max_calls, int(args.round_s / max(first_s[name], 1e-6))))
            if first_s[name] > args.slow_s and r >= args.slow_rounds:
                continue
            for _ in range(calls):
                t0 = time.perf_counter()
                steps[name]()
                sync()
                samples[name].append(time.perf_counter() - t0)
    return samples


def summarize(samples: list[float]) -> dict[str, Any]:
    """Median and quartiles of the timing samples."""
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return {
        "median_s": statistics.median(samples),
        "q1_s": q[0],
        "q3_s": q[2],
        "samples": len(samples),
    }


def versions() -> dict[str, str]:
    """Versions of Python and the measured packages."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "keras", "jax", "jaxlib", "tensorflow-cpu", "tensorflow", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def machine() -> dict[str, Any]:
    """CPU model, cores, memory and platform of this machine."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "platform": platform.platform(),
    }


def git_commit() -> str:
    """Short hash of the checked-out commit, or ``unknown``."""
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load() -> str:
    """The load averages, or ``?``."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _child(case: Case, args: argparse.Namespace, mode: str) -> tuple[list[dict[str, Any]], str]:
    """Run one case in a fresh process: ``(its rows, "")`` or ``([], why it failed)``."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(args.threads),
        TF_CPP_MIN_LOG_LEVEL="3",
        KERAS_BACKEND=case["backend"],
        XLA_FLAGS=f"--xla_cpu_multi_thread_eigen={'true' if args.threads > 1 else 'false'}",
    )
    if mode == "memory":
        # freed blocks >= 64 KiB go straight back to the OS, so the RSS
        # high-water mark of a call is what that call allocates (this slows
        # allocation down, hence the separate timing process)
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [sys.executable, str(SCRIPT), "--child", json.dumps(case), "--mode", mode]
    cmd += args.child_args
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=args.case_timeout
        )
    except subprocess.TimeoutExpired:
        return [], f"timed out after {args.case_timeout} s"
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :]), ""
    return [], f"child failed (rc={proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}"


def run_child(case: Case, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Timing child (default allocator), then memory child (allocator pinned)."""
    t0 = time.perf_counter()
    timed, error = _child(case, args, "time")
    if not timed:
        return [
            {**case_row(case, impl), "skipped": True, "reason": error} for impl in case["impls"]
        ]
    measured, error = _child(case, args, "memory")
    peaks = {r["impl"]: r for r in measured}
    for row in timed:
        mem = peaks.get(row["impl"], {})
        if "peak_bytes" in mem:
            row["peak_bytes"], row["peak_method"] = mem["peak_bytes"], mem["peak_method"]
        elif not row.get("skipped"):
            row["peak_bytes"], row["peak_method"] = None, f"failed: {error}"
        row["case_wall_s"] = round(time.perf_counter() - t0, 1)
    return timed
