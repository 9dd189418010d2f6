"""Distillation losses as pure functions of ``(y_true, y_pred)``.

Every function takes teacher outputs (or one-hot labels) as ``y_true`` and
student outputs as ``y_pred``, both of shape ``(batch, dim)``, and returns a
scalar in the input dtype. They are written with ``keras.ops`` only, so they
run unchanged on the JAX, TensorFlow, PyTorch and NumPy backends, inside
``jax.jit``, ``tf.function`` and ``torch.compile``.

float16 and bfloat16 inputs are accumulated in float32 and the result is cast
back. Pairwise losses return 0 for a batch with fewer than two rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

__all__ = [
    "comparative_loss",
    "dist_loss",
    "kd_loss",
    "make_projection",
    "projected_rkd_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
]

Tensor = Any
# Sums a tensor over the data-parallel replicas (e.g. an autograd-aware
# ``torch.distributed`` all-reduce, a ``tf.distribute`` replica-context
# all-reduce or ``jax.lax.psum``); see ``comparative_loss``.
AllReduce = Callable[[Tensor], Tensor]
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_HALF_DTYPES = ("float16", "bfloat16")
# RepDistiller clamps squared pairwise distances at this value before sqrt.
_PDIST_EPS = 1e-12
# Anchor chunk of the RKD angle term: at most this many (anchor, j, k) entries
# live at once (times a handful of temporaries), whatever the batch size
# (at least one anchor, n * n entries). 2**19 float32 entries (2 MiB per
# temporary) measured fastest on CPU (benchmarks/losses.py): 4-5x faster
# than 2**23 at n=256, where every temporary missed the cache.
_ANGLE_CHUNK_ENTRIES = 1 << 19


_DTYPE_NAMES: dict[Any, str] = {}


def _dtype_name(x: Tensor) -> str:
    """``keras.backend.standardize_dtype(x.dtype)``, memoized per dtype object.

    It runs several times per call on the hot path, where Keras' version
    costs a few microseconds each (string conversions and lookups).
    """
    dtype = x.dtype
    try:
        return _DTYPE_NAMES[dtype]
    except (KeyError, TypeError):
        name = keras.backend.standardize_dtype(dtype)
        try:
            _DTYPE_NAMES[dtype] = name
        except TypeError:
            pass
        return name


def _float_dtype(x: Tensor, role: str) -> str:
    dtype = _dtype_name(x)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{role} must have a floating dtype, got {dtype}.")
    return dtype


def _prepare(y_true: Tensor, y_pred: Tensor) -> tuple[Tensor, Tensor, str]:
    """Validates a ``(batch, dim)`` pair and casts both to the compute dtype.

    Returns ``(y_true, y_pred, out_dtype)``: ``out_dtype`` is ``y_pred``'s
    dtype; the returned tensors are float32 when that dtype is a half type.
    """
    # Backend tensors are used as they are (no device move on torch: the
    # result stays on the inputs' device); ``ops.convert_to_tensor`` costs
    # more than a small loss itself, so only other inputs go through it.
    if not ops.is_tensor(y_pred):
        y_pred = ops.convert_to_tensor(y_pred)
    if not ops.is_tensor(y_true):
        y_true = ops.convert_to_tensor(y_true)
    out_dtype = _float_dtype(y_pred, "y_pred")
    _float_dtype(y_true, "y_true")
    true_shape, pred_shape = tuple(y_true.shape), tuple(y_pred.shape)
    if len(pred_shape) != 2 or len(true_shape) != 2:
        raise ValueError(
            "Expected y_true and y_pred of rank 2 (batch, dim), got shapes "
            f"y_true={true_shape} and y_pred={pred_shape}."
        )
    for a, b in zip(true_shape, pred_shape, strict=True):
        if a is not None and b is not None and a != b:
            raise ValueError(
                "y_true and y_pred must have the same shape, got "
                f"y_true={true_shape} and y_pred={pred_shape}."
            )
    compute = "float32" if out_dtype in _HALF_DTYPES else out_dtype
    return _cast(y_true, compute), _cast(y_pred, compute), out_dtype


def _cast(x: Tensor, dtype: str) -> Tensor:
    if _dtype_name(x) == dtype:
        return x
    return ops.cast(x, dtype)


def _weights(sample_weight: Tensor | None, like: Tensor) -> Tensor | None:
    if sample_weight is None:
        return None
    w = ops.convert_to_tensor(sample_weight)
    if len(w.shape) != 1:
        w = ops.reshape(w, (-1,))
    return _cast(w, _dtype_name(like))


def _num_rows(x: Tensor) -> Any:
    """Batch size: a Python int when static, else a tensor in ``x``'s dtype."""
    n = x.shape[0]
    if n is None:
        return ops.cast(ops.shape(x)[0], x.dtype)
    return n


def _mean(x: Tensor, axis: int | None = None, keepdims: bool = False) -> Tensor:
    """Mean as sum / count: ``ops.mean`` computes float64 in float32 on torch."""
    axes = range(len(x.shape)) if axis is None else (axis,)
    count: Any = 1
    for a in axes:
        size = x.shape[a]
        count = count * (ops.cast(ops.shape(x)[a], x.dtype) if size is None else size)
    return ops.sum(x, axis=axis, keepdims=keepdims) / count


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0``, else 0, with finite gradients."""
    positive = den > 0
    return ops.where(positive, num / ops.where(positive, den, ops.ones_like(den)), 0)


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
    d = e.shape[1]
    if w is None:
        n = _num_rows(e)
        if isinstance(n, int) and n < 2:
            return ops.sum(e * 0)
        # 2n sum||e_i - m||^2 / (n (n - 1) d)
        if isinstance(n, int):
            return _centred_sum_of_squares(e) * (2 / ((n - 1) * d))
        return _centred_sum_of_squares(e) * 2 / (ops.where(n > 1, n - 1, 1) * d)
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
    d = e.shape[1]
    if w is None:
        count = ops.sum(ops.ones_like(e[:, :1]), axis=0)  # (1,), in e's dtype
        stats = all_reduce(ops.concatenate([ops.stop_gradient(ops.sum(e, axis=0)), count]))
        total_w = stats[d : d + 1]
        pair_w = total_w * (total_w - 1)
    else:
        w_col = w[:, None]
        weight_sums = ops.stack([ops.sum(w), ops.sum(ops.square(w))])
        local = ops.concatenate([ops.stop_gradient(ops.sum(e * w_col, axis=0)), weight_sums])
        stats = all_reduce(local)
        total_w = stats[d : d + 1]
        pair_w = ops.square(total_w) - stats[d + 1 : d + 2]
    # Guards by masks, not ops.where: Keras' numpy backend computes
    # ops.where in float32 even for float64 operands.
    dtype = keras.backend.standardize_dtype(e.dtype)
    mean = stats[None, :d] / (total_w + ops.cast(total_w <= 0, dtype))
    sq = ops.square(e - mean)
    local_spread = ops.sum(sq if w is None else sq * w[:, None])
    spread = all_reduce(ops.reshape(local_spread, (1,)))
    has_pairs = ops.cast(pair_w > 0, dtype)
    ratio = (2 * total_w * spread) / ((pair_w + (1 - has_pairs)) * d)
    return ops.reshape(ratio * has_pairs, ())


def _take(x: Tensor, index: Tensor) -> Tensor:
    return ops.take(x, ops.convert_to_tensor(index, dtype="int32"), axis=0)


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
        sample_weight: optional ``(batch,)`` weights (all pairs or ``pairs``).
        pairs: ``"all"`` or a pair of index vectors ``(a, b)``.
        groups: optional pair of index matrices; overrides ``pairs``.
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
    if all_reduce is not None and (groups is not None or not isinstance(pairs, str)):
        raise ValueError("all_reduce is only supported with pairs='all'.")
    if groups is not None:
        if sample_weight is not None:
            raise ValueError("sample_weight is not supported with groups.")
        group_a, group_b = groups
        delta = _mean(_take(e, group_a), axis=1) - _mean(_take(e, group_b), axis=1)
        loss = _mean(ops.square(delta))
    elif isinstance(pairs, str):
        if pairs != "all":
            raise ValueError(f"pairs must be 'all' or (a, b) index vectors, got {pairs!r}.")
        loss = _all_pairs_mse(e, _weights(sample_weight, e), all_reduce)
    else:
        index_a, index_b = pairs  # type: ignore[str-unpack]  # not a str here
        sq = ops.square(_take(e, index_a) - _take(e, index_b))
        w = _weights(sample_weight, e)
        if w is None:
            loss = _mean(sq)
        else:
            pair_w = _take(w, index_a) * _take(w, index_b)
            loss = _safe_ratio(ops.sum(sq * pair_w[:, None]), ops.sum(pair_w) * sq.shape[1])
    return _cast(loss, out_dtype)


def make_projection(dim: int, out_dim: int, kind: str = "gaussian", seed: int = 0) -> np.ndarray:
    """Fixed projection matrix ``P`` of shape ``(dim, out_dim)`` for RKD_d.

    ``"gaussian"``: i.i.d. N(0, 1) entries scaled by ``1/sqrt(out_dim)``;
    ``"orthogonal"``: orthonormal columns (needs ``out_dim <= dim``);
    ``"identity"``: the identity (needs ``out_dim == dim``). Drawn with
    NumPy from ``seed``, so every backend sees the same matrix.
    """
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
    p = ops.convert_to_tensor(projection, dtype=keras.backend.standardize_dtype(y_pred.dtype))
    if len(p.shape) != 2 or p.shape[0] != y_pred.shape[1]:
        raise ValueError(
            f"projection must have shape (dim, k) with dim={y_pred.shape[1]}, got {tuple(p.shape)}."
        )
    e = (y_pred - y_true) @ p
    return _cast(_all_pairs_mse(e, _weights(sample_weight, e), all_reduce), out_dtype)


def _weighted_mean(values: Tensor, w: Tensor | None) -> Tensor:
    if w is None:
        return _mean(values)
    return _safe_ratio(ops.sum(values * w), ops.sum(w))


def kd_loss(
    y_true: Tensor,
    y_pred: Tensor,
    sample_weight: Tensor | None = None,
    *,
    temperature: float = 4.0,
) -> Tensor:
    r"""Hinton knowledge distillation on logits.

    .. math::
        L = T^2 \cdot \frac{1}{n}\sum_i \mathrm{KL}\big(
            \mathrm{softmax}(y_i / T) \,\Vert\, \mathrm{softmax}(\hat y_i / T)\big)

    computed from log-softmax (no clipping), averaged over the batch
    (``sample_weight`` gives a weighted mean).

    Example:
        >>> import numpy as np
        >>> logits = np.array([[1.0, 2.0, 3.0]], "float32")
        >>> float(kd_loss(logits, logits))
        0.0

    Reference:
        Hinton, Vinyals, Dean. "Distilling the Knowledge in a Neural
        Network." 2015.
    """
    y_true, y_pred, out_dtype = _prepare(y_true, y_pred)
    log_p_student = ops.log_softmax(y_pred / temperature, axis=-1)
    log_p_teacher = ops.log_softmax(y_true / temperature, axis=-1)
    per_sample = ops.sum(ops.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    loss = _weighted_mean(per_sample, _weights(sample_weight, per_sample)) * temperature**2
    return _cast(loss, out_dtype)


def _mean_pearson(a: Tensor, b: Tensor, axis: int, eps: float = 1e-8) -> Tensor:
    a = a - _mean(a, axis=axis, keepdims=True)
    b = b - _mean(b, axis=axis, keepdims=True)
    prod = ops.sum(ops.square(a), axis=axis) * ops.sum(ops.square(b), axis=axis)
    # sqrt'(0) is infinite: constant rows/columns (e.g. dim 1, equal rows)
    # would get NaN gradients. Their correlation is 0 either way.
    positive = prod > 0
    norms = ops.where(positive, ops.sqrt(ops.where(positive, prod, 1)), 0)
    return _mean(ops.sum(a * b, axis=axis) / (norms + eps))


def dist_loss(
    y_true: Tensor,
    y_pred: Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    tau: float = 4.0,
) -> Tensor:
    r"""DIST: distillation by Pearson correlation of softened predictions.

    With :math:`p = \mathrm{softmax}(\hat y/\tau)` and
    :math:`q = \mathrm{softmax}(y/\tau)`:

    .. math::
        L = \tau^2 \big(\beta\,(1 - \overline{\rho}_{\text{rows}}(p, q))
            + \gamma\,(1 - \overline{\rho}_{\text{cols}}(p, q))\big)

    where :math:`\overline{\rho}` is the mean Pearson correlation over rows
    (inter-class relation) or columns (intra-class relation); the Pearson
    denominator carries ``+1e-8`` as in the authors' code.

    Example:
        >>> import numpy as np
        >>> logits = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]], "float32")
        >>> round(float(dist_loss(logits, logits)), 3)  # ~1e-4 from the 1e-8 eps
        0.0

    Reference:
        Huang, You, Wang, Qian, Xu. "Knowledge Distillation from A Stronger
        Teacher." NeurIPS 2022.
    """
    y_true, y_pred, out_dtype = _prepare(y_true, y_pred)
    p_student = ops.softmax(y_pred / tau, axis=-1)
    p_teacher = ops.softmax(y_true / tau, axis=-1)
    inter = 1 - _mean_pearson(p_student, p_teacher, axis=1)
    intra = 1 - _mean_pearson(p_student, p_teacher, axis=0)
    return _cast((inter * beta + intra * gamma) * tau**2, out_dtype)


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


def _inverse_distances(gram: Tensor) -> Tensor:
    """``1 / ||x_i - x_j||``, and 0 for ``i == j`` and duplicated rows.

    A squared distance below a few ulps of the squared norms is rounding
    noise of the Gram form: such pairs are duplicates, whose direction
    vector is zero in RepDistiller's explicit form (cosine 0).
    """
    sq_norm = ops.diagonal(gram)
    eps = float(np.finfo(keras.backend.standardize_dtype(gram.dtype)).eps)
    threshold = (sq_norm[:, None] + sq_norm[None, :]) * (64 * eps) + _PDIST_EPS
    sq_dist = sq_norm[:, None] + sq_norm[None, :] - gram * 2
    valid = sq_dist > threshold
    return ops.where(valid, ops.rsqrt(ops.where(valid, sq_dist, 1)), 0)


def _angle_chunks(n: int) -> list[tuple[int, int]]:
    step = max(1, min(n, _ANGLE_CHUNK_ENTRIES // max(n * n, 1)))
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def _cosines(gram: Tensor, inv: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """``cos[a, j, k]`` of the angle at vertex ``a`` for anchors ``start:stop``.

    ``<x_j - x_a, x_k - x_a> = G_jk + h_aj + h_ak`` with
    ``h_aj = G_aa / 2 - G_aj``. Returns the cosines and the scale
    ``inv[a, j] * inv[a, k]`` that turned inner products into cosines.
    """
    half_diag = ops.diagonal(gram)[start:stop] * 0.5
    h = half_diag[:, None] - gram[start:stop]
    inv_rows = inv[start:stop]
    scale = inv_rows[:, :, None] * inv_rows[:, None, :]
    return (gram[None, :, :] + h[:, :, None] + h[:, None, :]) * scale, scale


def _angle_loss_and_gram_grad(gram_s: Tensor, gram_t: Tensor) -> tuple[Tensor, Tensor]:
    """Angle loss as a function of the student Gram matrix, and its gradient.

    Computed over anchor chunks so that memory is bounded; the analytic
    gradient is accumulated in the same pass so that backpropagation needs
    no ``(n, n, n)`` tensor either.
    """
    n = gram_s.shape[0]
    inv_s = _inverse_distances(gram_s)
    inv_t = _inverse_distances(gram_t)

    total = ops.zeros((), gram_s.dtype)
    grad_inner = ops.zeros_like(gram_s)  # d loss / d G via the G_jk term
    grad_rows, grad_diag = [], []
    grad_col_diag = ops.zeros_like(ops.diagonal(gram_s))
    # Every (chunk, n, n) operation below is a full pass over memory: they
    # are kept few (about 20 per chunk), and ``_ANGLE_CHUNK_ENTRIES`` keeps
    # the chunk small enough to stay in cache.
    for start, stop in _angle_chunks(n):
        cos_s, scale_s = _cosines(gram_s, inv_s, start, stop)
        diff = cos_s - _cosines(gram_t, inv_t, start, stop)[0]
        slope = ops.clip(diff, -1, 1)  # smooth-L1'
        # smooth_l1(x) = slope * (x - slope / 2) (ops.vdot runs float64 in float32)
        total = total + ops.sum(slope * (diff - slope * 0.5))
        inv_rows = inv_s[start:stop]
        # d loss / d inner[a, j, k] = slope * inv[a, j] * inv[a, k]
        d_inner = slope * scale_s
        grad_inner = grad_inner + ops.sum(d_inner, axis=0)
        d_inner_rows = ops.sum(d_inner, axis=2)
        # d loss / d sq_dist[a, j] = -1/2 inv^2 * 2 sum_k slope * cos
        d_sq_dist = -(ops.square(inv_rows) * ops.sum(slope * cos_s, axis=2))
        grad_rows.append(-2 * (d_inner_rows + d_sq_dist))
        grad_diag.append(ops.sum(d_inner_rows, axis=1) + ops.sum(d_sq_dist, axis=1))
        grad_col_diag = grad_col_diag + ops.sum(d_sq_dist, axis=0)
    grad = grad_inner + ops.concatenate(grad_rows, axis=0)
    grad = grad + ops.diag(ops.concatenate(grad_diag, axis=0) + grad_col_diag)
    scale = 1 / float(n) ** 3
    return total * scale, grad * scale


@keras.ops.custom_gradient
def _angle_loss_of_gram(gram_s: Tensor, gram_t: Tensor) -> Any:
    loss, grad = _angle_loss_and_gram_grad(gram_s, gram_t)

    def grad_fn(*args: Any, upstream: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if upstream is None:
            (upstream,) = args
        return grad * upstream, ops.zeros_like(gram_t)

    return loss, grad_fn


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
