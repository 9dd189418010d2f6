"""The performance table (``results/README_performance.md``, in docs/performance.md) from JSON."""

from __future__ import annotations

from typing import Any

from references import NAIVE_TENSORS
from report import find, first_row, fmt_bytes, fmt_time, peak_of, targets_table, versions_text

# (title, loss, n, d, reference) of the rows of the section's table
PICKS = [
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
NAMES = {
    "native": "hand-written torch",
    "naive": "brute force (n,n,d)",
    "comparative": "ComparativeLoss, same input",
    "repdistiller": "RepDistiller RKD",
}


def readme_section(report: dict[str, Any], source: str) -> str:
    """docs/performance.md's table: key rows, targets, machine, versions, command."""
    rows, meta = report["results"], report["meta"]
    f32 = {"dtype": "float32", "backend": "torch"}
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
    for title, loss, n, d, ref in PICKS:
        ckd = find(rows, loss=loss, impl="ckd", n=n, d=d, **f32)
        other = find(rows, loss=loss, impl=ref, n=n, d=d, **f32)
        if ckd is None:
            continue
        if other is None:
            skipped = first_row(rows, loss=loss, impl=ref, n=n, d=d)
            reason = skipped.get("reason", "not run").split(" > ")[0].split(" exceeds")[0]
            cells = [NAMES[ref], f"skipped ({reason})", "–", fmt_bytes(ckd["peak_bytes"]), "–"]
        else:
            star = "*" if other.get("chunked") else ""
            cells = [
                NAMES[ref],
                fmt_time(other["median_s"]),
                f"{other['median_s'] / ckd['median_s']:.2f}×",
                fmt_bytes(ckd["peak_bytes"]),
                fmt_bytes(peak_of(other)) + star,
            ]
        lines.append(
            f"| {title} | {n} | {d} | {fmt_time(ckd['median_s'])} | " + " | ".join(cells) + " |"
        )
    m = meta["machine"]
    lines += [
        "",
        "Performance targets, from the same run:",
        "",
        *targets_table(report["targets"], no="no"),
        "",
        f"Machine: {m['cpu']} CPU, {m['cores']} cores shared with other jobs (load average "
        f"{meta['load_before'].split()[0]} at the start), {meta['threads']} torch thread, "
        f"{m['memory_gib']} GiB RAM, no GPU. Versions: "
        + versions_text(meta)
        + f". Commit {meta['commit']}, {meta['date'][:10]}.",
        "",
        f"Reproduce: `{meta['command']}` (or `nox -s bench -- --full`; `nox -s bench` runs the "
        f"small `--quick` grid). Every case and the skipped ones with their reasons: "
        f"`{source}` and its `.md` table.",
    ]
    return "\n".join(lines) + "\n"
