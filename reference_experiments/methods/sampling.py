"""Random draws shared by several methods, as the official samplers make them.

* :func:`tuple_pool` -- the official ``CKDSample``/``MixupSample`` pool: up to
  ``size`` (100k) distinct tuples of distinct cached images, ``pos`` then
  ``neg`` of them, drawn once per run; every tuple when fewer than 5x ``size``
  exist.
* :class:`PoolCursor` -- walks a pool in shuffled order, reshuffling when it is
  exhausted (a DataLoader with ``shuffle=True`` over the pool).
* :func:`class_balanced` -- the official ``RKDSampler``: classes in random
  order, ``per_class`` random images of each, until the batch is full.
* :func:`other_class_negatives` -- the official ``CRDSample``: negatives drawn
  from the other classes only, with replacement when there are fewer than ``k``
  (:class:`OtherClassNegatives`: the same, set up once per run).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

__all__ = [
    "OtherClassNegatives",
    "PoolCursor",
    "class_balanced",
    "other_class_negatives",
    "tuple_pool",
]

#: the official ``--max_rel_samples`` default
POOL_SIZE = 100_000


def tuple_pool(n: int, pos: int, neg: int, size: int, seed: int) -> np.ndarray:
    """``(m, pos + neg)`` int64 tuples of distinct indices in ``[0, n)``, ``m <= size``.

    Sides are sorted within themselves (a tuple is a pair of sets), and no tuple
    repeats. Like the official samplers, every possible tuple is enumerated when
    fewer than ``5 * size`` exist, and ``size`` of them are kept at random.
    """
    k = pos + neg
    if n < k:
        raise ValueError(f"{k}-image tuples need at least {k} cached images, got {n}")
    rng = np.random.default_rng([seed, pos, neg, 0x7C])
    possible = math.comb(n, pos) * math.comb(n - pos, neg)
    if possible < 5 * size:
        combos = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64)
        splits = list(itertools.combinations(range(k), pos))
        parts: list[np.ndarray] = []
        for side in splits:
            rest = [i for i in range(k) if i not in side]
            parts.append(combos[:, list(side) + rest])
        every = np.concatenate(parts)
        keep = rng.permutation(len(every))[: min(size, len(every))]
        return every[np.sort(keep)]
    rows = np.empty((0, k), dtype=np.int64)
    while len(rows) < size:
        draw = rng.integers(0, n, size=(2 * (size - len(rows)) + 16, k))
        distinct = (np.sort(draw, 1)[:, 1:] != np.sort(draw, 1)[:, :-1]).all(1)
        draw = draw[distinct]
        draw = np.concatenate([np.sort(draw[:, :pos], 1), np.sort(draw[:, pos:], 1)], axis=1)
        # keep first occurrences, in draw order, of tuples not seen before
        both = np.concatenate([rows, draw])
        _, first = np.unique(both, axis=0, return_index=True)
        rows = both[np.sort(first)]
    return rows[:size]


class PoolCursor:
    """Hands out ``(steps, batch, pos + neg)`` rows of a run's :func:`tuple_pool`
    (drawn on first use), in an order reshuffled per pass over the pool."""

    def __init__(self, n: int, pos: int, neg: int, seed: int, size: int = POOL_SIZE) -> None:
        self.args = (n, pos, neg, size, seed)
        self.pool: torch.Tensor | None = None
        self._order = torch.empty(0, dtype=torch.int64)

    def take(self, gen: torch.Generator, steps: int, batch: int) -> torch.Tensor:
        if self.pool is None:
            self.pool = torch.from_numpy(tuple_pool(*self.args))
        self.pool = self.pool.to(gen.device)
        need = steps * batch
        while self._order.numel() < need:
            perm = torch.randperm(len(self.pool), generator=gen, device=gen.device)
            self._order = torch.cat([self._order.to(gen.device), perm])
        rows, self._order = self._order[:need], self._order[need:]
        return self.pool[rows].view(steps, batch, -1)


def class_balanced(
    gen: torch.Generator,
    labels: torch.Tensor,
    num_classes: int,
    steps: int,
    batch: int,
    per_class: int = 5,
) -> torch.Tensor:
    """``(steps, m)`` indices: per step, classes in random order and ``per_class``
    random images of each, the first ``m = min(batch, per_class * classes, n)`` of
    them, as the official ``RKDSampler``. Where classes hold fewer than
    ``per_class`` images the official batch shrinks; here random other images
    fill it, so that every run of a stack has the same batch size.
    """
    n = labels.numel()
    dev = gen.device
    labels = labels.to(dev)
    counts = torch.bincount(labels, minlength=num_classes)
    m = min(batch, per_class * num_classes, n)
    # random order within each class: sort by class, ties broken by a uniform key
    u = torch.rand((steps, n), generator=gen, device=dev)
    order = torch.argsort(labels.to(u.dtype) + u, dim=1)
    cls = labels[order]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=dev) - starts[cls]  # position within its class
    class_rank = torch.argsort(torch.rand((steps, num_classes), generator=gen, device=dev), 1)
    key = class_rank.gather(1, cls) * per_class + rank
    filler = n * num_classes + torch.argsort(torch.rand((steps, n), generator=gen, device=dev), 1)
    key = torch.where(rank < per_class, key, filler)
    pick = torch.argsort(key, dim=1)[:, :m]
    return order.gather(1, pick)


class OtherClassNegatives:
    """:func:`other_class_negatives` for one run's ``labels`` and ``k``: what depends on
    them alone (class counts, images grouped by class, whether draws replace) is
    computed once, so a step's draw never waits on the device. Only where some classes
    have fewer than ``k`` other-class images and some have not (a subset larger than
    ``k``) does each draw read its anchors' classes back to choose the rule.
    """

    def __init__(self, labels: torch.Tensor, k: int) -> None:
        self.labels, self.k = labels, int(k)
        self.counts = torch.bincount(labels)
        present = self.counts > 0
        self.others = labels.numel() - self.counts  # other-class images, per class
        if bool(((self.others < 1) & present).any()):
            raise ValueError("CRD needs images of at least two classes")
        self.short = self.others < self.k
        short_present = self.short[present]
        self.replace: bool | None = None  # None: it depends on the anchors
        if bool(short_present.all()) or not bool(short_present.any()):
            self.replace = bool(short_present.all())
        self.by_class = torch.argsort(labels * 1.0, stable=True)  # images grouped by class
        self.start = torch.cumsum(self.counts, 0) - self.counts

    def __call__(self, gen: torch.Generator, anchors: torch.Tensor) -> torch.Tensor:
        """``(*anchors.shape, k)`` indices of images of another class than the anchor's."""
        dev, k = gen.device, self.k
        flat = self.labels[anchors.to(dev)].reshape(-1)  # the anchors' classes
        replace = self.replace
        if replace is None:
            replace = bool(self.short[flat].any())
        if not replace:
            keys = torch.rand((flat.numel(), self.labels.numel()), generator=gen, device=dev)
            keys = torch.where(self.labels[None, :] == flat[:, None], 2.0, keys)
            return torch.topk(keys, k, dim=1, largest=False).indices.view(*anchors.shape, k)
        # the j-th image of another class: rank r in [0, others) mapped past the anchor class
        r = torch.floor(
            torch.rand((flat.numel(), k), generator=gen, device=dev) * self.others[flat][:, None]
        ).long()
        start = self.start[flat][:, None]
        pos = torch.where(r >= start, r + self.counts[flat][:, None], r)
        return self.by_class[pos].view(*anchors.shape, k)


def other_class_negatives(
    gen: torch.Generator, labels: torch.Tensor, anchors: torch.Tensor, k: int
) -> torch.Tensor:
    """``(*anchors.shape, k)`` indices of images whose class differs from the anchor's.

    Uniform over the other classes' images, with replacement when some anchor's
    classes number fewer than ``k`` (the official rule); without replacement otherwise.
    """
    return OtherClassNegatives(labels.to(gen.device), k)(gen, anchors)
