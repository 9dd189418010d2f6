"""Distillation losses as pure functions of ``(y_true, y_pred)``.

Every function takes teacher outputs (or one-hot labels) as ``y_true`` and
student outputs as ``y_pred``, both of shape ``(batch, dim)``, and returns a
scalar in the input dtype. ``reduction`` has Keras' meaning where the loss
is a mean of per-sample terms (KD, CKD, RKD_d); the batch-level losses (RKD,
DIST) accept only its default. They are written with ``keras.ops`` only, so they
run unchanged on the JAX, TensorFlow, PyTorch and NumPy backends, inside
``jax.jit``, ``tf.function`` and ``torch.compile``.

float16 and bfloat16 inputs are accumulated in float32 and the result is cast
back. Pairwise losses return 0 for a batch with fewer than two rows.

This module gathers the public functions of the loss families:
:mod:`ckd_core.comparative` (CKD, RKD_d), :mod:`ckd_core.logit` (KD, DIST)
and :mod:`ckd_core.relational` (RKD).
"""

from __future__ import annotations

from ckd_core._checks import AllReduce  # noqa: F401  (the type of all_reduce=)
from ckd_core.comparative import comparative_loss, make_projection, projected_rkd_loss
from ckd_core.logit import dist_loss, kd_loss
from ckd_core.relational import rkd_angle_loss, rkd_distance_loss, rkd_loss

__all__ = [
    "comparative_loss",
    "dist_loss",
    "kd_loss",
    "make_projection",
    "projected_rkd_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rkd_loss",
]
