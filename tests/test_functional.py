"""Deterministic checks of ``ckd_core.functional``: edge cases, bad input, dtypes.

Values are compared with the float64 loop oracle (``tests/oracle.py``);
gradients are computed with the active backend (skipped on numpy).
"""

from __future__ import annotations

import keras
import numpy as np
import oracle
import pytest
from helpers import (
    BACKEND,
    DTYPE_MAX,
    FLOAT_DTYPES,
    HALF_DTYPES,
    HAS_GRADIENTS,
    as_dtype,
    assert_close,
    compute_eps,
    dtype_of,
    expected_out_dtypes,
    make_batch,
    requires_gradients,
    to_float,
    to_numpy,
    to_tensor,
    value_and_grad,
)
from helpers import (
    LOSSES as LOSS_TABLE,
)

from ckd_core import functional as F

# name -> (loss(t, s), oracle(t, s)) from the shared table; the oracle gets
# the float64 values.
LOSSES = {name: (case.fn, case.oracle) for name, case in LOSS_TABLE.items()}
PAIRWISE = ["comparative", "projected", "rkd_distance", "rkd_angle"]


def _degenerate_inputs(n: int = 6, d: int = 4) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    t = rng.standard_normal((n, d))
    s = rng.standard_normal((n, d))
    return {
        "duplicated_rows": (np.repeat(t[: n // 2], 2, axis=0), np.repeat(s[: n // 2], 2, axis=0)),
        "student_duplicates_only": (t, np.repeat(s[:1], n, axis=0)),
        "all_equal_rows": (np.ones((n, d)), np.full((n, d), 3.0)),
        "zeros": (np.zeros((n, d)), np.zeros((n, d))),
        "zero_student": (t, np.zeros((n, d))),
        "equal_inputs": (t, t),
    }


# ---------------------------------------------------------------------------
# Finite values and gradients on degenerate inputs, for every float dtype
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", list(_degenerate_inputs()))
@pytest.mark.parametrize("name", list(LOSSES))
def test_degenerate_inputs_are_finite_and_match_oracle(name, case, dtype):
    fn, reference = LOSSES[name]
    t, s = (as_dtype(x, dtype) for x in _degenerate_inputs()[case])
    out = fn(to_tensor(t, dtype), to_tensor(s, dtype))
    assert dtype_of(out) in expected_out_dtypes(dtype)
    value = to_float(out)
    assert np.isfinite(value)
    want = reference(t, s)
    # RKD on exact duplicates: the Gram-form squared distance is rounding
    # noise ~eps*|x|^2 that the distance term takes as a distance of
    # ~sqrt(eps)*|x| where the oracle clamps at 1e-6: allow that.
    atol = 1e-3 if name == "rkd_distance" and dtype != "float64" else 1e-7
    if name == "dist":
        # 1 - Pearson of (nearly) constant rows: rounding of the centred
        # probabilities against the +1e-8 of the denominator.
        atol = 1e3 * compute_eps(dtype)
    assert_close(value, want, dtype, atol=atol)
    if not HAS_GRADIENTS:
        return
    constant_student = case in ("student_duplicates_only", "zero_student")
    if name == "dist" and dtype == "float16" and constant_student:
        # DIST's Pearson denominator ||a|| ||b|| + 1e-8 (the authors' code)
        # has slope b / 1e-8 where the student's centred probabilities a are
        # 0: a gradient of ~1e6, finite in float32 (the compute dtype) but
        # beyond float16's 65504. Check that this is the only reason.
        _, grads = value_and_grad(fn, [to_tensor(t, "float32"), to_tensor(s, "float32")], wrt=(1,))
        assert np.all(np.isfinite(grads[0])) and np.max(np.abs(grads[0])) > DTYPE_MAX["float16"]
        return
    _, grads = value_and_grad(fn, [to_tensor(t, dtype), to_tensor(s, dtype)], wrt=(0, 1))
    for g in grads:
        assert np.all(np.isfinite(g)), (name, case, dtype, g)


# Data at the edge of each dtype's range (float16 stops at 65504; bfloat16
# shares float32's exponent range; float64 1e150 keeps the oracle's squares
# finite while the RKD Gram matrix would overflow without rescaling).
LARGE = {"float16": 1e4, "bfloat16": 1e30, "float32": 1e30, "float64": 1e150}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("relation", ["independent", "close", "translated"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_large_values_are_finite_when_the_loss_is_representable(name, relation, dtype):
    """Finite inputs near the dtype's range give a finite loss and gradient.

    Wherever the exact loss itself fits in the dtype (the comparative loss of
    two independent 1e30 batches is ~1e60, which float32 cannot hold; the
    scale-invariant RKD and DIST terms always fit).
    """
    fn, reference = LOSSES[name]
    rng = np.random.default_rng(1)
    big = LARGE[dtype]
    t = rng.uniform(-1, 1, (5, 3)) * big
    if relation == "independent":
        s = rng.uniform(-1, 1, (5, 3)) * big
    elif relation == "close":
        s = t * (1 + rng.uniform(-1e-2, 1e-2, (5, 3)))
    else:
        s = t + big * 0.5
    t, s = as_dtype(t, dtype), as_dtype(s, dtype)
    assert np.all(np.isfinite(t)) and np.all(np.isfinite(s))
    want = reference(t, s)
    if not abs(want) < DTYPE_MAX[dtype] / 16:
        # Only the comparative family (value ~ |x|^2) can land here.
        assert name in ("comparative", "projected", "kd"), (name, want)
        pytest.skip(f"the exact loss {want:.3g} does not fit in {dtype}")
    out = fn(to_tensor(t, dtype), to_tensor(s, dtype))
    assert np.isfinite(to_float(out)), (name, to_float(out), want)
    if HAS_GRADIENTS:
        _, grads = value_and_grad(fn, [to_tensor(t, dtype), to_tensor(s, dtype)], wrt=(0, 1))
        for g in grads:
            assert np.all(np.isfinite(g)), (name, dtype, g)


@pytest.mark.parametrize("name", ["rkd_distance", "rkd_angle", "dist"])
def test_scale_invariant_losses_at_float32_range_match_oracle(name):
    fn, reference = LOSSES[name]
    batch = make_batch(7, 5, "float64", seed=4, kind="independent")
    t, s = batch.teacher * 1e30, batch.student * 3e29
    want = reference(t, s) if name != "dist" else reference(t / 1e30, s / 3e29)
    if name == "dist":  # DIST is not scale invariant: compare at the original scale
        want = reference(as_dtype(t, "float32"), as_dtype(s, "float32"))
    got = to_float(fn(to_tensor(t, "float32"), to_tensor(s, "float32")))
    assert_close(got, want, "float32", atol=1e-5)


# ---------------------------------------------------------------------------
# Batch sizes 0 and 1
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("n", [0, 1])
@pytest.mark.parametrize("name", PAIRWISE)
def test_batch_below_two_gives_zero(name, n, dtype):
    fn, _ = LOSSES[name]
    t = to_tensor(np.arange(n * 3).reshape(n, 3) * 0.5, dtype)
    s = to_tensor(np.arange(n * 3).reshape(n, 3) * -1.5, dtype)
    out = fn(t, s)
    assert dtype_of(out) in expected_out_dtypes(dtype)
    assert to_float(out) == 0.0
    if HAS_GRADIENTS:
        _, (grad,) = value_and_grad(fn, [t, s], wrt=(1,))
        assert grad.shape == (n, 3)
        assert np.all(grad == 0)


def test_weighted_batch_below_two_pairs_gives_zero():
    t = to_tensor([[1.0, 2.0], [3.0, 5.0], [0.0, 1.0]])
    s = to_tensor([[0.0, 2.0], [1.0, 1.0], [4.0, 1.0]])
    # One nonzero weight: no pair has positive weight.
    assert to_float(F.comparative_loss(t, s, sample_weight=np.array([0.0, 2.0, 0.0]))) == 0.0
    assert to_float(F.comparative_loss(t, s, sample_weight=np.zeros(3))) == 0.0
    weights = np.array([0.0, 2.0, 0.5])
    want = oracle.comparative(to_numpy(t), to_numpy(s), weights)
    assert want > 0
    assert_close(to_float(F.comparative_loss(t, s, sample_weight=weights)), want, "float64")


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

BAD_SHAPES = [
    ((4, 3), (4, 2)),
    ((4, 3), (5, 3)),
    ((4,), (4,)),
    ((4, 3), (4, 3, 1)),
    ((2, 3, 4), (2, 3, 4)),
]


@pytest.mark.parametrize("true_shape, pred_shape", BAD_SHAPES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_bad_shapes_raise_value_error_naming_both(name, true_shape, pred_shape):
    fn, _ = LOSSES[name]
    if name == "projected":
        fn = lambda t, s: F.projected_rkd_loss(t, s, np.eye(3))  # noqa: E731
    t = to_tensor(np.zeros(true_shape), "float32")
    s = to_tensor(np.zeros(pred_shape), "float32")
    with pytest.raises(ValueError) as info:
        fn(t, s)
    message = str(info.value)
    assert str(true_shape) in message and str(pred_shape) in message, message


@pytest.mark.parametrize(
    "dtypes", [("int32", "int32"), ("float32", "int32"), ("int64", "float32"), ("bool", "bool")]
)
@pytest.mark.parametrize("name", list(LOSSES))
def test_non_float_dtypes_raise_type_error(name, dtypes):
    fn, _ = LOSSES[name]
    t = keras.ops.convert_to_tensor(np.ones((4, 3)), dtype=dtypes[0])
    s = keras.ops.convert_to_tensor(np.ones((4, 3)), dtype=dtypes[1])
    with pytest.raises(TypeError):
        fn(t, s)


def test_invalid_options_raise():
    t, s = to_tensor(np.zeros((4, 3))), to_tensor(np.ones((4, 3)))
    with pytest.raises(ValueError):
        F.comparative_loss(t, s, pairs="some")
    with pytest.raises(ValueError):
        F.comparative_loss(t, s, np.ones(4), groups=(np.zeros((1, 1)), np.ones((1, 1))))
    with pytest.raises(ValueError):
        F.projected_rkd_loss(t, s, np.eye(4))
    with pytest.raises(ValueError):
        F.make_projection(3, 4, "orthogonal")
    with pytest.raises(ValueError):
        F.make_projection(3, 2, "identity")
    with pytest.raises(ValueError):
        F.make_projection(3, 2, "sparse")


# ---------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_output_dtype_is_input_dtype_and_value_matches_oracle(name, dtype):
    fn, reference = LOSSES[name]
    batch = make_batch(9, 5, dtype, seed=2, kind="independent")
    t, s = batch.tensors()
    out = fn(t, s)
    assert dtype_of(out) in expected_out_dtypes(dtype)
    atol = {"float16": 1e-3, "bfloat16": 1e-2}.get(dtype, 1e-6)
    assert_close(to_float(out), reference(batch.teacher, batch.student), dtype, atol=atol)
    if HAS_GRADIENTS:
        _, (grad,) = value_and_grad(fn, [t, s], wrt=(1,))
        assert np.all(np.isfinite(grad))


@requires_gradients
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_half_precision_gradients_have_input_dtype(name, dtype):
    fn, _ = LOSSES[name]
    t, s = make_batch(6, 4, dtype, seed=5).tensors()
    if BACKEND == "jax":
        import jax

        grad = jax.grad(lambda x: fn(t, x))(s)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(s)
            loss = fn(t, s)
        grad = tape.gradient(loss, s)
    else:
        s = s.detach().requires_grad_(True)
        fn(t, s).backward()
        grad = s.grad
    assert dtype_of(grad) == dtype
    assert np.all(np.isfinite(to_numpy(grad)))


def test_mixed_float_dtypes_follow_y_pred():
    t = to_tensor(np.ones((3, 2)) * [[1.0], [2.0], [4.0]], "float32")
    s = to_tensor(np.zeros((3, 2)), "float64")
    out = F.comparative_loss(t, s)
    assert dtype_of(out) in expected_out_dtypes("float64")
    assert_close(to_float(out), oracle.comparative(to_numpy(t), to_numpy(s)), "float32")


# ---------------------------------------------------------------------------
# Explicit pairs and groups: the torch.nn.MSELoss formulas of the issue
# ---------------------------------------------------------------------------


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    """``torch.nn.MSELoss()(a, b)``: mean over all elements."""
    return float(np.mean((a - b) ** 2))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_pairs_equal_mse_of_differences(dtype):
    batch = make_batch(10, 7, dtype, seed=6)
    s, t = batch.student, batch.teacher
    a = np.array([0, 1, 2, 3, 9, 9, 4, 5, 5])
    b = np.array([1, 0, 2, 8, 0, 9, 6, 7, 2])  # includes i == j pairs and repeats
    want = _mse(s[a] - s[b], t[a] - t[b])
    got = to_float(F.comparative_loss(*batch.tensors(), pairs=(a, b)))
    assert_close(got, want, dtype)
    # Index tensors work as well as NumPy arrays.
    index = (keras.ops.convert_to_tensor(a, "int32"), keras.ops.convert_to_tensor(b, "int64"))
    assert_close(to_float(F.comparative_loss(*batch.tensors(), pairs=index)), want, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_groups_equal_mse_of_group_mean_differences(dtype):
    batch = make_batch(12, 5, dtype, seed=7)
    s, t = batch.student, batch.teacher
    rng = np.random.default_rng(8)
    ga, gb = rng.integers(0, 12, size=(4, 3)), rng.integers(0, 12, size=(4, 2))
    want = _mse(s[ga].mean(1) - s[gb].mean(1), t[ga].mean(1) - t[gb].mean(1))
    got = to_float(F.comparative_loss(*batch.tensors(), groups=(ga, gb)))
    assert_close(got, want, dtype)


def test_all_pairs_small_example_by_hand():
    # e = s - t = [[1], [0], [0]]: pairs (0,1), (0,2), (1,0), (2,0) have
    # squared difference 1, the other two 0: mean over 6 ordered pairs = 2/3.
    t = to_tensor([[0.0], [1.0], [2.0]])
    s = to_tensor([[1.0], [1.0], [2.0]])
    assert_close(to_float(F.comparative_loss(t, s)), 2 / 3, "float64")
    assert_close(to_float(F.projected_rkd_loss(t, s, np.array([[2.0]]))), 8 / 3, "float64")


def test_make_projection():
    for kind in ("gaussian", "orthogonal"):
        p = F.make_projection(50, 8, kind, seed=1)
        assert p.shape == (50, 8)
        np.testing.assert_array_equal(p, F.make_projection(50, 8, kind, seed=1))
        assert not np.allclose(p, F.make_projection(50, 8, kind, seed=2))
    q = F.make_projection(50, 8, "orthogonal", seed=1)
    np.testing.assert_allclose(q.T @ q, np.eye(8), atol=1e-12)
    g = F.make_projection(400, 100, "gaussian", seed=0)
    # Entries N(0, 1) / sqrt(out_dim): mean square 1 / out_dim.
    assert abs(np.mean(g**2) * 100 - 1) < 0.02
    np.testing.assert_array_equal(F.make_projection(4, 4, "identity"), np.eye(4))


# ---------------------------------------------------------------------------
# Compiled execution: jax.jit / tf.function (torch.compile: test_torch_adapter)
# ---------------------------------------------------------------------------


def _compiled(fn):
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    pytest.skip(f"compilation is tested for jax and tensorflow here, not {BACKEND}")


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_run_compiled(name):
    fn, _ = LOSSES[name]
    batch = make_batch(8, 5, "float32", seed=9)
    eager = to_float(fn(*batch.tensors()))
    compiled = to_float(_compiled(fn)(*batch.tensors()))
    assert_close(compiled, eager, "float32", atol=1e-7)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="dynamic batch size: tf.function only")
@pytest.mark.parametrize("n", [1, 2, 7])
def test_comparative_with_unknown_batch_size(n):
    import tensorflow as tf

    spec = tf.TensorSpec((None, 4), tf.float64)
    weights = tf.TensorSpec((None,), tf.float64)
    plain = tf.function(F.comparative_loss, input_signature=[spec, spec])
    weighted = tf.function(
        lambda t, s, w: F.comparative_loss(t, s, sample_weight=w),
        input_signature=[spec, spec, weights],
    )
    kd = tf.function(F.kd_loss, input_signature=[spec, spec])
    batch = make_batch(n, 4, "float64", seed=n)
    w = np.linspace(0.5, 1.5, n)
    assert_close(
        to_float(plain(*batch.tensors())),
        oracle.comparative(batch.teacher, batch.student),
        "float64",
    )
    assert_close(
        to_float(weighted(*batch.tensors(), tf.constant(w))),
        oracle.comparative(batch.teacher, batch.student, w),
        "float64",
    )
    assert_close(to_float(kd(*batch.tensors())), oracle.kd(batch.teacher, batch.student), "float64")
