"""Report: Markdown tables and PNG figures from results JSONL files.

Rows (``RunConfig.as_dict()`` merged with a :class:`~.rows.ResultRow`) are grouped
into settings (every identity field of the run config except method, budget, seed,
lr and weights, plus ``paper_dataset``). Rows whose ``test_acc`` is not finite are
skipped and counted; rows differing only in the config ``lr`` are reduced with
:func:`~.protocol.best_on_validation`, which also picks the synthetic per-family row
("CKD (best on val)"). Method order, labels and "ours" come from the registry.
Table 1: calls to reach target accuracies; Table 2: accuracy per budget; figures:
accuracy vs calls (Fig. 2/3), RKD vs RKD_d (Fig. 4), within-class spectra (Fig. 5).

>>> interpolate_calls([(100, 40.0), (200, 50.0), (400, 60.0)], 55.0)
(300.0, False)
>>> interpolate_calls([(100, 40.0), (200, 50.0)], 70.0)
(None, False)
>>> interpolate_calls([(100, 40.0), (200, 50.0)], 35.0)
(100.0, True)
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from .config import PRESETS, RunConfig
from .datasets import dataset_title
from .methods import registry
from .protocol import best_on_validation
from .rows import atomic_write_bytes, describe_environment, read_rows

#: config fields that vary inside one setting (one table / figure)
_WITHIN = {"method", "budget", "seed", "lr", "weights"}
SETTING_KEYS = tuple(
    f.name for f in fields(RunConfig) if f.metadata["identity"] and f.name not in _WITHIN
) + ("paper_dataset",)
#: method-name prefix of the synthetic validation-selected family rows
BEST = "best_on_val:"

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


# --------------------------------------------------------------------------- methods


def method_id(r: Mapping[str, Any]) -> str:
    """The curve a row belongs to: its method, plus loss-weight overrides if any."""
    w = r.get("weights") or {}
    items = sorted(w.items() if isinstance(w, Mapping) else ((str(k), v) for k, v in w))
    if not items:
        return str(r["method"])
    return f"{r['method']}[{','.join(f'{k}={float(v):g}' for k, v in items)}]"


def _cls(name: str) -> type[registry.Method] | None:
    try:
        return registry.get(name.split("[", 1)[0])
    except ValueError:
        return None


def _info(mid: str) -> tuple[float, str, str]:
    """``(order, label, kind)``; kind: "ours", "baseline" or "other" (unknown)."""
    if mid.startswith(BEST):
        fam = mid[len(BEST) :]
        orders = [registry.get(n).order for n in registry.names() if registry.get(n).family == fam]
        return min(orders, default=1000) - 0.5, f"{fam.upper()} (best on val)", "ours"
    cls = _cls(mid)
    if cls is None:
        return math.inf, mid, "other"
    base = mid.split("[", 1)[0]
    lab = cls.label + (f" ({mid[len(base) + 1 : -1]})" if mid != base else "")
    return float(cls.order), lab, "ours" if cls.ours else "baseline"


def label(mid: str) -> str:
    return _info(mid)[1]


def is_ours(mid: str) -> bool:
    return _info(mid)[2] == "ours"


def sort_key(mid: str) -> tuple[float, str]:
    return _info(mid)[0], mid


# --------------------------------------------------------------------------- rows


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _val(r: Mapping[str, Any]) -> Any:
    return r.get("best_val_acc")


def setting_key(r: Mapping[str, Any]) -> tuple:
    return tuple(r.get(k) for k in SETTING_KEYS)


def select_lr(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Per (setting, method, budget, seed), the row with the best validation accuracy
    (:func:`~.protocol.best_on_validation`; the first row if none has one): rows that
    differ only in the config lr."""
    by: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        by[setting_key(r) + (method_id(r), r.get("budget"), r.get("seed"))].append(r)
    out = []
    for cands in by.values():
        best = best_on_validation(cands, _val)
        out.append(dict(best or cands[0]))
    return out


def group_rows(rows: Sequence[Mapping[str, Any]]) -> dict[tuple, list[dict]]:
    """Rows with a finite test accuracy, by setting (sorted)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if _finite(r.get("test_acc")):
            groups[setting_key(r)].append(dict(r))
    return dict(sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])))


def family_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Synthetic rows (method ``best_on_val:<family>``) of one setting: for each family
    with two or more variants present, per (budget, seed) the variant row with the best
    validation accuracy; ``picked`` names it."""
    fams: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        cls = _cls(str(r["method"]))
        if cls is not None and cls.family:
            fams[cls.family].append(r)
    out = []
    for fam, rs in sorted(fams.items()):
        if len({method_id(r) for r in rs}) < 2:
            continue
        cells: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
        for r in sorted(rs, key=lambda r: sort_key(method_id(r))):
            cells[(r.get("budget"), r.get("seed"))].append(r)
        for cands in cells.values():
            best = best_on_validation(cands, _val)
            if best is not None:
                out.append({**best, "method": BEST + fam, "weights": {}, "picked": method_id(best)})
    return out


def budget_calls(rows: Sequence[Mapping[str, Any]]) -> dict[Any, float]:
    """Teacher calls a budget costs: the most any run at it made (CE makes none and is
    placed there); without any, the training split ``n_train``, else the budget."""
    calls: dict[Any, float] = {}
    fallback: dict[Any, float] = {}
    for r in rows:
        b = r.get("budget")
        calls[b] = max(calls.get(b, 0.0), float(r.get("teacher_calls") or 0))
        fallback[b] = max(fallback.get(b, 0.0), float(r.get("n_train") or 0))
    return {b: c or fallback[b] or float(b) for b, c in calls.items()}


def curves(rows: Sequence[Mapping[str, Any]], key: str = "test_acc", scale: float = 100.0):
    """method -> points sorted by calls: {budget, calls, mean, std, n} (test acc. in %)."""
    bc = budget_calls(rows)
    acc: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if _finite(r.get(key)):
            acc[method_id(r)][r["budget"]].append(float(r[key]) * scale)
    out: dict[str, list[dict[str, float]]] = {}
    for m in sorted(acc, key=sort_key):
        pts = []
        for b, v in acc[m].items():
            sd = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
            pts.append({"budget": b, "calls": bc[b], "mean": float(np.mean(v)), "std": sd})
        out[m] = sorted(pts, key=lambda p: p["calls"])
    return out


def interpolate_calls(
    points: Sequence[tuple[float, float]], target: float
) -> tuple[float | None, bool]:
    """Calls at which the piecewise-linear (calls, acc) curve first reaches ``target``.

    ``(calls, at_first)``: ``at_first`` when the first point already reaches it (the
    true cost is at most that); ``(None, False)`` when it is never reached.
    """
    pts = sorted(points)
    if not pts:
        return None, False
    if pts[0][1] >= target:
        return float(pts[0][0]), True
    for (c0, a0), (c1, a1) in zip(pts, pts[1:], strict=False):
        if a0 < target <= a1:
            return float(c0 + (target - a0) / (a1 - a0) * (c1 - c0)), False
    return None, False


def default_targets(cv: Mapping[str, list[dict[str, float]]], n: int = 4) -> list[float]:
    """``n`` targets from the best mean at the smallest budget to the best baseline's
    mean at the largest (the best of all methods without baselines)."""
    if not cv:
        return []
    first = min(p["calls"] for pts in cv.values() for p in pts)
    last = max(p["calls"] for pts in cv.values() for p in pts)
    lo = max(p["mean"] for pts in cv.values() for p in pts if p["calls"] == first)
    at_last = [(m, p["mean"]) for m, pts in cv.items() for p in pts if p["calls"] == last]
    base = [a for m, a in at_last if _info(m)[2] == "baseline"]
    hi = max(base) if base else max(a for _, a in at_last)
    if hi <= lo:
        return [math.floor(hi * 10) / 10]
    return sorted({math.floor(t * 10) / 10 for t in np.linspace(lo, hi, n + 1)[1:]})


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


def _setting(key: tuple) -> dict[str, Any]:
    return dict(zip(SETTING_KEYS, key, strict=True))


def _title(key: tuple) -> str:
    d = _setting(key)
    t = f" (teacher `{d['teacher_key']}`)" if d.get("teacher_key") else ""
    return f"{d['teacher_arch'] or '?'} → {d['student_arch']}{t}"


def setting_notes(key: tuple, rows: Sequence[Mapping[str, Any]], skipped: int = 0) -> list[str]:
    """Markdown bullet lines describing one setting."""
    d = _setting(key)
    real = [r for r in rows if not str(r["method"]).startswith(BEST)]
    seeds = {r.get("seed") for r in real}
    teacher = [float(r["teacher_test_acc"]) for r in real if _finite(r.get("teacher_test_acc"))]
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
    used = Counter(f"{r['lr_used']:g}" for r in real if _finite(r.get("lr_used")))
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
    """Markdown: teacher calls (thousands) to reach each target accuracy, Δ% vs best baseline."""
    cv = curves(rows)
    targets = list(targets) if targets else default_targets(cv)
    calls = {
        m: [interpolate_calls([(p["calls"], p["mean"]) for p in pts], t) for t in targets]
        for m, pts in cv.items()
    }
    base = [m for m in calls if _info(m)[2] == "baseline"]
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
        f"{_title(key)}.** Linear interpolation between budgets (see the rules above); "
        f"“≤x”: a bound at the smallest budget; “—”: not reached.",
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
        f"{_title(key)}.** Best in bold."
    )
    return _stat_table(caption, curves(rows), ".2f", bold=True)


def flat_dims_table(key: tuple, rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: ``flat_dims`` mean ± std per method and budget ("" if no row has it)."""
    cv = curves(rows, key="flat_dims", scale=1.0)
    caption = (
        f"**Fig. 5 table — within-class directions holding 90% of the variance "
        f"(`flat_dims`), mean ± std over seeds, {_title(key)}.**"
    )
    return _stat_table(caption, cv, ".1f", bold=False) if cv else ""


# --------------------------------------------------------------------------- figures


def _slug(key: tuple) -> str:
    d = _setting(key)
    h = hashlib.sha256(repr(key).encode()).hexdigest()[:6]
    parts = [d["dataset"], d["teacher_arch"], d["student_arch"], d["preset"], h]
    return "_".join(str(p) for p in parts if p).replace("/", "-").replace("+", "p")


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.4), dpi=120)


def _save(fig, ax, key: tuple, rows, path, title: str) -> Path:
    import matplotlib.pyplot as plt

    d = _setting(key)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title.replace(": ", ":\n", 1), fontsize=9)
    ax.legend(fontsize=7, loc="best")
    caps = sorted({r["epoch_cap"] for r in rows if r.get("epoch_cap")})
    cap = f" (≤{'/'.join(map(str, caps))} epochs)" if caps else ""
    used = dataset_title(d["dataset"])
    if d["paper_dataset"] and d["paper_dataset"] != d["dataset"]:
        used += f" (paper: {dataset_title(d['paper_dataset'])})"
    fig.text(0.01, 0.01, f"{used}; preset {d['preset']}{cap}; mean over seeds", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _style(m: str) -> dict[str, Any]:
    ours = is_ours(m)
    width = (3.0 if m.startswith(BEST) else 2.0) if ours else 1.2
    return {"label": label(m), "linewidth": width, "linestyle": "-" if ours else "--"}


def plot_curves(
    key: tuple,
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    methods: Iterable[str] | None = None,
    title: str | None = None,
) -> Path:
    """Accuracy vs teacher calls, mean ± std error bars, one line per method (log x)."""
    cv = curves(rows)
    keep = set(cv if methods is None else methods)
    cv = {m: p for m, p in cv.items() if m in keep}
    fig, ax = _figure()
    for m, pts in cv.items():
        x, y, e = ([p[k] for p in pts] for k in ("calls", "mean", "std"))
        ax.errorbar(x, y, yerr=e, marker="o" if is_ours(m) else ".", capsize=3, **_style(m))
    ax.set_xscale("log")
    ticks = sorted({p["calls"] for pts in cv.values() for p in pts})
    ax.set_xticks(ticks, [f"{t / 1000:g}k" if t >= 1000 else f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("teacher calls")
    ax.set_ylabel("test accuracy (%)")
    return _save(fig, ax, key, rows, path, title or f"Accuracy vs teacher calls: {_title(key)}")


def spectrum_budget(rows: Sequence[Mapping[str, Any]]) -> Any:
    """The largest budget with spectra of several methods (else of any), or None."""
    by: dict[Any, set[str]] = defaultdict(set)
    for r in rows:
        if r.get("spectrum") and not str(r["method"]).startswith(BEST):
            by[r.get("budget")].add(method_id(r))
    several = [b for b, ms in by.items() if len(ms) > 1]
    return max(several or by, default=None)


def plot_spectra(key: tuple, rows: Sequence[Mapping[str, Any]], budget: Any, path) -> Path:
    """Fig. 5: each method's normalised within-class singular values at ``budget``,
    averaged over seeds (truncated to the shortest), log y."""
    specs: dict[str, list[list[float]]] = defaultdict(list)
    for r in rows:
        if r.get("budget") == budget and r.get("spectrum"):
            specs[method_id(r)].append([float(v) for v in r["spectrum"]])
    fig, ax = _figure()
    for m in sorted(specs, key=sort_key):
        n = min(len(s) for s in specs[m])
        mean = np.mean([s[:n] for s in specs[m]], axis=0)
        ax.plot(np.arange(1, n + 1), np.maximum(mean, 1e-12), **_style(m))
    ax.set_yscale("log")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("singular direction k")
    ax.set_ylabel("normalised singular value σ_k")
    title = f"Within-class feature spectrum at budget n={budget}: {_title(key)}"
    return _save(fig, ax, key, rows, path, title)


def rkd_d_methods(methods: Iterable[str]) -> list[str]:
    """Fig. 4's methods when a projected RKD_d (class attribute ``out_dim``) is among
    ``methods``: those, the methods whose name prefixes theirs (RKD), and ours; else []."""
    methods = sorted(methods, key=sort_key)
    proj = [m for m in methods if getattr(_cls(m), "out_dim", 0)]
    parents = [m for m in methods if m not in proj and any(p.startswith(m) for p in proj)]
    return proj + parents + [m for m in methods if is_ours(m)] if proj else []


# --------------------------------------------------------------------------- report

RULES = [
    "Accuracy: test accuracy (%) of the best-validation checkpoint, mean ± std (sample "
    "std) over seeds",
    "Teacher calls count the training split only; CE only makes none and is placed at the "
    "calls its budget costs the other methods",
    "lr: `lr` unset = the preset's lrs swept inside each run, the best on validation kept; "
    "a grid lr axis is reduced the same way per (method, budget, seed)",
    "Validation-selected family rows (“CKD (best on val)”): " + FAMILY_RULE.format(fam="family"),
    "Table 1: " + INTERPOLATION_RULE,
    SPECTRUM_RULE,
    "Methods not in the registry (old rows) are listed last under their own name and are "
    "not counted as baselines",
]


def make_report(
    results_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    targets: Sequence[float] | None = None,
) -> Path:
    """Writes ``report.md`` (ending with the rows' environments) and PNG figures into
    ``out_dir``; returns the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    srcs: list[str | os.PathLike[str]] = (
        [results_paths] if isinstance(results_paths, (str, os.PathLike)) else list(results_paths)
    )
    raw = [r for p in srcs for r in read_rows(p) if r.get("method") is not None]
    ok = [r for r in raw if _finite(r.get("test_acc"))]
    skipped = Counter(setting_key(r) for r in raw if not _finite(r.get("test_acc")))
    groups = group_rows(select_lr(ok))
    md = [
        "# Reference experiments report",
        "",
        f"Source: {', '.join(map(str, srcs))}: {len(raw)} rows; {len(raw) - len(ok)} "
        f"diverged (test accuracy not finite) skipped; "
        f"{sum(map(len, groups.values()))} after lr selection; {len(groups)} setting(s).",
        "",
        *(f"- {rule}." for rule in RULES),
        "",
    ]
    for key, grows in groups.items():
        grows = grows + family_rows(grows)
        slug, dataset = _slug(key), _setting(key)["dataset"]
        md += [f"## {_title(key)} — {dataset_title(dataset)}", ""]
        md += [f"- {n}" for n in setting_notes(key, grows, skipped.get(key, 0))] + [""]
        md += [table1(key, grows, targets), "", table2(key, grows), ""]
        png = plot_curves(key, grows, out / f"curves_{slug}.png")
        md += [f"![accuracy vs teacher calls]({png.name})", ""]
        fig4 = rkd_d_methods({method_id(r) for r in grows})
        if fig4:
            title = f"RKD vs RKD_d vs CKD: {_title(key)}"
            png = plot_curves(key, grows, out / f"fig4_rkd_d_{slug}.png", fig4, title)
            md += [f"![RKD_d comparison]({png.name})", ""]
        if ft := flat_dims_table(key, grows):
            md += [ft, ""]
        if (budget := spectrum_budget(grows)) is not None:
            png = plot_spectra(key, grows, budget, out / f"fig5_spectrum_{slug}.png")
            md += [f"![within-class spectrum]({png.name})", ""]
    md += [describe_environment(raw)]
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(md).encode("utf-8"))
    return path
