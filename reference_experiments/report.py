"""Report: Markdown tables and PNG figures from a results JSONL.

Rows are grouped by experiment setting (dataset, teacher, student, preset,
teacher view). Within a group, a method's curve is its mean (± std over
seeds) test accuracy at each budget, placed at the teacher calls that budget
costs. When a grid swept several learning rates, each (method, budget, seed)
keeps the lr with the best validation accuracy, as the paper's protocol does.

* **Table 1** -- teacher calls (thousands) needed to reach each target
  accuracy, by linear interpolation between budgets on the mean curve (the
  first crossing; "—" when never reached, "≤x" when already reached at the
  smallest budget), with Δ% vs the best (fewest-calls) baseline.
* **Table 2** -- mean ± std test accuracy at each fixed number of calls.
* **Figures** -- accuracy vs teacher calls with error bars (the paper's
  Fig. 2/3), and the RKD_d comparison (Fig. 4) when RKD_d runs are present.

>>> interpolate_calls([(100, 40.0), (200, 50.0), (400, 60.0)], 55.0)
(300.0, False)
>>> interpolate_calls([(100, 40.0), (200, 50.0)], 70.0)
(None, False)
>>> interpolate_calls([(100, 40.0), (200, 50.0)], 35.0)
(100.0, True)
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DATASET_NAMES = {
    "cifar100": "CIFAR-100",
    "cifar10-jpeg": "CIFAR-10 (JPEG q75 copy)",
    "cars64": "Stanford Cars (training half, 64×64, seeded 80/20 split)",
    "digits": "scikit-learn digits (8×8, 10 classes)",
}

PRESET_NOTES = {
    "paper": "preset `paper` (SGD, early stopping with patience 50, ≤3 lr decays, "
    "test accuracy of the best-validation checkpoint)",
    "fast": "preset `fast` (short fixed schedule for iteration, not the paper's protocol)",
}

#: display order; methods not listed follow alphabetically
METHOD_ORDER = [
    "ce",
    "kd",
    "rkd",
    "dist",
    "mixup",
    "crd",
    "rkd_d10",
    "rkd_d50",
    "rkd_d100",
    "fitnets",
    "vid",
    "fitnets+crd",
    "vid+crd",
    "ckd_pairs",
    "ckd_groups2",
    "ckd_groups3",
    "ckd_all",
    "fitnets+ckd",
    "vid+ckd",
]

METHOD_LABELS = {
    "ce": "CE only",
    "kd": "KD",
    "rkd": "RKD",
    "dist": "DIST",
    "mixup": "Mixup",
    "crd": "CRD",
    "ckd_pairs": "CKD (pairs)",
    "ckd_groups2": "CKD (groups k=2)",
    "ckd_groups3": "CKD (groups k=3)",
    "ckd_all": "CKD (all pairs)",
    "rkd_d10": "RKD_10",
    "rkd_d50": "RKD_50",
    "rkd_d100": "RKD_100",
    "fitnets": "FitNets",
    "fitnets+crd": "FitNets+CRD",
    "fitnets+ckd": "FitNets+CKD",
    "vid": "VID",
    "vid+crd": "VID+CRD",
    "vid+ckd": "VID+CKD",
}

#: rows that share these are one setting (one table / figure); ``teacher`` is the grid
#: config's teacher key (two teachers of the same arch are different settings)
GROUP_KEYS = (
    "dataset",
    "paper_dataset",
    "teacher_arch",
    "teacher",
    "student_arch",
    "preset",
    "teacher_view",
)


def is_ours(method: str) -> bool:
    """CKD variants are 'ours'; everything else (CE-only included) is a baseline."""
    return "ckd" in method


def method_sort_key(m: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m)


def label(m: str) -> str:
    return METHOD_LABELS.get(m, m)


def dataset_note(dataset: str, paper_dataset: str | None = None) -> str:
    used = DATASET_NAMES.get(dataset, dataset)
    if paper_dataset and paper_dataset != dataset:
        return f"{used} as stand-in for {DATASET_NAMES.get(paper_dataset, paper_dataset)}"
    return used


# --------------------------------------------------------------------------- data


def read_rows(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[dict]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    rows = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        print(f"warning: {p}: malformed row skipped", file=sys.stderr)
    return rows


def select_lr(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Per (setting, method, budget, seed), keep the lr with the best validation accuracy."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = tuple(r.get(k) for k in GROUP_KEYS) + (
            r.get("method"),
            r.get("budget"),
            r.get("seed"),
        )
        val = r.get("best_val_acc")
        val = -math.inf if val is None else val
        if key not in best or val > best[key].get("_val", -math.inf):
            best[key] = {**r, "_val": val}
    return [{k: v for k, v in r.items() if k != "_val"} for r in best.values()]


def _scale(rows: Sequence[Mapping[str, Any]]) -> float:
    """Accuracies stored as fractions are shown in percent."""
    accs = [r["test_acc"] for r in rows if r.get("test_acc") is not None]
    return 100.0 if accs and max(accs) <= 1.0 else 1.0


def group_rows(rows: Sequence[Mapping[str, Any]]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("test_acc") is None:
            continue
        groups[tuple(r.get(k) for k in GROUP_KEYS)].append(dict(r))
    return dict(sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])))


def budget_calls(rows: Sequence[Mapping[str, Any]]) -> dict[Any, float]:
    """Teacher calls each budget costs: the most any run at that budget made.

    CE-only makes none; it is placed at the calls its budget costs the others. A
    group with no teacher calls at all (CE only) falls back to the budget itself.
    """
    calls: dict[Any, float] = {}
    for r in rows:
        b = r.get("budget")
        calls[b] = max(calls.get(b, 0.0), float(r.get("teacher_calls") or 0))
    return {b: (c if c > 0 else float(b)) for b, c in calls.items()}


def curves(
    rows: Sequence[Mapping[str, Any]], scale: float = 1.0
) -> dict[str, list[dict[str, float]]]:
    """method -> points sorted by calls: {budget, calls, mean, std, n} (accuracy in %)."""
    bc = budget_calls(rows)
    acc: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        acc[r["method"]][r["budget"]].append(float(r["test_acc"]) * scale)
    out: dict[str, list[dict[str, float]]] = {}
    for m in sorted(acc, key=method_sort_key):
        pts = []
        for b, vals in acc[m].items():
            v = np.asarray(vals, dtype=float)
            pts.append(
                {
                    "budget": b,
                    "calls": bc[b],
                    "mean": float(v.mean()),
                    "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                    "n": len(v),
                }
            )
        out[m] = sorted(pts, key=lambda p: p["calls"])
    return out


def interpolate_calls(
    points: Sequence[tuple[float, float]], target: float
) -> tuple[float | None, bool]:
    """Calls at which the piecewise-linear (calls, acc) curve first reaches ``target``.

    Returns ``(calls, at_first)``: ``at_first`` is True when the first point already
    reaches the target (the true cost is at most that many calls); ``(None, False)``
    when the curve never reaches it.
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
    """``n`` targets from just above where the methods start to the best baseline's final
    accuracy: lo = best mean at the smallest budget, hi = best baseline mean at the largest."""
    if not cv:
        return []
    first = min(p["calls"] for pts in cv.values() for p in pts)
    last = max(p["calls"] for pts in cv.values() for p in pts)
    lo = max((p["mean"] for pts in cv.values() for p in pts if p["calls"] == first), default=None)
    base = [p["mean"] for m, pts in cv.items() if not is_ours(m) for p in pts if p["calls"] == last]
    hi = (
        max(base)
        if base
        else max(p["mean"] for pts in cv.values() for p in pts if p["calls"] == last)
    )
    if lo is None or hi <= lo:
        return [math.floor(hi * 10) / 10]
    ts = np.linspace(lo, hi, n + 1)[1:]
    return sorted({math.floor(t * 10) / 10 for t in ts})


# --------------------------------------------------------------------------- tables


def _fmt_k(calls: float) -> str:
    k = calls / 1000.0
    return f"{k:.3g}" if k < 100 else f"{k:.0f}"


def _group_header(key: tuple, rows: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    d = dict(zip(GROUP_KEYS, key, strict=True))
    teacher = d["teacher_arch"]
    if d["teacher"] and d["teacher"] != d["teacher_arch"]:
        teacher = f"{d['teacher_arch']} (teacher `{d['teacher']}`)"
    title = f"{teacher} → {d['student_arch']}"
    seeds = sorted({r.get("seed") for r in rows}, key=str)
    lrs = sorted({r.get("lr") for r in rows if r.get("lr") is not None}, key=str)
    preset = PRESET_NOTES.get(d["preset"], f"preset `{d['preset']}`")
    note = f"Dataset: {dataset_note(d['dataset'], d['paper_dataset'])}; {preset}"
    caps = sorted({r["max_epochs"] for r in rows if r.get("max_epochs")})
    if caps:
        note += f", capped at {'/'.join(map(str, caps))} epochs"
    note += f"; teacher view `{d['teacher_view']}`; {len(seeds)} seed(s)"
    if len(lrs) > 1:
        note += (
            f"; lrs used: {', '.join(map(str, lrs))} (where a run was tried at several, "
            f"the best on validation is kept)"
        )
    return title, note + "."


def table1(
    key: tuple, rows: Sequence[Mapping[str, Any]], targets: Sequence[float] | None = None
) -> str:
    """Markdown: teacher calls (thousands) to reach each target accuracy, Δ% vs best baseline."""
    scale = _scale(rows)
    cv = curves(rows, scale)
    targets = list(targets) if targets else default_targets(cv)
    title, note = _group_header(key, rows)
    calls = {
        m: [interpolate_calls([(p["calls"], p["mean"]) for p in pts], t) for t in targets]
        for m, pts in cv.items()
    }
    best_base = []
    for j in range(len(targets)):
        cands = [(c[j][0], m) for m, c in calls.items() if not is_ours(m) and c[j][0] is not None]
        best_base.append(min(cands) if cands else None)
    lines = [
        f"**Table 1 — teacher calls (thousands) to reach a target test accuracy, "
        f"{title}.** {note} Interpolated linearly on the mean accuracy-vs-calls curve; "
        f'"—": never reached; "≤x": reached at the smallest budget; '
        f"Δ: vs the best baseline (negative = fewer calls).",
        "",
        "| method | " + " | ".join(f"to {t:.1f}%" for t in targets) + " |",
        "|---|" + "---:|" * len(targets),
    ]
    for m, cs in calls.items():
        cells = []
        for j, (c, at_first) in enumerate(cs):
            if c is None:
                cells.append("—")
                continue
            cell = ("≤" if at_first else "") + _fmt_k(c)
            bb = best_base[j]
            if is_ours(m):
                if bb is None:
                    cell += " (baselines: —)"
                elif not at_first and bb[0] > 0:
                    cell += f" ({(c - bb[0]) / bb[0] * 100:+.0f}%)"
            cells.append(cell)
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    lines.append(
        "| *best baseline* | "
        + " | ".join("—" if bb is None else f"{_fmt_k(bb[0])} ({label(bb[1])})" for bb in best_base)
        + " |"
    )
    return "\n".join(lines)


def table2(key: tuple, rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: mean ± std test accuracy (%) per method at each fixed number of calls."""
    scale = _scale(rows)
    cv = curves(rows, scale)
    title, note = _group_header(key, rows)
    cols = sorted({(p["calls"], p["budget"]) for pts in cv.values() for p in pts})
    best = {
        c: max((p["mean"] for pts in cv.values() for p in pts if p["calls"] == c[0]), default=None)
        for c in cols
    }
    lines = [
        f"**Table 2 — test accuracy (%) at fixed teacher calls, mean ± std over seeds, "
        f"{title}.** {note} Column: teacher calls in thousands (budget n); best in bold.",
        "",
        "| method | " + " | ".join(f"{_fmt_k(c)}k (n={b})" for c, b in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for m, pts in cv.items():
        by = {p["calls"]: p for p in pts}
        cells = []
        for c, _ in cols:
            p = by.get(c)
            if p is None:
                cells.append("")
                continue
            s = f"{p['mean']:.2f} ± {p['std']:.2f}"
            if best[(c, _)] is not None and p["mean"] >= best[(c, _)] - 1e-9:
                s = f"**{s}**"
            cells.append(s)
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures


def _slug(key: tuple) -> str:
    d = dict(zip(GROUP_KEYS, key, strict=True))
    teacher = d["teacher"] if d["teacher"] and d["teacher"] != d["teacher_arch"] else None
    parts = [d["dataset"], d["teacher_arch"], teacher, d["student_arch"], d["preset"]]
    parts.append(d["teacher_view"])
    return "_".join(str(p) for p in parts if p).replace("/", "-").replace("+", "p")


def plot_curves(
    key: tuple,
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    methods: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Accuracy vs teacher calls, mean ± std error bars, one line per method (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = _scale(rows)
    cv = curves(rows, scale)
    if methods is not None:
        cv = {m: p for m, p in cv.items() if m in methods}
    d = dict(zip(GROUP_KEYS, key, strict=True))
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for m, pts in cv.items():
        x = [p["calls"] for p in pts]
        ax.errorbar(
            x,
            [p["mean"] for p in pts],
            yerr=[p["std"] for p in pts],
            label=label(m),
            marker="o" if is_ours(m) else ".",
            linewidth=2.2 if is_ours(m) else 1.2,
            linestyle="-" if is_ours(m) else "--",
            capsize=3,
            markersize=5,
        )
    ax.set_xscale("log")
    ticks = sorted({p["calls"] for pts in cv.values() for p in pts})
    ax.set_xticks(ticks, [f"{t / 1000:g}k" if t >= 1000 else f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("teacher calls")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or f"{d['teacher_arch']} → {d['student_arch']}", fontsize=10)
    caps = sorted({r["max_epochs"] for r in rows if r.get("max_epochs")})
    cap = f" (≤{'/'.join(map(str, caps))} epochs)" if caps else ""
    fig.text(
        0.01,
        0.01,
        f"{dataset_note(d['dataset'], d['paper_dataset'])}; "
        f"preset {d['preset']}{cap}; mean ± std over seeds",
        fontsize=7,
        alpha=0.8,
    )

    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


RKD_D_METHODS = ("rkd", "rkd_d10", "rkd_d50", "rkd_d100")


def has_rkd_d(rows: Sequence[Mapping[str, Any]]) -> bool:
    return any(str(r.get("method", "")).startswith("rkd_d") for r in rows)


# --------------------------------------------------------------------------- report


def make_report(
    results: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    targets: Sequence[float] | None = None,
    tables: Sequence[int] = (1, 2),
) -> Path:
    """Write ``report.md`` and PNG figures into ``out_dir``; return the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = read_rows(results)
    rows = select_lr(raw)
    groups = group_rows(rows)
    srcs = [results] if isinstance(results, (str, os.PathLike)) else list(results)
    md = [
        "# Reference experiments report",
        "",
        f"Source: {', '.join(str(s) for s in srcs)} ({len(raw)} rows, {len(rows)} after "
        f"lr selection, {len(groups)} setting(s)). Accuracy: test accuracy (%) of the "
        f"best-validation checkpoint. Teacher calls count the training split only; CE only "
        f"makes none and is placed at the calls its sample budget costs the other methods.",
        "",
    ]
    for key, grows in groups.items():
        title, note = _group_header(key, grows)
        md += [f"## {title} — {dict(zip(GROUP_KEYS, key, strict=True))['dataset']}", ""]
        if 1 in tables:
            md += [table1(key, grows, targets), ""]
        if 2 in tables:
            md += [table2(key, grows), ""]
        png = plot_curves(
            key,
            grows,
            out / f"curves_{_slug(key)}.png",
            title=f"Accuracy vs teacher calls: {title}",
        )
        md += [f"![accuracy vs teacher calls]({png.name})", ""]
        if has_rkd_d(grows):
            keep = [m for m in {r["method"] for r in grows} if m in RKD_D_METHODS or is_ours(m)]
            png4 = plot_curves(
                key,
                grows,
                out / f"fig4_rkd_d_{_slug(key)}.png",
                methods=keep,
                title=f"RKD vs RKD_d (d=10/50/100) vs CKD: {title}",
            )
            md += [f"![RKD_d comparison]({png4.name})", ""]
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(md), encoding="utf-8")
    os.replace(tmp, path)
    return path
