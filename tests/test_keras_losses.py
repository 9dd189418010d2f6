"""The ``keras.losses.Loss`` classes: values, serialization, training in a model."""

from __future__ import annotations

import keras
import numpy as np
import oracle
import pytest
from helpers import (
    BACKEND,
    HAS_GRADIENTS,
    LOSS_NAMES,
    LOSSES,
    assert_close,
    dtype_of,
    expected_out_dtypes,
    make_batch,
    to_float,
    to_tensor,
)

import ckd_core
from ckd_core import functional as F

# Options beyond each loss's table hyperparameters (``helpers.LOSSES``).
OPTION_VARIANTS = {
    "table": lambda case: {},
    "named_float64": lambda case: {"name": "custom", "dtype": "float64"},
    "reduction": lambda case: {"reduction": "sum" if case.decomposes else "sum_over_batch_size"},
}
# Hyperparameters other than the table's that change the config.
HYPERPARAMETER_VARIANTS = {
    "projected": [
        {"out_dim": 4, "projection": "orthogonal", "seed": 3},
        {"out_dim": None, "projection": "identity"},
    ],
    "kd": [{"temperature": 2.5}],
    "dist": [{"beta": 2.0, "gamma": 0.5, "tau": 3.0}],
    "rkd_distance": [{"distance_weight": 2.0, "angle_weight": 0.0}],
}
SERIALIZATION_CASES = [
    (name, variant, {}) for name in LOSS_NAMES for variant in OPTION_VARIANTS
] + [
    (name, "table", hyperparameters)
    for name, variants in HYPERPARAMETER_VARIANTS.items()
    for hyperparameters in variants
]


def _value(loss, batch) -> float:
    return to_float(loss(*batch.tensors()))


@pytest.mark.parametrize("name, variant, hyperparameters", SERIALIZATION_CASES)
def test_serialization_round_trip(name, variant, hyperparameters):
    case = LOSSES[name]
    config = {**case.hyperparameters, **hyperparameters, **OPTION_VARIANTS[variant](case)}
    cls = type(case.make())
    loss = cls(**config)
    batch = make_batch(6, 5, "float32", seed=1)
    expected = _value(loss, batch)

    serialized = keras.saving.serialize_keras_object(loss)
    assert serialized["registered_name"].startswith("ckd_core>")
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is cls
    assert restored.get_config() == loss.get_config()
    assert _value(restored, batch) == expected

    from_config = cls.from_config(loss.get_config())
    assert from_config.get_config() == loss.get_config()
    assert _value(from_config, batch) == expected
    for key, value in config.items():
        assert loss.get_config()[key] == value

    # Through keras.losses.get/serialize as a model would store it.
    assert type(keras.losses.deserialize(keras.losses.serialize(loss))) is cls


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_class_values_match_oracle(name):
    batch = make_batch(7, 4, "float64", seed=2)
    case = LOSSES[name]
    want = case.oracle(batch.teacher, batch.student)
    assert_close(_value(case.make(), batch), want, "float64", atol=1e-12)


def test_class_hyperparameters_match_oracle():
    batch = make_batch(7, 4, "float64", seed=2)
    t, s = batch.teacher, batch.student
    rkd = 25 * oracle.rkd_distance(t, s) + 50 * oracle.rkd_angle(t, s)
    p = ckd_core.ProjectedRKDLoss(out_dim=3, seed=5)
    checks = [
        (ckd_core.RKDLoss(), rkd),
        (p, oracle.projected(t, s, F.make_projection(4, 3, "gaussian", 5))),
        (ckd_core.ProjectedRKDLoss(out_dim=None, projection="identity"), oracle.comparative(t, s)),
        (ckd_core.KDLoss(temperature=3.0), oracle.kd(t, s, 3.0)),
        (ckd_core.DISTLoss(beta=2.0), oracle.dist(t, s, beta=2.0)),
    ]
    for loss, want in checks:
        assert_close(_value(loss, batch), want, "float64", atol=1e-12)
    np.testing.assert_array_equal(p.matrix(4), F.make_projection(4, 3, "gaussian", 5))


def test_comparative_class_pairs_groups_and_sample_weight():
    batch = make_batch(8, 3, "float64", seed=3)
    t, s = batch.tensors()
    loss = ckd_core.ComparativeLoss()
    a, b = np.array([0, 1, 2, 7]), np.array([3, 3, 5, 0])
    w = np.linspace(0.0, 2.0, 8)
    assert_close(
        to_float(loss(t, s, pairs=(a, b))),
        oracle.comparative_pairs(batch.teacher, batch.student, a, b),
        "float64",
    )
    ga, gb = a.reshape(2, 2), b.reshape(2, 2)
    assert_close(
        to_float(loss(t, s, groups=(ga, gb))),
        oracle.comparative_groups(batch.teacher, batch.student, ga, gb),
        "float64",
    )
    assert_close(
        to_float(loss(t, s, sample_weight=w)),
        oracle.comparative(batch.teacher, batch.student, w),
        "float64",
    )


@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if not LOSSES[n].weights])
def test_losses_without_sample_weight_support_reject_it(name):
    t, s = make_batch(4, 3, "float32", seed=4).tensors()
    with pytest.raises(ValueError, match="sample_weight"):
        LOSSES[name].make()(t, s, sample_weight=np.ones(4))


def test_dtype_argument_casts_inputs():
    batch = make_batch(5, 3, "float32", seed=5)
    out = ckd_core.ComparativeLoss(dtype="float64")(*batch.tensors())
    assert dtype_of(out) in expected_out_dtypes("float64")
    assert_close(to_float(out), oracle.comparative(batch.teacher, batch.student), "float32")


# ---------------------------------------------------------------------------
# Training a tiny model
# ---------------------------------------------------------------------------


def _data(n: int = 16, d_in: int = 6, d_out: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d_in)).astype("float32")
    teacher = (x @ rng.standard_normal((d_in, d_out))).astype("float32")
    return x, teacher


def _model(d_in: int = 6, d_out: int = 4, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((d_in,)), keras.layers.Dense(d_out)])


@pytest.mark.parametrize("name", ["comparative", "kd", "rkd_angle", "projected"])
def test_tiny_model_trains_two_steps(name):
    loss = LOSSES[name].make()
    x, teacher = _data()
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss)
    before = [np.array(w) for w in model.get_weights()]
    expected = to_float(
        type(loss).from_config(loss.get_config())(teacher[:8], model.predict(x[:8], verbose=0))
    )
    if BACKEND == "numpy":
        # The numpy backend cannot train; evaluation still runs the loss.
        value = model.evaluate(x[:8], teacher[:8], batch_size=8, verbose=0)
        assert_close(value, expected, "float32", atol=1e-6)
        with pytest.raises(NotImplementedError):
            model.fit(x, teacher, batch_size=8, epochs=1, steps_per_epoch=2, verbose=0)
        return
    history = model.fit(
        x, teacher, batch_size=8, epochs=1, steps_per_epoch=2, shuffle=False, verbose=0
    )
    losses = history.history["loss"]
    assert len(losses) == 1 and np.isfinite(losses[0])
    after = model.get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True)), (
        "weights did not move"
    )
    assert all(np.all(np.isfinite(w)) for w in after)


def test_fit_passes_sample_weight_to_the_loss():
    x, teacher = _data(n=8)
    weights = np.array([0, 0, 1, 1, 2, 2, 0.5, 1], "float32")
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=ckd_core.ComparativeLoss())
    pred = model.predict(x, verbose=0)
    weighted = oracle.comparative(teacher, pred, weights)
    unweighted = oracle.comparative(teacher, pred)
    assert abs(weighted - unweighted) > 1e-2 * unweighted  # the check can fail
    value = model.evaluate(x, teacher, sample_weight=weights, batch_size=8, verbose=0)
    assert_close(value, weighted, "float32", atol=1e-5 * weighted)
    if BACKEND == "numpy":
        pytest.skip("the numpy backend cannot fit")
    history = model.fit(x, teacher, sample_weight=weights, batch_size=8, epochs=1, verbose=0)
    assert_close(history.history["loss"][0], weighted, "float32", atol=1e-5 * weighted)


@pytest.mark.skipif(not HAS_GRADIENTS, reason="the numpy backend cannot train")
def test_distillation_reduces_the_loss():
    x, teacher = _data(n=32, seed=1)
    model = _model(seed=1)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=ckd_core.ComparativeLoss())
    start = model.evaluate(x, teacher, batch_size=32, verbose=0)
    model.fit(x, teacher, batch_size=32, epochs=5, verbose=0)
    assert model.evaluate(x, teacher, batch_size=32, verbose=0) < start


def test_model_with_loss_saves_and_loads(tmp_path):
    x, teacher = _data()
    model = _model()
    model.compile(optimizer="sgd", loss=ckd_core.ProjectedRKDLoss(out_dim=3, seed=7))
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.loss, ckd_core.ProjectedRKDLoss)
    assert restored.loss.get_config() == model.loss.get_config()
    value = to_float(restored.loss(to_tensor(teacher, "float32"), restored.predict(x, verbose=0)))
    assert value == to_float(model.loss(to_tensor(teacher, "float32"), model.predict(x, verbose=0)))
