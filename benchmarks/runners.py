"""What a child process runs: one case, its implementations timed or measured for memory."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from harness import Case, Memory, case_row, summarize, time_impls
from references import (
    BYTES,
    NAIVE_TENSORS,
    PROJ_OUT,
    naive_bytes,
    repdistiller_bytes,
    torch_references,
)


def skip_reason(case: Case, impl: str, args: argparse.Namespace) -> str | None:
    """Why ``impl`` does not fit this case's time or memory budget, or None."""
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


class TorchCase:
    """The tensors of one torch case and a step (forward + backward) per implementation."""

    def __init__(self, case: Case, args: argparse.Namespace) -> None:
        import torch

        from ckd_core.functional import make_projection

        torch.set_num_threads(args.threads)
        self.case, self.args, self.torch = case, args, torch
        self.device = torch.device(args.device)
        dtype = getattr(torch, case["dtype"])
        n, d = case["n"], case["d"]
        self.refs = torch_references(torch)
        gen = torch.Generator().manual_seed(0)
        self.teacher = torch.randn(n, d, generator=gen).to(self.device, dtype)
        noise = 0.5 * torch.randn(n, d, generator=gen).to(self.device, dtype)
        self.student = (self.teacher + noise).detach().requires_grad_(True)
        projection = make_projection(d, PROJ_OUT)
        self.proj = torch.as_tensor(projection, dtype=torch.float32, device=self.device)
        self.proj_dtype = self.proj.to(dtype)
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

    def naive_backward(self, rows: int) -> float:
        """The naive loss in chunks of ``rows`` rows, gradients accumulated in student.grad."""
        total = 0.0
        loss, n = self.case["loss"], self.case["n"]
        p = self.proj.to(self.student.dtype) if loss == "projected" else None
        for start in range(0, n, rows):
            part = self.refs["naive_part"](
                self.student, self.teacher, slice(start, start + rows), p
            )
            part.backward()
            total += float(part.detach())
        return total

    def forward(self, impl: str) -> Callable[[], Any]:
        """One forward call of ``impl`` (not the naive form) on the case's tensors."""
        import ckd_torch

        loss, s, t = self.case["loss"], self.student, self.teacher
        if impl in ("ckd", "comparative"):
            modules: dict[str, Callable[[], Any]] = {
                "comparative": ckd_torch.ComparativeLoss,
                "projected": lambda: ckd_torch.ProjectedRKDLoss(out_dim=PROJ_OUT),
                "rkd": ckd_torch.RKDLoss,
                "kd": ckd_torch.KDLoss,
                "dist": ckd_torch.DISTLoss,
            }
            module = modules["comparative" if impl == "comparative" else loss]()
            return lambda: module(s, t)
        if impl == "native":
            fn = self.refs[f"{loss}_native"]
            return (lambda: fn(s, t, self.proj)) if loss == "projected" else (lambda: fn(s, t))
        if impl == "repdistiller":
            return lambda: self.refs["repdistiller"](s, t)
        raise ValueError(impl)

    def make(self, impl: str) -> tuple[Callable[[], Any], Callable[[], Any] | None, dict[str, Any]]:
        """``(step, forward, info)``: one forward + backward, the forward alone."""
        if impl == "naive":
            case = self.case
            n, d = case["n"], case["d"]
            # elements per row of the chunk: one row of each (n, n, d) tensor
            row_bytes = NAIVE_TENSORS * n * d * BYTES[case["dtype"]]
            if naive_bytes(n, d, case["dtype"]) <= self.args.mem_budget_gb * 2**30 / 2:
                rows = n
            else:
                rows = max(1, int(self.args.chunk_mb * 2**20 // row_bytes))
            info = {
                "chunked": rows < n,
                "chunk_rows": rows,
                "analytic_unchunked_peak_bytes": naive_bytes(n, d, case["dtype"]),
            }

            def naive_step() -> float:
                total = self.naive_backward(rows)
                self.student.grad = None
                return total

            return naive_step, None, info
        forward = self.forward(impl)

        def step() -> Any:
            out = forward()
            out.backward()
            self.student.grad = None
            return out

        return step, forward, {}

    def first_call(self, forward: Callable[[], Any] | None, info: dict[str, Any]) -> float:
        """Value of the first call (also the warm-up); its gradient stays in student.grad."""
        if forward is None:  # naive: chunks accumulate into student.grad
            return self.naive_backward(info["chunk_rows"])
        out = forward()
        out.backward()
        return float(out.detach().float())


def _memory_row(tc: TorchCase, row: dict[str, Any], step: Any, forward: Any) -> None:
    """Peak memory of one call: a fast call after one warm-up call, a slow one on its first."""
    info, args = row, tc.args
    t0 = time.perf_counter()
    if forward is not None and tc.case["n"] <= 4096:
        forward()  # probe the cost without backward
    if time.perf_counter() - t0 < args.slow_s / 4 and not info.get("chunked"):
        step()
        tc.sync()
    row["peak_bytes"], row["peak_method"] = Memory(args.device, tc.torch).peak(step)
    if info.get("chunked"):
        row["peak_method"] += "_chunked"


def run_torch_case(case: Case, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The torch adapter and the torch references on one case."""
    tc = TorchCase(case, args)
    results: list[dict[str, Any]] = []
    steps: dict[str, Callable[[], Any]] = {}
    first_s: dict[str, float] = {}
    values: dict[str, float] = {}
    grads: dict[str, Any] = {}
    for impl in case["impls"]:
        row = case_row(case, impl)
        results.append(row)
        reason = skip_reason(case, impl, args)
        if reason:
            row.update(skipped=True, reason=reason)
            continue
        step, forward, info = tc.make(impl)
        row.update(info)
        if args.mode == "memory":
            _memory_row(tc, row, step, forward)
            continue
        t0 = time.perf_counter()
        values[impl] = tc.first_call(forward, info)
        assert tc.student.grad is not None  # set by the backward above
        grads[impl] = tc.student.grad.detach().float().clone()
        tc.student.grad = None
        tc.sync()
        first_s[impl] = time.perf_counter() - t0
        for _ in range(args.warmup if first_s[impl] < args.slow_s else 0):
            step()
        tc.sync()
        steps[impl] = step
    if args.mode == "memory":
        return results
    samples = time_impls(steps, tc.sync, first_s, args)
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


def run_keras_case(case: Case, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Keras core under ``jax.jit`` or ``tf.function`` on one case."""
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

    row = case_row(case, f"keras-{backend}")
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
