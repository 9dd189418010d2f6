"""Report rows: which curve a row belongs to, lr and family selection on validation,
accuracy-vs-calls curves and the calls at which a curve reaches a target.

>>> interpolate_calls([(100, 40.0), (200, 50.0), (400, 60.0)], 55.0)
(300.0, False)
>>> interpolate_calls([(100, 40.0), (200, 50.0)], 70.0)
(None, False)
>>> interpolate_calls([(100, 40.0), (200, 50.0)], 35.0)
(100.0, True)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

import numpy as np

from .config import RunConfig
from .methods import registry
from .protocol import best_on_validation

#: config fields that vary inside one setting (one table / figure)
_WITHIN = {"method", "budget", "seed", "lr", "weights"}
SETTING_KEYS = tuple(
    f.name for f in fields(RunConfig) if f.metadata["identity"] and f.name not in _WITHIN
) + ("paper_dataset",)
#: method-name prefix of the synthetic validation-selected family rows
BEST = "best_on_val:"


# --------------------------------------------------------------------------- methods


def method_id(r: Mapping[str, Any]) -> str:
    """The curve a row belongs to: its method, plus loss-weight overrides if any."""
    w = r.get("weights") or {}
    items = sorted(w.items() if isinstance(w, Mapping) else ((str(k), v) for k, v in w))
    if not items:
        return str(r["method"])
    return f"{r['method']}[{','.join(f'{k}={float(v):g}' for k, v in items)}]"


def method_class(name: str) -> type[registry.Method] | None:
    try:
        return registry.get(name.split("[", 1)[0])
    except ValueError:
        return None


def method_info(mid: str) -> tuple[float, str, str]:
    """``(order, label, kind)``; kind: "ours", "baseline" or "other" (unknown)."""
    if mid.startswith(BEST):
        fam = mid[len(BEST) :]
        orders = [registry.get(n).order for n in registry.names() if registry.get(n).family == fam]
        return min(orders, default=1000) - 0.5, f"{fam.upper()} (best on val)", "ours"
    cls = method_class(mid)
    if cls is None:
        return math.inf, mid, "other"
    base = mid.split("[", 1)[0]
    lab = cls.label + (f" ({mid[len(base) + 1 : -1]})" if mid != base else "")
    return float(cls.order), lab, "ours" if cls.ours else "baseline"


def label(mid: str) -> str:
    return method_info(mid)[1]


def is_ours(mid: str) -> bool:
    return method_info(mid)[2] == "ours"


def sort_key(mid: str) -> tuple[float, str]:
    return method_info(mid)[0], mid


# --------------------------------------------------------------------------- rows


def is_finite(x: Any) -> bool:
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
        if is_finite(r.get("test_acc")):
            groups[setting_key(r)].append(dict(r))
    return dict(sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])))


def family_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Synthetic rows (method ``best_on_val:<family>``) of one setting: for each family
    with two or more variants present, per (budget, seed) the variant row with the best
    validation accuracy; ``picked`` names it."""
    fams: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        cls = method_class(str(r["method"]))
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
        if is_finite(r.get(key)):
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


#: Table 1's target test accuracies (%) in the paper, by the data set they were set for
PAPER_TARGETS: dict[str, tuple[float, ...]] = {"cifar100": (30.0, 35.0, 40.0, 45.0, 50.0, 55.0)}


def table1_targets(
    dataset: str, cv: Mapping[str, list[dict[str, float]]], given: Sequence[float] | None = None
) -> tuple[list[float], str]:
    """Table 1's targets and where they come from: ``given`` (``--targets``), else the
    paper's on the data set it used them for, else :func:`default_targets` of the curves."""
    if given:
        return list(given), "given (`--targets`)"
    if dataset in PAPER_TARGETS:
        return list(PAPER_TARGETS[dataset]), "the paper's Table 1 targets"
    return default_targets(cv), (
        "derived from these curves (the best mean at the smallest budget up to the best "
        "baseline's at the largest; the paper's targets are for CIFAR-100)"
    )


def default_targets(cv: Mapping[str, list[dict[str, float]]], n: int = 4) -> list[float]:
    """``n`` targets from the best mean at the smallest budget to the best baseline's
    mean at the largest (the best of all methods without baselines)."""
    if not cv:
        return []
    first = min(p["calls"] for pts in cv.values() for p in pts)
    last = max(p["calls"] for pts in cv.values() for p in pts)
    lo = max(p["mean"] for pts in cv.values() for p in pts if p["calls"] == first)
    at_last = [(m, p["mean"]) for m, pts in cv.items() for p in pts if p["calls"] == last]
    base = [a for m, a in at_last if method_info(m)[2] == "baseline"]
    hi = max(base) if base else max(a for _, a in at_last)
    if hi <= lo:
        return [math.floor(hi * 10) / 10]
    return sorted({math.floor(t * 10) / 10 for t in np.linspace(lo, hi, n + 1)[1:]})


def setting_dict(key: tuple) -> dict[str, Any]:
    return dict(zip(SETTING_KEYS, key, strict=True))


def setting_title(key: tuple) -> str:
    d = setting_dict(key)
    t = f" (teacher `{d['teacher_key']}`)" if d.get("teacher_key") else ""
    return f"{d['teacher_arch'] or '?'} → {d['student_arch']}{t}"
