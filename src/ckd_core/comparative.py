"""Comparative losses: CKD (all pairs, explicit pairs, groups) and RKD_d.

Includes the data-parallel statistics (``all_reduce``) of the all-pairs form.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from ckd_core._checks import (
    AllReduce,
    Tensor,
    _cast,
    _index_pair,
    _indices,
    _mean,
    _nonfinite_marker,
    _num_rows,
    _prepare,
    _scale,
    _size,
    _weights,
    check_int,
)

__all__ = ["comparative_loss", "make_projection", "projected_rkd_loss"]

_PROJECTIONS = ("gaussian", "orthogonal", "identity")


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0``, else 0, with finite gradients.

    NaN or infinite ``num``/``den`` give NaN, never 0: the fallback branch is
    ``(num + den) * 0``.
    """
    positive = den > 0
    return ops.where(positive, num / ops.where(positive, den, ops.ones_like(den)), (num + den) * 0)


def _centred_sum_of_squares(e: Tensor) -> Tensor:
    """``sum_i ||e_i - m||^2`` with ``m`` the row mean.

    The mean enters through ``stop_gradient``: the derivative with respect to
    ``m`` is ``-2 sum_i (e_i - m) = 0``, so the gradient ``2 (e_i - m)`` is
    exact while the backward pass skips the column reduction and its
    ``(n, d)`` temporaries. Plain ops (no custom gradient) keep the loss
    composable with ``torch.func.vmap``/``grad``.
    """
    centred = e - ops.stop_gradient(_mean(e, axis=0, keepdims=True))
    return ops.sum(centred * centred)


def _all_pairs_mse(e: Tensor, w: Tensor | None, all_reduce: AllReduce | None = None) -> Tensor:
    """Mean of ``(e_i - e_j)^2`` over ordered pairs ``i != j`` and columns.

    Centred O(n·d) form: ``sum_ij w_i w_j ||e_i - e_j||^2
    = 2 W sum_i w_i ||e_i - m||^2`` with ``W = sum w`` and ``m`` the
    weighted mean; the pair weights sum to ``W^2 - sum w^2``. With
    ``all_reduce`` the sums run over the batch of all replicas
    (:func:`_global_all_pairs_mse`).
    """
    if all_reduce is not None:
        return _global_all_pairs_mse(e, w, all_reduce)
    n, d = e.shape
    if w is None:
        if n is not None and n < 2:
            return ops.sum(e * 0)
        # 2n sum||e_i - m||^2 / (n (n - 1) d)
        if n is not None and d is not None:
            return _centred_sum_of_squares(e) * (2 / ((n - 1) * d))
        n, d = _num_rows(e), _size(e, 1)
        return _centred_sum_of_squares(e) * 2 / (ops.where(n > 1, n - 1, 1) * d)
    d = _size(e, 1)
    w_col = w[:, None]
    total_w = ops.sum(w)
    mean = ops.sum(e * w_col, axis=0, keepdims=True) / ops.where(total_w > 0, total_w, 1)
    spread = ops.sum(ops.square(e - mean) * w_col)
    pair_w = ops.square(total_w) - ops.sum(ops.square(w))
    return _safe_ratio(2 * total_w * spread, pair_w * d)


def _global_all_pairs_mse(e: Tensor, w: Tensor | None, all_reduce: AllReduce) -> Tensor:
    """:func:`_all_pairs_mse` of the batch concatenated over all replicas.

    ``all_reduce`` sums a tensor over the replicas (the local shards of the
    global batch may have different sizes). Two collectives of O(d) elements,
    whatever the batch size, in the two-pass centred form (no
    ``sum||e||^2 - ||sum e||^2 / W`` cancellation):

    1. ``[sum_i w_i e_i, sum_i w_i, sum_i w_i^2]`` (``d + 2`` numbers;
       ``[sum_i e_i, n]`` without weights) gives the global weight sum ``W``
       and mean ``m``;
    2. the scalar ``sum_i w_i ||e_i - m||^2`` about that global mean, which
       equals Chan's merge ``M2_r + W_r ||m_r - m||^2`` of the local centred
       sums, summed over replicas.

    The mean carries no gradient: ``d/dm sum_i w_i ||e_i - m||^2 = 0`` at
    the global mean, so only the scalar of step 2 needs a differentiable
    collective (plus the weight sums when the weights require gradients).
    Each replica returns the same global loss; its gradient with respect to
    the local rows is that of the global loss once summed over replicas by
    the collective's backward (see the adapters for the resulting scale).
    """
    d = _size(e, 1)
    # The counts come first, so that no slice needs a static ``d``.
    if w is None:
        count = ops.sum(ops.ones_like(e[:, :1]), axis=0)  # (1,), in e's dtype
        stats = all_reduce(ops.concatenate([count, ops.stop_gradient(ops.sum(e, axis=0))]))
        total_w = stats[0:1]
        pair_w = total_w * (total_w - 1)
        sums = stats[1:]
    else:
        w_col = w[:, None]
        weight_sums = ops.stack([ops.sum(w), ops.sum(ops.square(w))])
        local = ops.concatenate([weight_sums, ops.stop_gradient(ops.sum(e * w_col, axis=0))])
        stats = all_reduce(local)
        total_w = stats[0:1]
        pair_w = ops.square(total_w) - stats[1:2]
        sums = stats[2:]
    # Guards by masks, not ops.where: Keras' numpy backend computes
    # ops.where in float32 even for float64 operands.
    dtype = keras.backend.standardize_dtype(e.dtype)
    mean = sums[None, :] / (total_w + ops.cast(total_w <= 0, dtype))
    sq = ops.square(e - mean)
    local_spread = ops.sum(sq if w is None else sq * w[:, None])
    spread = all_reduce(ops.reshape(local_spread, (1,)))
    has_pairs = ops.cast(pair_w > 0, dtype)
    ratio = (2 * total_w * spread) / ((pair_w + (1 - has_pairs)) * d)
    return ops.reshape(ratio * has_pairs, ())


def comparative_loss(
    y_true: Tensor,
    y_pred: Tensor,
    sample_weight: Tensor | None = None,
    *,
    pairs: str | Sequence[Tensor] = "all",
    groups: Sequence[Tensor] | None = None,
    all_reduce: AllReduce | None = None,
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
            ``O(dim)`` numbers communicated per call (two collectives), not
            ``O(batch·dim)``. Only with ``pairs="all"``.

    Returns:
        Scalar loss in ``y_pred``'s dtype.

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
    y_true, y_pred, out_dtype = _prepare(y_true, y_pred)
    e = y_pred - y_true
    n = y_pred.shape[0]
    explicit = groups is not None or not isinstance(pairs, str)
    if all_reduce is not None and explicit:
        raise ValueError(
            "all_reduce is only supported with pairs='all' (the global batch has no "
            "explicit pairs or groups)."
        )
    if groups is not None:
        if sample_weight is not None:
            raise ValueError(
                "sample_weight is not supported with groups (a group mean has no per-row weight)."
            )
        group_a, group_b = _index_pair(groups, "groups")
        ga, bad_a = _indices(group_a, "groups[0]", 2, e)
        gb, bad_b = _indices(group_b, "groups[1]", 2, e)
        if None not in (ga.shape[0], gb.shape[0]) and ga.shape[0] != gb.shape[0]:
            raise ValueError(
                "groups[0] and groups[1] must have the same number of groups (rows), got "
                f"shapes {tuple(ga.shape)} and {tuple(gb.shape)}."
            )
        delta = _mean(ops.take(e, ga, axis=0), axis=1) - _mean(ops.take(e, gb, axis=0), axis=1)
        loss = _mean(ops.square(delta)) + _nonfinite_marker(e)
        loss = _add_markers(loss, bad_a, bad_b)
    elif isinstance(pairs, str):
        if pairs != "all":
            raise ValueError(
                f"pairs must be 'all' or a pair (a, b) of index vectors, got {pairs!r}."
            )
        if sample_weight is None:  # the hot path: no call overhead
            loss = _all_pairs_mse(e, None, all_reduce)
        else:
            w, scale = _weights(sample_weight, e, n)
            loss = _scale(_all_pairs_mse(e, w, all_reduce), scale)
    else:
        index_a, index_b = _index_pair(pairs, "pairs")
        a, bad_a = _indices(index_a, "pairs[0]", 1, e)
        b, bad_b = _indices(index_b, "pairs[1]", 1, e)
        if None not in (a.shape[0], b.shape[0]) and a.shape[0] != b.shape[0]:
            raise ValueError(
                "pairs[0] and pairs[1] must have the same length, got shapes "
                f"{tuple(a.shape)} and {tuple(b.shape)}."
            )
        sq = ops.square(ops.take(e, a, axis=0) - ops.take(e, b, axis=0))
        w, scale = _weights(sample_weight, e, n)
        if w is None:
            loss = _mean(sq)
        else:
            pair_w = ops.take(w, a, axis=0) * ops.take(w, b, axis=0)
            loss = _safe_ratio(ops.sum(sq * pair_w[:, None]), ops.sum(pair_w) * _size(sq, 1))
        loss = _add_markers(_scale(loss, scale) + _nonfinite_marker(e), bad_a, bad_b)
    return _cast(loss, out_dtype)


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
    if kind not in _PROJECTIONS:
        raise ValueError(
            f"projection must be 'gaussian', 'orthogonal' or 'identity', got {kind!r}."
        )
    if kind == "identity":
        if out_dim != dim:
            raise ValueError(f"identity projection needs out_dim == dim, got {out_dim} != {dim}.")
        return np.eye(dim)
    gaussian = np.random.default_rng(seed).standard_normal((dim, out_dim))
    if kind == "gaussian":
        return gaussian / np.sqrt(out_dim)
    if kind == "orthogonal":
        if out_dim > dim:
            raise ValueError(f"orthogonal projection needs out_dim <= dim, got {out_dim} > {dim}.")
        q, r = np.linalg.qr(gaussian)
        return q * np.sign(np.diag(r))
    raise ValueError(f"projection must be 'gaussian', 'orthogonal' or 'identity', got {kind!r}.")


def projected_rkd_loss(
    y_true: Tensor,
    y_pred: Tensor,
    projection: Tensor,
    sample_weight: Tensor | None = None,
    *,
    all_reduce: AllReduce | None = None,
) -> Tensor:
    r"""Projected relational distillation RKD_d (the CKD paper's ablation).

    .. math::
        L = \frac{1}{n(n-1)\,k} \sum_{i \ne j}
            \lVert P^\top(\hat y_i - \hat y_j) - P^\top(y_i - y_j) \rVert^2

    with a fixed ``projection`` ``P`` of shape ``(dim, k)`` (see
    :func:`make_projection`), in O(n·dim·k) via the CKD identity on the
    projected residuals. With ``P = I`` it equals :func:`comparative_loss`.
    ``all_reduce`` extends the pairs to the global data-parallel batch, as
    in :func:`comparative_loss` (``O(k)`` numbers communicated).

    Example:
        >>> import numpy as np
        >>> t = np.zeros((4, 3), "float32")
        >>> s = np.ones((4, 3), "float32")
        >>> float(projected_rkd_loss(t, s, make_projection(3, 2)))
        0.0
    """
    y_true, y_pred, out_dtype = _prepare(y_true, y_pred)
    if projection is None or isinstance(projection, str):
        raise TypeError(
            f"projection must be a (dim, k) matrix (see make_projection), got {projection!r}."
        )
    p = ops.convert_to_tensor(projection, dtype=keras.backend.standardize_dtype(y_pred.dtype))
    dim = y_pred.shape[1]
    p_shape = tuple(p.shape)
    if len(p_shape) != 2 or (dim is not None and p_shape[0] != dim) or p_shape[1] == 0:
        raise ValueError(
            f"projection must have shape (dim, k) with k >= 1 and dim={dim} (from y_pred of "
            f"shape {tuple(y_pred.shape)}), got shape {p_shape}."
        )
    e = (y_pred - y_true) @ p
    w, scale = _weights(sample_weight, e, y_pred.shape[0])
    return _cast(_scale(_all_pairs_mse(e, w, all_reduce), scale), out_dtype)
