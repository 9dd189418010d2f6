"""Which results files a report or a resumed grid reads: a file, a folder or a glob.

A grid run by one process appends to one JSONL file; a grid run as a cluster job
array (:mod:`.launcher`) writes one file per job into ``<results stem>.parts/``
beside it, so that no two nodes ever share a file. Both read back as one set of
rows: a folder stands for every ``*.jsonl`` under it (failure logs
``*.failed.jsonl`` excluded), a pattern with ``*``, ``?`` or ``[`` for the files it
matches. Torch-free (the command line checks its arguments with it).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .rows import read_rows

__all__ = ["finished_run_ids", "job_parts_dir", "read_result_rows", "result_files"]

FAILED_SUFFIX = ".failed.jsonl"


def _is_results(path: Path) -> bool:
    return path.is_file() and path.name.endswith(".jsonl") and not path.name.endswith(FAILED_SUFFIX)


def result_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Each argument expanded, in order and without repeats: a file as is, a folder to
    its ``*.jsonl`` files (recursively, sorted), a glob pattern to its matches (sorted).
    A folder or pattern that holds no results file is an error, as is a missing file."""
    out: list[Path] = []
    for arg in paths:
        text = os.fspath(arg)
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.jsonl") if _is_results(p))
            what = f"folder {text}"
        elif any(c in text for c in "*?["):
            found = sorted(p for p in map(Path, glob.glob(text, recursive=True)) if _is_results(p))
            what = f"pattern {text!r}"
        elif path.is_file():
            found, what = [path], text
        else:
            raise FileNotFoundError(f"results file {text} not found")
        if not found:
            raise FileNotFoundError(f"{what} holds no results file (*.jsonl)")
        out += [p for p in found if p not in out]
    return out


def read_result_rows(files: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """The rows of ``files`` in order; a ``run_id`` seen before is skipped (a run written
    both by a local grid and by a cluster job counts once)."""
    seen: set[str] = set()
    rows = []
    for path in files:
        for row in read_rows(path):
            rid = row.get("run_id")
            if rid is not None and rid in seen:
                continue
            if rid is not None:
                seen.add(rid)
            rows.append(row)
    return rows


def job_parts_dir(results: str | os.PathLike[str]) -> Path:
    """The folder of a job array's per-job results files: ``<results stem>.parts/``."""
    results = Path(results)
    return results.with_name(results.stem + ".parts")


def finished_run_ids(results: str | os.PathLike[str]) -> set[str]:
    """Run ids finished in ``results`` or in any per-job file of its parts folder."""
    files = [Path(results), *sorted(job_parts_dir(results).glob("*.jsonl"))]
    return {
        r["run_id"] for r in read_result_rows(p for p in files if _is_results(p)) if "run_id" in r
    }
