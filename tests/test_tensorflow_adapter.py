"""``ckd_tensorflow``: tf.function + GradientTape (tensorflow backend session only)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import oracle
import pytest
from helpers import BACKEND, LOSS_NAMES, LOSSES, assert_close, make_batch

pytestmark = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="ckd_tensorflow needs the tensorflow backend"
)

if BACKEND == "tensorflow":
    import ckd_tensorflow
    import tensorflow as tf


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_tf_function_and_gradient_tape(name):
    loss, reference = LOSSES[name].make_tensorflow(), LOSSES[name].oracle
    batch = make_batch(8, 5, "float64", seed=1)
    teacher = tf.constant(batch.teacher)
    student = tf.Variable(batch.student)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            value = loss(teacher, student)
        return value, tape.gradient(value, student)

    value, grad = step()
    assert value.dtype == tf.float64
    assert_close(float(value), reference(batch.teacher, batch.student), "float64", atol=1e-13)
    assert grad.shape == (8, 5) and bool(tf.reduce_all(tf.math.is_finite(grad)))
    # Same as eager.
    with tf.GradientTape() as tape:
        eager = loss(teacher, student)
    np.testing.assert_allclose(
        grad.numpy(), tape.gradient(eager, student).numpy(), rtol=1e-9, atol=1e-14
    )


def test_training_step_in_tf_function_reduces_loss():
    tf.random.set_seed(0)
    x = tf.random.normal((32, 6))
    teacher = tf.matmul(x, tf.random.normal((6, 4)))
    w = tf.Variable(tf.zeros((6, 4)))
    loss_fn = ckd_tensorflow.ComparativeLoss()
    optimizer = tf.keras.optimizers.SGD(0.1)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(teacher, tf.matmul(x, w))
        optimizer.apply_gradients([(tape.gradient(loss, w), w)])
        return loss

    first = float(step())
    for _ in range(20):
        last = float(step())
    assert last < 0.5 * first


def test_unknown_batch_size_in_tf_function():
    loss_fn = ckd_tensorflow.ComparativeLoss()
    fn = tf.function(loss_fn.__call__, input_signature=[tf.TensorSpec((None, 3), tf.float32)] * 2)
    for n in (1, 4, 9):
        batch = make_batch(n, 3, "float32", seed=n)
        got = float(
            fn(tf.constant(batch.teacher, tf.float32), tf.constant(batch.student, tf.float32))
        )
        assert_close(got, oracle.comparative(batch.teacher, batch.student), "float32")


def test_functional_module_is_core():
    from ckd_core import functional

    assert ckd_tensorflow.functional is functional
    assert issubclass(ckd_tensorflow.ComparativeLoss, tf.keras.losses.Loss)


@pytest.mark.slow
def test_import_error_when_keras_runs_another_backend():
    code = (
        "import keras\ntry:\n    import ckd_tensorflow\n"
        "except ImportError as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "numpy"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert (
        "ERR" in out.stdout and "numpy" in out.stdout and "KERAS_BACKEND=tensorflow" in out.stdout
    )


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_of_global_batch_losses_keep_their_replica_hook(how):
    import copy
    import pickle

    copies = {"deepcopy": copy.deepcopy, "pickle": lambda m: pickle.loads(pickle.dumps(m))}
    hooked = [
        (ckd_tensorflow.ComparativeLoss(all_reduce=ckd_tensorflow.replica_sum), "all_reduce"),
        (ckd_tensorflow.ProjectedRKDLoss(all_reduce=ckd_tensorflow.replica_sum), "all_reduce"),
        (ckd_tensorflow.RKDLoss(all_gather=ckd_tensorflow.replica_gather), "all_gather"),
    ]
    for loss, hook in hooked:
        clone = copies[how](loss)
        assert getattr(clone, hook) is getattr(loss, hook), type(loss).__name__
        assert clone.get_config() == loss.get_config()
