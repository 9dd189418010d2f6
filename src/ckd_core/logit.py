"""Logit losses: Hinton KD and DIST."""

from __future__ import annotations

from keras import ops

from ckd_core._checks import (
    MEAN,
    Tensor,
    _cast,
    _mean,
    _nonfinite_marker,
    _num_rows,
    _prepare,
    _reduce,
    _safe_ratio,
    _scale,
    _weights,
    check_number,
    check_reduction,
    ops64,
)

__all__ = ["dist_loss", "kd_loss"]


def kd_loss(
    y_true: Tensor,
    y_pred: Tensor,
    sample_weight: Tensor | None = None,
    *,
    temperature: float = 4.0,
    reduction: str | None = MEAN,
) -> Tensor:
    r"""Hinton knowledge distillation on logits.

    .. math::
        L = T^2 \cdot \frac{1}{n}\sum_i \mathrm{KL}\big(
            \mathrm{softmax}(y_i / T) \,\Vert\, \mathrm{softmax}(\hat y_i / T)\big)

    computed from log-softmax (no clipping), averaged over the batch
    (a ``(batch,)`` ``sample_weight`` gives a weighted mean, a scalar one
    scales the loss). ``temperature`` must be finite and > 0.
    ``reduction`` (Keras' meaning): ``"sum_over_batch_size"`` (default) the
    loss above, ``"sum"`` and ``None``/``"none"`` the sum or vector of the
    per-sample terms whose mean it is (``n w_i T^2 KL_i / sum w``).

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
    reduction = check_reduction(reduction)
    y_true, y_pred, out_dtype = _prepare(y_true, y_pred, min_batch=1)
    log_p_student = ops.log_softmax(y_pred / temperature, axis=-1)
    log_p_teacher = ops.log_softmax(y_true / temperature, axis=-1)
    per_sample = ops.sum(ops64.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    per_sample = per_sample * temperature**2
    if sample_weight is None:
        loss = _reduce(per_sample, reduction)
    else:
        w, scale = _weights(sample_weight, y_pred, y_pred.shape[0])
        if w is not None:  # terms whose mean is the weighted mean
            per_sample = per_sample * _safe_ratio(w * _num_rows(per_sample), ops.sum(w))
        loss = _scale(_reduce(per_sample, reduction), scale)
    return _cast(loss, out_dtype)


def _mean_pearson(a: Tensor, b: Tensor, axis: int, eps: float = 1e-8) -> Tensor:
    a = a - _mean(a, axis=axis, keepdims=True)
    b = b - _mean(b, axis=axis, keepdims=True)
    prod = ops.sum(ops64.square(a), axis=axis) * ops.sum(ops64.square(b), axis=axis)
    # sqrt'(0) is infinite: constant rows/columns (e.g. dim 1, equal rows)
    # would get NaN gradients. Their correlation is 0 either way.
    positive = prod > 0
    norms = ops64.where(positive, ops64.sqrt(ops64.where(positive, prod, 1)), 0)
    return _mean(ops.sum(a * b, axis=axis) / (norms + eps))


def dist_loss(
    y_true: Tensor,
    y_pred: Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    tau: float = 4.0,
    reduction: str | None = MEAN,
) -> Tensor:
    r"""DIST: distillation by Pearson correlation of softened predictions.

    With :math:`p = \mathrm{softmax}(\hat y/\tau)` and
    :math:`q = \mathrm{softmax}(y/\tau)`:

    .. math::
        L = \tau^2 \big(\beta\,(1 - \overline{\rho}_{\text{rows}}(p, q))
            + \gamma\,(1 - \overline{\rho}_{\text{cols}}(p, q))\big)

    where :math:`\overline{\rho}` is the mean Pearson correlation over rows
    (inter-class relation) or columns (intra-class relation); the Pearson
    denominator carries ``+1e-8`` as in the authors' code. A batch-level
    loss: ``reduction`` accepts only ``"sum_over_batch_size"``.

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
    check_reduction(reduction, "DIST")
    y_true, y_pred, out_dtype = _prepare(y_true, y_pred, min_batch=1)
    # exp(log_softmax): Keras' softmax warns for one class (dim 1), a valid input.
    p_student = ops64.exp(ops.log_softmax(y_pred / tau, axis=-1))
    p_teacher = ops64.exp(ops.log_softmax(y_true / tau, axis=-1))
    inter = 1 - _mean_pearson(p_student, p_teacher, axis=1)
    intra = 1 - _mean_pearson(p_student, p_teacher, axis=0)
    # softmax maps -inf logits to a finite 0: keep non-finite input visible.
    loss = (inter * beta + intra * gamma) * tau**2 + _nonfinite_marker(y_true, y_pred)
    return _cast(loss, out_dtype)
