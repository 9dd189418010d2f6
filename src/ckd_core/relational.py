"""Relational losses: the RKD distance and angle terms (Park et al. 2019).

The angle term's hand-derived gradient lives in :mod:`ckd_core._rkd_angle`.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from ckd_core._checks import Tensor, _cast, _mean, _prepare
from ckd_core._rkd_angle import _PDIST_EPS, _angle_loss_of_gram

__all__ = ["rkd_angle_loss", "rkd_distance_loss"]


def _centred_gram(x: Tensor) -> Tensor:
    """Gram matrix of the rows after subtracting their mean (better rounding).

    Batches with entries beyond ``finfo.max ** 0.25`` are first divided by
    their largest magnitude (the RKD terms are scale invariant), so that the
    squared distances cannot overflow (e.g. 1e30 in float32).
    """
    big = float(np.finfo(keras.backend.standardize_dtype(x.dtype)).max) ** 0.25
    peak = ops.stop_gradient(ops.max(ops.abs(x)))
    x = x / ops.where(peak > big, peak, 1)
    x = x - _mean(x, axis=0, keepdims=True)
    return x @ ops.transpose(x)  # ops.matmul computes float64 in float32 on torch


def _sq_dist(gram: Tensor) -> Tensor:
    """Squared pairwise distances ``G_ii + G_jj - 2 G_ij``."""
    sq_norm = ops.diagonal(gram)
    return sq_norm[:, None] + sq_norm[None, :] - gram * 2


def _normalized_distances(x: Tensor) -> Tensor:
    """Pairwise distances divided by their off-diagonal mean (RepDistiller)."""
    n = x.shape[0]
    sq_dist = _sq_dist(_centred_gram(x))
    dist = ops.sqrt(ops.where(sq_dist > _PDIST_EPS, sq_dist, _PDIST_EPS))
    dist = dist * (1 - ops.eye(n, dtype=keras.backend.standardize_dtype(dist.dtype)))
    # Off-diagonal distances are >= sqrt(eps) > 0, so "mean of the nonzero
    # distances" is the sum over the n (n - 1) off-diagonal entries.
    return dist * (n * (n - 1) / ops.sum(dist))


def _smooth_l1(diff: Tensor) -> Tensor:
    absolute = ops.abs(diff)
    return ops.where(absolute < 1, 0.5 * ops.square(diff), absolute - 0.5)


def rkd_distance_loss(y_true: Tensor, y_pred: Tensor) -> Tensor:
    r"""RKD distance term: smooth-L1 between normalized pairwise distances.

    .. math::
        L = \frac{1}{n^2} \sum_{i, j} \ell_1^{\text{smooth}}\Big(
            \frac{\lVert \hat y_i - \hat y_j\rVert}{\mu_{\hat y}}
            - \frac{\lVert y_i - y_j\rVert}{\mu_y}\Big)

    with :math:`\mu` the mean off-diagonal distance. Distances come from the
    Gram matrix of the centred batch (no ``(n, n, dim)`` tensor); squared
    distances are clamped at 1e-12 as in RepDistiller. The teacher side
    (``y_true``) carries no gradient.

    Reference:
        Park, Kim, Lu, Cho. "Relational Knowledge Distillation." CVPR 2019.
    """
    y_true, y_pred, out_dtype = _prepare(y_true, y_pred)
    n = y_pred.shape[0]
    if n is not None and n < 2:
        return _cast(ops.sum(y_pred * 0), out_dtype)
    teacher = _normalized_distances(ops.stop_gradient(y_true))
    student = _normalized_distances(y_pred)
    return _cast(_mean(_smooth_l1(student - teacher)), out_dtype)


def rkd_angle_loss(y_true: Tensor, y_pred: Tensor) -> Tensor:
    r"""RKD angle term: smooth-L1 between cosines of all triplet angles.

    .. math::
        L = \frac{1}{n^3} \sum_{a, j, k} \ell_1^{\text{smooth}}\big(
            \cos\angle_{\hat y}(j, a, k) - \cos\angle_{y}(j, a, k)\big),\quad
        \cos\angle_x(j, a, k) = \Big\langle
            \tfrac{x_j - x_a}{\lVert x_j - x_a\rVert},
            \tfrac{x_k - x_a}{\lVert x_k - x_a\rVert}\Big\rangle

    with degenerate angles (``j = a``, ``k = a`` or duplicated rows) counted
    as cosine 0, as in RepDistiller. Cosines come from the Gram matrix of the
    centred batch, in anchor chunks of bounded memory; the gradient is
    analytic, so backpropagation needs no ``(n, n, n)`` tensor. The teacher
    side carries no gradient. Float32 cosines lose accuracy for rows closer
    than about ``sqrt(eps)`` times the batch spread.

    Reference:
        Park, Kim, Lu, Cho. "Relational Knowledge Distillation." CVPR 2019.
    """
    y_true, y_pred, out_dtype = _prepare(y_true, y_pred)
    n = y_pred.shape[0]
    if n is None:
        raise ValueError("rkd_angle_loss needs a static batch size.")
    if n < 2:
        return _cast(ops.sum(y_pred * 0), out_dtype)
    gram_s = _centred_gram(y_pred)
    gram_t = _centred_gram(ops.stop_gradient(y_true))
    return _cast(_angle_loss_of_gram(gram_s, gram_t), out_dtype)
