"""``ckd_core.distillation``: keras.distillation losses and the budgeted distiller.

Values, serialization and argument checks run on every backend; training
(``Distiller.fit``, ``BudgetedDistiller.fit``) needs gradients and is skipped
on the NumPy backend.
"""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest
from helpers import BACKEND, HAS_GRADIENTS, to_numpy, to_tensor

import ckd_core
from ckd_core import functional as F
from ckd_core.distillation import (
    BudgetedDistiller,
    ComparativeDistillation,
    DISTDistillation,
    ProjectedRelationalDistillation,
    RelationalDistillation,
    budgeted_targets,
)

needs_training = pytest.mark.skipif(
    not HAS_GRADIENTS, reason=f"the {BACKEND} backend cannot train (no gradients)"
)
RTOL = 1e-10  # float64 on every backend (conftest enables x64 on JAX)


def _proj(t, s):
    return F.projected_rkd_loss(t, s, F.make_projection(t.shape[1], 3, "orthogonal", 1))


# (DistillationLoss, the same loss through ckd_core.functional)
CASES = [
    (ComparativeDistillation(), F.comparative_loss),
    (
        RelationalDistillation(distance_weight=2.0, angle_weight=3.0),
        lambda t, s: 2 * F.rkd_distance_loss(t, s) + 3 * F.rkd_angle_loss(t, s),
    ),
    (
        RelationalDistillation(),
        lambda t, s: 25 * F.rkd_distance_loss(t, s) + 50 * F.rkd_angle_loss(t, s),
    ),
    (ProjectedRelationalDistillation(out_dim=3, projection="orthogonal", seed=1), _proj),
    (
        ProjectedRelationalDistillation(out_dim=None, projection="identity"),
        F.comparative_loss,
    ),
    (
        DISTDistillation(beta=2.0, gamma=0.5, tau=3.0),
        lambda t, s: F.dist_loss(t, s, beta=2.0, gamma=0.5, tau=3.0),
    ),
]
IDS = [f"{type(c[0]).__name__}-{k}" for k, c in enumerate(CASES)]


def _batch(n=9, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(n, d))


@pytest.mark.parametrize("loss, reference", CASES, ids=IDS)
def test_compute_loss_equals_functional(loss, reference):
    t, s = (to_tensor(a, "float64") for a in _batch())
    got = to_numpy(loss.compute_loss(t, s))
    np.testing.assert_allclose(got, to_numpy(reference(t, s)), rtol=RTOL)
    assert got.shape == ()
    # multi-output models: the outputs' losses add up; feature maps are flattened
    t2, s2 = (to_tensor(a, "float64") for a in _batch(9, 12, seed=1))
    maps = [keras.ops.reshape(a, (9, 2, 3, 2)) for a in (t2, s2)]
    total = to_numpy(loss.compute_loss([t, maps[0]], [s, maps[1]]))
    np.testing.assert_allclose(total, got + to_numpy(reference(t2, s2)), rtol=RTOL)


def test_ckd_matches_explicit_pairs():
    t, s = _batch(6, 4)
    want = np.mean(
        [((s[i] - s[j]) - (t[i] - t[j])) ** 2 for i, j in itertools.permutations(range(6), 2)]
    )
    got = ComparativeDistillation().compute_loss(to_tensor(t), to_tensor(s))
    np.testing.assert_allclose(to_numpy(got), want, rtol=RTOL)


@pytest.mark.parametrize("loss, reference", CASES, ids=IDS)
def test_serialization_round_trip(loss, reference):
    config = keras.saving.serialize_keras_object(loss)
    assert config["registered_name"] == f"ckd_core>{type(loss).__name__}"
    again = keras.saving.deserialize_keras_object(config)
    assert type(again) is type(loss)
    assert again.get_config() == loss.get_config()
    t, s = (to_tensor(a, "float64") for a in _batch())
    np.testing.assert_allclose(
        to_numpy(again.compute_loss(t, s)), to_numpy(loss.compute_loss(t, s)), rtol=RTOL
    )


BAD = [
    (RelationalDistillation, {"distance_weight": -1.0}, "distance_weight"),
    (RelationalDistillation, {"angle_weight": "50"}, "angle_weight"),
    (RelationalDistillation, {"angle_weight": float("nan")}, "angle_weight"),
    (ProjectedRelationalDistillation, {"out_dim": 0}, "out_dim"),
    (ProjectedRelationalDistillation, {"out_dim": 2.5}, "out_dim"),
    (ProjectedRelationalDistillation, {"projection": "random"}, "projection"),
    (ProjectedRelationalDistillation, {"out_dim": None}, "out_dim"),
    (ProjectedRelationalDistillation, {"seed": -1}, "seed"),
    (DISTDistillation, {"tau": 0.0}, "tau"),
    (DISTDistillation, {"beta": -2.0}, "beta"),
    (DISTDistillation, {"gamma": True}, "gamma"),
    (ComparativeDistillation, {"teacher_layer_name": 3}, "teacher_layer_name"),
    (ComparativeDistillation, {"student_layer_name": ""}, "student_layer_name"),
]


@pytest.mark.parametrize("cls, kwargs, name", BAD)
def test_bad_arguments_raise_value_error(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


def _mlp(name, width=8, classes=3, seed=0):
    init = keras.initializers.GlorotUniform(seed=seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(width, activation="relu", name="hidden", kernel_initializer=init),
            keras.layers.Dense(classes, name="logits", kernel_initializer=init),
        ],
        name=name,
    )


def test_budgeted_distiller_bad_arguments():
    student = _mlp("s")
    with pytest.raises(ValueError, match="student"):
        BudgetedDistiller("not a model")
    with pytest.raises(ValueError, match=r"distillation_losses\[0\]"):
        BudgetedDistiller(student, [ckd_core.ComparativeLoss()])
    with pytest.raises(ValueError, match=r"distillation_losses\[0\] names a layer"):
        BudgetedDistiller(student, [ComparativeDistillation("hidden", "hidden")])
    with pytest.raises(ValueError, match="distillation_loss_weights"):
        BudgetedDistiller(student, [ComparativeDistillation()], distillation_loss_weights=[1, 2])
    with pytest.raises(ValueError, match=r"distillation_loss_weights\[0\]"):
        BudgetedDistiller(student, [ComparativeDistillation()], distillation_loss_weights=[-1])
    with pytest.raises(ValueError, match="student_loss_weight"):
        BudgetedDistiller(student, student_loss_weight="1")
    budget = ckd_core.TeacherBudget(lambda x: {"a": x, "b": x}, budget=None)
    with pytest.raises(ValueError, match="key"):
        budgeted_targets(budget, [0, 1], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="labels"):
        budgeted_targets(budget, [0, 1], np.zeros((2, 3)), labels=np.zeros(3), key="a")
    with pytest.raises(ValueError, match="budget"):
        budgeted_targets(lambda x: x, [0], np.zeros((1, 3)))


# --------------------------------------------------------------------------- training
DATA = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
LABELS = np.eye(3, dtype="float32")[np.arange(16) % 3]
CE = keras.losses.CategoricalCrossentropy(from_logits=True)


def _weights(model):
    return [np.array(w) for w in model.get_weights()]


@needs_training
@pytest.mark.parametrize(
    "loss",
    [c[0] for c in CASES] + [ComparativeDistillation("hidden", "hidden")],
    ids=[*IDS, "ComparativeDistillation-features"],
)
def test_distiller_fit(loss):
    keras.utils.set_random_seed(0)
    teacher, student = _mlp("teacher", seed=1), _mlp("student", seed=2)
    before_t, before_s = _weights(teacher), _weights(student)
    distiller = keras.distillation.Distiller(
        teacher=teacher, student=student, distillation_losses=[loss], student_loss_weight=0.5
    )
    distiller.compile(optimizer=keras.optimizers.SGD(0.01), loss=CE)
    history = distiller.fit(DATA, LABELS, batch_size=8, epochs=1, verbose=0)  # 2 steps
    assert int(keras.ops.convert_to_numpy(distiller.optimizer.iterations)) == 2
    assert np.isfinite(history.history["loss"]).all()
    assert history.history["distillation_loss"][0] > 0
    assert all(np.array_equal(a, b) for a, b in zip(before_t, _weights(teacher), strict=True))
    assert any(not np.allclose(a, b) for a, b in zip(before_s, _weights(student), strict=True))


@needs_training
def test_distiller_checks_layer_names_and_round_trips():
    teacher, student = _mlp("teacher"), _mlp("student")
    with pytest.raises(ValueError, match="missing"):
        keras.distillation.Distiller(teacher, student, [ComparativeDistillation("missing")])
    losses = [ComparativeDistillation("hidden", "hidden"), DISTDistillation(tau=2.0)]
    distiller = keras.distillation.Distiller(teacher, student, losses, [1.0, 0.5])
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(distiller))
    assert [type(x) for x in again.distillation_losses] == [type(x) for x in losses]
    assert [x.get_config() for x in again.distillation_losses] == [x.get_config() for x in losses]


class CountingTeacher:
    """A Keras teacher behind a callable that counts the rows it is given."""

    def __init__(self) -> None:
        self.model = _mlp("teacher", seed=1)
        self.rows = 0
        self.calls = 0

    def __call__(self, x):
        self.rows += len(x)
        self.calls += 1
        return keras.ops.convert_to_numpy(self.model(x, training=False))


@needs_training
def test_budgeted_distiller_never_exceeds_the_budget():
    keras.utils.set_random_seed(0)
    teacher = CountingTeacher()
    train = np.arange(12)  # sample ids 0..11 train, 12..15 validate (no teacher call)
    budget = ckd_core.TeacherBudget(teacher, budget=len(train), batch_size=5)
    targets = budgeted_targets(budget, train, DATA[train], labels=LABELS[train])
    assert (teacher.rows, teacher.calls, budget.used) == (12, 3, 12)
    distiller = BudgetedDistiller(
        _mlp("student", seed=2), [ComparativeDistillation(), DISTDistillation()], [1.0, 0.5]
    )
    distiller.compile(
        keras.optimizers.SGD(0.01), loss=ckd_core.ComparativeLoss(), metrics=["accuracy"]
    )
    history = distiller.fit(
        DATA[train],
        targets,
        batch_size=4,
        epochs=3,
        verbose=0,
        validation_data=(DATA[12:], LABELS[12:]),
    )
    assert int(keras.ops.convert_to_numpy(distiller.optimizer.iterations)) == 9
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history.history)
    assert np.isfinite(history.history["loss"]).all()
    # the cache answers again; one more id would exceed the budget: refused before any call
    again = budgeted_targets(budget, train[::-1], DATA[train[::-1]])
    np.testing.assert_array_equal(again["teacher"], targets["teacher"][::-1])
    with pytest.raises(ckd_core.TeacherBudgetExceeded):
        budgeted_targets(budget, [12], DATA[12:13])
    assert (teacher.rows, teacher.calls, budget.used) == (12, 3, 12)


@needs_training
def test_budgeted_ckd_loss_equals_hand_computed():
    keras.utils.set_random_seed(0)
    n = 5
    x, y = DATA[:n], LABELS[:n]
    t = np.random.default_rng(1).normal(size=(n, 3)).astype("float32")
    budget = ckd_core.TeacherBudget(lambda batch: t[np.asarray(batch, int)], budget=n)
    targets = budgeted_targets(budget, np.arange(n), np.arange(n), labels=y)
    student = _mlp("student", seed=2)
    distiller = BudgetedDistiller(student, [ComparativeDistillation()])
    distiller.compile(keras.optimizers.SGD(0.0), loss=ckd_core.ComparativeLoss())
    s = keras.ops.convert_to_numpy(student(x)).astype(np.float64)

    def pairs_mse(a):
        return np.mean(
            [((s[i] - s[j]) - (a[i] - a[j])) ** 2 for i, j in itertools.permutations(range(n), 2)]
        )

    want = pairs_mse(y) + pairs_mse(t)  # MSE(ds, d onehot) + MSE(ds, d teacher)
    got = distiller.compute_loss(x, targets, keras.ops.convert_to_tensor(s.astype("float32")))
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(got)), want, rtol=1e-5)
    result = distiller.evaluate(x, targets, batch_size=n, verbose=0, return_dict=True)
    np.testing.assert_allclose(result["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(result["student_loss"], pairs_mse(y), rtol=1e-5)
    # labels alone (validation data): the label term only; training without
    # teacher outputs, or with sample weights, is refused
    np.testing.assert_allclose(
        distiller.evaluate(x, y, batch_size=n, verbose=0, return_dict=True)["loss"],
        pairs_mse(y),
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="teacher"):
        distiller.compute_loss(x, y, student(x))
    with pytest.raises(ValueError, match="sample_weight"):
        distiller.compute_loss(x, targets, student(x), sample_weight=np.ones(n))


@needs_training
def test_budgeted_distiller_serialization_round_trip():
    distiller = BudgetedDistiller(
        _mlp("student"),
        [RelationalDistillation(1.0, 2.0), keras.distillation.LogitsDistillation(temperature=4.0)],
        [0.5, 1.0],
        student_loss_weight=0.25,
    )
    distiller.compile(keras.optimizers.Adam(1e-3), loss=ckd_core.ComparativeLoss())
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(distiller))
    assert isinstance(again, BudgetedDistiller)
    assert again.student_loss_weight == 0.25 and again.distillation_loss_weights == [0.5, 1.0]
    assert (
        again.distillation_losses[0].get_config() == distiller.distillation_losses[0].get_config()
    )
    assert isinstance(again._student_loss, ckd_core.ComparativeLoss)
    x = DATA[:4]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(again.student(x)),
        keras.ops.convert_to_numpy(distiller.student(x)),
    )
