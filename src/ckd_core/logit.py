"""Logit losses: Hinton KD and DIST."""

from __future__ import annotations

from keras import ops

from ckd_core._checks import (
    Tensor,
    _cast,
    _mean,
    _nonfinite_marker,
    _prepare,
    _safe_ratio,
    _scale,
    _weights,
    check_number,
)

__all__ = ["dist_loss", "kd_loss"]


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
    (a ``(batch,)`` ``sample_weight`` gives a weighted mean, a scalar one
    scales the loss). ``temperature`` must be finite and > 0.

    Example:
        >>> import numpy as np
        >>> logits = np.array([[1.0, 2.0, 3.0]], "float32")
        >>> float(kd_loss(logits, logits))
        0.0

    Reference:
        Hinton, Vinyals, Dean. "Distilling the Knowledge in a Neural
        Network." 2015.
    """
    temperature = check_number(temperature, "temperature", positive=True)
    y_true, y_pred, out_dtype = _prepare(y_true, y_pred, min_batch=1)
    log_p_student = ops.log_softmax(y_pred / temperature, axis=-1)
    log_p_teacher = ops.log_softmax(y_true / temperature, axis=-1)
    per_sample = ops.sum(ops.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    if sample_weight is None:
        loss = _mean(per_sample) * temperature**2
    else:
        w, scale = _weights(sample_weight, y_pred, y_pred.shape[0])
        loss = _scale(_weighted_mean(per_sample, w), scale) * temperature**2
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
    beta = check_number(beta, "beta")
    gamma = check_number(gamma, "gamma")
    tau = check_number(tau, "tau", positive=True)
    y_true, y_pred, out_dtype = _prepare(y_true, y_pred, min_batch=1)
    p_student = ops.softmax(y_pred / tau, axis=-1)
    p_teacher = ops.softmax(y_true / tau, axis=-1)
    inter = 1 - _mean_pearson(p_student, p_teacher, axis=1)
    intra = 1 - _mean_pearson(p_student, p_teacher, axis=0)
    # softmax maps -inf logits to a finite 0: keep non-finite input visible.
    loss = (inter * beta + intra * gamma) * tau**2 + _nonfinite_marker(y_true, y_pred)
    return _cast(loss, out_dtype)
