"""The performance targets (naive/native/projected ratios, memory, adapter), from a run's rows."""

from __future__ import annotations

from typing import Any

from report import find, peak_of

Rows = list[dict[str, Any]]
F32 = {"dtype": "float32", "backend": "torch"}
#: Training sizes of the adapter targets (5a, 5b): batch n and feature dim d.
ADAPTER_NS = (64, 128, 256)
ADAPTER_DS = (10, 64, 640)
CKD_OVER_NATIVE = 1.3  # target 5a: ckd / hand-written centred torch CKD
RKD_OVER_REPDISTILLER = 1.0  # target 5b: ckd / RepDistiller's RKDLoss


def _target(tid: str, what: str, value: Any, threshold: str, met: bool | None, **extra: Any):
    return {
        "target": tid,
        "what": what,
        "measured": value,
        "threshold": threshold,
        "met": met,
        **extra,
    }


def _time_ratio(
    tid: str, what: str, num: dict[str, Any], den: dict[str, Any], threshold: str, limit: float
) -> dict[str, Any]:
    """A target on the time ratio ``num / den``, met at or below ``limit``."""
    ratio = num["median_s"] / den["median_s"]
    return _target(tid, what, round(ratio, 3), threshold, ratio <= limit)


def _naive_targets(rows: Rows) -> Rows:
    """1a, 1b: ComparativeLoss against the brute force at n=4096, d=100."""
    ckd = find(rows, loss="comparative", impl="ckd", n=4096, d=100, **F32)
    naive = find(rows, loss="comparative", impl="naive", n=4096, d=100, **F32)
    if not (ckd and naive):
        return []
    speed = naive["median_s"] / ckd["median_s"]
    mem = peak_of(naive) / max(ckd["peak_bytes"], 1)
    what = "ComparativeLoss n=4096 d=100: naive"
    return [
        _target("1a", f"{what} time / ckd time", round(speed, 1), ">= 50", speed >= 50),
        _target(
            "1b",
            f"{what} peak / ckd peak (naive unchunked peak analytic)",
            round(mem, 1),
            ">= 1000",
            mem >= 1000,
            naive_peak_bytes=peak_of(naive),
            ckd_peak_bytes=ckd["peak_bytes"],
        ),
    ]


def _native_targets(rows: Rows) -> Rows:
    """2a, 2b: ComparativeLoss through the adapter against the hand-written closed form."""
    out = []
    ckd = find(rows, loss="comparative", impl="ckd", n=4096, d=100, **F32)
    native = find(rows, loss="comparative", impl="native", n=4096, d=100, **F32)
    if ckd and native:
        what = "ComparativeLoss n=4096 d=100: ckd (torch adapter) / native time"
        out.append(_time_ratio("2a", what, ckd, native, "<= 1.10", 1.10))
    for d in (10, 100):
        small = find(rows, loss="comparative", impl="ckd", n=64, d=d, **F32)
        small_native = find(rows, loss="comparative", impl="native", n=64, d=d, **F32)
        if small and small_native:
            added = (small["median_s"] - small_native["median_s"]) * 1e6
            what = f"ComparativeLoss n=64 d={d}: ckd - native per call (us)"
            out.append(_target("2b", what, round(added, 1), "<= 150", added <= 150))
    return out


def _rkd_targets(rows: Rows) -> Rows:
    """3a: RKD peak memory at n=1024; 3b: RKD against RepDistiller at n >= 256, d=640."""
    out = []
    rkd = find(rows, loss="rkd", impl="ckd", n=1024, d=640, **F32)
    if rkd:
        gib = rkd["peak_bytes"] / 2**30
        what = "RKDLoss n=1024 d=640: peak memory (GiB)"
        out.append(_target("3a", what, round(gib, 3), "<= 2", gib <= 2))
    for row in rows:
        if (row["loss"], row["impl"], row.get("dtype"), row["backend"]) != (
            "rkd",
            "ckd",
            "float32",
            "torch",
        ):
            continue
        if row.get("skipped") or row["n"] < 256 or row["d"] != 640:
            continue
        rep = find(rows, loss="rkd", impl="repdistiller", n=row["n"], d=640, **F32)
        if rep is None:
            continue
        ratio = row["median_s"] / rep["median_s"]
        what = (
            f"RKDLoss n={row['n']} d=640: ckd / repdistiller time (value rel. err "
            f"{row['rel_err_value']:.1e})"
        )
        ok = ratio <= 1.0 and row["rel_err_value"] <= 1e-5
        out.append(_target("3b", what, round(ratio, 3), "<= 1, rel. err <= 1e-5", ok))
    return out


def _projected_targets(rows: Rows) -> Rows:
    """4: ProjectedRKDLoss against ComparativeLoss on the full-width input."""
    proj = find(rows, loss="projected", impl="ckd", n=4096, d=640, **F32)
    comp = find(rows, loss="projected", impl="comparative", n=4096, d=640, **F32)
    if not (proj and comp):
        return []
    what = "ProjectedRKDLoss(out_dim=100) n=4096 d_in=640 / ComparativeLoss n=4096 d=640 time"
    return [_time_ratio("4", what, proj, comp, "<= 2", 2)]


def _adapter_targets(rows: Rows) -> Rows:
    """5a, 5b: the torch adapter at training sizes against its peers, 1 thread."""
    out = []
    for loss, ref, tid, limit in (
        ("comparative", "native", "5a", CKD_OVER_NATIVE),
        ("rkd", "repdistiller", "5b", RKD_OVER_REPDISTILLER),
    ):
        for n in ADAPTER_NS:
            for d in ADAPTER_DS:
                ckd = find(rows, loss=loss, impl="ckd", n=n, d=d, **F32)
                peer = find(rows, loss=loss, impl=ref, n=n, d=d, **F32)
                if ckd and peer:
                    what = f"{loss} n={n} d={d}: ckd (torch adapter) / {ref} time"
                    out.append(_time_ratio(tid, what, ckd, peer, f"<= {limit}", limit))
    return out


def targets(rows: Rows) -> Rows:
    """Targets 1-5 (see ``benchmarks/results/README_performance.md``), from a run's rows."""
    return [
        *_naive_targets(rows),
        *_native_targets(rows),
        *_rkd_targets(rows),
        *_projected_targets(rows),
        *_adapter_targets(rows),
    ]
