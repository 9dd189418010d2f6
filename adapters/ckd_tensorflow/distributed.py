"""Global-batch losses under ``tf.distribute`` (e.g. ``MirroredStrategy``).

Each replica of a data-parallel step holds a shard of the global batch.
Passing :func:`replica_sum` as ``all_reduce`` to :class:`ckd_core.ComparativeLoss`
or :class:`ckd_core.ProjectedRKDLoss` makes every replica compute the
all-pairs loss of the global batch (shards may differ in size), for two
replica-context all-reduces of ``dim + 1`` (``dim + 2`` with
``sample_weight``) and 1 numbers per call, plus one number in the backward.

Gradient scale: the gradient of a replica-context all-reduce is again an
all-reduce (sum), so each replica's gradient is ``num_replicas_in_sync``
times the global loss's gradient through its own rows. tf.distribute sums
gradients over replicas and expects per-replica losses scaled by
``1 / num_replicas_in_sync``; ``model.fit`` does that scaling itself. In a
custom loop, differentiate ``loss / strategy.num_replicas_in_sync`` and the
summed gradients equal the single-device gradient on the global batch.

Example (custom loop)::

    strategy = tf.distribute.MirroredStrategy()
    loss_fn = ComparativeLoss(all_reduce=replica_sum)

    def replica_step(x, teacher):
        with tf.GradientTape() as tape:
            loss = loss_fn(teacher, model(x))  # global-batch loss
            scaled = loss / strategy.num_replicas_in_sync
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["replica_sum"]


def replica_sum(x: tf.Tensor) -> tf.Tensor:
    """Sum of ``x`` over the replicas in sync (differentiable).

    The ``all_reduce`` for the core's all-pairs losses under
    ``tf.distribute``; identity outside any strategy (one replica). Must be
    called in a replica context: inside ``strategy.run`` or ``model.fit``.
    """
    context = tf.distribute.get_replica_context()
    if context is None:
        raise RuntimeError(
            "replica_sum needs a replica context: call the loss inside strategy.run(...) "
            "or model.fit, not in the strategy's cross-replica context."
        )
    if context.num_replicas_in_sync == 1:
        return x
    return context.all_reduce(tf.distribute.ReduceOp.SUM, x)
