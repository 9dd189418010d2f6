"""Report figures (PNG): accuracy vs teacher calls (Figs. 2/3, and Fig. 4's RKD vs
RKD_d vs CKD) and within-class spectra (Fig. 5)."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import dataset_title
from .report_rows import (
    BEST,
    curves,
    is_ours,
    label,
    method_class,
    method_id,
    setting_dict,
    setting_title,
    sort_key,
)

# --------------------------------------------------------------------------- figures


def setting_slug(key: tuple) -> str:
    d = setting_dict(key)
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

    d = setting_dict(key)
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
    title = title or f"Accuracy vs teacher calls: {setting_title(key)}"
    return _save(fig, ax, key, rows, path, title)


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
    title = f"Within-class feature spectrum at budget n={budget}: {setting_title(key)}"
    return _save(fig, ax, key, rows, path, title)


def rkd_d_methods(methods: Iterable[str]) -> list[str]:
    """Fig. 4's methods when a projected RKD_d (class attribute ``out_dim``) is among
    ``methods``: those, the methods whose name prefixes theirs (RKD), and ours; else []."""
    methods = sorted(methods, key=sort_key)
    proj = [m for m in methods if getattr(method_class(m), "out_dim", 0)]
    parents = [m for m in methods if m not in proj and any(p.startswith(m) for p in proj)]
    return proj + parents + [m for m in methods if is_ours(m)] if proj else []
