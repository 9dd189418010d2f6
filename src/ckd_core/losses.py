"""``keras.losses.Loss`` classes over :mod:`ckd_core.functional`.

Each class is a thin, serializable wrapper: the maths lives in the function.
These losses reduce over the batch themselves (a pair involves two samples),
so ``sample_weight`` is passed to the function, not applied afterwards, and
the result keeps the input dtype unless ``dtype`` is given.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from ckd_core import functional

try:  # Keras' per-replica loss scaling under tf.distribute (identity elsewhere)
    from keras.src.losses.loss import scale_loss_for_distribution as _scale_for_replicas
except ImportError:  # pragma: no cover - older/newer Keras without it

    def _scale_for_replicas(value: Any) -> Any:
        return value


__all__ = ["ComparativeLoss", "DISTLoss", "KDLoss", "ProjectedRKDLoss", "RKDLoss"]

Tensor = Any
_register = keras.saving.register_keras_serializable(package="ckd_core")


class _BatchLoss(keras.losses.Loss):
    """Base class: ``call`` returns the batch loss, weighted by the function.

    Like Keras' own mean-reduced losses, the result is divided by the number
    of replicas in sync under a ``tf.distribute`` strategy (TensorFlow
    backend; a no-op otherwise): ``model.fit`` and custom loops then sum the
    replicas' gradients, and ``model.fit`` reports the unscaled value.
    """

    def __init__(self, name: str | None = None, dtype: Any = None) -> None:
        super().__init__(name=name, reduction="sum", dtype=dtype)
        self._cast_inputs = dtype is not None

    def __call__(
        self, y_true: Tensor, y_pred: Tensor, sample_weight: Tensor | None = None
    ) -> Tensor:
        with keras.name_scope(self.name):
            if self._cast_inputs:
                y_true = ops.convert_to_tensor(y_true, dtype=self.dtype)
                y_pred = ops.convert_to_tensor(y_pred, dtype=self.dtype)
            return _scale_for_replicas(self.call(y_true, y_pred, sample_weight))

    def call(self, y_true: Tensor, y_pred: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"name": self.name}
        if self._cast_inputs:
            config["dtype"] = self.dtype
        return config


@_register
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
        all_reduce: functional.AllReduce | None = None,
    ) -> None:
        super().__init__(name=name, dtype=dtype)
        self.all_reduce = all_reduce

    def __call__(
        self,
        y_true: Tensor,
        y_pred: Tensor,
        sample_weight: Tensor | None = None,
        *,
        pairs: Any = "all",
        groups: Any = None,
    ) -> Tensor:
        if isinstance(pairs, str) and groups is None:
            return super().__call__(y_true, y_pred, sample_weight)
        return _scale_for_replicas(
            functional.comparative_loss(
                y_true,
                y_pred,
                sample_weight,
                pairs=pairs,
                groups=groups,
                all_reduce=self.all_reduce,
            )
        )

    def call(self, y_true: Tensor, y_pred: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        return functional.comparative_loss(
            y_true, y_pred, sample_weight, all_reduce=self.all_reduce
        )


@_register
class RKDLoss(_BatchLoss):
    """Relational KD (Park et al. 2019): ``distance_weight * distance + angle_weight * angle``.

    See :func:`ckd_core.functional.rkd_distance_loss` and
    :func:`ckd_core.functional.rkd_angle_loss`.
    """

    def __init__(
        self,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        name: str = "rkd_loss",
        dtype: Any = None,
    ) -> None:
        super().__init__(name=name, dtype=dtype)
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    def call(self, y_true: Tensor, y_pred: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        _reject_sample_weight(self, sample_weight)
        loss = functional.rkd_distance_loss(y_true, y_pred) * self.distance_weight
        if self.angle_weight:
            loss = loss + functional.rkd_angle_loss(y_true, y_pred) * self.angle_weight
        return loss

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "distance_weight": self.distance_weight,
            "angle_weight": self.angle_weight,
        }


@_register
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
        all_reduce: functional.AllReduce | None = None,
    ) -> None:
        super().__init__(name=name, dtype=dtype)
        self.all_reduce = all_reduce
        self.out_dim = out_dim
        self.projection = projection
        self.seed = seed
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
        dim = y_pred.shape[-1]
        if dim is None:
            raise ValueError("ProjectedRKDLoss needs a static feature dimension.")
        return functional.projected_rkd_loss(
            y_true, y_pred, self.matrix(dim), sample_weight, all_reduce=self.all_reduce
        )

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "out_dim": self.out_dim,
            "projection": self.projection,
            "seed": self.seed,
        }


@_register
class KDLoss(_BatchLoss):
    """Hinton KD on logits; see :func:`ckd_core.functional.kd_loss`."""

    def __init__(self, temperature: float = 4.0, name: str = "kd_loss", dtype: Any = None) -> None:
        super().__init__(name=name, dtype=dtype)
        self.temperature = temperature

    def call(self, y_true: Tensor, y_pred: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        return functional.kd_loss(y_true, y_pred, sample_weight, temperature=self.temperature)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "temperature": self.temperature}


@_register
class DISTLoss(_BatchLoss):
    """DIST (Huang et al. 2022); see :func:`ckd_core.functional.dist_loss`."""

    def __init__(
        self,
        beta: float = 1.0,
        gamma: float = 1.0,
        tau: float = 4.0,
        name: str = "dist_loss",
        dtype: Any = None,
    ) -> None:
        super().__init__(name=name, dtype=dtype)
        self.beta = beta
        self.gamma = gamma
        self.tau = tau

    def call(self, y_true: Tensor, y_pred: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        _reject_sample_weight(self, sample_weight)
        return functional.dist_loss(y_true, y_pred, beta=self.beta, gamma=self.gamma, tau=self.tau)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "beta": self.beta, "gamma": self.gamma, "tau": self.tau}


def _reject_sample_weight(loss: keras.losses.Loss, sample_weight: Tensor | None) -> None:
    if sample_weight is not None:
        raise ValueError(f"{type(loss).__name__} does not support sample_weight.")
