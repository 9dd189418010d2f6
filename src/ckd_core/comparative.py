"""Comparative losses: CKD (all pairs, explicit pairs, groups) and RKD_d.

Includes the data-parallel statistics (``all_reduce``) of the all-pairs form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from ckd_core._checks import (
    MEAN,
    AllReduce,
    Tensor,
    _cast,
    _index_pair,
    _indices,
    _mean,
    _nonfinite_marker,
    _num_rows,
    _peak,
    _prepare,
    _reduce,
    _safe_ratio,
    _scale,
    _size,
    _weights,
    check_int,
    check_reduction,
    ops64,
)

__all__ = ["comparative_loss", "make_projection", "projected_rkd_loss"]

_PROJECTIONS = ("gaussian", "orthogonal", "identity")


def check_projection_kind(kind: str) -> str:
    """``kind`` if it names a projection of :func:`make_projection`, else ``ValueError``."""
    if not isinstance(kind, str) or kind not in _PROJECTIONS:
        raise ValueError(
            f"projection must be 'gaussian', 'orthogonal' or 'identity', got {kind!r}."
        )
    return kind


def _pair_weight_sum(w: Tensor) -> Tensor:
    """``sum_{i != j} w_i w_j = 2 sum_j w_j sum_{i < j} w_i``.

    Exclusive prefix sums of non-negative terms: no ``W^2 - sum w^2``
    cancellation (``w = [1, 1e-8]`` gives 2e-8, not 0).
    """
    prefix = ops.concatenate([ops.zeros_like(w[:1]), ops64.cumsum(w)[:-1]])
    return 2 * ops.sum(w * prefix)


def _weighted_centre(e: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """``(W, e - m)``: the weight sum and ``e`` about its weighted row mean ``m``."""
    total_w = ops.sum(w)
    mean = ops.sum(e * w[:, None], axis=0, keepdims=True) / ops64.where(total_w > 0, total_w, 1)
    return total_w, e - mean


def _pair_coefficient(e: Tensor) -> float | Tensor:
    """``2 / ((n - 1) d)``, 0 for ``n < 2``: ``sum_ij ||e_i - e_j||^2 = 2n sum_i ||e_i - m||^2``."""
    n, d = e.shape
    if n is not None and d is not None:
        return 2 / ((n - 1) * d) if n > 1 else 0.0
    rows = _num_rows(e)
    return ops.cast(rows > 1, e.dtype) * 2 / (ops64.where(rows > 1, rows - 1, 1) * _size(e, 1))


def _all_pairs_mse(e: Tensor, w: Tensor | None, all_reduce: AllReduce | None = None) -> Tensor:
    """Mean of ``(e_i - e_j)^2`` over ordered pairs ``i != j`` and columns.

    Centred O(n·d) form: ``sum_ij w_i w_j ||e_i - e_j||^2
    = 2 W sum_i w_i ||e_i - m||^2`` with ``W = sum w`` and ``m`` the
    weighted mean; the pair weights sum to :func:`_pair_weight_sum`.
    ``e`` is divided by its peak before squaring (:func:`_peak`). With
    ``all_reduce`` the sums run over the batch of all replicas
    (:func:`_global_all_pairs_mse`).
    """
    if all_reduce is not None:
        return _global_all_pairs_mse(e, w, all_reduce)
    n = e.shape[0]
    if w is None and n is not None and n < 2:
        return ops.sum(e * 0)
    peak = _peak(e)
    e = e / peak
    if w is None:
        centred = e - _mean(e, axis=0, keepdims=True)
        loss = ops.sum(centred * centred) * _pair_coefficient(e)
    else:
        total_w, centred = _weighted_centre(e, w)
        spread = ops.sum(ops64.square(centred) * w[:, None])
        loss = _safe_ratio(2 * total_w * spread, _pair_weight_sum(w) * _size(e, 1))
    return loss * peak * peak


def _all_pairs_terms(e: Tensor, w: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-sample terms ``t_i`` of the centred form, whose mean is :func:`_all_pairs_mse`.

    Returned as ``(t / peak^2, peak)``: reduce before multiplying back.

    ``t_i = n * 2 W w_i ||e_i - m||^2 / (sum_{k != l} w_k w_l * d)`` (``w = 1``
    without weights).
    """
    peak = _peak(e)
    e = e / peak
    rows = _num_rows(e)
    if w is None:
        centred = e - _mean(e, axis=0, keepdims=True)
        shares = ops.sum(centred * centred, axis=1) * _pair_coefficient(e)
    else:
        total_w, centred = _weighted_centre(e, w)
        scale = _safe_ratio(2 * total_w, _pair_weight_sum(w) * _size(e, 1))
        shares = ops.sum(ops64.square(centred), axis=1) * w * scale
    return shares * rows, peak


def _shard_peak(x: Tensor) -> Tensor:
    """``max |x|`` of a replica's shard (0 for an empty one), without gradient, shape (1,)."""
    flat = ops.reshape(ops.abs(ops.stop_gradient(x)), (-1,))
    if x.shape[0] is None or x.shape[0] == 0:
        flat = ops.concatenate([flat, ops.zeros((1,), flat.dtype)])
    return ops.reshape(ops.amax(flat), (1,))


def _global_all_pairs_mse(e: Tensor, w: Tensor | None, all_reduce: AllReduce) -> Tensor:
    """:func:`_all_pairs_mse` of the batch concatenated over all replicas.

    ``all_reduce`` sums a tensor over the replicas (the local shards of the
    global batch may have different sizes). Three collectives of O(d)
    elements, whatever the batch size, in the two-pass centred form (no
    ``sum||e||^2 - ||sum e||^2 / W`` cancellation):

    1. the sum ``P`` of the replicas' peaks ``max |e|`` (and ``max w``),
       without gradient: every replica divides by the same ``P >= max |e|``
       before summing or squaring, so nothing overflows where the loss fits
       (the loss is ``P^2`` times that of ``e / P``, as in :func:`_peak`);
    2. ``[n, sum_i e_i]`` (``[W, sum_i w_i^2, sum_i w_i e_i]`` with weights)
       gives the global weight sum ``W`` and mean ``m``;
    3. the scalar ``sum_i w_i ||e_i - m||^2`` about that global mean (Chan's
       merge of the local centred sums).

    Steps 2 and 3 are differentiated through the collective (its backward
    is again a sum over replicas): the gradient through ``m`` vanishes, but
    its derivative does not, so the Hessian is that of the pair form.
    Each replica returns the same global loss; its gradient with respect to
    the local rows is that of the global loss once summed over replicas by
    the collective's backward (see the adapters for the resulting scale).
    """
    d = _size(e, 1)
    dtype = keras.backend.standardize_dtype(e.dtype)
    peaks = all_reduce(
        _shard_peak(e) if w is None else ops.concatenate([_shard_peak(e), _shard_peak(w)])
    )
    # Guards by masks, not ops.where: Keras' numpy backend computes
    # ops.where in float32 even for float64 operands.
    peaks = ops.stop_gradient(peaks + ops.cast(peaks <= 0, dtype))
    e = e / peaks[0]
    # The counts come first, so that no slice needs a static ``d``.
    if w is None:
        count = ops.sum(ops.ones_like(e[:, :1]), axis=0)  # (1,), in e's dtype
        stats = all_reduce(ops.concatenate([count, ops.sum(e, axis=0)]))
        total_w = stats[0:1]
        pair_w = total_w * (total_w - 1)
        sums = stats[1:]
    else:
        w = w / peaks[1]
        weight_sums = ops.stack([ops.sum(w), ops.sum(ops64.square(w))])
        stats = all_reduce(ops.concatenate([weight_sums, ops.sum(e * w[:, None], axis=0)]))
        total_w = stats[0:1]
        pair_w = ops64.square(total_w) - stats[1:2]
        sums = stats[2:]
    mean = sums[None, :] / (total_w + ops.cast(total_w <= 0, dtype))
    sq = ops64.square(e - mean)
    local_spread = ops.sum(sq if w is None else sq * w[:, None])
    spread = all_reduce(ops.reshape(local_spread, (1,)))
    has_pairs = ops.cast(pair_w > 0, dtype)
    ratio = (2 * total_w * spread) / ((pair_w + (1 - has_pairs)) * d)
    return ops.reshape(ratio * has_pairs * peaks[0] * peaks[0], ())


def comparative_loss(
    y_true: Tensor,
    y_pred: Tensor,
    sample_weight: Tensor | None = None,
    *,
    pairs: str | Sequence[Tensor] = "all",
    groups: Sequence[Tensor] | None = None,
    all_reduce: AllReduce | None = None,
    reduction: str | None = MEAN,
) -> Tensor:
    r"""Comparative knowledge distillation (CKD) loss.

    With residuals :math:`e_i = \hat y_i - y_i` (student minus teacher), CKD
    matches differences between samples:

    .. math::
        L = \frac{1}{|P|\,d} \sum_{(i, j) \in P}
            \lVert (\hat y_i - \hat y_j) - (y_i - y_j) \rVert^2
          = \frac{1}{|P|\,d} \sum_{(i, j) \in P} \lVert e_i - e_j \rVert^2 .

    ``pairs="all"`` (default) takes every ordered pair ``i != j`` and costs
    O(n·d) through :math:`\sum_{ij}\lVert e_i-e_j\rVert^2 = 2n\sum_i
    \lVert e_i-\bar e\rVert^2`; ``sample_weight`` then weights pair
    ``(i, j)`` by ``w_i w_j``. ``pairs=(a, b)`` compares rows ``a[m]`` and
    ``b[m]``; ``groups=(ga, gb)`` (index matrices ``(m, k_a)``, ``(m, k_b)``)
    compares the means of the indexed rows, as the official CKD code does.

    Args:
        y_true: teacher outputs or one-hot labels, ``(batch, dim)``.
        y_pred: student outputs, ``(batch, dim)``.
        sample_weight: optional weights (all pairs or ``pairs``): ``(batch,)``
            finite and >= 0, pair ``(i, j)`` weighted by ``w_i w_j``; or a
            scalar, which scales the loss (Keras' rule).
        pairs: ``"all"`` or a pair of non-empty integer index vectors
            ``(a, b)`` of equal length, entries in ``[0, batch)``.
        groups: optional pair of non-empty integer index matrices
            ``(m, k_a)``, ``(m, k_b)``; overrides ``pairs``.
        all_reduce: data-parallel training: a function summing a tensor over
            the replicas (autograd-aware where gradients are needed). The
            all-pairs loss then covers the global batch, the concatenation
            of every replica's rows (shards may differ in size), for
            ``O(dim)`` numbers communicated per call (three collectives), not
            ``O(batch·dim)``. Only with ``pairs="all"`` and the default
            ``reduction``.
        reduction: Keras' meaning. ``"sum_over_batch_size"`` (default): the
            loss above; ``"sum"`` and ``None``/``"none"``: the sum or the
            vector of per-sample terms whose mean is that loss (one term per
            row for all pairs, from the centred form; one per pair or group
            with ``pairs``/``groups``).

    Returns:
        The loss in ``y_pred``'s dtype (scalar unless ``reduction`` is ``None``).

    Example:
        >>> import numpy as np
        >>> t = np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]], "float32")
        >>> s = t + np.array([[1.0, 0.0]], "float32")  # same differences
        >>> float(comparative_loss(t, s))
        0.0

    Reference:
        Wilf, Xu, Liang, Obolenskiy, Fried, Morency. "Comparative Knowledge
        Distillation." WACV 2025.
    """
    reduction = check_reduction(reduction)
    y_true, y_pred, out_dtype = _prepare(y_true, y_pred)
    e = y_pred - y_true
    explicit = groups is not None or not isinstance(pairs, str)
    if all_reduce is not None and (explicit or reduction != MEAN):
        raise ValueError(
            "all_reduce is only supported with pairs='all' and reduction='sum_over_batch_size' "
            "(the global batch has no explicit pairs, groups or local per-sample terms)."
        )
    if groups is not None:
        loss = _groups_loss(e, groups, sample_weight, reduction)
    elif isinstance(pairs, str):
        if pairs != "all":
            raise ValueError(
                f"pairs must be 'all' or a pair (a, b) of index vectors, got {pairs!r}."
            )
        loss = _all_pairs_loss(e, sample_weight, all_reduce, reduction)
    else:
        loss = _pairs_loss(e, pairs, sample_weight, reduction)
    return _cast(loss, out_dtype)


def _all_pairs_loss(
    e: Tensor, sample_weight: Tensor | None, all_reduce: AllReduce | None, reduction: str
) -> Tensor:
    if sample_weight is None:  # the hot path: no call overhead
        w, scale = None, None
    else:
        w, scale = _weights(sample_weight, e, e.shape[0], normalise=all_reduce is None)
    if reduction == MEAN:
        return _scale(_all_pairs_mse(e, w, all_reduce), scale)
    terms, peak = _all_pairs_terms(e, w)
    return _scale(_reduce(terms, reduction) * peak * peak, scale)


def _matched_indices(
    arg: Any, name: str, rank: int, e: Tensor, size: str
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``name=(a, b)`` checked as index arrays of ``rank`` into ``e``'s rows, with the same
    leading ``size``: ``(a, b, out-of-range marker of a, of b)``."""
    index_a, index_b = _index_pair(arg, name)
    a, bad_a = _indices(index_a, f"{name}[0]", rank, e)
    b, bad_b = _indices(index_b, f"{name}[1]", rank, e)
    if None not in (a.shape[0], b.shape[0]) and a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name}[0] and {name}[1] must have the same {size}, got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}."
        )
    return a, b, bad_a, bad_b


def _groups_loss(
    e: Tensor, groups: Sequence[Tensor], sample_weight: Tensor | None, reduction: str
) -> Tensor:
    """Mean over groups and columns of the squared difference of group means."""
    if sample_weight is not None:
        raise ValueError(
            "sample_weight is not supported with groups (a group mean has no per-row weight)."
        )
    ga, gb, bad_a, bad_b = _matched_indices(groups, "groups", 2, e, "number of groups (rows)")
    peak = _peak(e)
    scaled = e / peak
    mean_a = _mean(ops.take(scaled, ga, axis=0), axis=1)
    delta = mean_a - _mean(ops.take(scaled, gb, axis=0), axis=1)
    loss = _reduce(_mean(ops64.square(delta), axis=1), reduction) * peak * peak
    return _add_markers(loss + _nonfinite_marker(e), bad_a, bad_b)


def _pairs_loss(
    e: Tensor, pairs: Sequence[Tensor], sample_weight: Tensor | None, reduction: str
) -> Tensor:
    """Mean over the listed pairs and columns (pair weight ``w_a w_b``)."""
    a, b, bad_a, bad_b = _matched_indices(pairs, "pairs", 1, e, "length")
    peak = _peak(e)
    scaled = e / peak
    per_pair = _mean(
        ops64.square(ops.take(scaled, a, axis=0) - ops.take(scaled, b, axis=0)), axis=1
    )
    w, scale = _weights(sample_weight, e, e.shape[0])
    if w is not None:
        pair_w = ops.take(w, a, axis=0) * ops.take(w, b, axis=0)
        # terms whose mean is sum(pair_w * per_pair) / sum(pair_w)
        per_pair = per_pair * _safe_ratio(pair_w * _num_rows(per_pair), ops.sum(pair_w))
    loss = _scale(_reduce(per_pair, reduction) * peak * peak, scale)
    return _add_markers(loss + _nonfinite_marker(e), bad_a, bad_b)


def _add_markers(loss: Tensor, *markers: Tensor | None) -> Tensor:
    for marker in markers:
        if marker is not None:
            loss = loss + marker
    return loss


def make_projection(dim: int, out_dim: int, kind: str = "gaussian", seed: int = 0) -> np.ndarray:
    """Fixed projection matrix ``P`` of shape ``(dim, out_dim)`` for RKD_d.

    ``"gaussian"``: i.i.d. N(0, 1) entries scaled by ``1/sqrt(out_dim)``;
    ``"orthogonal"``: orthonormal columns (needs ``out_dim <= dim``);
    ``"identity"``: the identity (needs ``out_dim == dim``). Drawn with
    NumPy from ``seed``, so every backend sees the same matrix. ``dim`` and
    ``out_dim`` are integers >= 1, ``seed`` an integer >= 0.
    """
    dim = check_int(dim, "dim", minimum=1)
    out_dim = check_int(out_dim, "out_dim", minimum=1)
    seed = check_int(seed, "seed", minimum=0)
    check_projection_kind(kind)
    if kind == "identity":
        if out_dim != dim:
            raise ValueError(f"identity projection needs out_dim == dim, got {out_dim} != {dim}.")
        return np.eye(dim)
    gaussian = np.random.default_rng(seed).standard_normal((dim, out_dim))
    if kind == "gaussian":
        return gaussian / np.sqrt(out_dim)
    if out_dim > dim:
        raise ValueError(f"orthogonal projection needs out_dim <= dim, got {out_dim} > {dim}.")
    q, r = np.linalg.qr(gaussian)
    return q * np.sign(np.diag(r))


def projected_rkd_loss(
    y_true: Tensor,
    y_pred: Tensor,
    projection: Tensor,
    sample_weight: Tensor | None = None,
    *,
    all_reduce: AllReduce | None = None,
    reduction: str | None = MEAN,
) -> Tensor:
    r"""Projected relational distillation RKD_d (the CKD paper's ablation).

    .. math::
        L = \frac{1}{n(n-1)\,k} \sum_{i \ne j}
            \lVert P^\top(\hat y_i - \hat y_j) - P^\top(y_i - y_j) \rVert^2

    with a fixed ``projection`` ``P`` of shape ``(dim, k)`` (see
    :func:`make_projection`), in O(n·dim·k) via the CKD identity on the
    projected residuals. With ``P = I`` it equals :func:`comparative_loss`.
    ``all_reduce`` extends the pairs to the global data-parallel batch, as
    in :func:`comparative_loss` (``O(k)`` numbers communicated);
    ``reduction`` as in :func:`comparative_loss` (one term per row).

    Example:
        >>> import numpy as np
        >>> t = np.zeros((4, 3), "float32")
        >>> s = np.ones((4, 3), "float32")
        >>> float(projected_rkd_loss(t, s, make_projection(3, 2)))
        0.0
    """
    reduction = check_reduction(reduction)
    if all_reduce is not None and reduction != MEAN:
        raise ValueError(
            "all_reduce is only supported with reduction='sum_over_batch_size' (the global "
            "batch has no local per-sample terms)."
        )
    y_true, y_pred, out_dtype = _prepare(y_true, y_pred)
    if projection is None or isinstance(projection, str):
        raise TypeError(
            f"projection must be a (dim, k) matrix (see make_projection), got {projection!r}."
        )
    dtype = keras.backend.standardize_dtype(y_pred.dtype)
    # A backend tensor is only cast: it may be a constant of a compiled graph.
    if ops.is_tensor(projection):
        p = _cast(projection, dtype)
    else:
        p = ops.convert_to_tensor(projection, dtype=dtype)
    dim = y_pred.shape[1]
    p_shape = tuple(p.shape)
    if len(p_shape) != 2 or (dim is not None and p_shape[0] != dim) or p_shape[1] == 0:
        raise ValueError(
            f"projection must have shape (dim, k) with k >= 1 and dim={dim} (from y_pred of "
            f"shape {tuple(y_pred.shape)}), got shape {p_shape}."
        )
    e = (y_pred - y_true) @ p
    return _cast(_all_pairs_loss(e, sample_weight, all_reduce, reduction), out_dtype)
