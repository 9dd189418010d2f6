"""``keras.losses.Loss`` classes over :mod:`ckd_core.functional`.

Each class is a thin, serializable wrapper: the maths lives in the function.
These losses reduce over the batch themselves (a pair involves two samples),
so ``sample_weight`` is passed to the function, not applied afterwards, and
the result keeps the input dtype unless ``dtype`` is given. ``reduction``
has Keras' meaning where the loss is a mean of per-sample terms (KD, CKD,
RKD_d: ``"sum_over_batch_size"``, ``"sum"``, ``None``/``"none"``); the
batch-level RKD and DIST accept only the default. Copies (``copy``,
``pickle``) keep ``all_reduce``/``all_gather``.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

from ckd_core import functional
from ckd_core._checks import (
    MEAN,
    AllGather,
    Tensor,
    _as_tensor,
    check_int,
    check_number,
    check_reduction,
    register_serializable,
)
from ckd_core.comparative import check_projection_kind

_TENSORFLOW = keras.backend.backend() == "tensorflow"


def _scale_for_replicas(value: Any) -> Any:
    """Divides by ``num_replicas_in_sync`` under a ``tf.distribute`` strategy.

    What Keras' own losses do (its private ``scale_loss_for_distribution``),
    with public TensorFlow API; identity on the other backends.
    """
    if not _TENSORFLOW:
        return value
    import tensorflow as tf

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        value = value * ops.cast(1.0 / replicas, value.dtype)
    return value


__all__ = ["ComparativeLoss", "DISTLoss", "KDLoss", "ProjectedRKDLoss", "RKDLoss"]

_COLLECTIVES = ("all_reduce", "all_gather")


def _rebuild(cls: type, config: dict[str, Any], collectives: dict[str, Any]) -> Any:
    """A loss from its config and the collectives that ``get_config`` leaves out."""
    return cls(**config, **collectives)


def _constant_while_tracing(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run by ``torch.compile`` while tracing, its result a graph constant.

    For values drawn with NumPy (no NumPy call in the compiled graph, no
    graph break); other backends trace or call ``fn`` as usual.
    """
    if keras.backend.backend() != "torch":
        return fn
    import torch

    return torch.compiler.assume_constant_result(fn)


class _BatchLoss(keras.losses.Loss):
    """Base class: ``call`` returns the batch loss, weighted by the function.

    Like Keras' own mean-reduced losses, the result is divided by the number
    of replicas in sync under a ``tf.distribute`` strategy (TensorFlow
    backend; a no-op otherwise): ``model.fit`` and custom loops then sum the
    replicas' gradients, and ``model.fit`` reports the unscaled value.
    """

    def __init__(
        self, name: str | None = None, dtype: Any = None, reduction: str | None = MEAN
    ) -> None:
        check_reduction(reduction, None if self._decomposes else type(self).__name__)
        super().__init__(name=name, reduction="sum", dtype=dtype)
        self.reduction = reduction
        self._cast_inputs = dtype is not None

    # Whether the loss is a mean of per-sample terms (``reduction`` then has
    # Keras' meaning; batch-level losses accept only its default).
    _decomposes = True

    def _collectives(self) -> dict[str, Any]:
        return {
            name: getattr(self, name)
            for name in _COLLECTIVES
            if getattr(self, name, None) is not None
        }

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        """A copy with the same configuration and the same collectives (not copies)."""
        return _rebuild(type(self), self.get_config(), self._collectives())

    def __reduce__(self) -> Any:
        """Pickles the config and the collectives, which must pickle themselves.

        Keras' own ``__reduce__`` would drop ``all_reduce``/``all_gather`` and
        turn a global-batch loss into a local one; a collective that cannot
        be pickled (a lambda, a local function) refuses instead.
        """
        collectives = self._collectives()
        for name, fn in collectives.items():
            try:
                pickle.dumps(fn)
            except Exception as err:
                raise TypeError(
                    f"cannot pickle {type(self).__name__} with {name}={fn!r}: the function does "
                    "not pickle (define it at module level, or pickle the loss without it and "
                    f"pass {name} again after loading)."
                ) from err
        return (_rebuild, (type(self), self.get_config(), collectives))

    def __call__(
        self, y_true: Tensor, y_pred: Tensor, sample_weight: Tensor | None = None, **options: Any
    ) -> Tensor:
        """The batch loss; ``options`` (e.g. ``pairs=``) go to :meth:`call`."""
        with keras.name_scope(self.name):
            if self._cast_inputs:
                y_true = ops.convert_to_tensor(y_true, dtype=self.dtype)
                y_pred = ops.convert_to_tensor(y_pred, dtype=self.dtype)
            return _scale_for_replicas(self.call(y_true, y_pred, sample_weight, **options))

    def call(self, y_true: Tensor, y_pred: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"name": self.name, "reduction": self.reduction}
        if self._cast_inputs:
            config["dtype"] = self.dtype
        return config


@register_serializable
class ComparativeLoss(_BatchLoss):
    """CKD loss over all in-batch pairs; see :func:`ckd_core.functional.comparative_loss`.

    Example:
        >>> import numpy as np
        >>> teacher = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], "float32")
        >>> student = np.array([[1.0, 0.5], [0.0, 1.0], [1.0, 1.0]], "float32")
        >>> round(float(ComparativeLoss()(teacher, student)), 4)
        0.0833

    ``all_reduce`` (a function summing a tensor over data-parallel replicas)
    makes the all-pairs loss cover the global batch of all replicas; it is
    not serialized by ``get_config`` (pass it again after loading).
    """

    def __init__(
        self,
        name: str = "comparative_loss",
        dtype: Any = None,
        *,
        reduction: str | None = MEAN,
        all_reduce: functional.AllReduce | None = None,
    ) -> None:
        super().__init__(name=name, dtype=dtype, reduction=reduction)
        self.all_reduce = all_reduce

    def __call__(  # type: ignore[override]
        self,
        y_true: Tensor,
        y_pred: Tensor,
        sample_weight: Tensor | None = None,
        *,
        pairs: Any = "all",
        groups: Any = None,
    ) -> Tensor:
        if isinstance(pairs, str) and pairs == "all" and groups is None:
            # The plain Keras ``call`` signature, for subclasses that override it.
            return super().__call__(y_true, y_pred, sample_weight)
        return super().__call__(y_true, y_pred, sample_weight, pairs=pairs, groups=groups)

    def call(  # type: ignore[override]
        self,
        y_true: Tensor,
        y_pred: Tensor,
        sample_weight: Tensor | None = None,
        *,
        pairs: Any = "all",
        groups: Any = None,
    ) -> Tensor:
        return functional.comparative_loss(
            y_true,
            y_pred,
            sample_weight,
            pairs=pairs,
            groups=groups,
            all_reduce=self.all_reduce,
            reduction=self.reduction,
        )


@register_serializable
class RKDLoss(_BatchLoss):
    """Relational KD (Park et al. 2019): ``distance_weight * distance + angle_weight * angle``.

    A batch-level loss: ``reduction`` accepts only ``"sum_over_batch_size"``.

    See :func:`ckd_core.functional.rkd_distance_loss` and
    :func:`ckd_core.functional.rkd_angle_loss`. Both weights are finite and
    >= 0; a zero weight skips its term.

    ``all_gather`` (a function concatenating every data-parallel replica's
    rows along axis 0, e.g. ``ckd_tensorflow.replica_gather`` or
    ``jax.lax.all_gather(x, axis, tiled=True)``) evaluates RKD on the global
    batch of all replicas, gathered once per call; it is not serialized by
    ``get_config`` (pass it again after loading).
    """

    _decomposes = False

    def __init__(
        self,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        name: str = "rkd_loss",
        dtype: Any = None,
        *,
        reduction: str | None = MEAN,
        all_gather: AllGather | None = None,
    ) -> None:
        super().__init__(name=name, dtype=dtype, reduction=reduction)
        self.distance_weight = check_number(distance_weight, "distance_weight")
        self.angle_weight = check_number(angle_weight, "angle_weight")
        self.all_gather = all_gather

    def call(self, y_true: Tensor, y_pred: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        _reject_sample_weight(self, sample_weight)
        return functional.rkd_loss(
            y_true,
            y_pred,
            distance_weight=self.distance_weight,
            angle_weight=self.angle_weight,
            all_gather=self.all_gather,
        )

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "distance_weight": self.distance_weight,
            "angle_weight": self.angle_weight,
        }


@register_serializable
class ProjectedRKDLoss(_BatchLoss):
    """RKD_d: CKD after a fixed projection to ``out_dim`` dimensions.

    The ``(dim, out_dim)`` matrix is drawn from ``seed`` on first use (see
    :func:`ckd_core.functional.make_projection`); ``out_dim=None`` with
    ``projection="identity"`` keeps all dimensions and equals
    :class:`ComparativeLoss`. ``all_reduce`` extends the pairs to the
    global data-parallel batch, as in :class:`ComparativeLoss`.
    """

    def __init__(
        self,
        out_dim: int | None = 10,
        projection: str = "gaussian",
        seed: int = 0,
        name: str = "projected_rkd_loss",
        dtype: Any = None,
        *,
        reduction: str | None = MEAN,
        all_reduce: functional.AllReduce | None = None,
    ) -> None:
        super().__init__(name=name, dtype=dtype, reduction=reduction)
        self.all_reduce = all_reduce
        self.out_dim = None if out_dim is None else check_int(out_dim, "out_dim", minimum=1)
        check_projection_kind(projection)
        if out_dim is None and projection != "identity":
            raise ValueError(
                f"out_dim=None (keep every dimension) needs projection='identity', got "
                f"{projection!r}."
            )
        self.projection = projection
        self.seed = check_int(seed, "seed", minimum=0)
        self._matrices: dict[int, np.ndarray] = {}

    def matrix(self, dim: int) -> np.ndarray:
        """The projection used for inputs with ``dim`` columns."""
        if dim not in self._matrices:
            out_dim = dim if self.out_dim is None else self.out_dim
            self._matrices[dim] = functional.make_projection(
                dim, out_dim, self.projection, self.seed
            )
        return self._matrices[dim]

    def call(self, y_true: Tensor, y_pred: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        if not ops.is_tensor(y_pred):
            y_pred = _as_tensor(y_pred, "y_pred")
        shape = tuple(y_pred.shape)
        if len(shape) != 2 or shape[1] is None or shape[1] == 0:
            # Raises the shared rank/shape/dtype errors first.
            functional.projected_rkd_loss(y_true, y_pred, np.ones((1, 1)))
            raise ValueError(
                "ProjectedRKDLoss needs a static feature dimension to draw its (dim, out_dim) "
                f"projection, got y_pred of shape {shape}."
            )
        dtype = keras.backend.standardize_dtype(y_pred.dtype)
        projection = _projection_tensor(self, int(shape[1]), dtype)
        return functional.projected_rkd_loss(
            y_true,
            y_pred,
            projection,
            sample_weight,
            all_reduce=self.all_reduce,
            reduction=self.reduction,
        )

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "out_dim": self.out_dim,
            "projection": self.projection,
            "seed": self.seed,
        }


@_constant_while_tracing
def _projection_tensor(loss: ProjectedRKDLoss, dim: int, dtype: str) -> Tensor:
    """``loss.matrix(dim)`` as a backend tensor (drawn with NumPy, outside compiled graphs)."""
    return ops.convert_to_tensor(loss.matrix(dim), dtype=dtype)


@register_serializable
class KDLoss(_BatchLoss):
    """Hinton KD on logits; see :func:`ckd_core.functional.kd_loss`."""

    def __init__(
        self,
        temperature: float = 4.0,
        name: str = "kd_loss",
        dtype: Any = None,
        *,
        reduction: str | None = MEAN,
    ) -> None:
        super().__init__(name=name, dtype=dtype, reduction=reduction)
        # Plain Python numbers: configs then serialize on every backend.
        self.temperature = check_number(temperature, "temperature", positive=True)

    def call(self, y_true: Tensor, y_pred: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        return functional.kd_loss(
            y_true, y_pred, sample_weight, temperature=self.temperature, reduction=self.reduction
        )

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "temperature": self.temperature}


@register_serializable
class DISTLoss(_BatchLoss):
    """DIST (Huang et al. 2022); see :func:`ckd_core.functional.dist_loss`.

    A batch-level loss: ``reduction`` accepts only ``"sum_over_batch_size"``.
    """

    _decomposes = False

    def __init__(
        self,
        beta: float = 1.0,
        gamma: float = 1.0,
        tau: float = 4.0,
        name: str = "dist_loss",
        dtype: Any = None,
        *,
        reduction: str | None = MEAN,
    ) -> None:
        super().__init__(name=name, dtype=dtype, reduction=reduction)
        self.beta = check_number(beta, "beta")
        self.gamma = check_number(gamma, "gamma")
        self.tau = check_number(tau, "tau", positive=True)

    def call(self, y_true: Tensor, y_pred: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        _reject_sample_weight(self, sample_weight)
        return functional.dist_loss(y_true, y_pred, beta=self.beta, gamma=self.gamma, tau=self.tau)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "beta": self.beta, "gamma": self.gamma, "tau": self.tau}


def _reject_sample_weight(loss: keras.losses.Loss, sample_weight: Tensor | None) -> None:
    if sample_weight is not None:
        raise ValueError(
            f"{type(loss).__name__} does not support sample_weight (its terms compare every "
            "pair or row with the others); got a sample_weight."
        )
