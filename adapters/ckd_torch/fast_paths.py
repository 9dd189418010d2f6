"""Torch-native fast paths of the hot cases, with the core's formula and guarantees.

At training sizes a loss call through Keras' torch backend costs more in op
dispatch and checks than in arithmetic. The all-pairs CKD loss without
options, and the first-order pass of RKD's angle term (registered with the
core as its native kernel), are written here in plain torch ops: the same centred form as
:func:`ckd_core.functional.comparative_loss` (exact derivatives of every
order, the mean included), with its overflow safety kept by a check on the
result instead of a rescaling pass. Every case outside the fast path (other
dtypes, devices, tracing, options, bad inputs) returns ``None`` and runs
through the core, which also raises its errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ckd_core import _rkd_angle
from ckd_core._private_api import torch_functorch_wrapped
from ckd_core._rkd_angle import _DUPLICATE_ULPS, _PDIST_EPS, _angle_chunks


def _autocast_check() -> Callable[[str], bool]:
    """``torch.is_autocast_enabled(device_type)``; always True on torch < 2.4 (no device arg)."""
    try:
        torch.is_autocast_enabled("cpu")
    except TypeError:  # pragma: no cover - torch < 2.4: always leave autocast
        return lambda device_type: True
    return torch.is_autocast_enabled


autocast_enabled = _autocast_check()


_FAST_DTYPES = (torch.float32, torch.float64)
#: float dtype -> (smallest, largest) sum of squares read without rescaling.
_EXACT_RANGE = {
    dtype: (torch.finfo(dtype).tiny / torch.finfo(dtype).eps, torch.finfo(dtype).max)
    for dtype in _FAST_DTYPES
}


def _eligible(student: torch.Tensor, teacher: torch.Tensor) -> bool:
    """Eager CPU float32/float64 batches of equal shape, >= 2 rows, outside autocast.

    Reading the sum of squares back (``.item()``) is free there; traced code
    (``torch.compile``, ``torch.func``) and accelerators keep the core's
    branch-free rescaling.
    """
    return (
        student.dtype in _FAST_DTYPES
        and teacher.dtype == student.dtype
        and student.device.type == "cpu"
        and teacher.device.type == "cpu"
        and student.ndim == 2
        and student.shape == teacher.shape
        and student.shape[0] >= 2
        and student.shape[1] >= 1
        and not autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch_functorch_wrapped(student)
        and not torch_functorch_wrapped(teacher)
    )


class _CentredSquares(torch.autograd.Function):
    r"""``sum_i ||e_i - mean(e)||^2`` of ``e = student - teacher``, gradient ``2 (e_i - mean)``.

    One node instead of five on the tape, and a one-multiply backward. When
    the backward is itself recorded (``create_graph=True``) the centred rows
    are recomputed from the saved inputs with tracked ops, so every
    higher derivative (the mean's included) is exact.
    """

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        residual = student - teacher
        centred = residual - residual.mean(dim=0, keepdim=True)
        flat = centred.reshape(-1)
        ctx.save_for_backward(student, teacher, centred)
        ctx.save_for_forward(centred)
        return torch.dot(flat, flat)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        student, teacher, centred = ctx.saved_tensors
        if torch.is_grad_enabled():  # a recorded backward: differentiable in student
            residual = student - teacher
            centred = residual - residual.mean(dim=0, keepdim=True)
        return centred * (2 * grad), None

    @staticmethod
    def jvp(ctx: Any, d_student: torch.Tensor | None, d_teacher: torch.Tensor | None) -> Any:
        (centred,) = ctx.saved_tensors
        tangent = torch.zeros_like(centred) if d_student is None else d_student
        if d_teacher is not None:
            tangent = tangent - d_teacher
        # sum_i <c_i, t_i - mean(t)> = sum_i <c_i, t_i>: the centred rows sum to 0
        return 2 * torch.sum(centred * tangent)


def all_pairs_ckd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor | None:
    r"""CKD over all ordered pairs, :math:`\frac{2}{(n-1) d}\sum_i \lVert e_i - \bar e\rVert^2`.

    ``e = student - teacher`` (``teacher`` already detached). The sum of
    squares is read back once: when it is not finite (a square or the mean
    overflowed, or the input is not finite) or so small that underflowed
    squares could matter (below ``n d tiny / eps``), ``None`` hands the call
    to the core, which divides by the peak before squaring. Otherwise every
    square was exact to rounding, so the result is the core's. ``None`` also
    for inputs outside :func:`_eligible`.
    """
    if not _eligible(student, teacher):
        return None
    squares = _CentredSquares.apply(student, teacher)
    n, d = student.shape
    smallest, largest = _EXACT_RANGE[student.dtype]
    if not smallest * (n * d) <= squares.detach().item() < largest:
        return None
    return squares * (2.0 / ((n - 1) * d))


def _eager_first_order(*grams: torch.Tensor) -> bool:
    """Whether the torch kernel below may run: eager torch, nothing recorded or traced.

    Its in-place updates would break a recorded graph (the Hessian's
    recomputation), ``torch.func`` transforms and compiled graphs (which
    fuse the element-wise passes anyway): those use the core's Keras ops.
    """
    return not (
        torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or any(torch_functorch_wrapped(g) for g in grams)
    )


def torch_inverse_distances(gram: torch.Tensor) -> torch.Tensor:
    """:func:`ckd_core._rkd_angle._inverse_distances` in torch ops (values only, no gradient)."""
    sq_norm = torch.diagonal(gram)
    pair = sq_norm[:, None] + sq_norm[None, :]
    eps = torch.finfo(gram.dtype).eps
    sq_dist = pair - gram * 2
    valid = sq_dist > pair * (_DUPLICATE_ULPS * eps) + _PDIST_EPS
    return torch.where(valid, torch.where(valid, sq_dist, 1).rsqrt(), 0)


def _angle_loss_and_gram_grad(
    gram_s: torch.Tensor, gram_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The core's ``_angle_loss_and_gram_grad`` in torch ops: the same sums in fewer passes.

    Every ``(chunk, n, n)`` temporary is updated in place where the Keras
    version allocates a new one; ``smooth_l1(x) = s x - s^2 / 2`` with
    ``s = clip(x, -1, 1)`` is summed by two dot products and the row and
    anchor sums run as matrix-vector products (BLAS); no per-op dispatch cost.
    """
    n = gram_s.shape[0]
    inv_s, inv_t = torch_inverse_distances(gram_s), torch_inverse_distances(gram_t)
    h_s = torch.diagonal(gram_s)[:, None] * 0.5 - gram_s  # h[a, j] = G_aa / 2 - G_aj
    h_t = torch.diagonal(gram_t)[:, None] * 0.5 - gram_t
    ones = gram_s.new_ones(n, 1)
    total = gram_s.new_zeros(())
    grad_inner = torch.zeros_like(gram_s)
    grad_col_diag = gram_s.new_zeros(n)
    grad_rows, grad_diag = [], []
    for start, stop in _angle_chunks(n):
        inv_rows, inv_rows_t = inv_s[start:stop], inv_t[start:stop]
        count = inv_rows.shape[0]
        scale = inv_rows[:, :, None] * inv_rows[:, None, :]
        h, h_teacher = h_s[start:stop], h_t[start:stop]
        cos_s = torch.add(h[:, :, None], h[:, None, :]).add_(gram_s).mul_(scale)
        diff = torch.add(h_teacher[:, :, None], h_teacher[:, None, :]).add_(gram_t)
        diff.mul_(inv_rows_t[:, :, None] * inv_rows_t[:, None, :])  # rounded as cos_s
        torch.sub(cos_s, diff, out=diff)
        slope = diff.clamp(-1, 1)  # smooth-L1'
        flat_slope = slope.view(-1)
        total += torch.dot(flat_slope, diff.view(-1)) - 0.5 * torch.dot(flat_slope, flat_slope)
        slope_cos = torch.bmm(cos_s.mul_(slope), ones.expand(count, n, 1)).view(count, n)
        d_sq_dist = -(inv_rows * inv_rows) * slope_cos
        d_inner = slope.mul_(scale)
        grad_inner += (ones[:count].T @ d_inner.view(count, n * n)).view(n, n)
        d_inner_rows = (d_inner.view(count * n, n) @ ones).view(count, n)
        grad_rows.append(-2 * (d_inner_rows + d_sq_dist))
        grad_diag.append(d_inner_rows.sum(dim=1) + d_sq_dist.sum(dim=1))
        grad_col_diag += d_sq_dist.sum(dim=0)
    grad = grad_inner + torch.cat(grad_rows)
    grad += torch.diag(torch.cat(grad_diag) + grad_col_diag)
    scale_n = 1 / float(max(n, 1)) ** 3
    return total * scale_n, grad * scale_n


def rkd_angle_kernel(
    gram_s: torch.Tensor, gram_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The RKD angle term's ``(loss, gradient)`` in torch ops on eager, unrecorded calls;
    None elsewhere (the core's Keras ops run). Registered with the core on import."""
    if not _eager_first_order(gram_s, gram_t):
        return None
    return _angle_loss_and_gram_grad(gram_s, gram_t)


_rkd_angle.register_native_kernel(rkd_angle_kernel)
