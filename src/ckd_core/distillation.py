"""Keras-native distillation: ``keras.distillation`` losses and a budgeted distiller.

* :class:`ComparativeDistillation` (CKD), :class:`RelationalDistillation` (RKD),
  :class:`ProjectedRelationalDistillation` (RKD_d) and :class:`DISTDistillation`
  are ``keras.distillation.DistillationLoss`` subclasses for
  ``keras.distillation.Distiller``; ``compute_loss(teacher_outputs,
  student_outputs)`` is the matching ckd_core loss with ``y_true = teacher``,
  ``y_pred = student``.
* :class:`BudgetedDistiller` trains a student against teacher outputs cached by
  :class:`ckd_core.TeacherBudget` (see :func:`budgeted_targets`): the teacher is
  never called during training, so it sees each sample id at most once and never
  more ids than its budget (``keras.distillation.Distiller`` calls the teacher on
  every step, which the few-teacher-inference setting forbids).

Example (CKD with the label term, Wilf et al., WACV 2025)::

    budget = TeacherBudget(lambda x: teacher.predict(x, verbose=0), budget=len(x))
    targets = budgeted_targets(budget, ids, x, labels=one_hot)  # one call per id
    distiller = BudgetedDistiller(student, [ComparativeDistillation()])
    distiller.compile("adam", loss=ComparativeLoss(), metrics=["accuracy"])
    distiller.fit(x, targets, validation_data=(x_val, y_val), epochs=50)
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from keras import ops

from ckd_core._checks import Tensor, check_number
from ckd_core._checks import register_serializable as _register
from ckd_core.budget import TeacherBudget
from ckd_core.losses import ComparativeLoss, DISTLoss, ProjectedRKDLoss, RKDLoss

__all__ = [
    "BudgetedDistiller",
    "ComparativeDistillation",
    "DISTDistillation",
    "ProjectedRelationalDistillation",
    "RelationalDistillation",
    "budgeted_targets",
]


def _as_value_error(make: Any, *args: Any, **kwargs: Any) -> Any:
    """``make(...)``; a ``TypeError`` (naming the argument) becomes a ``ValueError``,
    as ``keras.distillation`` raises for every bad argument."""
    try:
        return make(*args, **kwargs)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def _layer_name(value: Any, name: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{name} must be a non-empty layer name (str) or None, got {value!r}.")
    return value


def _rows(x: Tensor) -> Tensor:
    """``(batch, ...)`` features as ``(batch, dim)``: feature maps are flattened."""
    shape = tuple(x.shape)
    if len(shape) <= 2:
        return x
    tail = shape[1:]
    if any(s is None for s in tail):
        raise ValueError(f"features of rank > 2 need static trailing dimensions, got {shape}.")
    return ops.reshape(x, (-1, math.prod(tail)))


class _LossDistillation(keras.distillation.DistillationLoss):
    """A ckd_core loss as a ``DistillationLoss``: ``sum_k loss(t_k, s_k)`` over outputs.

    Nested (multi-output) structures are summed output by output, as
    ``keras.distillation.FeatureDistillation`` does; feature maps are
    flattened to ``(batch, dim)``.
    """

    _params: tuple[str, ...] = ()
    loss: keras.losses.Loss

    def compute_loss(self, teacher_outputs: Any, student_outputs: Any, **kwargs: Any) -> Tensor:
        """The ckd_core loss, teacher outputs as ``y_true``, student outputs as ``y_pred``."""
        pairs = zip(
            keras.tree.flatten(teacher_outputs), keras.tree.flatten(student_outputs), strict=True
        )  # the structures are checked by validate_outputs
        losses = [self.loss(_rows(t), _rows(s)) for t, s in pairs]
        return losses[0] if len(losses) == 1 else ops.sum(ops.stack(losses))

    def get_config(self) -> dict[str, Any]:
        return {p: getattr(self, p) for p in self._params}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Any:
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class _RelationalDistillation(_LossDistillation):
    """Adds ``teacher_layer_name`` / ``student_layer_name``, as ``FeatureDistillation``.

    With a layer name, ``Distiller`` extracts that layer's output (Functional or
    Sequential models only); ``None`` uses the model's final output.
    """

    def __init__(self, teacher_layer_name: str | None, student_layer_name: str | None) -> None:
        self.teacher_layer_name = _layer_name(teacher_layer_name, "teacher_layer_name")
        self.student_layer_name = _layer_name(student_layer_name, "student_layer_name")

    def validate_model_compatibility(self, teacher: keras.Model, student: keras.Model) -> None:
        """Checks the named layers exist (``FeatureDistillation``'s own check)."""
        keras.distillation.FeatureDistillation.validate_model_compatibility(self, teacher, student)


@_register
class ComparativeDistillation(_RelationalDistillation):
    """CKD (Wilf et al., WACV 2025) on the outputs (or named layers) of a Distiller.

    ``L = 1/(n(n-1)d) sum_{i != j} ||(s_i - s_j) - (t_i - t_j)||^2`` over the
    batch, computed in O(n d); :class:`ckd_core.ComparativeLoss`.
    """

    _params = ("teacher_layer_name", "student_layer_name")

    def __init__(
        self, teacher_layer_name: str | None = None, student_layer_name: str | None = None
    ) -> None:
        super().__init__(teacher_layer_name, student_layer_name)
        self.loss = ComparativeLoss()


@_register
class RelationalDistillation(_RelationalDistillation):
    """RKD (Park et al., CVPR 2019) on the outputs (or named layers) of a Distiller.

    ``L = w_d smoothL1(psi_D(s), psi_D(t)) + w_a smoothL1(psi_A(s), psi_A(t))``.
    Distances normalised by their mean, angles' cosines at every vertex;
    :class:`ckd_core.RKDLoss`. Weights finite and >= 0 (defaults 25, 50).
    """

    _params = ("distance_weight", "angle_weight", "teacher_layer_name", "student_layer_name")

    def __init__(
        self,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        teacher_layer_name: str | None = None,
        student_layer_name: str | None = None,
    ) -> None:
        super().__init__(teacher_layer_name, student_layer_name)
        self.loss = _as_value_error(
            RKDLoss, distance_weight=distance_weight, angle_weight=angle_weight
        )
        self.distance_weight = self.loss.distance_weight
        self.angle_weight = self.loss.angle_weight


@_register
class ProjectedRelationalDistillation(_RelationalDistillation):
    """RKD_d (the CKD paper's ablation): ``MSE(P(s_i - s_j), P(t_i - t_j))`` over all pairs.

    ``P`` is a fixed ``(dim, out_dim)`` projection drawn from ``seed``
    (``"gaussian"`` scaled 1/sqrt(k), ``"orthogonal"``, or ``"identity"`` with
    ``out_dim=None``, which equals CKD); :class:`ckd_core.ProjectedRKDLoss`.
    """

    _params = ("out_dim", "projection", "seed", "teacher_layer_name", "student_layer_name")

    def __init__(
        self,
        out_dim: int | None = 10,
        projection: str = "gaussian",
        seed: int = 0,
        teacher_layer_name: str | None = None,
        student_layer_name: str | None = None,
    ) -> None:
        super().__init__(teacher_layer_name, student_layer_name)
        self.loss = _as_value_error(
            ProjectedRKDLoss, out_dim=out_dim, projection=projection, seed=seed
        )
        self.out_dim = self.loss.out_dim
        self.projection = self.loss.projection
        self.seed = self.loss.seed


@_register
class DISTDistillation(_LossDistillation):
    """DIST (Huang et al., NeurIPS 2022) on logits.

    ``tau^2 (beta (1 - mean_i rho(p_i, q_i)) + gamma (1 - mean_c rho(p_:c, q_:c)))``
    with ``p = softmax(s/tau)``, ``q = softmax(t/tau)`` and ``rho`` the Pearson
    correlation; :class:`ckd_core.DISTLoss`. Defaults ``beta = gamma = 1``, ``tau = 4``.
    """

    _params = ("beta", "gamma", "tau")

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 4.0) -> None:
        self.loss = _as_value_error(DISTLoss, beta=beta, gamma=gamma, tau=tau)
        self.beta, self.gamma, self.tau = self.loss.beta, self.loss.gamma, self.loss.tau


# --------------------------------------------------------------------------- budgeted path
def budgeted_targets(
    budget: TeacherBudget,
    ids: Any,
    inputs: Any = None,
    labels: Any = None,
    *,
    key: str | None = None,
) -> dict[str, np.ndarray]:
    """Targets ``{"teacher": ..., "labels": ...}`` for :meth:`BudgetedDistiller.fit`.

    Queries ``budget`` once for ``ids`` (rows aligned with ``ids``): the
    teacher sees only the ids not cached yet, and ``TeacherBudgetExceeded`` is
    raised before any call that would exceed the budget. ``inputs`` is what
    :meth:`TeacherBudget.query` takes (an array aligned with ``ids`` or a
    loader); ``key`` picks one output of a teacher that returns a dict.
    """
    if not isinstance(budget, TeacherBudget):
        raise ValueError(f"budget must be a ckd_core.TeacherBudget, got {type(budget).__name__}.")
    outputs = budget.query(ids, inputs)
    if isinstance(outputs, dict):
        names = sorted(outputs)
        key = names[0] if key is None and len(names) == 1 else key
        if key not in outputs:
            raise ValueError(f"key must name one of the teacher's outputs {names}, got {key!r}.")
        outputs = outputs[key]
    elif key is not None:
        raise ValueError(f"key={key!r} given, but the teacher returns a single array.")
    targets = {"teacher": np.asarray(outputs)}
    if labels is not None:
        targets["labels"] = np.asarray(labels)
        if len(targets["labels"]) != len(targets["teacher"]):
            raise ValueError(
                f"labels must have one row per id ({len(targets['teacher'])}), "
                f"got {len(targets['labels'])}."
            )
    return targets


def _weight(value: Any, name: str) -> float:
    return float(_as_value_error(check_number, value, name))


@_register
class BudgetedDistiller(keras.Model):
    """Trains ``student`` on cached teacher outputs: the teacher is never called.

    ``fit(x, y)`` with ``y = {"teacher": t, "labels": y}`` (from
    :func:`budgeted_targets`; ``"labels"`` optional) minimises

    ``L = student_loss_weight * loss(labels, s) + sum_k w_k * D_k.compute_loss(t, s)``

    with ``loss`` given to :meth:`compile` (e.g. ``ComparativeLoss()`` on one-hot
    labels: the paper's CKD is ``MSE(ds, dy) + MSE(ds, dt)`` over all pairs) and
    ``D_k`` the ``distillation_losses`` (any ``keras.distillation.DistillationLoss``
    on final outputs). Unlike ``keras.distillation.Distiller`` the terms add up
    (no convex ``student_loss_weight``). ``y`` without ``"teacher"`` (e.g.
    ``validation_data=(x_val, y_val)``) gives the label term alone, so
    validation costs no teacher call; compiled metrics see the labels.
    """

    def __init__(
        self,
        student: keras.Model,
        distillation_losses: Any = (),
        distillation_loss_weights: Any = None,
        student_loss_weight: float = 1.0,
        name: str = "budgeted_distiller",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        if not isinstance(student, keras.Model):
            raise ValueError(f"student must be a keras.Model, got {type(student).__name__}.")
        if isinstance(distillation_losses, keras.distillation.DistillationLoss):
            distillation_losses = [distillation_losses]
        losses = list(distillation_losses)
        for k, loss in enumerate(losses):
            if not isinstance(loss, keras.distillation.DistillationLoss):
                raise ValueError(
                    f"distillation_losses[{k}] must be a keras.distillation.DistillationLoss, "
                    f"got {type(loss).__name__}."
                )
            if getattr(loss, "teacher_layer_name", None) or getattr(
                loss, "student_layer_name", None
            ):
                raise ValueError(
                    f"distillation_losses[{k}] names a layer: the budgeted path caches final "
                    "teacher outputs only (cache features as the teacher's output instead)."
                )
        if distillation_loss_weights is None:
            weights = [1.0] * len(losses)
        else:
            weights = [
                _weight(w, f"distillation_loss_weights[{k}]")
                for k, w in enumerate(distillation_loss_weights)
            ]
            if len(weights) != len(losses):
                raise ValueError(
                    f"distillation_loss_weights has {len(weights)} entries for "
                    f"{len(losses)} distillation_losses."
                )
        self.student = student
        self.distillation_losses = losses
        self.distillation_loss_weights = weights
        self.student_loss_weight = _weight(student_loss_weight, "student_loss_weight")
        self._student_loss: Any = None
        self.student_loss_tracker = keras.metrics.Mean(name="student_loss")
        self.distillation_loss_tracker = keras.metrics.Mean(name="distillation_loss")

    def compile(
        self, optimizer: Any = "adam", loss: Any = None, metrics: Any = None, **kwargs: Any
    ) -> None:
        """``loss``: the student's label loss (``None``: distillation terms only)."""
        self._student_loss = None if loss is None else keras.losses.get(loss)
        super().compile(optimizer=optimizer, loss=None, metrics=metrics, **kwargs)

    def call(self, inputs: Any, training: Any = None, **kwargs: Any) -> Tensor:
        return self.student(inputs, training=training, **kwargs)

    @staticmethod
    def _split(y: Any) -> tuple[Any, Any]:
        """``(labels, teacher outputs)``; a non-dict ``y`` is labels only."""
        if isinstance(y, dict):
            unknown = set(y) - {"labels", "teacher"}
            if unknown:
                raise ValueError(
                    f"y must be labels or a dict with keys 'labels' and/or 'teacher', got "
                    f"keys {sorted(y)}."
                )
            return y.get("labels"), y.get("teacher")
        return y, None

    def compute_loss(
        self,
        x: Any = None,
        y: Any = None,
        y_pred: Any = None,
        sample_weight: Any = None,
        training: bool = True,
    ) -> Tensor:
        if sample_weight is not None:
            raise ValueError(
                "BudgetedDistiller does not support sample_weight/class_weight (its pairwise "
                "terms compare the samples of a batch)."
            )
        if y_pred is None:
            y_pred = self(x, training=training)
        labels, teacher = self._split(y)
        dtype = keras.tree.flatten(y_pred)[0].dtype
        student_loss = ops.zeros((), dtype)
        if self._student_loss is not None and self.student_loss_weight > 0:
            if labels is None:
                raise ValueError("a student loss was compiled but y has no 'labels'.")
            if keras.backend.is_float_dtype(labels.dtype):
                labels = ops.cast(labels, dtype)
            student_loss = ops.cast(ops.mean(self._student_loss(labels, y_pred)), dtype)
        distillation_loss = ops.zeros((), dtype)
        if teacher is not None:
            teacher = keras.tree.map_structure(lambda t: ops.cast(t, dtype), teacher)
            for loss, weight in zip(
                self.distillation_losses, self.distillation_loss_weights, strict=True
            ):
                loss.validate_outputs(teacher, y_pred)
                value = ops.cast(loss.compute_loss(teacher, y_pred), dtype)
                distillation_loss = distillation_loss + weight * value
        elif training and self.distillation_losses:
            raise ValueError(
                "training with distillation_losses needs y={'teacher': ..., 'labels': ...} "
                "(see ckd_core.distillation.budgeted_targets)."
            )
        total = self.student_loss_weight * student_loss + distillation_loss
        for extra in self.losses:  # e.g. the student's regularisers
            total = total + ops.cast(ops.sum(extra), dtype)
        self.student_loss_tracker.update_state(student_loss)
        self.distillation_loss_tracker.update_state(distillation_loss)
        return total

    def compute_metrics(self, x: Any, y: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        return super().compute_metrics(x, self._split(y)[0], y_pred, sample_weight)

    def get_compile_config(self) -> Any:
        config = super().get_compile_config()
        if config is not None and self._student_loss is not None:
            config["loss"] = keras.saving.serialize_keras_object(self._student_loss)
        return config

    def compile_from_config(self, config: Any) -> None:
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "student": keras.saving.serialize_keras_object(self.student),
            "distillation_losses": [
                keras.saving.serialize_keras_object(loss) for loss in self.distillation_losses
            ],
            "distillation_loss_weights": list(self.distillation_loss_weights),
            "student_loss_weight": self.student_loss_weight,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BudgetedDistiller:
        config = dict(config)
        config["student"] = keras.saving.deserialize_keras_object(config["student"])
        config["distillation_losses"] = [
            keras.saving.deserialize_keras_object(loss) for loss in config["distillation_losses"]
        ]
        return cls(**config)
