"""Regression tests of the core numerics on every backend.

Exact second derivatives (Hessians against finite differences of the
gradient and against the pair form), scale-free sample weights, scaling
before squaring, float64 kept end to end (numpy backend included), traced
out-of-range indices, the RKD near-duplicate threshold and clear errors for
string weights and ragged groups.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import oracle
import pytest
from helpers import (
    BACKEND,
    LOSS_NAMES,
    LOSSES,
    WEIGHTED_LOSSES,
    dtype_of,
    projection_for,
    requires_gradients,
    to_float,
    to_numpy,
    to_tensor,
    value_and_grad,
)

from ckd_core import functional as F


def _gradient(fn: Any, t: np.ndarray, s: np.ndarray) -> np.ndarray:
    return value_and_grad(fn, [to_tensor(t), to_tensor(s)])[1][0]


def hessian(fn: Any, t: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``d^2 fn(t, s) / ds^2`` as an ``(n d, n d)`` matrix, by the backend's own tools.

    ``torch.autograd.functional.hessian``, ``jax.hessian`` or a nested
    ``tf.GradientTape`` (jacobian of the gradient).
    """
    size = s.size
    teacher = to_tensor(t)
    if BACKEND == "torch":
        import torch

        h = torch.autograd.functional.hessian(lambda x: fn(teacher, x), to_tensor(s))
    elif BACKEND == "jax":
        h = _jitted_jax_hessian(fn)(teacher, to_tensor(s))
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        x = tf.Variable(s)
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = fn(teacher, x)
            grad = inner.gradient(value, x)
        h = outer.jacobian(grad, x)
    else:
        pytest.skip("the numpy backend computes values only, no gradients")
    return np.asarray(to_numpy(h)).reshape(size, size)


@functools.cache
def _jitted_jax_hessian(fn: Any) -> Any:
    """``jax.jit(jax.hessian(fn, argnums=1))``, compiled once per loss and shape."""
    import jax

    return jax.jit(jax.hessian(fn, argnums=1))


def _batch(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.standard_normal((n, d))


@requires_gradients
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_hessian_equals_finite_differences_of_the_gradient(name: str) -> None:
    """Every column ``H e_k`` equals ``(g(s + h e_k) - g(s - h e_k)) / 2h``."""
    fn = LOSSES[name].fn
    t, s = _batch(5, 3, seed=1)
    h = hessian(fn, t, s)
    step = 1e-5
    for k in range(s.size):
        direction = np.zeros(s.size)
        direction[k] = step
        direction = direction.reshape(s.shape)
        fd = (_gradient(fn, t, s + direction) - _gradient(fn, t, s - direction)) / (2 * step)
        np.testing.assert_allclose(h[:, k], fd.ravel(), rtol=1e-5, atol=1e-7)


@requires_gradients
def test_comparative_hessian_is_the_pair_forms() -> None:
    """n=4, d=1: row 0 of the Hessian is ``[1, -1/3, -1/3, -1/3]``, not ``[4/3, 0, 0, 0]``."""
    t, s = _batch(4, 1, seed=2)
    h = hessian(F.comparative_loss, t, s)
    np.testing.assert_allclose(h[0], [1, -1 / 3, -1 / 3, -1 / 3], atol=1e-12)
    projected = lambda a, b: F.projected_rkd_loss(a, b, np.eye(1))  # noqa: E731
    np.testing.assert_allclose(hessian(projected, t, s)[0], [1, -1 / 3, -1 / 3, -1 / 3], atol=1e-12)


# ---------------------------------------------------------------------------
# Weights: scale-free, no cancellation, no underflow or overflow
# ---------------------------------------------------------------------------

TWO_ROWS = (np.zeros((2, 1), "float32"), np.array([[0.0], [1.0]], "float32"))


@pytest.mark.parametrize("small", [1e-8, 1e-4])
def test_small_weight_does_not_cancel(small: float) -> None:
    """``t = 0, s = [0, 1]``: one pair, of loss 1, whatever its weight (was 0.0 for 1e-8)."""
    t, s = TWO_ROWS
    loss = F.comparative_loss(t, s, np.array([1.0, small], "float32"))
    assert abs(to_float(loss) - 1.0) <= 1e-6


@pytest.mark.parametrize("name", WEIGHTED_LOSSES)
@pytest.mark.parametrize("factor", [1e-30, 1e-20, 1e19])
def test_weights_are_scale_free(name: str, factor: float) -> None:
    """Multiplying every weight by a constant leaves the loss unchanged (float32)."""
    t, s = (x.astype("float32") for x in _batch(6, 4, seed=3))
    w = np.random.default_rng(4).uniform(0.5, 2.0, 6)
    fn = LOSSES[name].fn
    want = oracle_value(name, t, s, w)
    got = to_float(
        fn(to_tensor(t, "float32"), to_tensor(s, "float32"), (w * factor).astype("float32"))
    )
    assert abs(got - want) <= 1e-5 * abs(want)


def oracle_value(name: str, t: np.ndarray, s: np.ndarray, w: np.ndarray) -> float:
    """The float64 oracle of a weighted loss of the table."""
    if name == "kd":
        kl = [oracle.kd(t[i : i + 1], s[i : i + 1]) for i in range(len(w))]
        return float(np.sum(w * np.array(kl)) / np.sum(w))
    if name == "projected":
        return oracle.projected(t, s, projection_for(t.shape[1]), weights=w)
    return oracle.comparative(t, s, weights=w)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's x64 switch")
def test_int64_weights_beyond_int32_with_jax_x64_off() -> None:
    """``2**40`` int64 weights are not wrapped to int32 0 (the loss was 0.0)."""
    import jax

    t, s = TWO_ROWS
    with jax.enable_x64(False):
        loss = F.comparative_loss(t, s, np.array([2**40, 2**40], "int64"))
        assert to_float(loss) == pytest.approx(1.0, rel=1e-6)


# ---------------------------------------------------------------------------
# Scale before squaring: no inf (or 0) where the result fits
# ---------------------------------------------------------------------------

CKD_FORMS = {
    "all": lambda t, s: F.comparative_loss(t, s),
    "weighted": lambda t, s: F.comparative_loss(t, s, np.array([1.0, 2.0, 1.0, 3.0], "float32")),
    "pairs": lambda t, s: F.comparative_loss(t, s, pairs=(np.array([0, 2]), np.array([1, 3]))),
    "groups": lambda t, s: F.comparative_loss(
        t, s, groups=(np.array([[0, 2]]), np.array([[1, 3]]))
    ),
    "projected": lambda t, s: F.projected_rkd_loss(t, s, np.eye(2)),
}
CKD_ORACLES = {
    "all": lambda t, s: oracle.comparative(t, s),
    "weighted": lambda t, s: oracle.comparative(t, s, [1.0, 2.0, 1.0, 3.0]),
    "pairs": lambda t, s: oracle.comparative_pairs(t, s, [0, 2], [1, 3]),
    "groups": lambda t, s: oracle.comparative_groups(t, s, [[0, 2]], [[1, 3]]),
    "projected": lambda t, s: oracle.projected(t, s, np.eye(2)),
}


@pytest.mark.parametrize("form", list(CKD_FORMS))
@pytest.mark.parametrize("magnitude", [8.66e18, 1.0])
def test_ckd_scales_before_squaring(form: str, magnitude: float) -> None:
    """float32 residuals of 8.66e18: the sums of squares overflow, the result (~2e38) fits."""
    t = np.zeros((4, 2), "float32")
    signs = np.array([[1.0, 0.5], [-1.0, 0.25], [1.0, -0.5], [-1.0, 1.0]])
    s = (signs * magnitude).astype("float32")
    want = CKD_ORACLES[form](t.astype(np.float64), s.astype(np.float64))
    got = CKD_FORMS[form](to_tensor(t, "float32"), to_tensor(s, "float32"))
    assert dtype_of(got) == "float32"
    assert abs(to_float(got) - want) <= 1e-5 * want, (to_float(got), want)


# ---------------------------------------------------------------------------
# The data-parallel path (all_reduce): exact Hessian, scaled before squaring
# ---------------------------------------------------------------------------

COPIES = 3  # replicas simulated in one process: each holds the same shard


def _sum_over_copies(x: Any) -> Any:
    """``all_reduce`` of ``COPIES`` replicas with equal shards: the sum is ``COPIES * x``.

    The loss is then that of the batch tiled ``COPIES`` times, as a function of one
    shard: its derivatives include every cross-replica term.
    """
    return x * COPIES


ALL_REDUCE_WEIGHTS = np.array([1.0, 2.0, 0.5, 3.0, 1.5])
ALL_REDUCE_FORMS = {
    "all": lambda t, s, reduce=None: F.comparative_loss(t, s, all_reduce=reduce),
    "weighted": lambda t, s, reduce=None: F.comparative_loss(
        t, s, np.tile(ALL_REDUCE_WEIGHTS, s.shape[0] // 5), all_reduce=reduce
    ),
    "projected": lambda t, s, reduce=None: F.projected_rkd_loss(
        t, s, np.array([[1.0, 0.5], [-0.5, 1.0], [0.25, 2.0]])[: s.shape[1]], all_reduce=reduce
    ),
}


def _tiled(x: Any) -> Any:
    import keras

    return keras.ops.concatenate([x] * COPIES, axis=0)


@requires_gradients
@pytest.mark.parametrize("form", list(ALL_REDUCE_FORMS))
def test_all_reduce_hessian_is_exact(form: str) -> None:
    """The Hessian through ``all_reduce`` equals finite differences of its gradient and the
    single-process Hessian of the tiled batch (the global mean carried no gradient)."""
    loss = ALL_REDUCE_FORMS[form]
    distributed = functools.partial(loss, reduce=_sum_over_copies)
    t, s = _batch(5, 3, seed=11)
    h = hessian(distributed, t, s)
    tiled = hessian(lambda a, b: _tiled_form(loss, a, b), t, s)
    np.testing.assert_allclose(h, tiled, rtol=1e-9, atol=1e-12)
    step = 1e-5
    for seed in range(2):  # Hessian-vector products along random directions
        v = np.random.default_rng(seed).standard_normal(s.shape)
        fd = (_gradient(distributed, t, s + step * v) - _gradient(distributed, t, s - step * v)) / (
            2 * step
        )
        np.testing.assert_allclose(h @ v.ravel(), fd.ravel(), rtol=1e-5, atol=1e-7)


def _tiled_form(loss: Any, t: Any, s: Any) -> Any:
    """The single-process loss of the batch of every copy (weights tiled alike)."""
    return loss(_tiled(t), _tiled(s))


@pytest.mark.parametrize("form", list(ALL_REDUCE_FORMS))
@pytest.mark.parametrize("magnitude", [8.66e18, 1.0])
def test_all_reduce_scales_before_squaring(form: str, magnitude: float) -> None:
    """float32 residuals of 8.66e18: the sums of squares overflowed (inf), the loss of the
    global batch fits float32."""
    signs = np.array([[1.0, 0.5], [-1.0, 0.25], [1.0, -0.5], [-1.0, 1.0], [0.5, -1.0]])
    t = np.zeros((5, 2), "float32")
    s = (signs * magnitude).astype("float32")
    want = _tiled_form(ALL_REDUCE_FORMS[form], to_tensor(t), to_tensor(s.astype(np.float64)))
    got = ALL_REDUCE_FORMS[form](to_tensor(t, "float32"), to_tensor(s, "float32"), _sum_over_copies)
    assert dtype_of(got) == "float32"
    assert abs(to_float(got) - to_float(want)) <= 1e-5 * to_float(want), (got, want)


@pytest.mark.parametrize("factor", [1e-30, 1e19])
def test_all_reduce_weights_are_scale_free(factor: float) -> None:
    """float32 weights of 1e19 (their squares overflowed: NaN) or 1e-30 (underflowed: 0)
    through ``all_reduce``: the weighted loss of the global batch."""
    t, s = (x.astype("float32") for x in _batch(5, 3, seed=12))
    w = ALL_REDUCE_WEIGHTS * factor
    got = F.comparative_loss(
        to_tensor(t, "float32"),
        to_tensor(s, "float32"),
        w.astype("float32"),
        all_reduce=_sum_over_copies,
    )
    want = oracle.comparative(
        np.tile(t, (COPIES, 1)), np.tile(s, (COPIES, 1)), np.tile(ALL_REDUCE_WEIGHTS, COPIES)
    )
    assert abs(to_float(got) - want) <= 1e-5 * want, (to_float(got), want)


# ---------------------------------------------------------------------------
# float64 end to end (the numpy backend computed some ops in float32)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_float64_is_computed_in_float64(name: str) -> None:
    t, s = _batch(7, 5, seed=5)
    got = LOSSES[name].fn(to_tensor(t), to_tensor(s))
    assert dtype_of(got) == "float64"
    want = LOSSES[name].oracle(t, s)
    assert abs(to_float(got) - want) <= 1e-12 * abs(want)


@pytest.mark.parametrize("name", WEIGHTED_LOSSES)
def test_float64_tiny_weights(name: str) -> None:
    """float64 weights of 1e-300 (their products underflow) keep the weighted loss."""
    t, s = _batch(6, 4, seed=6)
    w = np.random.default_rng(7).uniform(0.5, 2.0, 6)
    got = to_float(LOSSES[name].fn(to_tensor(t), to_tensor(s), w * 1e-300))
    assert abs(got - oracle_value(name, t, s, w)) <= 1e-12 * abs(oracle_value(name, t, s, w))


# ---------------------------------------------------------------------------
# Traced out-of-range indices >= 2**31: NaN, never a wrapped valid row
# ---------------------------------------------------------------------------

BIG_INDICES = [2**31, 2**32, 2**32 + 1, 2**40]


def _traced(fn: Any) -> list[Any]:
    """``fn`` under every tracer of the backend that hides index values."""
    if BACKEND == "jax":
        import jax

        return [jax.jit(fn)]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return [tf.function(fn), tf.function(fn, jit_compile=True)]
    if BACKEND == "torch":
        import torch

        def vmapped(t: Any, s: Any, a: Any, b: Any) -> Any:  # indices batched: traced
            return torch.vmap(lambda i, j: fn(t, s, i, j))(torch.stack([a, a]), torch.stack([b, b]))

        return [vmapped]
    pytest.skip("the numpy backend does not trace")


@pytest.mark.parametrize("big", BIG_INDICES)
@pytest.mark.parametrize("form", ["pairs", "groups"])
def test_traced_huge_index_gives_nan(big: int, form: str) -> None:
    """int64 index 2**32 wrapped to row 0 (a finite loss) under the int32 cast."""

    def loss(t: Any, s: Any, a: Any, b: Any) -> Any:
        if form == "pairs":
            return F.comparative_loss(t, s, pairs=(a, b))
        return F.comparative_loss(t, s, groups=(a[:, None], b[:, None]))

    t, s = _batch(4, 2, seed=8)
    a = to_index(np.array([0, big], "int64"))
    b = to_index(np.array([1, 2], "int64"))
    for traced in _traced(loss):
        values = to_numpy(traced(to_tensor(t), to_tensor(s), a, b))
        assert np.all(np.isnan(values)), values


def to_index(values: np.ndarray) -> Any:
    import keras

    return keras.ops.convert_to_tensor(values, dtype=str(values.dtype))


# ---------------------------------------------------------------------------
# RKD near-duplicate threshold: the Gram form's rounding level
# ---------------------------------------------------------------------------


def _near_duplicates(rel: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 batch whose last student row is ``rel`` times its spread from row 0."""
    rng = np.random.default_rng(seed)
    t, s = rng.standard_normal((8, 4)), rng.standard_normal((8, 4))
    u = rng.standard_normal(4)
    s[7] = s[0] + rel * np.linalg.norm(s[0] - s.mean(0)) * u / np.linalg.norm(u)
    return t.astype("float32"), s.astype("float32")


@pytest.mark.parametrize(("rel", "seed"), [(1e-2, 0), (3e-3, 1), (3e-3, 2), (2e-3, 1)])
def test_rkd_angle_near_duplicates_keep_their_angle(rel: float, seed: int) -> None:
    """float32 rows 3e-3 apart were zeroed as duplicates (relative error 2e-2, now 3e-5)."""
    t, s = _near_duplicates(rel, seed=seed)
    want = oracle.rkd_angle(t, s)
    got = to_float(F.rkd_angle_loss(to_tensor(t, "float32"), to_tensor(s, "float32")))
    assert abs(got - want) <= 1e-3 * want, (got, want)


@requires_gradients
def test_rkd_angle_gradient_finite_at_every_separation() -> None:
    for k, rel in enumerate(np.logspace(-2, -7, 40)):
        t, s = _near_duplicates(float(rel), seed=k)
        value, (grad,) = value_and_grad(
            F.rkd_loss, [to_tensor(t, "float32"), to_tensor(s, "float32")]
        )
        assert np.isfinite(value) and np.all(np.isfinite(grad)), rel


def test_rkd_exact_duplicates_count_as_cosine_zero() -> None:
    t, s = _near_duplicates(0.0, seed=1)
    want = oracle.rkd_angle(t, s)
    got = to_float(F.rkd_angle_loss(to_tensor(t, "float32"), to_tensor(s, "float32")))
    assert abs(got - want) <= 1e-5 * want


# ---------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", WEIGHTED_LOSSES)
@pytest.mark.parametrize("weights", [np.array(["1", "2"]), ["a", "b"], np.array([b"1", b"2"])])
def test_string_sample_weight_is_a_type_error(name: str, weights: Any) -> None:
    t, s = _batch(2, 3)
    with pytest.raises(TypeError, match="sample_weight"):
        LOSSES[name].fn(to_tensor(t), to_tensor(s), weights)


@pytest.mark.parametrize("side", [0, 1])
def test_ragged_groups_name_groups(side: int) -> None:
    t, s = _batch(4, 2)
    ragged = [[0, 1], [2]]
    groups = (ragged, [[1, 2], [3, 0]]) if side == 0 else ([[1, 2], [3, 0]], ragged)
    with pytest.raises(ValueError, match=rf"groups\[{side}\]"):
        F.comparative_loss(to_tensor(t), to_tensor(s), groups=groups)
