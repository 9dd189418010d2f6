"""RKD angle term as a function of the Gram matrix, with a hand-derived gradient.

The angle loss sums ``smooth_l1(cos_s[a, j, k] - cos_t[a, j, k])`` over all
``n^3`` triplets. Its autodiff backward would keep ``(n, n, n)`` tensors
alive; instead :func:`_angle_loss_and_gram_grad` accumulates the gradient
with respect to the student Gram matrix ``G`` in the same chunked pass as
the value, and :func:`_angle_loss_of_gram` attaches it through
``keras.ops.custom_gradient``. Derivation, with ``h_aj = G_aa / 2 - G_aj``,
``inner[a, j, k] = G_jk + h_aj + h_ak = <x_j - x_a, x_k - x_a>``,
``sq_dist[a, j] = G_aa + G_jj - 2 G_aj``, ``inv = sq_dist^(-1/2)`` and
``cos = inner * inv[a, j] * inv[a, k]``:

* ``d cos / d inner = inv[a, j] inv[a, k]``;
* ``d cos / d sq_dist[a, j] = -1/2 cos inv[a, j]^2`` (twice by symmetry in
  ``j, k``);
* the chain through ``inner`` and ``sq_dist`` onto ``G_jk``, ``G_aj`` and the
  diagonal gives the four accumulators of the loop below.

``tests/test_properties.py`` checks it against autodiff of RepDistiller's
explicit ``(n, n, n)`` form and against finite differences.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

from ckd_core._checks import Tensor, ops64

# RepDistiller clamps squared pairwise distances at this value before sqrt.
_PDIST_EPS = 1e-12
# Squared distances within this many ulps of G_ii + G_jj count as duplicates
# (twice the largest rounding noise of the Gram form measured on CPU).
_DUPLICATE_ULPS = 8
# Anchor chunk of the RKD angle term: at most this many (anchor, j, k) entries
# live at once (times a handful of temporaries), whatever the batch size
# (at least one anchor, n * n entries). 2**19 float32 entries (2 MiB per
# temporary) measured fastest on CPU (benchmarks/losses.py): 4-5x faster
# than 2**23 at n=256, where every temporary missed the cache.
_ANGLE_CHUNK_ENTRIES = 1 << 19

#: A framework's native kernel of :func:`_angle_loss_and_gram_grad` (the same
#: sums, registered by an adapter: ``ckd_torch`` registers one for eager torch).
#: Called with the two Gram matrices, it returns ``(loss, gradient)``, or None
#: where it does not apply (then the Keras ops below run).
AngleKernel = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor] | None"]
_native_kernels: list[AngleKernel] = []


def register_native_kernel(kernel: AngleKernel) -> None:
    """Let ``kernel`` compute the angle term where it applies (once per kernel)."""
    if kernel not in _native_kernels:
        _native_kernels.append(kernel)


def _inverse_distances(gram: Tensor) -> Tensor:
    """``1 / ||x_i - x_j||``, and 0 for ``i == j`` and duplicated rows.

    The Gram form ``G_ii + G_jj - 2 G_ij`` of a squared distance carries a
    rounding error of up to about ``4 eps (G_ii + G_jj)`` (measured with
    NumPy's float64 BLAS; 0 for exact duplicates with torch, JAX and TF on
    CPU): below ``_DUPLICATE_ULPS = 8`` times that scale its sign is noise,
    so such pairs count as duplicates, whose direction vector is zero in
    RepDistiller's explicit form (cosine 0). In distances: rows closer than
    ``sqrt(8 eps (||x_i - m||^2 + ||x_j - m||^2))`` (``m`` the batch mean),
    about 1.4e-3 times their distance from ``m`` in float32. The bound also
    caps ``1 / ||x_i - x_j||^2`` and so keeps the gradient finite.
    """
    sq_norm = ops.diagonal(gram)
    eps = float(np.finfo(keras.backend.standardize_dtype(gram.dtype)).eps)
    threshold = (sq_norm[:, None] + sq_norm[None, :]) * (_DUPLICATE_ULPS * eps) + _PDIST_EPS
    sq_dist = sq_norm[:, None] + sq_norm[None, :] - gram * 2
    valid = sq_dist > threshold
    return ops64.where(valid, ops64.rsqrt(ops64.where(valid, sq_dist, 1)), 0)


def _angle_chunks(n: int | None) -> list[tuple[int, int | None]]:
    """Anchor ranges ``start:stop``; one range of every anchor when ``n`` is unknown."""
    if n is None:
        return [(0, None)]
    step = max(1, min(n, _ANGLE_CHUNK_ENTRIES // max(n * n, 1)))
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def _cosines(gram: Tensor, inv: Tensor, start: int, stop: int | None) -> tuple[Tensor, Tensor]:
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
    for kernel in _native_kernels:
        if n is not None and (got := kernel(gram_s, gram_t)) is not None:
            return got
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
        slope = ops64.clip(diff, -1, 1)  # smooth-L1'
        # smooth_l1(x) = slope * (x - slope / 2) (ops.vdot runs float64 in float32)
        total = total + ops.sum(slope * (diff - slope * 0.5))
        inv_rows = inv_s[start:stop]
        # d loss / d inner[a, j, k] = slope * inv[a, j] * inv[a, k]
        d_inner = slope * scale_s
        grad_inner = grad_inner + ops.sum(d_inner, axis=0)
        d_inner_rows = ops.sum(d_inner, axis=2)
        # d loss / d sq_dist[a, j] = -1/2 inv^2 * 2 sum_k slope * cos
        d_sq_dist = -(ops64.square(inv_rows) * ops.sum(slope * cos_s, axis=2))
        grad_rows.append(-2 * (d_inner_rows + d_sq_dist))
        grad_diag.append(ops.sum(d_inner_rows, axis=1) + ops.sum(d_sq_dist, axis=1))
        grad_col_diag = grad_col_diag + ops.sum(d_sq_dist, axis=0)
    grad = grad_inner + ops.concatenate(grad_rows, axis=0)
    grad = grad + ops.diag(ops.concatenate(grad_diag, axis=0) + grad_col_diag)
    if n is None:  # unknown (traced) batch size; 0 rows give 0, not 0 / 0
        count = ops.cast(ops64.maximum(ops.shape(gram_s)[0], 1), gram_s.dtype)
        scale = 1 / (count * count * count)
    else:
        scale = 1 / float(max(n, 1)) ** 3
    return total * scale, grad * scale


def _angle_loss_of_gram_with_grad(gram_s: Tensor, gram_t: Tensor) -> Any:
    """The angle loss with its analytic gradient attached (``keras.ops.custom_gradient``).

    The gradient computed in the forward pass serves first-order
    backpropagation. Torch differentiates a backward pass only when it
    records one (``create_graph=True``, grad mode on inside ``backward``):
    the gradient is then recomputed from the saved Gram matrix, so that its
    own derivative (the Hessian) is exact. JAX and TensorFlow differentiate
    the forward pass's gradient directly.
    """
    loss, grad = _angle_loss_and_gram_grad(gram_s, gram_t)

    def grad_fn(*args: Any, upstream: Tensor | None = None) -> tuple[Tensor, Tensor]:
        gram_grad = grad
        if upstream is None:  # JAX, TensorFlow: grad_fn(upstream)
            (upstream,) = args
        elif _torch_records_backward():  # torch: grad_fn(*saved_inputs, upstream=...)
            gram_grad = _angle_loss_and_gram_grad(args[0], args[1])[1]
        return gram_grad * upstream, ops.zeros_like(gram_t)

    return loss, grad_fn


def _torch_records_backward() -> bool:
    import torch

    return torch.is_grad_enabled()


def _angle_loss_without_grad(gram_s: Tensor, gram_t: Tensor) -> Tensor:
    return _angle_loss_and_gram_grad(gram_s, gram_t)[0]


# The numpy backend has no gradients (and warns on ``custom_gradient``).
_angle_loss_of_gram = (
    _angle_loss_without_grad
    if keras.backend.backend() == "numpy"
    else keras.ops.custom_gradient(_angle_loss_of_gram_with_grad)
)
