"""Input checks and small numeric helpers shared by the loss families.

Every loss of :mod:`ckd_core.functional` runs its inputs through
:func:`_prepare` (types, ranks, shapes, dtypes, the compute dtype), its
``sample_weight`` through :func:`_weights`, its index arguments through
:func:`_indices` and its hyperparameters through :func:`check_number`.

What is checked where (docs/behaviour.md states the rules):

* Types, dtypes, ranks and static sizes are checked on every call, traced or
  not: they are known while tracing.
* Values (finite and non-negative weights, indices in range) are checked
  only where they can be read on the host without a device sync and without
  tracing (:func:`_host_values`): NumPy inputs, and CPU tensors outside
  ``jax.jit``, ``tf.function``, ``torch.compile`` and ``torch.func``
  transforms. Elsewhere (traced code, GPU tensors) a bad value turns the
  loss into NaN instead: a negative or non-finite weight becomes NaN, an
  out-of-range index is clipped and adds NaN to the loss. No check ever
  reads a traced value back to the host.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import keras
import numpy as np
from keras import ops

from ckd_core import _private_api

Tensor = Any
# Registers a Keras-serializable class of this package (one registry name).
register_serializable = keras.saving.register_keras_serializable(package="ckd_core")
# Sums a tensor over the data-parallel replicas (e.g. an autograd-aware
# ``torch.distributed`` all-reduce, a ``tf.distribute`` replica-context
# all-reduce or ``jax.lax.psum``); see ``comparative_loss``.
AllReduce = Callable[[Tensor], Tensor]
# Concatenates every replica's rows along axis 0, in replica order (e.g.
# ``ckd_torch.distributed.gather_rows``, ``ckd_tensorflow.replica_gather`` or
# ``jax.lax.all_gather(x, axis_name, tiled=True)``); see ``rkd_distance_loss``.
AllGather = Callable[[Tensor], Tensor]
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_HALF_DTYPES = ("float16", "bfloat16")
NP_FLOAT = {"float32": np.float32, "float64": np.float64}
_BACKEND = keras.backend.backend()


def _elementwise_ops() -> SimpleNamespace:
    """``keras.ops`` element-wise functions that keep float64 on every backend.

    Keras' type promotion maps float64 to float32 on the numpy backend (for
    all of these) and in torch's ``cumsum``: there the NumPy or torch
    function itself is used.
    """
    names = ("where", "square", "sqrt", "rsqrt", "exp", "clip", "cumsum", "maximum")
    functions = {name: getattr(ops, name) for name in names}
    if _BACKEND == "numpy":
        functions = {name: getattr(np, name) for name in names if name != "rsqrt"}
        functions["rsqrt"] = lambda x: 1 / np.sqrt(x)
    elif _BACKEND == "torch":
        import torch

        functions["cumsum"] = lambda x: torch.cumsum(x, dim=0)
    return SimpleNamespace(**functions)


ops64 = _elementwise_ops()
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


def _shape(x: Tensor) -> tuple[int | None, ...]:
    return tuple(x.shape)


def _as_tensor(x: Tensor, role: str) -> Tensor:
    """``x`` as a backend tensor (backend tensors are used as they are)."""
    if ops.is_tensor(x):
        return x
    if x is None or isinstance(x, str | bytes | dict):
        raise TypeError(f"{role} must be a (batch, dim) float tensor or array, got {x!r}.")
    try:
        return ops.convert_to_tensor(x)
    except Exception as err:  # each backend raises its own type
        raise TypeError(
            f"{role} must be a (batch, dim) float tensor or array, got {type(x).__name__} ({err})."
        ) from err


def _float_dtype(x: Tensor, role: str) -> str:
    dtype = _dtype_name(x)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{role} must have a floating dtype ({', '.join(_FLOAT_DTYPES)}), got {dtype}."
        )
    return dtype


def _prepare(y_true: Tensor, y_pred: Tensor, *, min_batch: int = 0) -> tuple[Tensor, Tensor, str]:
    """Validates a ``(batch, dim)`` pair and casts both to the compute dtype.

    Returns ``(y_true, y_pred, out_dtype)``: ``out_dtype`` is ``y_pred``'s
    dtype; the returned tensors are float32 when that dtype is a half type.
    ``min_batch``: the smallest static batch size the loss accepts (1 for
    the per-sample means KD and DIST, 0 for the pairwise losses).
    """
    # Backend tensors are used as they are (no device move on torch: the
    # result stays on the inputs' device); ``ops.convert_to_tensor`` costs
    # more than a small loss itself, so only other inputs go through it.
    if not ops.is_tensor(y_pred):
        y_pred = _as_tensor(y_pred, "y_pred")
    if not ops.is_tensor(y_true):
        y_true = _as_tensor(y_true, "y_true")
    out_dtype = _float_dtype(y_pred, "y_pred")
    _float_dtype(y_true, "y_true")
    true_shape, pred_shape = _shape(y_true), _shape(y_pred)
    if len(pred_shape) != 2 or len(true_shape) != 2:
        raise ValueError(
            "y_true and y_pred must have rank 2 (batch, dim), got shapes "
            f"y_true={true_shape} and y_pred={pred_shape}."
        )
    for a, b in zip(true_shape, pred_shape, strict=True):
        if a is not None and b is not None and a != b:
            raise ValueError(
                "y_true and y_pred must have the same shape, got "
                f"y_true={true_shape} and y_pred={pred_shape}."
            )
    if 0 in (true_shape[1], pred_shape[1]):
        raise ValueError(
            "y_true and y_pred need at least one feature (dim >= 1), got shapes "
            f"y_true={true_shape} and y_pred={pred_shape}."
        )
    n = pred_shape[0] if pred_shape[0] is not None else true_shape[0]
    if n is not None and n < min_batch:
        raise ValueError(
            f"this loss averages over the batch and needs batch >= {min_batch}, got shapes "
            f"y_true={true_shape} and y_pred={pred_shape}."
        )
    compute = "float32" if out_dtype in _HALF_DTYPES else out_dtype
    return _cast(y_true, compute), _cast(y_pred, compute), out_dtype


def _cast(x: Tensor, dtype: str) -> Tensor:
    if _dtype_name(x) == dtype:
        return x
    return ops.cast(x, dtype)


def _size(x: Tensor, axis: int) -> Any:
    """``x.shape[axis]``: a Python int when static, else a tensor in ``x``'s dtype."""
    size = x.shape[axis]
    if size is None:
        return ops.cast(ops.shape(x)[axis], x.dtype)
    return int(size)


def _num_rows(x: Tensor) -> Any:
    """Batch size: a Python int when static, else a tensor in ``x``'s dtype."""
    return _size(x, 0)


def _mean(x: Tensor, axis: int | None = None, keepdims: bool = False) -> Tensor:
    """Mean as sum / count: ``ops.mean`` computes float64 in float32 on torch."""
    axes = range(len(x.shape)) if axis is None else (axis,)
    count: Any = 1
    for a in axes:
        size = x.shape[a]
        count = count * (ops.cast(ops.shape(x)[a], x.dtype) if size is None else size)
    return ops.sum(x, axis=axis, keepdims=keepdims) / count


def _nonfinite_marker(*xs: Tensor) -> Tensor:
    """0, or NaN when any entry of ``xs`` is NaN or infinite (no gradient).

    ``sum(x * 0)`` is exactly 0 for finite ``x`` (no overflow, unlike
    ``sum(x) * 0``). Added to losses whose guards (clamps, ``where``) would
    otherwise send a non-finite input to a finite branch.
    """
    marker = ops.sum(ops.stop_gradient(xs[0]) * 0)
    for x in xs[1:]:
        marker = marker + ops.sum(ops.stop_gradient(x) * 0)
    return marker


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0``, else 0, with finite gradients.

    NaN or infinite ``num``/``den`` give NaN, never 0: the fallback branch is
    ``(num + den) * 0``.
    """
    positive = den > 0
    return ops64.where(
        positive, num / ops64.where(positive, den, ops.ones_like(den)), (num + den) * 0
    )


def _peak(x: Tensor) -> Tensor:
    """``max |x|`` (1 where that is 0), without gradient: a scale for ``x``.

    Losses quadratic in ``x`` compute ``peak^2 * L(x / peak)``, which equals
    ``L(x)`` for any constant ``peak`` (so every derivative is exact) and
    neither overflows nor underflows where the result fits the dtype.
    ``ops.amax``: Keras' ``ops.max`` breaks ``torch.compile`` graphs.
    """
    peak = ops.stop_gradient(ops.amax(ops.abs(x)))
    return ops64.where(peak > 0, peak, ops.ones_like(peak))


# ---------------------------------------------------------------------------
# Host values: where value checks may run
# ---------------------------------------------------------------------------


def _host_values(x: Any) -> np.ndarray | None:
    """``x``'s values as NumPy when readable without tracing or a device sync.

    ``None`` for traced values (``jax.jit``, ``tf.function``,
    ``torch.compile``, ``torch.func`` transforms) and for tensors on an
    accelerator (reading them would wait for the device on every call).
    """
    if isinstance(x, (np.ndarray, np.generic, numbers.Number, list, tuple)):
        return np.asarray(x)
    if _BACKEND == "numpy":
        return np.asarray(x)
    if _BACKEND == "jax":
        import jax

        if isinstance(x, jax.core.Tracer):
            return None
        if not all(d.platform == "cpu" for d in x.devices()):
            return None
        return np.asarray(x)
    if _BACKEND == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly() or not hasattr(x, "numpy") or "GPU" in x.device:
            return None
        return np.asarray(x.numpy())
    if _BACKEND == "torch":
        import torch

        if not isinstance(x, torch.Tensor):
            return np.asarray(x)
        if (
            torch.compiler.is_compiling()
            or x.device.type != "cpu"
            or _private_api.torch_functorch_wrapped(x)
        ):
            return None
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()
    return None  # pragma: no cover - other backends: check nothing, propagate NaN


# ---------------------------------------------------------------------------
# sample_weight
# ---------------------------------------------------------------------------


def _weight_dtype_name(sample_weight: Tensor, values: np.ndarray | None) -> str:
    """The dtype name of ``sample_weight``; ``TypeError`` unless real (float or int)."""
    if values is None:
        dtype = _dtype_name(sample_weight)
    elif values.dtype.kind in "fiu":
        dtype = np.dtype(values.dtype).name
    else:  # strings, objects, bools: no Keras dtype name needed to refuse them
        dtype = str(values.dtype)
    if dtype not in _FLOAT_DTYPES and not dtype.startswith(("int", "uint")):
        raise TypeError(f"sample_weight must have a real (float or int) dtype, got {dtype}.")
    return dtype


def _check_weight_values(values: np.ndarray) -> None:
    finite = np.isfinite(values.astype(np.float64))
    if not np.all(finite):
        bad = np.flatnonzero(~finite.ravel())[0]
        raise ValueError(f"sample_weight must be finite, got {values.ravel()[bad]} at index {bad}.")
    if np.any(values < 0):
        bad = np.flatnonzero(values.ravel() < 0)[0]
        raise ValueError(f"sample_weight must be >= 0, got {values.ravel()[bad]} at index {bad}.")


def _weights(
    sample_weight: Tensor | None, like: Tensor, n: int | None = None, *, normalise: bool = True
) -> tuple[Tensor | None, Tensor | None]:
    """Validates ``sample_weight``: ``(per-sample vector, None)`` or ``(None, scalar)``.

    A scalar scales the loss (Keras' rule); a 1-D weight must have the batch
    length ``n`` and is returned divided by its largest entry (the losses
    are invariant to a common factor, which then can neither underflow nor
    overflow). Weights must be finite and >= 0: checked where the values
    are on the host (:func:`_host_values`), else bad entries become NaN.
    Returned in ``like``'s dtype. ``normalise=False`` keeps the 1-D weights as
    given: a data-parallel loss must scale every replica's shard alike, which a
    local peak does not.
    """
    if sample_weight is None:
        return None, None
    if isinstance(sample_weight, bool) or (
        not ops.is_tensor(sample_weight)
        and not isinstance(sample_weight, (np.ndarray, np.generic, numbers.Real, list, tuple))
    ):
        raise TypeError(
            "sample_weight must be None, a number or a 1-D (batch,) array of real weights, "
            f"got {type(sample_weight).__name__}."
        )
    values = _host_values(sample_weight)
    _weight_dtype_name(sample_weight, values)
    shape = _shape(sample_weight) if values is None else values.shape
    if len(shape) > 1:
        raise ValueError(
            "sample_weight must be a scalar or 1-D with one weight per row (batch,), got "
            f"shape {shape} for y_pred of shape {_shape(like)}."
        )
    if len(shape) == 1 and shape[0] is not None and n is not None and shape[0] != n:
        raise ValueError(
            f"sample_weight must have one weight per row: shape ({n},) for y_pred of shape "
            f"{_shape(like)}, got shape {shape}."
        )
    dtype = _dtype_name(like)
    if values is not None:
        _check_weight_values(values)
        if ops.is_tensor(sample_weight):
            w = _cast(sample_weight, dtype)
        else:  # NumPy casts int64 exactly (JAX without x64 would wrap it to int32)
            w = ops.convert_to_tensor(values.astype(NP_FLOAT[dtype]), dtype=dtype)
    else:
        w = _cast(sample_weight, dtype)
        # Traced or on a device: a negative or non-finite weight makes the
        # loss NaN (never a finite number, never a host sync).
        valid = ops.logical_and(w >= 0, ops.isfinite(w))
        w = ops64.where(valid, w, ops.cast(float("nan"), dtype))
    if len(shape) == 0:
        return None, w
    return (w / _peak(w) if normalise else w), None


def _scale(loss: Tensor, scale: Tensor | None) -> Tensor:
    return loss if scale is None else loss * scale


# ---------------------------------------------------------------------------
# Index arguments (pairs, groups)
# ---------------------------------------------------------------------------


def _index_pair(arg: Any, name: str) -> tuple[Any, Any]:
    if isinstance(arg, str | bytes) or arg is None:
        raise TypeError(f"{name} must be a pair (a, b) of integer index arrays, got {arg!r}.")
    try:
        count = len(arg)
    except TypeError as err:
        raise TypeError(
            f"{name} must be a pair (a, b) of integer index arrays, got {type(arg).__name__}."
        ) from err
    if count != 2:
        raise ValueError(f"{name} must be a pair (a, b) of index arrays, got {count} items.")
    return arg[0], arg[1]


def _index_values(index: Any, role: str) -> np.ndarray | None:
    """:func:`_host_values` of an index argument; ragged nested lists name ``role``."""
    try:
        return _host_values(index)
    except ValueError as err:  # NumPy refuses ragged nested sequences
        raise ValueError(
            f"{role} must be a rectangular integer index array (every group the same "
            f"size), got a ragged sequence ({err})."
        ) from err


def _indices(index: Any, role: str, rank: int, e: Tensor) -> tuple[Tensor, Tensor | None]:
    """Validates one index array of ``pairs`` (rank 1) or ``groups`` (rank 2).

    Returns the int32 index tensor and ``None``, or, where the values cannot
    be read on the host, the indices clipped into range and a NaN marker
    (NaN when any index was out of range, else 0) to add to the loss. The
    range is checked in the index's own dtype, before the int32 cast (which
    would wrap 2**32 to 0).
    """
    values = _index_values(index, role)
    if values is not None:
        shape: tuple[int | None, ...] = values.shape
        dtype = np.dtype(values.dtype).name
    else:
        shape = _shape(index)
        dtype = _dtype_name(index)
    kind = "a 1-D (m,) index vector" if rank == 1 else "a 2-D (m, k) index matrix"
    if len(shape) != rank:
        raise ValueError(f"{role} must be {kind}, got shape {tuple(shape)}.")
    if 0 in shape:
        raise ValueError(f"{role} must not be empty, got shape {tuple(shape)}.")
    if not dtype.startswith(("int", "uint")):
        raise TypeError(f"{role} must have an integer dtype (int32, int64, ...), got {dtype}.")
    n = e.shape[0]
    if values is not None and n is not None:
        out = (values < 0) | (values >= n)
        if np.any(out):
            bad = values[out].ravel()[0]
            raise IndexError(
                f"{role} has index {bad} out of range for a batch of {n} rows "
                f"(allowed: 0 <= index < {n})."
            )
        source = index if ops.is_tensor(index) else values
        return ops.convert_to_tensor(source, dtype="int32"), None
    # Compared in a signed type wide enough for every value (uint64 2**64 - 1
    # becomes -1: out of range either way).
    wide = "int64" if dtype in ("int64", "uint32", "uint64") else "int32"
    idx = ops.convert_to_tensor(index if values is None else values, dtype=wide)
    rows = ops.cast(n if n is not None else ops.shape(e)[0], wide)
    valid = ops.logical_and(idx >= 0, idx < rows)
    nan = ops.cast(float("nan"), _dtype_name(e))
    marker = ops.sum(ops64.where(valid, ops.zeros((), _dtype_name(e)), nan))
    return ops.cast(ops64.where(valid, idx, ops.zeros_like(idx)), "int32"), marker


# ---------------------------------------------------------------------------
# Reduction (Keras' meaning)
# ---------------------------------------------------------------------------

MEAN = "sum_over_batch_size"
_REDUCTIONS = (MEAN, "sum", None, "none")


def check_reduction(reduction: Any, loss_name: str | None = None) -> str:
    """``reduction`` as ``"sum_over_batch_size"``, ``"sum"`` or ``"none"`` (``None``).

    Keras' meaning: the mean of the per-sample terms (the default), their
    sum, or the terms themselves. ``loss_name``: a batch-level loss (no
    per-sample terms), which accepts the default only.
    """
    if not (reduction is None or isinstance(reduction, str)) or reduction not in _REDUCTIONS:
        raise ValueError(
            "reduction must be 'sum_over_batch_size' (the mean), 'sum', None or 'none', "
            f"got {reduction!r}."
        )
    if reduction is None:
        reduction = "none"
    if loss_name is not None and reduction != MEAN:
        raise ValueError(
            f"{loss_name} is a batch-level loss (not a mean of per-sample terms): it supports "
            f"only reduction='sum_over_batch_size', got {reduction!r}."
        )
    return reduction


def _reduce(terms: Tensor, reduction: str) -> Tensor:
    """The mean (default), sum or vector of per-sample ``terms``."""
    if reduction == "none":
        return terms
    if reduction == "sum":
        return ops.sum(terms)
    return _mean(terms)


# ---------------------------------------------------------------------------
# Hyperparameters
# ---------------------------------------------------------------------------


def check_number(value: Any, name: str, *, positive: bool = False) -> float:
    """``value`` as a plain Python float, finite and > 0 (``positive``) or >= 0.

    Raises ``TypeError`` for non-numbers (bool included) and ``ValueError``
    for NaN, infinities and out-of-range values, naming the argument.
    """
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, numbers.Real | np.ndarray | np.generic
    ):
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a real number, got {value!r}.") from err
    bound = "> 0" if positive else ">= 0"
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}.")
    return number


def check_int(value: Any, name: str, *, minimum: int) -> int:
    """``value`` as a Python int ``>= minimum`` (``TypeError`` for bools and floats)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)
