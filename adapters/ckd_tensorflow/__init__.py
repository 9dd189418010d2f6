"""TensorFlow adapter: ckd-core losses for ``tf.keras`` models and ``tf.function``.

Importing this package selects Keras' TensorFlow backend (or raises
``ImportError`` when keras already runs another backend). With Keras 3,
``tf.keras.losses.Loss`` is ``keras.losses.Loss``, so the native TensorFlow
losses are the core classes themselves: ``loss(y_true, y_pred)`` on
``tf.Tensor`` inside ``tf.function`` and ``tf.GradientTape``.

Example:
    >>> import tensorflow as tf
    >>> from ckd_tensorflow import ComparativeLoss
    >>> student = tf.Variable(tf.random.normal((8, 10)))
    >>> teacher = tf.random.normal((8, 10))
    >>> with tf.GradientTape() as tape:
    ...     loss = ComparativeLoss()(teacher, student)
    >>> tape.gradient(loss, student).shape
    TensorShape([8, 10])
"""

from ckd_core._backend_select import use_keras_backend

use_keras_backend("tensorflow", "ckd_tensorflow")

from ckd_core import (  # noqa: E402
    ComparativeLoss,
    DISTLoss,
    KDLoss,
    ProjectedRKDLoss,
    RKDLoss,
    functional,
)
from ckd_tensorflow.distributed import replica_gather, replica_sum  # noqa: E402

__all__ = [
    "ComparativeLoss",
    "DISTLoss",
    "KDLoss",
    "ProjectedRKDLoss",
    "RKDLoss",
    "functional",
    "replica_gather",
    "replica_sum",
]
