"""Torch-native fast paths of the hot cases, with the core's formula and guarantees.

At training sizes a loss call through Keras' torch backend costs more in op
dispatch and checks than in arithmetic. The all-pairs CKD loss without
options is written here in plain torch ops: the same centred form as
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

from ckd_core._private_api import torch_functorch_wrapped


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
