"""Report: Markdown tables and PNG figures from results JSONL files.

Rows (``RunConfig.as_dict()`` merged with a :class:`~.rows.ResultRow`) are grouped
into settings (every identity field of the run config except method, budget, seed,
lr and weights, plus ``paper_dataset``). Rows whose ``test_acc`` is not finite are
skipped and counted; rows differing only in the config ``lr`` are reduced with
:func:`~.protocol.best_on_validation`, which also picks the synthetic per-family row
("CKD (best on val)"). Method order, labels and "ours" come from the registry.
Table 1: calls to reach target accuracies; Table 2: accuracy per budget; figures:
accuracy vs calls (Fig. 2/3), RKD vs RKD_d (Fig. 4), within-class spectra (Fig. 5).
The row logic (with examples) is in :mod:`.report_rows`, tables in
:mod:`.report_tables`, figures in :mod:`.report_figures`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .datasets import dataset_title
from .report_figures import (
    plot_curves,
    plot_spectra,
    rkd_d_methods,
    setting_slug,
    spectrum_budget,
)
from .report_rows import (
    family_rows,
    group_rows,
    interpolate_calls,
    is_finite,
    is_ours,
    label,
    method_id,
    select_lr,
    setting_dict,
    setting_key,
    setting_title,
    sort_key,
)
from .report_tables import (
    FAMILY_RULE,
    INTERPOLATION_RULE,
    SPECTRUM_RULE,
    dataset_note,
    flat_dims_table,
    preset_note,
    setting_notes,
    table1,
    table2,
)
from .result_files import read_result_rows, result_files
from .rows import atomic_write_bytes, describe_environment

__all__ = [
    "dataset_note",
    "family_rows",
    "flat_dims_table",
    "group_rows",
    "interpolate_calls",
    "is_ours",
    "label",
    "make_report",
    "method_id",
    "preset_note",
    "select_lr",
    "setting_key",
    "setting_notes",
    "setting_title",
    "sort_key",
    "spectrum_budget",
    "table1",
    "table2",
]

# --------------------------------------------------------------------------- report

RULES = [
    "Accuracy: test accuracy (%) of the best-validation checkpoint, mean ± std (sample "
    "std) over seeds",
    "Teacher calls count the training split only (0.8·n of a budget n, as the paper "
    "reports them; the official code queries the whole subset of n once); CE only makes "
    "none and is placed at the calls its budget costs the other methods",
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
    ``out_dir``; returns the Markdown path. ``results_paths``: results files, folders
    or glob patterns (:func:`~.result_files.result_files`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    srcs = result_files(
        [results_paths] if isinstance(results_paths, (str, os.PathLike)) else results_paths
    )
    raw = [r for r in read_result_rows(srcs) if r.get("method") is not None]
    ok = [r for r in raw if is_finite(r.get("test_acc"))]
    skipped = Counter(setting_key(r) for r in raw if not is_finite(r.get("test_acc")))
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
        slug, dataset = setting_slug(key), setting_dict(key)["dataset"]
        md += [f"## {setting_title(key)} — {dataset_title(dataset)}", ""]
        md += [f"- {n}" for n in setting_notes(key, grows, skipped.get(key, 0))] + [""]
        md += [table1(key, grows, targets), "", table2(key, grows), ""]
        png = plot_curves(key, grows, out / f"curves_{slug}.png")
        md += [f"![accuracy vs teacher calls]({png.name})", ""]
        fig4 = rkd_d_methods({method_id(r) for r in grows})
        if fig4:
            title = f"RKD vs RKD_d vs CKD: {setting_title(key)}"
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
