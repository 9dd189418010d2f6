"""Global-batch losses under ``tf.distribute`` (e.g. ``MirroredStrategy``).

Each replica of a data-parallel step holds a shard of the global batch.
Passing :func:`replica_sum` as ``all_reduce`` to :class:`ckd_core.ComparativeLoss`
or :class:`ckd_core.ProjectedRKDLoss` makes every replica compute the
all-pairs loss of the global batch (shards may differ in size), for three
replica-context all-reduces of 1, ``dim + 1`` and 1 numbers per call (2,
``dim + 2`` and 1 with ``sample_weight``), plus ``dim + 1`` (``dim + 2``)
and 1 numbers in the backward.

Gradient scale: the gradient of a replica-context all-reduce is again an
all-reduce (sum), so each replica's gradient of the global loss is
``num_replicas_in_sync`` times the gradient through its own rows.
tf.distribute sums gradients over replicas, and the ckd-core loss classes,
like Keras' own losses, return the per-replica value divided by
``num_replicas_in_sync`` inside a strategy; so in ``model.fit`` and in a
custom loop the summed gradients equal the single-device gradient on the
global batch, and ``strategy.reduce("SUM", loss)`` is the global loss.
``model.fit``/``evaluate`` report the global loss. Do not use
``train_on_batch`` under a strategy: Keras feeds the whole batch to every
replica there, so the global batch would hold every row several times.

Example (custom loop)::

    strategy = tf.distribute.MirroredStrategy()
    with strategy.scope():
        model, optimizer = make_model(), keras.optimizers.SGD(0.1)
    loss_fn = ComparativeLoss(all_reduce=replica_sum)

    @tf.function
    def step(x, teacher):  # per-replica shards, e.g. from a distributed dataset
        def replica_step(x, teacher):
            with tf.GradientTape() as tape:
                loss = loss_fn(teacher, model(x))  # global loss / replicas
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss
        losses = strategy.run(replica_step, args=(x, teacher))
        return strategy.reduce("SUM", losses, axis=None)  # the global loss

With ``model.fit`` it suffices to compile under ``strategy.scope()`` with
``loss=ComparativeLoss(all_reduce=replica_sum)``.

RKD compares every pair and triplet of rows, so the global-batch RKD needs
the rows themselves: ``RKDLoss(all_gather=replica_gather)`` concatenates
every replica's student and teacher rows (O(batch·dim) per call) and
evaluates RKD on the global batch in every replica, with the same gradient
scale as above (the gradient of an all-gather sums the replicas' upstream
gradients of the local rows).
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["replica_gather", "replica_sum"]


def replica_sum(x: tf.Tensor) -> tf.Tensor:
    """Sum of ``x`` over the replicas in sync (differentiable).

    The ``all_reduce`` for the core's all-pairs losses under
    ``tf.distribute``: inside ``strategy.run`` or ``model.fit`` it sums over
    the replicas. Identity with one replica, and in the cross-replica
    context, where a loss sees whole (not per-replica) tensors, e.g. in
    Keras' symbolic build.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return x
    return context.all_reduce(tf.distribute.ReduceOp.SUM, x)


def replica_gather(x: tf.Tensor) -> tf.Tensor:
    """Concatenation of every replica's ``x`` along axis 0, in replica order (differentiable).

    The ``all_gather`` for :class:`ckd_core.RKDLoss` under ``tf.distribute``;
    shards may differ in size. Identity with one replica and in the
    cross-replica context.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return x
    return context.all_gather(x, axis=0)
