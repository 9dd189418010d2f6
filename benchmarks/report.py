"""The result rows: look-ups, formatting, and the Markdown table of a run."""

from __future__ import annotations

from typing import Any

from references import NAIVE_TENSORS, PROJ_OUT


def find(rows: list[dict[str, Any]], **kw: Any) -> dict[str, Any] | None:
    """The first measured (not skipped) row with these fields, or None."""
    for row in rows:
        if all(row.get(k) == v for k, v in kw.items()) and not row.get("skipped"):
            return row
    return None


def first_row(rows: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    """The first row with these fields, skipped or not, or ``{}``."""
    return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), {})


def peak_of(row: dict[str, Any]) -> int:
    """Peak bytes of a row; the analytic unchunked peak for a chunked naive row."""
    return int(row.get("analytic_unchunked_peak_bytes") or row.get("peak_bytes") or 0)


def cell(text: str) -> str:
    """One line of text for a Markdown table cell or list item."""
    return " ".join(text.split()).replace("|", "/")


def fmt_time(s: float | None) -> str:
    """Seconds in µs, ms or s."""
    if s is None:
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_bytes(b: float | None) -> str:
    """Bytes in KiB, MiB or GiB."""
    if b is None:
        return "–"
    if b < 64 * 2**10:  # below the RSS resolution of small heap allocations
        return "<64 KiB"
    if b < 2**20:
        return f"{b / 2**10:.0f} KiB"
    if b < 2**30:
        return f"{b / 2**20:.1f} MiB"
    return f"{b / 2**30:.2f} GiB"


def versions_text(meta: dict[str, Any]) -> str:
    """The package versions of a run, ``name version`` comma-separated."""
    return ", ".join(f"{k} {v}" for k, v in meta["versions"].items())


def targets_table(targets: list[dict[str, Any]], no: str) -> list[str]:
    """The Markdown table of the targets; ``no`` marks one not met."""
    lines = ["| # | what | measured | target | met |", "|---|---|---|---|---|"]
    for t in targets:
        lines.append(
            f"| {t['target']} | {t['what']} | {t['measured']} | {t['threshold']} | "
            f"{'yes' if t['met'] else no} |"
        )
    return lines


REFS_BY_LOSS = {
    "comparative": ["native", "naive"],
    "projected": ["native", "naive", "comparative"],
    "rkd": ["repdistiller"],
    "kd": ["native"],
    "dist": ["native"],
}
TITLES = {
    "comparative": "ComparativeLoss (all pairs)",
    "projected": f"ProjectedRKDLoss (out_dim={PROJ_OUT}); `comparative` = ComparativeLoss "
    "on the same inputs",
    "rkd": "RKDLoss (distance 25, angle 50)",
    "kd": "KDLoss",
    "dist": "DISTLoss",
}


def torch_tables(rows: list[dict[str, Any]]) -> list[str]:
    """One table per loss of the torch cases: ckd against its references."""
    lines: list[str] = []
    for loss, refs in REFS_BY_LOSS.items():
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
        head += ["rel. err"]
        lines += [
            "",
            f"## {TITLES[loss]}",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for dtype, d, n in keys:
            sel = {"loss": loss, "dtype": dtype, "d": d, "n": n, "backend": "torch"}
            ckd = find(rows, impl="ckd", **sel)
            cells = [dtype, str(n), str(d)]
            if ckd is None:
                reason = first_row(rows, impl="ckd", **sel).get("reason", "")
                cells += ["skipped", cell(reason)[:60]]
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
    return lines


def keras_table(rows: list[dict[str, Any]]) -> list[str]:
    """The table of the Keras jax / tensorflow cases, against torch from their own process."""
    keras_rows = [r for r in rows if r["backend"] != "torch"]
    if not keras_rows:
        return []
    lines = [
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
    return lines


def _added_cases(meta: dict[str, Any]) -> list[str]:
    """A paragraph on the adapter cases added to this run from another one, if any."""
    added = meta.get("adapter_cases")
    if not added:
        return []
    return [
        f"Adapter cases (targets 5a/5b) added from `{added['command']}` at commit "
        f"{added['commit']}, {added['date']}: {added['note']}.",
        "",
    ]


def markdown(report: dict[str, Any]) -> str:
    """The ``<name>.md`` of a run: machine, targets, one table per loss, skipped cases."""
    rows = report["results"]
    meta = report["meta"]
    lines = [
        f"# ckd-core loss benchmark ({meta['grid']}, {meta['device']})",
        "",
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores "
        f"({meta['threads']} thread(s) used), {meta['machine']['memory_gib']} GiB; "
        + versions_text(meta)
        + f". Commit {meta['commit']}, {meta['date']}. Load average before/after: "
        f"{meta['load_before']} / {meta['load_after']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        *_added_cases(meta),
        "Forward + backward per call, median over interleaved rounds after warm-up; peak = "
        "RSS high-water mark of one call minus the baseline (fresh process per case). "
        "`naive` above the memory budget runs in row chunks; its peak (*) is then the "
        f"analytic unchunked one ({NAIVE_TENSORS} tensors of n·n·d elements).",
        "",
        "## Targets",
        "",
        *targets_table(report["targets"], no="NO"),
        *torch_tables(rows),
        *keras_table(rows),
    ]
    skipped = [r for r in rows if r.get("skipped")]
    if skipped:
        lines += ["", "## Skipped", ""]
        for r in skipped:
            lines.append(
                f"- {r['loss']} {r['impl']} n={r['n']} d={r['d']} {r['dtype']} "
                f"({r['backend']}): {cell(r['reason'])[:300]}"
            )
    return "\n".join(lines) + "\n"
