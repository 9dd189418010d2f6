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
    python benchmarks/losses.py --full             # the grid of the README table
    python benchmarks/losses.py --full --only rkd  # one loss family

Writes ``benchmarks/results/<name>.json`` and ``<name>.md`` (``--name``,
default ``cpu-quick`` / ``cpu-full``).
"""

from __future__ import annotations

import argparse
import datetime
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
RESULTS = ROOT / "benchmarks" / "results"
MARK = "@@BENCH@@"
NAIVE_TENSORS = 4  # live (n, n, d) tensors of the naive form, a lower bound
BYTES = {"float32": 4, "bfloat16": 2, "float64": 8}
PROJ_OUT = 100  # ProjectedRKDLoss out_dim

# --------------------------------------------------------------------------- grids

Case = dict[str, Any]


def _cases(
    loss: str,
    ns: list[int],
    ds: list[int],
    dtypes: list[str],
    impls: list[str],
    backend: str = "torch",
) -> list[Case]:
    return [
        {"loss": loss, "n": n, "d": d, "dtype": dt, "impls": impls, "backend": backend}
        for dt in dtypes
        for d in ds
        for n in ns
    ]


def grid(name: str) -> list[Case]:
    """Cases of the ``quick`` (CI) and ``full`` grids."""
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
        # Sized for a shared 2-core CPU (about 40 minutes); the target cases of
        # issue 5 come first. bfloat16 computes in float32 inside the losses.
        return [
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
        ]
    raise ValueError(name)


# ------------------------------------------------------------ feasibility limits


def naive_bytes(n: int, d: int, dtype: str) -> int:
    """Analytic unchunked peak of the naive form: 4 live (n, n, d) tensors."""
    return NAIVE_TENSORS * n * n * d * BYTES[dtype]


def repdistiller_bytes(n: int, d: int, dtype: str) -> int:
    """Rough peak of RepDistiller's RKD with autograd: ~6 (n,n,d) + ~6 (n,n,n) tensors."""
    return 6 * (n * n * d + n**3) * BYTES[dtype]


def skip_reason(case: Case, impl: str, args: argparse.Namespace) -> str | None:
    n, d, dtype = case["n"], case["d"], case["dtype"]
    budget = args.mem_budget_gb * 2**30
    if impl == "naive":
        work = n * n * d * (1 + (PROJ_OUT // 8 if case["loss"] == "projected" else 0))
        # bfloat16 elementwise kernels run at about a sixth of float32's speed on CPU
        limit = args.naive_max_work / (6 if dtype == "bfloat16" else 1)
        if work > limit:
            return (
                f"work n*n*d{'*k/8' if case['loss'] == 'projected' else ''} = {work:.2e} "
                f"exceeds the time budget of this CPU ({limit:.1e}: --naive-max-work, "
                f"divided by 6 for bfloat16); unchunked peak "
                f"would be {naive_bytes(n, d, dtype) / 2**30:.1f} GiB"
            )
    if impl == "repdistiller":
        need = repdistiller_bytes(n, d, dtype)
        if need > budget:
            return (
                f"needs ~{need / 2**30:.1f} GiB ((n,n,d) and (n,n,n) tensors with "
                f"autograd) > budget {args.mem_budget_gb} GiB on this machine"
            )
    if impl == "ckd" and case["loss"] == "rkd" and n**3 > args.rkd_max_entries:
        return (
            f"n^3 = {n**3:.2e} angle entries: ~{n**3 * 60e-9:.0f} s per call on one "
            f"core exceeds the time budget (--rkd-max-entries {args.rkd_max_entries:.1e})"
        )
    return None


# -------------------------------------------------------------------- references


def torch_references(torch: Any) -> dict[str, Callable[..., Any]]:
    """Pure-torch reference implementations (written here, not in the library)."""
    import torch.nn.functional as F

    def up(x: Any) -> Any:
        return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x

    def comparative_native(s: Any, t: Any) -> Any:
        e = up(s) - up(t)
        n, d = e.shape
        c = e - e.mean(0, keepdim=True)
        return ((c * c).sum() * (2.0 / ((n - 1) * d))).to(s.dtype)

    def naive_part(s: Any, t: Any, rows: slice, p: Any = None) -> Any:
        n, d = s.shape
        ds = s[rows, None, :] - s[None, :, :]
        dt = t[rows, None, :] - t[None, :, :]
        diff = ds - dt
        if p is not None:
            diff = diff @ p
        k = diff.shape[-1]
        return (diff**2).sum() / (n * (n - 1) * k)

    def projected_native(s: Any, t: Any, p: Any) -> Any:
        e = (up(s) - up(t)) @ p
        n, k = e.shape
        c = e - e.mean(0, keepdim=True)
        return ((c * c).sum() * (2.0 / ((n - 1) * k))).to(s.dtype)

    def pdist(e: Any, eps: float = 1e-12) -> Any:
        e_square = e.pow(2).sum(dim=1)
        prod = e @ e.t()
        res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
        res = res.sqrt().clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    def repdistiller(s: Any, t: Any, w_d: float = 25.0, w_a: float = 50.0) -> Any:
        """RepDistiller's RKDLoss.forward (distiller_zoo/RKD.py), verbatim maths."""
        with torch.no_grad():
            t_d = pdist(t)
            t_d = t_d / t_d[t_d > 0].mean()
        d = pdist(s)
        d = d / d[d > 0].mean()
        loss_d = F.smooth_l1_loss(d, t_d)
        with torch.no_grad():
            td = t.unsqueeze(0) - t.unsqueeze(1)
            norm_td = F.normalize(td, p=2, dim=2)
            t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
        sd = s.unsqueeze(0) - s.unsqueeze(1)
        norm_sd = F.normalize(sd, p=2, dim=2)
        s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
        loss_a = F.smooth_l1_loss(s_angle, t_angle)
        return w_d * loss_d + w_a * loss_a

    def kd_native(s: Any, t: Any, temperature: float = 4.0) -> Any:
        log_ps = F.log_softmax(up(s) / temperature, dim=1)
        log_pt = F.log_softmax(up(t) / temperature, dim=1)
        kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
        return (kl * temperature**2).to(s.dtype)

    def dist_native(s: Any, t: Any, tau: float = 4.0) -> Any:
        """DIST authors' code (cosine of centred rows / columns)."""

        def pearson(a: Any, b: Any) -> Any:
            a = a - a.mean(1, keepdim=True)
            b = b - b.mean(1, keepdim=True)
            return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)

        ps = F.softmax(up(s) / tau, dim=1)
        pt = F.softmax(up(t) / tau, dim=1)
        inter = 1 - pearson(ps, pt).mean()
        intra = 1 - pearson(ps.t(), pt.t()).mean()
        return ((inter + intra) * tau**2).to(s.dtype)

    return {
        "comparative_native": comparative_native,
        "naive_part": naive_part,
        "projected_native": projected_native,
        "repdistiller": repdistiller,
        "kd_native": kd_native,
        "dist_native": dist_native,
    }


# ------------------------------------------------------------------ measurement


class Memory:
    """Peak memory of one call: RSS high-water mark (CPU) or CUDA allocator peak."""

    def __init__(self, device: str, torch: Any = None) -> None:
        self.cuda = device.startswith("cuda")
        self.torch = torch

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def peak(self, fn: Callable[[], Any]) -> tuple[int, str]:
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
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return {
        "median_s": statistics.median(samples),
        "q1_s": q[0],
        "q3_s": q[2],
        "samples": len(samples),
    }


# ----------------------------------------------------------------- child: torch


def run_torch_case(case: Case, args: argparse.Namespace) -> list[dict[str, Any]]:
    import ckd_torch
    import torch

    from ckd_core.functional import make_projection

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, case["dtype"])
    n, d, loss = case["n"], case["d"], case["loss"]
    refs = torch_references(torch)
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(n, d, generator=gen).to(device, dtype)
    student = (teacher + 0.5 * torch.randn(n, d, generator=gen).to(device, dtype)).detach()
    student.requires_grad_(True)
    proj = torch.as_tensor(make_projection(d, PROJ_OUT), dtype=torch.float32, device=device)
    proj_dtype = proj.to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    budget = args.mem_budget_gb * 2**30

    def make(impl: str) -> tuple[Callable[[], Any], Callable[[], Any] | None, dict[str, Any]]:
        """``(step, forward, info)``: one forward + backward, the forward alone."""
        info: dict[str, Any] = {}
        if impl == "ckd" or impl == "comparative":
            module = {
                "comparative": ckd_torch.ComparativeLoss,
                "projected": lambda: ckd_torch.ProjectedRKDLoss(out_dim=PROJ_OUT),
                "rkd": ckd_torch.RKDLoss,
                "kd": ckd_torch.KDLoss,
                "dist": ckd_torch.DISTLoss,
            }["comparative" if impl == "comparative" else loss]()

            def forward() -> Any:
                return module(student, teacher)

        elif impl == "native":
            fn = refs[f"{loss}_native"]

            def forward() -> Any:
                if loss == "projected":
                    return fn(student, teacher, proj)
                return fn(student, teacher)

        elif impl == "repdistiller":

            def forward() -> Any:
                return refs["repdistiller"](student, teacher)

        elif impl == "naive":
            p = proj_dtype if loss == "projected" else None
            # elements per row of the chunk: one row of each (n, n, d) tensor
            row_bytes = NAIVE_TENSORS * n * d * BYTES[case["dtype"]]
            if naive_bytes(n, d, case["dtype"]) <= budget / 2:
                rows = n
            else:
                rows = max(1, int(args.chunk_mb * 2**20 // row_bytes))
            info.update(
                chunked=rows < n,
                chunk_rows=rows,
                analytic_unchunked_peak_bytes=naive_bytes(n, d, case["dtype"]),
            )

            def step() -> float:
                total = 0.0
                for start in range(0, n, rows):
                    part = refs["naive_part"](student, teacher, slice(start, start + rows), p)
                    part.backward()
                    total += float(part.detach())
                student.grad = None
                return total

            return step, None, info
        else:
            raise ValueError(impl)

        def step() -> float:
            out = forward()
            out.backward()
            student.grad = None
            return out

        return step, forward, info

    results, steps, first_s, values, grads = [], {}, {}, {}, {}
    memory = Memory(args.device, torch)
    for impl in case["impls"]:
        row = {**{k: v for k, v in case.items() if k != "impls"}, "impl": impl}
        reason = skip_reason(case, impl, args)
        if reason:
            row.update(skipped=True, reason=reason)
            results.append(row)
            continue
        step, forward, info = make(impl)
        row.update(info)
        if args.mode == "memory":
            # a fast call is measured after one warm-up call; a slow one on its
            # first call (conservative: includes one-time initialisation)
            t0 = time.perf_counter()
            if forward is not None and n <= 4096:
                forward()  # probe the cost without backward
            if time.perf_counter() - t0 < args.slow_s / 4 and not info.get("chunked"):
                step()
                sync()
            row["peak_bytes"], row["peak_method"] = memory.peak(step)
            if info.get("chunked"):
                row["peak_method"] += "_chunked"
            results.append(row)
            continue
        # value and gradient (first call, also the warm-up)
        t0 = time.perf_counter()
        if forward is None:  # naive: chunks accumulate into student.grad
            total = 0.0
            rows = info["chunk_rows"]
            for start in range(0, n, rows):
                part = refs["naive_part"](
                    student,
                    teacher,
                    slice(start, start + rows),
                    proj_dtype if loss == "projected" else None,
                )
                part.backward()
                total += float(part.detach())
            values[impl] = total
        else:
            out = forward()
            out.backward()
            values[impl] = float(out.detach().float())
        grads[impl] = student.grad.detach().float().clone()
        student.grad = None
        sync()
        first_s[impl] = time.perf_counter() - t0
        for _ in range(args.warmup if first_s[impl] < args.slow_s else 0):
            step()
        sync()
        steps[impl] = step
        results.append(row)
    if args.mode == "memory":
        return results
    samples = time_impls(steps, sync, first_s, args)
    ref = next((r for r in ("native", "repdistiller", "naive") if r in values), None)
    for row in results:
        impl = row["impl"]
        if row.get("skipped"):
            continue
        row.update(summarize(samples[impl] or [first_s[impl]]))
        row["value"] = values[impl]
        if ref and impl != ref and impl != "comparative":
            row["ref"] = ref
            row["rel_err_value"] = abs(values[impl] - values[ref]) / max(abs(values[ref]), 1e-30)
            g, g_ref = grads[impl], grads[ref]
            row["rel_err_grad"] = float((g - g_ref).norm() / g_ref.norm().clamp_min(1e-30))
    return results


# ------------------------------------------------------------- child: keras jax/tf


def run_keras_case(case: Case, args: argparse.Namespace) -> list[dict[str, Any]]:
    import numpy as np

    backend = case["backend"]
    n, d, loss = case["n"], case["d"], case["loss"]
    rng = np.random.default_rng(0)
    t_np = rng.standard_normal((n, d)).astype(case["dtype"])
    s_np = (t_np + 0.5 * rng.standard_normal((n, d))).astype(case["dtype"])

    from ckd_core import functional as F

    def loss_fn(t: Any, s: Any) -> Any:
        if loss == "comparative":
            return F.comparative_loss(t, s)
        if loss == "rkd":
            return F.rkd_distance_loss(t, s) * 25.0 + F.rkd_angle_loss(t, s) * 50.0
        raise ValueError(loss)

    if backend == "jax":
        import jax

        jax.config.update("jax_platforms", "cpu")
        fn = jax.jit(jax.value_and_grad(lambda s, t: loss_fn(t, s)))
        s, t = jax.numpy.asarray(s_np), jax.numpy.asarray(t_np)

        def step() -> Any:
            value, grad = fn(s, t)
            grad.block_until_ready()
            return value

    else:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        s, t = tf.constant(s_np), tf.constant(t_np)

        @tf.function(jit_compile=False)
        def fn(s: Any, t: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch(s)
                value = loss_fn(t, s)
            return value, tape.gradient(value, s)

        def step() -> Any:
            value, grad = fn(s, t)
            grad.numpy()
            return value

    row = {**{k: v for k, v in case.items() if k != "impls"}, "impl": f"keras-{backend}"}
    t0 = time.perf_counter()
    value = step()  # compiles
    row["compile_s"] = time.perf_counter() - t0
    if args.mode == "memory":
        row["peak_bytes"], row["peak_method"] = Memory("cpu").peak(step)
        return [row]
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    samples = time_impls({"k": step}, lambda: None, {"k": first}, args)
    row.update(summarize(samples["k"]))
    row["value"] = float(np.asarray(value))
    return [row]


# ------------------------------------------------------------------------ parent


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "keras", "jax", "jaxlib", "tensorflow-cpu", "tensorflow", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def machine() -> dict[str, Any]:
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
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _child(case: Case, args: argparse.Namespace, mode: str) -> tuple[list[dict[str, Any]], str]:
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
    cmd = [sys.executable, __file__, "--child", json.dumps(case), "--mode", mode, *args.child_args]
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
            {
                **{k: v for k, v in case.items() if k != "impls"},
                "impl": i,
                "skipped": True,
                "reason": error,
            }
            for i in case["impls"]
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


def find(rows: list[dict[str, Any]], **kw: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in kw.items()) and not row.get("skipped"):
            return row
    return None


def peak_of(row: dict[str, Any]) -> int:
    return int(row.get("analytic_unchunked_peak_bytes") or row.get("peak_bytes") or 0)


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets 1-4, from this run's rows."""
    out: list[dict[str, Any]] = []
    f32 = {"dtype": "float32", "backend": "torch"}

    def add(
        tid: str, text: str, value: Any, threshold: str, met: bool | None, **extra: Any
    ) -> None:
        out.append(
            {
                "target": tid,
                "what": text,
                "measured": value,
                "threshold": threshold,
                "met": met,
                **extra,
            }
        )

    ckd = find(rows, loss="comparative", impl="ckd", n=4096, d=100, **f32)
    naive = find(rows, loss="comparative", impl="naive", n=4096, d=100, **f32)
    native = find(rows, loss="comparative", impl="native", n=4096, d=100, **f32)
    if ckd and naive:
        speed = naive["median_s"] / ckd["median_s"]
        mem = peak_of(naive) / max(ckd["peak_bytes"], 1)
        add(
            "1a",
            "ComparativeLoss n=4096 d=100: naive time / ckd time",
            round(speed, 1),
            ">= 50",
            speed >= 50,
        )
        add(
            "1b",
            "ComparativeLoss n=4096 d=100: naive peak / ckd peak (naive unchunked peak analytic)",
            round(mem, 1),
            ">= 1000",
            mem >= 1000,
            naive_peak_bytes=peak_of(naive),
            ckd_peak_bytes=ckd["peak_bytes"],
        )
    if ckd and native:
        ratio = ckd["median_s"] / native["median_s"]
        add(
            "2a",
            "ComparativeLoss n=4096 d=100: ckd (torch adapter) / native time",
            round(ratio, 3),
            "<= 1.10",
            ratio <= 1.10,
        )
    for d in (10, 100):
        small = find(rows, loss="comparative", impl="ckd", n=64, d=d, **f32)
        small_native = find(rows, loss="comparative", impl="native", n=64, d=d, **f32)
        if small and small_native:
            added = (small["median_s"] - small_native["median_s"]) * 1e6
            add(
                "2b",
                f"ComparativeLoss n=64 d={d}: ckd - native per call (us)",
                round(added, 1),
                "<= 150",
                added <= 150,
            )
    rkd = find(rows, loss="rkd", impl="ckd", n=1024, d=640, **f32)
    if rkd:
        add(
            "3a",
            "RKDLoss n=1024 d=640: peak memory (GiB)",
            round(rkd["peak_bytes"] / 2**30, 3),
            "<= 2",
            rkd["peak_bytes"] <= 2 * 2**30,
        )
    for row in rows:
        if (
            (row["loss"], row["impl"], row.get("dtype"), row["backend"])
            != ("rkd", "ckd", "float32", "torch")
            or row.get("skipped")
            or row["n"] < 256
        ):
            continue
        rep = find(rows, loss="rkd", impl="repdistiller", n=row["n"], d=row["d"], **f32)
        if rep is None or row["d"] != 640:
            continue
        ratio = row["median_s"] / rep["median_s"]
        ok = ratio <= 1.0 and row["rel_err_value"] <= 1e-5
        add(
            "3b",
            f"RKDLoss n={row['n']} d=640: ckd / repdistiller time (value rel. err "
            f"{row['rel_err_value']:.1e})",
            round(ratio, 3),
            "<= 1, rel. err <= 1e-5",
            ok,
        )
    proj = find(rows, loss="projected", impl="ckd", n=4096, d=640, **f32)
    comp = find(rows, loss="projected", impl="comparative", n=4096, d=640, **f32)
    if proj and comp:
        ratio = proj["median_s"] / comp["median_s"]
        add(
            "4",
            "ProjectedRKDLoss(out_dim=100) n=4096 d_in=640 / ComparativeLoss n=4096 d=640 time",
            round(ratio, 3),
            "<= 2",
            ratio <= 2,
        )
    return out


def _cell(text: str) -> str:
    """One line of text for a Markdown table cell or list item."""
    return " ".join(text.split()).replace("|", "/")


def fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "–"
    if b < 64 * 2**10:  # below the RSS resolution of small heap allocations
        return "<64 KiB"
    if b < 2**20:
        return f"{b / 2**10:.0f} KiB"
    if b < 2**30:
        return f"{b / 2**20:.1f} MiB"
    return f"{b / 2**30:.2f} GiB"


def markdown(report: dict[str, Any]) -> str:
    rows = report["results"]
    meta = report["meta"]
    lines = [
        f"# ckd-core loss benchmark ({meta['grid']}, {meta['device']})",
        "",
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores "
        f"({meta['threads']} thread(s) used), {meta['machine']['memory_gib']} GiB; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + f". Commit {meta['commit']}, {meta['date']}. Load average before/after: "
        f"{meta['load_before']} / {meta['load_after']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        "Forward + backward per call, median over interleaved rounds after warm-up; peak = "
        "RSS high-water mark of one call minus the baseline (fresh process per case). "
        "`naive` above the memory budget runs in row chunks; its peak (*) is then the "
        f"analytic unchunked one ({NAIVE_TENSORS} tensors of n·n·d elements).",
        "",
        "## Targets",
        "",
        "| # | what | measured | target | met |",
        "|---|---|---|---|---|",
    ]
    for t in report["targets"]:
        lines.append(
            f"| {t['target']} | {t['what']} | {t['measured']} | {t['threshold']} | "
            f"{'yes' if t['met'] else 'NO'} |"
        )
    refs_by_loss = {
        "comparative": ["native", "naive"],
        "projected": ["native", "naive", "comparative"],
        "rkd": ["repdistiller"],
        "kd": ["native"],
        "dist": ["native"],
    }
    titles = {
        "comparative": "ComparativeLoss (all pairs)",
        "projected": f"ProjectedRKDLoss (out_dim={PROJ_OUT}); `comparative` = ComparativeLoss "
        "on the same inputs",
        "rkd": "RKDLoss (distance 25, angle 50)",
        "kd": "KDLoss",
        "dist": "DISTLoss",
    }
    for loss, refs in refs_by_loss.items():
        keys = sorted(
            {
                (r["dtype"], r["d"], r["n"])
                for r in rows
                if r["loss"] == loss and r["backend"] == "torch"
            },
            key=lambda k: (k[0] != "float32", k[1], k[2]),
        )
        if not keys:
            continue
        head = ["dtype", "n", "d", "ckd time", "ckd peak"]
        for ref in refs:
            head += [f"{ref} time", f"{ref}/ckd", f"{ref} peak"]
        if loss in ("comparative", "projected", "rkd", "kd", "dist"):
            head += ["rel. err"]
        lines += [
            "",
            f"## {titles[loss]}",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for dtype, d, n in keys:
            sel = {"loss": loss, "dtype": dtype, "d": d, "n": n, "backend": "torch"}
            ckd = find(rows, impl="ckd", **sel)
            cells = [dtype, str(n), str(d)]
            if ckd is None:
                skipped = next(
                    (
                        r
                        for r in rows
                        if r["impl"] == "ckd" and all(r.get(k) == v for k, v in sel.items())
                    ),
                    {},
                )
                cells += ["skipped", _cell(skipped.get("reason", ""))[:60]]
            else:
                cells += [fmt_time(ckd["median_s"]), fmt_bytes(ckd["peak_bytes"])]
            for ref in refs:
                r = find(rows, impl=ref, **sel)
                if r is None:
                    cells += ["skipped", "", ""]
                    continue
                star = "*" if r.get("chunked") else ""
                ratio = f"{r['median_s'] / ckd['median_s']:.2f}×" if ckd else "–"
                cells += [fmt_time(r["median_s"]), ratio, fmt_bytes(peak_of(r)) + star]
            err = ckd.get("rel_err_value") if ckd else None
            cells.append("–" if err is None else f"{err:.1e}")
            lines.append("| " + " | ".join(cells) + " |")
    keras_rows = [r for r in rows if r["backend"] != "torch"]
    if keras_rows:
        lines += [
            "",
            "## Keras core on the jax / tensorflow backends (jit / tf.function)",
            "",
            "| backend | loss | dtype | n | d | time | torch native time (other process) "
            "| ratio | peak | compile |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in keras_rows:
            if r.get("skipped"):
                lines.append(
                    f"| {r['backend']} | {r['loss']} | {r['dtype']} | {r['n']} | "
                    f"{r['d']} | skipped | | | | |"
                )
                continue
            ref_impl = "native" if r["loss"] == "comparative" else "repdistiller"
            ref = find(
                rows,
                loss=r["loss"],
                impl=ref_impl,
                n=r["n"],
                d=r["d"],
                dtype=r["dtype"],
                backend="torch",
            )
            ratio = f"{r['median_s'] / ref['median_s']:.2f}×" if ref else "–"
            lines.append(
                f"| {r['backend']} | {r['loss']} | {r['dtype']} | {r['n']} | {r['d']} | "
                f"{fmt_time(r['median_s'])} | {fmt_time(ref['median_s']) if ref else '–'} "
                f"({ref_impl}) | {ratio} | {fmt_bytes(r['peak_bytes'])} | "
                f"{r['compile_s']:.1f} s |"
            )
    skipped = [r for r in rows if r.get("skipped")]
    if skipped:
        lines += ["", "## Skipped", ""]
        for r in skipped:
            lines.append(
                f"- {r['loss']} {r['impl']} n={r['n']} d={r['d']} {r['dtype']} "
                f"({r['backend']}): {_cell(r['reason'])[:300]}"
            )
    return "\n".join(lines) + "\n"


def readme_section(report: dict[str, Any], source: str) -> str:
    """The README's "Performance" section: key rows, targets, machine, versions, command."""
    rows, meta = report["results"], report["meta"]
    f32 = {"dtype": "float32", "backend": "torch"}
    picks = [
        ("ComparativeLoss", "comparative", 64, 100, "native"),
        ("ComparativeLoss", "comparative", 4096, 100, "native"),
        ("ComparativeLoss", "comparative", 4096, 100, "naive"),
        ("ComparativeLoss", "comparative", 16384, 640, "native"),
        ("ProjectedRKDLoss (k=100)", "projected", 4096, 640, "comparative"),
        ("ProjectedRKDLoss (k=100)", "projected", 4096, 640, "native"),
        ("RKDLoss", "rkd", 256, 640, "repdistiller"),
        ("RKDLoss", "rkd", 1024, 640, "repdistiller"),
        ("KDLoss", "kd", 16384, 640, "native"),
        ("DISTLoss", "dist", 16384, 640, "native"),
    ]
    names = {
        "native": "hand-written torch",
        "naive": "brute force (n,n,d)",
        "comparative": "ComparativeLoss, same input",
        "repdistiller": "RepDistiller RKD",
    }
    lines = [
        "## Performance",
        "",
        "Forward + backward through the torch adapter (`ckd_torch`, i.e. Keras core on "
        "Keras' torch backend), against references measured in the same run: a "
        "hand-written pure-torch closed form (the cost floor), a brute-force form that "
        "builds the `(n, n, d)` differences, and RepDistiller's RKD (`(n, n, d)` "
        "normalized differences and the `(n, n, n)` angle tensor). Median time per call; "
        "peak = resident-memory high-water mark of one call (fresh process per case); "
        "the brute force above the memory budget runs in row chunks and its peak is the "
        f"analytic unchunked one ({NAIVE_TENSORS} tensors of n·n·d floats, marked *).",
        "",
        "| loss | n | d | ckd time | reference | ref. time | ref./ckd time | ckd peak "
        "| ref. peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for title, loss, n, d, ref in picks:
        ckd = find(rows, loss=loss, impl="ckd", n=n, d=d, **f32)
        other = find(rows, loss=loss, impl=ref, n=n, d=d, **f32)
        if ckd is None:
            continue
        if other is None:
            skipped = next(
                (r for r in rows if (r["loss"], r["impl"], r["n"], r["d"]) == (loss, ref, n, d)),
                {},
            )
            reason = skipped.get("reason", "not run").split(" > ")[0].split(" exceeds")[0]
            cells = [names[ref], f"skipped ({reason})", "–", fmt_bytes(ckd["peak_bytes"]), "–"]
        else:
            star = "*" if other.get("chunked") else ""
            cells = [
                names[ref],
                fmt_time(other["median_s"]),
                f"{other['median_s'] / ckd['median_s']:.2f}×",
                fmt_bytes(ckd["peak_bytes"]),
                fmt_bytes(peak_of(other)) + star,
            ]
        lines.append(
            f"| {title} | {n} | {d} | {fmt_time(ckd['median_s'])} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "Targets (issue 5), from the same run:",
        "",
        "| # | what | measured | target | met |",
        "|---|---|---|---|---|",
    ]
    for t in report["targets"]:
        lines.append(
            f"| {t['target']} | {t['what']} | {t['measured']} | {t['threshold']} | "
            f"{'yes' if t['met'] else 'no'} |"
        )
    m = meta["machine"]
    lines += [
        "",
        f"Machine: {m['cpu']} CPU, {m['cores']} cores shared with other jobs (load average "
        f"{meta['load_before'].split()[0]} at the start), {meta['threads']} torch thread, "
        f"{m['memory_gib']} GiB RAM, no GPU. Versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + f". Commit {meta['commit']}, {meta['date'][:10]}.",
        "",
        f"Reproduce: `{meta['command']}` (or `nox -s bench -- --full`; `nox -s bench` runs the "
        f"small `--quick` grid). Every case and the skipped ones with their reasons: "
        f"`{source}` and its `.md` table.",
    ]
    return "\n".join(lines) + "\n"


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small grid (default)")
    g.add_argument("--full", action="store_true", help="full grid")
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
    args.child_args = [a for a in (argv if argv is not None else sys.argv[1:])]
    return args


def main(argv: list[str] | None = None) -> int:
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
        # strip the --child option from what the child was given
        case = json.loads(args.child)
        if case["backend"] == "torch":
            rows = run_torch_case(case, args)
        else:
            rows = run_keras_case(case, args)
        print(MARK + json.dumps(rows), flush=True)
        return 0
    name = "full" if args.full else "quick"
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
