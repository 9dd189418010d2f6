"""Report text: the per-setting notes (data set, schedule, lr, family picks) and the
Markdown tables (Table 1: calls to reach a target; Table 2: accuracy per budget;
Fig. 5's ``flat_dims``)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .config import PRESETS
from .datasets import dataset_title
from .report_rows import (
    BEST,
    curves,
    interpolate_calls,
    is_finite,
    is_ours,
    label,
    method_info,
    setting_dict,
    setting_title,
    table1_targets,
)

FAMILY_RULE = (
    "per (budget, seed), the {fam} variant with the best validation accuracy "
    "(`protocol.best_on_validation`; never chosen on test), as the paper sweeps "
    "`pos_and_neg`; the variants are listed separately as well"
)
INTERPOLATION_RULE = (
    "teacher calls (thousands) at which the mean accuracy-vs-calls curve first reaches "
    "the target, interpolated linearly in calls between the two budgets around the "
    "crossing; never extrapolated: “—” = not reached by the largest budget, “≤x” = "
    "reached at the smallest budget already (a bound); Δ: vs the best (fewest-calls) "
    "baseline, “≤” where ours is a bound, none where the baseline is"
)
SPECTRUM_RULE = (
    "Fig. 5: the student's penultimate test features are centred per class; `flat_dims` "
    "counts the singular directions holding 90% of that within-class variance "
    "(`spectrum`: singular values normalised to unit energy); flatter = more directions"
)


# --------------------------------------------------------------------------- notes


def dataset_note(dataset: str, paper_dataset: str | None = None) -> str:
    used = dataset_title(dataset)
    if paper_dataset and paper_dataset != dataset:
        paper = dataset_title(paper_dataset)
        return (
            f"{used} — the paper uses {paper}, which cannot be obtained here, so these results "
            f"are on {used} instead (not directly comparable to the paper's numbers)"
        )
    return used


def preset_note(rows: Sequence[Mapping[str, Any]]) -> str:
    """The schedule the rows actually ran: when capped, the cap and the lr phases reached."""
    name = rows[0].get("preset")
    p = PRESETS.get(str(name))
    if p is None:
        return f"preset `{name}`"
    full = p.max_epochs
    caps = sorted({int(r.get("epoch_cap") or min(full, r.get("max_epochs") or full)) for r in rows})
    cap, best = "/".join(map(str, caps)), "test accuracy of the best-validation checkpoint"
    if p.schedule == "cosine":
        return (
            f"preset `{name}` (not the paper's protocol): SGD, cosine lr over {cap} epochs; {best}"
        )
    pat = "/".join(map(str, sorted({r.get("patience") or p.patience for r in rows})))
    phases = [int(r["phases_reached"]) for r in rows if r.get("phases_reached") is not None]
    low, top = min(phases, default=None), max(phases, default=None)
    capped = any(c < full for c in caps)
    if not capped and (top is None or top >= p.phases):
        return (
            f"preset `{name}` (official protocol): SGD, lr ×{p.lr_decay:g} after {pat} epochs "
            f"without a validation gain, stop after {p.phases} lr phases or {full} epochs; {best}"
        )
    at_cap = sum((r.get("epochs") or 0) >= (r.get("epoch_cap") or math.inf) for r in rows)
    note = f"preset `{name}` " + (
        f"**capped at {cap} epochs** (the protocol allows {full}; "
        if capped
        else f"at most {cap} epochs ("
    )
    note += f"{at_cap} of {len(rows)} runs stopped at the epoch limit)"
    if top is None:
        return f"{note}; lr phases reached not recorded (patience {pat}); {best}"
    note += f"; lr phases reached: {'' if low == top else f'{low}–'}{top} of {p.phases}"
    if top < p.phases:
        note += (
            f". The patience-{pat} plateaus and lr decays beyond phase {top} were never "
            f"reached: the official schedule cut short, not the paper's protocol"
        )
    return f"{note}; {best}"


def setting_notes(key: tuple, rows: Sequence[Mapping[str, Any]], skipped: int = 0) -> list[str]:
    """Markdown bullet lines describing one setting."""
    d = setting_dict(key)
    real = [r for r in rows if not str(r["method"]).startswith(BEST)]
    seeds = {r.get("seed") for r in real}
    teacher = [float(r["teacher_test_acc"]) for r in real if is_finite(r.get("teacher_test_acc"))]
    notes = [
        f"Dataset: {dataset_note(d['dataset'], d['paper_dataset'])}.",
        f"Schedule: {preset_note(real)}.",
        f"Teacher view `{d['teacher_view']}`; {len(seeds)} seed(s)"
        + (f"; teacher test accuracy {100 * np.mean(teacher):.2f}%." if teacher else "."),
    ]
    grid_lrs = sorted({r["lr"] for r in real if r.get("lr") is not None})
    if grid_lrs:
        notes.append(
            f"lr grid axis {', '.join(f'{x:g}' for x in grid_lrs)}: per (method, budget, seed) "
            f"the row with the best validation accuracy is kept."
        )
    used = Counter(f"{r['lr_used']:g}" for r in real if is_finite(r.get("lr_used")))
    if used:
        notes.append(
            "lr used (runs): " + ", ".join(f"{k} ({v})" for k, v in sorted(used.items())) + "."
        )
    fams: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        if str(r["method"]).startswith(BEST):
            fams[str(r["method"])[len(BEST) :]][label(r["picked"])] += 1
    for fam, n in sorted(fams.items()):
        picked = ", ".join(f"{k} ×{v}" for k, v in n.most_common())
        rule = FAMILY_RULE.format(fam=fam.upper())
        notes.append(f"{fam.upper()} (best on val): {rule} (picked: {picked}).")
    if skipped:
        notes.append(f"{skipped} diverged run(s) (test accuracy not finite) skipped.")
    return notes


# --------------------------------------------------------------------------- tables


def _fmt_k(calls: float) -> str:
    k = calls / 1000.0
    return f"{k:.3g}" if k < 100 else f"{k:.0f}"


def table1(key: tuple, rows: Sequence[Mapping[str, Any]], targets: Sequence[float] | None = None):
    """Markdown: teacher calls (thousands) to reach each target accuracy, Δ% vs best baseline
    (targets: :func:`~.report_rows.table1_targets`)."""
    cv = curves(rows)
    targets, source = table1_targets(setting_dict(key)["dataset"], cv, targets)
    calls = {
        m: [interpolate_calls([(p["calls"], p["mean"]) for p in pts], t) for t in targets]
        for m, pts in cv.items()
    }
    base = [m for m in calls if method_info(m)[2] == "baseline"]
    #: per target, the baseline reaching it with the fewest calls: (calls, bound, method)
    best: list[tuple[float, bool, str] | None] = [
        min(
            ((c, bound, m) for m in base for c, bound in [calls[m][j]] if c is not None),
            default=None,
        )
        for j in range(len(targets))
    ]
    lines = [
        f"**Table 1 — teacher calls (thousands) to reach a target test accuracy, "
        f"{setting_title(key)}.** Method: the calls at which the mean (over seeds) "
        f"accuracy-vs-calls curve first reaches the target, linearly interpolated between "
        f"the two budgets around the crossing, never extrapolated; “≤x”: reached at the "
        f"smallest budget already (a bound); “—”: not reached by the largest budget. "
        f"Targets: {source}.",
        "",
        "| method | " + " | ".join(f"to {t:.1f}%" for t in targets) + " |",
        "|---|" + "---:|" * len(targets),
    ]
    for m, cs in calls.items():
        cells = []
        for (c, bound), bb in zip(cs, best, strict=True):
            cell = "—" if c is None else ("≤" if bound else "") + _fmt_k(c)
            if c is not None and is_ours(m):
                if bb is None:
                    cell += " (baselines: —)"
                elif not bb[1] and bb[0] > 0:
                    cell += f" ({'≤' if bound else ''}{(c - bb[0]) / bb[0] * 100:+.0f}%)"
            cells.append(cell)
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    cells = ["—" if b is None else f"{'≤' * b[1]}{_fmt_k(b[0])} ({label(b[2])})" for b in best]
    return "\n".join([*lines, "| *best baseline* | " + " | ".join(cells) + " |"])


def _stat_table(caption: str, cv: Mapping[str, list[dict]], fmt: str, bold: bool) -> str:
    """Markdown: mean ± std per method (rows) and budget (columns, by teacher calls)."""
    cols = sorted({(p["calls"], p["budget"]) for pts in cv.values() for p in pts})
    top = {
        c: max(p["mean"] for pts in cv.values() for p in pts if p["calls"] == c) for c, _ in cols
    }
    lines = [
        caption + " Column: teacher calls in thousands (budget n).",
        "",
        "| method | " + " | ".join(f"{_fmt_k(c)}k (n={b})" for c, b in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for m, pts in cv.items():
        by = {p["calls"]: p for p in pts}
        cells = []
        for c, _ in cols:
            p = by.get(c)
            s = "" if p is None else f"{p['mean']:{fmt}} ± {p['std']:{fmt}}"
            cells.append(f"**{s}**" if p and bold and p["mean"] >= top[c] - 1e-9 else s)
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table2(key: tuple, rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: mean ± std test accuracy (%) per method at each budget's teacher calls."""
    caption = (
        f"**Table 2 — test accuracy (%) at fixed teacher calls, mean ± std over seeds, "
        f"{setting_title(key)}.** Best in bold."
    )
    return _stat_table(caption, curves(rows), ".2f", bold=True)


def flat_dims_table(key: tuple, rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: ``flat_dims`` mean ± std per method and budget ("" if no row has it)."""
    cv = curves(rows, key="flat_dims", scale=1.0)
    caption = (
        f"**Fig. 5 table — within-class directions holding 90% of the variance "
        f"(`flat_dims`), mean ± std over seeds, {setting_title(key)}.**"
    )
    return _stat_table(caption, cv, ".1f", bold=False) if cv else ""
