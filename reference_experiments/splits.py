"""Seeded splits of a labelled image set: stratified, with groups kept on one side."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

__all__ = ["duplicate_groups", "stratified_group_split"]


def stratified_group_split(
    y: np.ndarray,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    train_only: Iterable[int] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of indices ``0..len(y)-1`` into (train, test).

    Per class, ``round(test_fraction * n_class)`` indices go to test, drawn from the
    indices not in ``train_only`` (which always go to train, e.g. duplicate groups).
    Both index arrays are sorted.
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    forced = np.zeros(len(y), dtype=bool)
    forced[np.asarray(list(train_only), dtype=np.int64)] = True
    test_mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n_test = int(round(test_fraction * len(members)))
        free = members[~forced[members]]
        pick = rng.permutation(free)[: min(n_test, len(free))]
        test_mask[pick] = True
    return np.flatnonzero(~test_mask), np.flatnonzero(test_mask)


def duplicate_groups(x: np.ndarray, extra_pairs: Iterable[tuple[int, int]] = ()) -> list[set]:
    """Groups (size >= 2) of indices with identical pixels, merged with ``extra_pairs``."""
    parent = list(range(len(x)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        parent[find(a)] = find(b)

    first: dict[bytes, int] = {}
    for i in range(len(x)):
        h = hashlib.sha256(np.ascontiguousarray(x[i]).tobytes()).digest()
        if h in first:
            union(i, first[h])
        else:
            first[h] = i
    for a, b in extra_pairs:
        union(a, b)
    groups: dict[int, set] = {}
    for i in range(len(x)):
        groups.setdefault(find(i), set()).add(i)
    return [g for g in groups.values() if len(g) > 1]
