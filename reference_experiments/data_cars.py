"""The Stanford Cars 64-pixel training half: archive reader and duplicate-aware split."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import tarfile
from collections.abc import Iterable

import numpy as np

from .datafiles import (
    CACHE_VERSION,
    DataDir,
    SplitArrays,
    _cached,
    _require_files,
    _verify_sha256sums,
    decode_jpeg,
    sha256_file,
)
from .splits import duplicate_groups, stratified_group_split

__all__ = ["CARS_DUPLICATE_PAIRS", "cars_split", "load_cars64", "read_cars_archive"]

#: Byte-identical image pairs with conflicting labels in the Stanford Cars training
#: half (1-based ``idx`` of ``labels.csv``), from the shared folder's README.
CARS_DUPLICATE_PAIRS: tuple[tuple[int, int], ...] = (
    (50, 3436),
    (151, 4892),
    (595, 3516),
    (2045, 4665),
    (2456, 2598),
    (2641, 7765),
    (2843, 6839),
    (4223, 6153),
    (4250, 6713),
    (5334, 5614),
    (6353, 7381),
)

CARS_ARCHIVE = "cars-train64-jpeg.tar.xz"


def read_cars_archive(
    archive: str | os.PathLike, decode: bool = True
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Return ``(x, y, idx)`` from the cars archive in ``labels.csv`` row order.

    With ``decode=False`` images are skipped and ``x`` is None (labels only).
    """
    images: dict[str, np.ndarray] = {}
    rows: list[dict[str, str]] | None = None
    with tarfile.open(archive, mode="r|*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            f = tar.extractfile(m)
            assert f is not None
            if m.name == "labels.csv":
                rows = list(csv.DictReader(io.StringIO(f.read().decode("utf-8"))))
            elif decode:
                images[m.name] = decode_jpeg(f.read())
    if rows is None:
        raise ValueError(f"{archive} has no labels.csv")
    y = np.asarray([int(r["label"]) for r in rows], dtype=np.int64)
    idx = np.asarray([int(r["idx"]) for r in rows], dtype=np.int64)
    x = np.stack([images[r["file"]] for r in rows]) if decode else None
    return x, y, idx


def cars_split(
    y: np.ndarray,
    idx: np.ndarray,
    x: np.ndarray | None = None,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    pairs: Iterable[tuple[int, int]] = CARS_DUPLICATE_PAIRS,
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split (row indices) keeping every duplicate group on the train side.

    Groups = the listed ``pairs`` (by 1-based ``idx``) merged with exact pixel
    duplicates in ``x`` (if given).
    """
    pos = {int(v): i for i, v in enumerate(idx)}
    row_pairs = [(pos[a], pos[b]) for a, b in pairs if a in pos and b in pos]
    if x is not None:
        groups = duplicate_groups(x, row_pairs)
    else:
        groups = [{a, b} for a, b in row_pairs]
    forced = sorted(set().union(*groups)) if groups else []
    return stratified_group_split(y, test_fraction=test_fraction, seed=seed, train_only=forced)


def load_cars64(where: DataDir, seed: int) -> SplitArrays:
    """Stanford Cars' training half at 64x64, seeded stratified 80/20 split keeping
    duplicate groups on the training side."""
    folder = where.folder("cars64", "stanford-cars-train64", CARS_ARCHIVE)
    _require_files(folder, (CARS_ARCHIVE,), "cars64", where)
    digests = _verify_sha256sums(folder, (CARS_ARCHIVE, "classes.txt"))
    archive = folder / CARS_ARCHIVE
    sha = digests.get(CARS_ARCHIVE) or sha256_file(archive)
    key = "cars64-" + hashlib.sha256(f"{CACHE_VERSION}:{sha}".encode()).hexdigest()[:16]

    def build() -> dict[str, np.ndarray]:
        x, y, idx = read_cars_archive(archive)
        assert x is not None
        return {"x": x, "y": y, "idx": idx}

    a = _cached(key, build, ("x", "y", "idx"))
    x, y, idx = a["x"], a["y"], a["idx"]
    tr, te = cars_split(y, idx, x, seed=seed)
    classes_file = folder / "classes.txt"
    num_classes = (
        len(classes_file.read_text(encoding="utf-8").splitlines())
        if classes_file.is_file()
        else int(y.max()) + 1
    )
    return SplitArrays(x[tr], y[tr], x[te], y[te], num_classes, split_seed=seed)
