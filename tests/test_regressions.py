"""Regression tests of the core-hardening issue: one test per reported defect.

Each test failed on the code before the fix (see the commit message and the
issue's report); the bad-input properties in ``test_bad_inputs.py`` keep the
whole classes covered.
"""

from __future__ import annotations

import keras
import numpy as np
import oracle
import pytest
from helpers import (
    BACKEND,
    HAS_GRADIENTS,
    assert_close,
    call_form,
    dtype_of,
    expected_out_dtypes,
    forms,
    make_batch,
    to_float,
    to_numpy,
    to_tensor,
    value_and_grad,
)

import ckd_core
from ckd_core import functional as F

if BACKEND == "tensorflow":
    import tensorflow as tf


def _batch(n: int = 6, d: int = 4, seed: int = 0, dtype: str = "float64"):
    b = make_batch(n, d, dtype, seed=seed)
    return b, *b.tensors()


# ---------------------------------------------------------------------------
# 1. Unknown batch and feature sizes under tf.function; model.fit partial batch
# ---------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_GRADIENTS, reason="the numpy backend cannot fit")
def test_rkd_fit_with_a_partial_last_batch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 5)).astype("float32")
    y = rng.standard_normal((10, 3)).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss=ckd_core.RKDLoss())
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)  # batches 4, 4, 2
    assert np.isfinite(history.history["loss"][0])


TRACEABLE = forms("traceable")
#: every traceable plain loss of the table also through its class
TRACEABLE_CLASSES = [name for name, (_, form) in TRACEABLE.items() if form is None]


def _traceable(name: str, via_class: bool):
    case, form = TRACEABLE[name]
    if via_class:
        return case.make()
    return lambda t, s: call_form((case, form), t, s)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="unknown static sizes: tf.function")
@pytest.mark.parametrize("unknown", ["batch", "batch_and_dim"])
@pytest.mark.parametrize(
    ("name", "via_class"),
    [(name, False) for name in TRACEABLE] + [(name, True) for name in TRACEABLE_CLASSES],
)
def test_every_loss_traces_with_unknown_batch_and_feature_sizes(name, via_class, unknown):
    if unknown == "batch_and_dim" and TRACEABLE[name][0].name == "projected":
        pytest.skip("a projection needs the static feature size (see the next test)")
    fn = _traceable(name, via_class)
    shape = (None, 4) if unknown == "batch" else (None, None)
    spec = tf.TensorSpec(shape, tf.float64)
    traced = tf.function(fn, input_signature=[spec, spec])
    for n in (1, 2, 5):
        b, t, s = _batch(n=n, seed=n)
        want = to_float(fn(t, s))
        assert_close(to_float(traced(t, s)), want, "float64", atol=1e-12)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="unknown static sizes: tf.function")
def test_projected_class_with_unknown_feature_size_names_it():
    spec = tf.TensorSpec((None, None), tf.float32)
    traced = tf.function(ckd_core.ProjectedRKDLoss().__call__, input_signature=[spec, spec])
    with pytest.raises(ValueError, match="static feature dimension"):
        traced(tf.zeros((3, 4)), tf.zeros((3, 4)))


# ---------------------------------------------------------------------------
# 3. NaN/inf never hidden (values and gradients)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize(
    "name", ["rkd_distance", "rkd_angle", "RKDLoss(angle_weight=0)", "dist", "pairs", "groups"]
)
def test_non_finite_input_is_not_hidden(name, value):
    b, t, s = _batch()
    student = b.student.copy()
    student[2, 1] = value
    s = to_tensor(student)
    fns = {
        "rkd_distance": F.rkd_distance_loss,
        "rkd_angle": F.rkd_angle_loss,
        "RKDLoss(angle_weight=0)": ckd_core.RKDLoss(angle_weight=0.0),
        "dist": F.dist_loss,
        "pairs": lambda t, s: F.comparative_loss(t, s, pairs=([0, 1], [3, 4])),
        "groups": lambda t, s: F.comparative_loss(t, s, groups=([[0]], [[1]])),
    }
    assert not np.isfinite(to_float(fns[name](t, s)))


def test_dist_with_minus_inf_logit_is_not_finite():
    b, t, s = _batch()
    student = b.student.copy()
    student[0, 0] = -np.inf  # softmax maps it to a finite 0
    assert not np.isfinite(to_float(F.dist_loss(t, to_tensor(student))))


# ---------------------------------------------------------------------------
# 4. sample_weight
# ---------------------------------------------------------------------------

WEIGHTED = forms("weighted")


@pytest.mark.parametrize("name", list(WEIGHTED))
def test_nan_sample_weight_is_an_error_not_zero(name):
    _, t, s = _batch()
    w = np.ones(6)
    w[1] = np.nan
    with pytest.raises(ValueError, match="sample_weight must be finite"):
        call_form(WEIGHTED[name], t, s, w)


@pytest.mark.parametrize("name", list(WEIGHTED))
def test_negative_sample_weight_is_an_error(name):
    _, t, s = _batch()
    w = np.ones(6)
    w[3] = -0.5
    with pytest.raises(ValueError, match="sample_weight must be >= 0"):
        call_form(WEIGHTED[name], t, s, w)


@pytest.mark.parametrize("name", list(WEIGHTED))
@pytest.mark.parametrize("scale", [0.0, 0.5, 3.0])
def test_scalar_sample_weight_scales_the_loss(name, scale):
    _, t, s = _batch()
    plain = to_float(call_form(WEIGHTED[name], t, s, None))
    assert_close(to_float(call_form(WEIGHTED[name], t, s, scale)), scale * plain, "float64")
    assert_close(
        to_float(call_form(WEIGHTED[name], t, s, np.float64(scale))), scale * plain, "float64"
    )


@pytest.mark.parametrize("name", list(WEIGHTED))
@pytest.mark.parametrize("shape", [(5,), (7,), (6, 1), (1, 6), (2, 3)])
def test_sample_weight_of_the_wrong_shape_names_it(name, shape):
    _, t, s = _batch()
    with pytest.raises(ValueError, match=r"sample_weight.*\(6,\)|sample_weight must be a scalar"):
        call_form(WEIGHTED[name], t, s, np.ones(shape))


def test_class_scalar_sample_weight_follows_keras():
    _, t, s = _batch()
    for loss in (ckd_core.ComparativeLoss(), ckd_core.KDLoss()):
        plain = to_float(loss(t, s))
        assert_close(to_float(loss(t, s, sample_weight=2.0)), 2 * plain, "float64")


# ---------------------------------------------------------------------------
# 5. Index arguments
# ---------------------------------------------------------------------------


def test_one_dimensional_groups_are_an_error():
    _, t, s = _batch()
    with pytest.raises(ValueError, match=r"groups\[0\] must be a 2-D"):
        F.comparative_loss(t, s, groups=(np.array([0, 1]), np.array([2, 3])))


@pytest.mark.parametrize("dtype", ["float32", "bool"])
def test_float_or_bool_indices_are_an_error(dtype):
    _, t, s = _batch()
    a = np.array([0, 1, 1]).astype(dtype)
    with pytest.raises(TypeError, match=r"pairs\[0\] must have an integer dtype"):
        F.comparative_loss(t, s, pairs=(a, np.array([2, 3, 4])))


@pytest.mark.parametrize("option", ["pairs", "groups"])
def test_empty_pairs_or_groups_are_an_error(option):
    _, t, s = _batch()
    empty = np.zeros((0,) if option == "pairs" else (0, 2), "int64")
    with pytest.raises(ValueError, match=rf"{option}\[0\] must not be empty"):
        F.comparative_loss(t, s, **{option: (empty, empty)})


@pytest.mark.parametrize("bad", [6, 100, -1])
def test_out_of_range_indices_raise_index_error_on_every_backend(bad):
    _, t, s = _batch()
    with pytest.raises(IndexError, match=r"pairs\[1\] has index .* out of range for a batch of 6"):
        F.comparative_loss(t, s, pairs=(np.array([0, 1]), np.array([2, bad])))
    with pytest.raises(IndexError, match=r"groups\[0\]"):
        F.comparative_loss(t, s, groups=(np.array([[0, bad]]), np.array([[2, 3]])))


# ---------------------------------------------------------------------------
# 6. Hyperparameters
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, -2.0, float("nan")])
def test_temperature_and_tau_must_be_positive(value):
    _, t, s = _batch()
    with pytest.raises(ValueError, match="temperature"):
        F.kd_loss(t, s, temperature=value)
    with pytest.raises(ValueError, match="temperature"):
        ckd_core.KDLoss(temperature=value)
    with pytest.raises(ValueError, match="tau"):
        F.dist_loss(t, s, tau=value)
    with pytest.raises(ValueError, match="tau"):
        ckd_core.DISTLoss(tau=value)


def test_projected_out_dim_zero_and_make_projection_zero_are_errors():
    with pytest.raises(ValueError, match="out_dim"):
        ckd_core.ProjectedRKDLoss(out_dim=0)
    with pytest.raises(ValueError, match="out_dim"):
        F.make_projection(3, 0)
    with pytest.raises(ValueError, match="dim"):
        F.make_projection(0, 3)


# ---------------------------------------------------------------------------
# 7. Degenerate shapes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["comparative", "projected", "kd", "dist", "rkd", "rkd_angle"])
def test_zero_features_is_a_value_error(name):
    t = s = to_tensor(np.zeros((4, 0)))
    fns = {
        "comparative": F.comparative_loss,
        "projected": ckd_core.ProjectedRKDLoss(),
        "kd": F.kd_loss,
        "dist": F.dist_loss,
        "rkd": F.rkd_distance_loss,
        "rkd_angle": F.rkd_angle_loss,
    }
    with pytest.raises(ValueError, match=r"dim >= 1.*\(4, 0\)"):
        fns[name](t, s)


@pytest.mark.parametrize("fn", [F.kd_loss, F.dist_loss], ids=["kd", "dist"])
def test_empty_batch_of_kd_and_dist_is_a_value_error(fn):
    t = s = to_tensor(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="batch >= 1"):
        fn(t, s)


# ---------------------------------------------------------------------------
# 8. Serialization of NumPy hyperparameters
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss",
    [
        lambda: ckd_core.KDLoss(temperature=np.float32(2)),
        lambda: ckd_core.DISTLoss(beta=np.float64(2), tau=np.float32(3)),
        lambda: ckd_core.RKDLoss(distance_weight=np.float32(1), angle_weight=np.int64(2)),
        lambda: ckd_core.ProjectedRKDLoss(out_dim=np.int64(3), seed=np.int32(1)),
    ],
)
def test_numpy_hyperparameters_survive_a_serialization_round_trip(loss):
    loss = loss()
    for value in loss.get_config().values():
        assert type(value) in (str, int, float, type(None)), loss.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    _, t, s = _batch()
    assert to_float(restored(t, s)) == to_float(loss(t, s))


# ---------------------------------------------------------------------------
# 9. Messages name the argument (the bad-input suite checks every class)
# ---------------------------------------------------------------------------


def test_messages_name_the_argument_and_both_shapes():
    _, t, s = _batch()
    with pytest.raises(ValueError, match=r"y_true=\(6, 4\) and y_pred=\(6, 3\)"):
        F.comparative_loss(t, s[:, :3])
    with pytest.raises(ValueError, match=r"pairs\[0\] and pairs\[1\] .* \(2,\) and \(3,\)"):
        F.comparative_loss(t, s, pairs=([0, 1], [1, 2, 3]))
    with pytest.raises(TypeError, match="y_pred must have a floating dtype"):
        F.comparative_loss(t, np.ones((6, 4), "int32"))


@pytest.mark.skipif(BACKEND != "torch", reason="ckd_torch")
def test_torch_adapter_names_a_numpy_student():
    import ckd_torch
    import torch

    # The adapter names its own arguments (student/teacher), as its docs say.
    with pytest.raises(TypeError, match=r"got student of type numpy\.ndarray"):
        ckd_torch.ComparativeLoss()(np.zeros((4, 3), "float32"), torch.zeros(4, 3))
    with pytest.raises(TypeError, match=r"got teacher of type numpy\.ndarray"):
        ckd_torch.ComparativeLoss()(torch.zeros(4, 3), np.zeros((4, 3), "float32"))


# ---------------------------------------------------------------------------
# 10. One call path: the class dtype applies with pairs and groups
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["all", "pairs", "groups"])
def test_class_dtype_applies_with_pairs_and_groups(option):
    b, t, s = _batch(dtype="float32")
    kwargs = {
        "all": {},
        "pairs": {"pairs": ([0, 1, 2], [3, 4, 5])},
        "groups": {"groups": ([[0, 1]], [[2, 3]])},
    }[option]
    out = ckd_core.ComparativeLoss(dtype="float64")(t, s, **kwargs)
    assert dtype_of(out) in expected_out_dtypes("float64")
    want = to_float(F.comparative_loss(*b.tensors("float64"), **kwargs))
    assert_close(to_float(out), want, "float32")


# ---------------------------------------------------------------------------
# Gradients stay finite for valid degenerate inputs (the NaN fixes changed guards)
# ---------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_GRADIENTS, reason="no gradients on numpy")
def test_rkd_gradient_finite_and_oracle_value_after_the_guards_changed():
    b, t, s = _batch(n=5, d=3, seed=3)
    value, (grad,) = value_and_grad(F.rkd_distance_loss, [t, s], wrt=(1,))
    assert_close(value, oracle.rkd_distance(b.teacher, b.student), "float64", atol=1e-12)
    assert np.all(np.isfinite(grad))
    assert np.all(np.isfinite(to_numpy(F.rkd_angle_loss(t, s))))
