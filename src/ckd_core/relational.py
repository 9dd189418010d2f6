"""Relational losses: the RKD distance and angle terms (Park et al. 2019).

The angle term's hand-derived gradient lives in :mod:`ckd_core._rkd_angle`.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from ckd_core._checks import (
    MEAN,
    AllGather,
    Tensor,
    _cast,
    _mean,
    _nonfinite_marker,
    _num_rows,
    _prepare,
    _safe_ratio,
    check_number,
    check_reduction,
    ops64,
)
from ckd_core._rkd_angle import _PDIST_EPS, _angle_loss_of_gram

__all__ = ["rkd_angle_loss", "rkd_distance_loss", "rkd_loss"]


def _centred_gram(x: Tensor) -> Tensor:
    """Gram matrix of the rows after subtracting their mean (better rounding).

    Batches with entries beyond ``finfo.max ** 0.25`` are first divided by
    their largest magnitude (the RKD terms are scale invariant), so that the
    squared distances cannot overflow (e.g. 1e30 in float32).
    """
    big = float(np.finfo(keras.backend.standardize_dtype(x.dtype)).max) ** 0.25
    peak = ops.stop_gradient(ops.amax(ops.abs(x)))
    x = x / ops64.where(peak > big, peak, 1)
    x = x - _mean(x, axis=0, keepdims=True)
    return x @ ops.transpose(x)  # ops.matmul computes float64 in float32 on torch


def _sq_dist(gram: Tensor) -> Tensor:
    """Squared pairwise distances ``G_ii + G_jj - 2 G_ij``."""
    sq_norm = ops.diagonal(gram)
    return sq_norm[:, None] + sq_norm[None, :] - gram * 2


def _normalized_distances(gram: Tensor) -> Tensor:
    """Pairwise distances (of the rows of Gram matrix ``gram``) over their off-diagonal mean.

    As in RepDistiller. Works with an unknown (traced) batch size, where a
    batch of 0 or 1 rows gives all-zero distances.
    """
    n = _num_rows(gram)
    sq_dist = _sq_dist(gram)
    dist = ops64.sqrt(ops64.where(sq_dist > _PDIST_EPS, sq_dist, _PDIST_EPS))
    size = n if isinstance(n, int) else ops.shape(gram)[0]
    dist = dist * (1 - ops.eye(size, dtype=keras.backend.standardize_dtype(dist.dtype)))
    # Off-diagonal distances are >= sqrt(eps) > 0, so "mean of the nonzero
    # distances" is the sum over the n (n - 1) off-diagonal entries (none
    # when n < 2: the ratio is then 0).
    if isinstance(n, int):
        return dist * (n * (n - 1) / ops.sum(dist))
    return dist * _safe_ratio(n * (n - 1), ops.sum(dist))


def _smooth_l1(diff: Tensor) -> Tensor:
    absolute = ops.abs(diff)
    return ops64.where(absolute < 1, 0.5 * ops64.square(diff), absolute - 0.5)


def rkd_distance_loss(
    y_true: Tensor,
    y_pred: Tensor,
    *,
    all_gather: AllGather | None = None,
    reduction: str | None = MEAN,
) -> Tensor:
    r"""RKD distance term: smooth-L1 between normalized pairwise distances.

    .. math::
        L = \frac{1}{n^2} \sum_{i, j} \ell_1^{\text{smooth}}\Big(
            \frac{\lVert \hat y_i - \hat y_j\rVert}{\mu_{\hat y}}
            - \frac{\lVert y_i - y_j\rVert}{\mu_y}\Big)

    with :math:`\mu` the mean off-diagonal distance. Distances come from the
    Gram matrix of the centred batch (no ``(n, n, dim)`` tensor); squared
    distances are clamped at 1e-12 as in RepDistiller. The teacher side
    (``y_true``) carries no gradient. Works with an unknown (traced) batch
    size.

    ``all_gather`` (data-parallel training): a function concatenating every
    replica's rows along axis 0; the loss then covers the global batch on
    every replica (O(batch·dim) communicated per call, O(N^2) memory for
    the global batch N). Gradients reach the local rows through the
    gather's backward (see the adapters for the resulting scale).

    Reference:
        Park, Kim, Lu, Cho. "Relational Knowledge Distillation." CVPR 2019.
    """
    return rkd_loss(
        y_true,
        y_pred,
        distance_weight=1,
        angle_weight=0,
        all_gather=all_gather,
        reduction=reduction,
    )


def _gather(y_true: Tensor, y_pred: Tensor, all_gather: AllGather | None) -> tuple[Tensor, Tensor]:
    """The global batch of every replica (the teacher side without gradient)."""
    y_true = ops.stop_gradient(y_true)
    if all_gather is None:
        return y_true, y_pred
    return all_gather(y_true), all_gather(y_pred)


def _weighted_terms(
    y_true: Tensor, y_pred: Tensor, distance_weight: float, angle_weight: float
) -> Tensor:
    """``distance_weight * distance + angle_weight * angle`` from one pair of Gram matrices.

    A zero weight skips its term. The clamps and the overflow guard would
    send NaN/inf input to a finite branch: the marker keeps it in the loss.
    """
    marker = _nonfinite_marker(y_true, y_pred)
    n = y_pred.shape[0]
    if (n is not None and n < 2) or not (distance_weight or angle_weight):
        return ops.sum(y_pred * 0) + marker
    gram_s, gram_t = _centred_gram(y_pred), _centred_gram(y_true)
    loss = marker
    if distance_weight:
        student, teacher = _normalized_distances(gram_s), _normalized_distances(gram_t)
        loss = loss + _mean(_smooth_l1(student - teacher)) * distance_weight
    if angle_weight:
        loss = loss + _angle_loss_of_gram(gram_s, gram_t) * angle_weight
    return loss


def rkd_loss(
    y_true: Tensor,
    y_pred: Tensor,
    *,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    all_gather: AllGather | None = None,
    reduction: str | None = MEAN,
) -> Tensor:
    """``distance_weight * distance + angle_weight * angle`` (one gather, one check).

    A zero weight skips its term (but non-finite input still gives NaN).
    RKD is a batch-level loss: ``reduction`` accepts only
    ``"sum_over_batch_size"`` (as in :func:`rkd_distance_loss`).
    """
    distance_weight = check_number(distance_weight, "distance_weight")
    angle_weight = check_number(angle_weight, "angle_weight")
    check_reduction(reduction, "RKD")
    y_true, y_pred, out_dtype = _prepare(y_true, y_pred)
    y_true, y_pred = _gather(y_true, y_pred, all_gather)
    return _cast(_weighted_terms(y_true, y_pred, distance_weight, angle_weight), out_dtype)


def rkd_angle_loss(
    y_true: Tensor,
    y_pred: Tensor,
    *,
    all_gather: AllGather | None = None,
    reduction: str | None = MEAN,
) -> Tensor:
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
    side carries no gradient. Rows closer than ``sqrt(8 eps)`` times
    ``sqrt(||x_i - m||^2 + ||x_j - m||^2)`` (``m`` the batch mean; 1e-3 in
    float32) count as duplicates (cosine 0); farther apart, a cosine keeps
    a relative error of about ``eps ||x - m||^2 / ||x_i - x_j||^2``. With an unknown (traced)
    batch size, e.g. ``tf.function`` with a ``None`` batch dimension, all
    anchors form one chunk: O(n^3) memory. ``all_gather``: as in
    :func:`rkd_distance_loss` (O(N^3) time for the global batch N).

    Reference:
        Park, Kim, Lu, Cho. "Relational Knowledge Distillation." CVPR 2019.
    """
    return rkd_loss(
        y_true,
        y_pred,
        distance_weight=0,
        angle_weight=1,
        all_gather=all_gather,
        reduction=reduction,
    )
