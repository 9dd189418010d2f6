"""The teacher-call budget: a seeded subset, one teacher call per training image, cached.

:func:`split_subset` draws the run's subset of ``budget`` = n training images
(80% train, 20% validation, as the official ``train_val_frac``);
:func:`query_teacher` calls the teacher once on each training image through
a :class:`ckd_core.TeacherBudget` (validation images are never sent), on one
augmented view drawn once per image (``augmented-once``, official) or on the
clean centre crop, and returns the logits and the feature maps white-box
methods need, from the same calls, as device tensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ckd_torch  # noqa: F401  (selects keras' torch backend before ckd_core imports keras)
import numpy as np
import torch
from torch import nn

from ckd_core import TeacherBudget

from .augment import augment, preprocess_eval
from .config import TEACHER_VIEWS, RunConfig
from .data import ImageDataset
from .devices import autocast

__all__ = ["TeacherCache", "query_teacher", "split_subset"]


def split_subset(
    num_train: int, n: int, seed: int, val_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded subset of ``n`` training indices -> sorted ``(train_ids, val_ids)``."""
    if not 2 <= n <= num_train:
        raise ValueError(f"budget n={n} must be in [2, {num_train}] (the training set size)")
    sub = np.random.default_rng(seed).choice(num_train, size=n, replace=False)
    n_val = min(max(1, int(round(val_fraction * n))), n - 1)
    return np.sort(sub[n_val:]).astype(np.int64), np.sort(sub[:n_val]).astype(np.int64)


@dataclass
class TeacherCache:
    """Cached teacher outputs of a run's training images (rows follow ``train_ids``)."""

    outputs: dict[str, torch.Tensor]
    calls: int
    new_calls: int


def query_teacher(
    model: nn.Module | None,
    meta: Mapping[str, Any],
    cfg: RunConfig,
    dataset: ImageDataset,
    train_ids: np.ndarray,
    feature_indices: Sequence[int],
    device: torch.device,
) -> TeacherCache:
    """Calls ``model`` once per image of ``train_ids`` (see the module docstring)."""
    if cfg.teacher_view not in TEACHER_VIEWS:
        raise ValueError(f"teacher_view must be one of {TEACHER_VIEWS}, got {cfg.teacher_view!r}")
    if model is None:
        raise ValueError(f"method {cfg.method!r} needs a teacher (--teacher PATH)")
    features = tuple(int(i) for i in feature_indices)
    gen = torch.Generator(device=device).manual_seed(10_007 * cfg.seed + 1)  # the view

    @torch.no_grad()
    def call(x_np: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(x_np)).to(device)
        x = preprocess_eval(x, dataset) if cfg.teacher_view == "clean" else augment(x, dataset, gen)
        x = x.to(next(model.parameters()).dtype)
        with autocast(device, cfg.precision):
            logits, feats = model(x, return_features=True)
        out = {"logits": logits.float().cpu().numpy()}
        for i in features:
            out[f"feat{i}"] = feats[i].to(torch.float16).cpu().numpy()
        return out

    model.eval()
    budget = TeacherBudget(
        call,
        cfg.budget,
        batch_size=500,
        metadata={
            "teacher": str(meta.get("sha256") or cfg.teacher_key or cfg.teacher),
            "dataset": dataset.name,
            "view": cfg.teacher_view,
            "seed": cfg.seed,
            "train_ids": hashlib.sha256(train_ids.tobytes()).hexdigest()[:16],
        },
    )
    out = budget.query(train_ids, lambda ids: dataset.x_train[ids])
    if not isinstance(out, dict):  # ``call`` returns a dict, so the budget does too
        raise TypeError(f"teacher outputs must be a dict of arrays, got {type(out).__name__}")
    return TeacherCache(
        {k: torch.from_numpy(v).to(device) for k, v in out.items()}, budget.used, budget.new_calls
    )
