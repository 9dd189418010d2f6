"""The performance targets (naive/native/projected ratios, memory), from a run's rows."""

from __future__ import annotations

from typing import Any

from report import find, peak_of


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Targets 1-4 (see ``benchmarks/results/README_performance.md``), from a run's rows."""
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

    def time_ratio(
        tid: str, text: str, num: dict[str, Any], den: dict[str, Any], threshold: str, limit: float
    ) -> None:
        """A target on the time ratio ``num / den``, met at or below ``limit``."""
        ratio = num["median_s"] / den["median_s"]
        add(tid, text, round(ratio, 3), threshold, ratio <= limit)

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
        time_ratio(
            "2a",
            "ComparativeLoss n=4096 d=100: ckd (torch adapter) / native time",
            ckd,
            native,
            "<= 1.10",
            1.10,
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
        time_ratio(
            "4",
            "ProjectedRKDLoss(out_dim=100) n=4096 d_in=640 / ComparativeLoss n=4096 d=640 time",
            proj,
            comp,
            "<= 2",
            2,
        )
    return out
