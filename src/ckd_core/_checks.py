"""Input checks and small numeric helpers shared by the loss families.

Every loss of :mod:`ckd_core.functional` runs its inputs through
:func:`prepare` (shapes, ranks, dtypes, the compute dtype).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import ops

Tensor = Any
# Sums a tensor over the data-parallel replicas (e.g. an autograd-aware
# ``torch.distributed`` all-reduce, a ``tf.distribute`` replica-context
# all-reduce or ``jax.lax.psum``); see ``comparative_loss``.
AllReduce = Callable[[Tensor], Tensor]
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_HALF_DTYPES = ("float16", "bfloat16")

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
