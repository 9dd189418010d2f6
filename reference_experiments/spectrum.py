"""Representation flattening (the paper's Fig. 5): how many directions the
student's penultimate features spread over, within classes.

Features ``f_i`` of test images are centred per class (``f_i - mean_{c(i)}``),
stacked into a matrix whose singular values ``sigma_1 >= sigma_2 >= ...`` are
normalised so that ``sum_k sigma_k^2 = 1`` (fractions of within-class
variance). :func:`flat_dims` is the number of directions holding ``q`` = 90% of
that variance: a flatter (more spread) spectrum gives a larger number.

>>> import torch
>>> f = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [3.0, 0.1], [1.0, -0.1]])
>>> spec = within_class_spectrum(f, torch.tensor([0, 0, 1, 1]))
>>> [round(v, 3) for v in spec.tolist()], flat_dims(spec)
([0.999, 0.05], 1)
"""

from __future__ import annotations

import torch

__all__ = ["flat_dims", "within_class_spectrum"]


def within_class_spectrum(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Normalised singular values of the class-centred features ``(N, D)``."""
    f = features.detach().double().flatten(1)
    labels = labels.to(f.device)
    classes = int(labels.max()) + 1
    sums = torch.zeros(classes, f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, labels, f)
    counts = torch.bincount(labels, minlength=classes).clamp(min=1).to(f.dtype)
    centred = f - (sums / counts[:, None])[labels]
    sigma = torch.linalg.svdvals(centred)
    total = torch.sqrt((sigma**2).sum())
    return (sigma / total if total > 0 else sigma).cpu()


def flat_dims(spectrum: torch.Tensor, q: float = 0.9) -> int:
    """Directions holding a fraction ``q`` of the variance behind ``spectrum``."""
    energy = torch.cumsum(spectrum.double() ** 2, 0)
    if energy.numel() == 0 or energy[-1] <= 0:
        return 0
    return int(torch.searchsorted(energy, q * energy[-1]).item()) + 1
