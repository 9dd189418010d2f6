"""Hypothesis properties of every loss, in the active backend's session.

Each property draws shapes (n 2-64, d 1-128), dtypes and values (see
``helpers.batches``) and checks the backend against the float64 loop oracle
(``tests/oracle.py``) or against an invariance of the loss. Run once per
backend, these are the backend-equivalence checks: every backend must agree
with the same oracle within its per-dtype tolerance (``helpers.rtol``).
"""

from __future__ import annotations

import numpy as np
import oracle
import pytest
from helpers import (
    BACKEND,
    LOSSES,
    Batch,
    as_dtype,
    assert_close,
    batches,
    call_form,
    compute_eps,
    dtype_of,
    expected_out_dtypes,
    forms,
    min_separation,
    requires_gradients,
    sizes,
    to_float,
    to_tensor,
    value_and_grad,
)
from hypothesis import assume, given
from hypothesis import strategies as st

from ckd_core import functional as F

# The RKD angle oracle loops over n^2 (anchor, j) in Python (k vectorized)
# and the loss is O(n^3): keep n small.
ANGLE_MAX_N = 16
# Relative separation (nearest distinct rows / batch diameter) required for
# RKD oracle checks below float64. The Gram form computes a squared distance
# as G_ii + G_jj - 2 G_ij, whose rounding error is ~eps * diameter^2, so a
# cosine or normalised distance between rows closer than ~sqrt(eps) * diameter
# is rounding noise (documented in rkd_angle_loss); the per-entry error is
# about eps / separation^2, which 0.05 keeps below ~3e-5 in float32.
LOW_PRECISION_MIN_SEPARATION = 0.05


def _compute_dtype(dtype: str) -> str:
    """The dtype the losses compute in (half types and numpy-backend float64: float32)."""
    return "float64" if compute_eps(dtype) < 1e-10 else "float32"


def _max_abs(*arrays: np.ndarray) -> float:
    return float(max(np.max(np.abs(a)) if a.size else 0.0 for a in arrays))


def _comparative_atol(b: Batch, value: float) -> float:
    """Rounding of ``e = y_pred - y_true`` (~eps |x|) propagated to the mean square."""
    eps = compute_eps(b.dtype)
    scale = _max_abs(b.teacher, b.student)
    return 16 * eps * scale * (np.sqrt(abs(value)) + eps * scale)


def _rkd_atol(b: Batch) -> float:
    """Per-entry error of Gram-form cosines/distances, ~eps / separation^2."""
    eps = compute_eps(b.dtype)
    sep = min(_min_sep_nonzero(b.teacher), _min_sep_nonzero(b.student))
    return 64 * eps / max(sep, 1e-300) ** 2 if sep < 1 else 64 * eps


def _min_sep_nonzero(x: np.ndarray) -> float:
    """Relative separation of distinct rows (exact duplicates are handled exactly)."""
    if x.shape[0] < 2:
        return 1.0
    unique = np.unique(x, axis=0)
    return 1.0 if unique.shape[0] < 2 else min_separation(unique)


def _weights(b: Batch, salt: int = 7) -> np.ndarray:
    # Multiples of 1/8 in [0, 2]: exact in every dtype; zeros included.
    return b.rng(salt).integers(0, 17, size=b.n) / 8.0


def _check_out(out, b: Batch) -> float:
    assert dtype_of(out) in expected_out_dtypes(b.dtype)
    return to_float(out)


# ---------------------------------------------------------------------------
# Oracle agreement
# ---------------------------------------------------------------------------


@given(batches())
def test_comparative_all_pairs_matches_oracle(b):
    want = oracle.comparative(b.teacher, b.student)
    got = _check_out(F.comparative_loss(*b.tensors()), b)
    assert_close(got, want, b.dtype, atol=_comparative_atol(b, want))


@given(batches())
def test_comparative_weighted_matches_oracle(b):
    w = _weights(b)
    want = oracle.comparative(b.teacher, b.student, w)
    got = _check_out(F.comparative_loss(*b.tensors(), sample_weight=to_tensor(w, "float32")), b)
    assert_close(got, want, b.dtype, atol=_comparative_atol(b, want))


@given(batches(), sizes(1, 200), st.booleans())
def test_comparative_pairs_matches_oracle(b, m, weighted):
    rng = b.rng()
    a, c = rng.integers(0, b.n, size=m), rng.integers(0, b.n, size=m)
    w = _weights(b) if weighted else None
    want = oracle.comparative_pairs(b.teacher, b.student, a, c, w)
    got = F.comparative_loss(
        *b.tensors(), sample_weight=None if w is None else to_tensor(w, "float32"), pairs=(a, c)
    )
    assert_close(_check_out(got, b), want, b.dtype, atol=_comparative_atol(b, want))


@given(batches(), sizes(1, 40), sizes(1, 5), sizes(1, 5))
def test_comparative_groups_matches_oracle(b, m, k_a, k_b):
    rng = b.rng()
    ga, gb = rng.integers(0, b.n, size=(m, k_a)), rng.integers(0, b.n, size=(m, k_b))
    want = oracle.comparative_groups(b.teacher, b.student, ga, gb)
    got = _check_out(F.comparative_loss(*b.tensors(), groups=(ga, gb)), b)
    assert_close(got, want, b.dtype, atol=_comparative_atol(b, want))


@given(batches(), st.sampled_from(["gaussian", "orthogonal"]), sizes(1, 16), st.booleans())
def test_projected_matches_oracle(b, kind, k, weighted):
    k = min(k, b.d) if kind == "orthogonal" else k
    p = F.make_projection(b.d, k, kind, seed=b.seed % 1000)
    w = _weights(b) if weighted else None
    want = oracle.projected(b.teacher, b.student, as_dtype(p, _compute_dtype(b.dtype)), w)
    got = F.projected_rkd_loss(
        *b.tensors(), p, sample_weight=None if w is None else to_tensor(w, "float32")
    )
    atol = _comparative_atol(b, want) * max(1.0, float(np.max(np.abs(p))) * np.sqrt(b.d))
    assert_close(_check_out(got, b), want, b.dtype, atol=atol)


def _kd_atol(b: Batch, temperature: float) -> float:
    """Log-softmax rounding: ~eps * (|log p| + max|z| / T) per entry, times T^2."""
    z = np.concatenate([b.teacher, b.student]) / temperature
    return 16 * compute_eps(b.dtype) * temperature**2 * (1 + 2 * np.max(np.abs(z)))


@given(batches(), st.sampled_from([1.0, 2.0, 4.0, 8.0]))
def test_kd_matches_oracle(b, temperature):
    want = oracle.kd(b.teacher, b.student, temperature)
    got = _check_out(F.kd_loss(*b.tensors(), temperature=temperature), b)
    assert_close(got, want, b.dtype, atol=_kd_atol(b, temperature))


@given(batches())
def test_kd_weighted_matches_explicit_weighted_mean(b):
    w = _weights(b)
    rows = [oracle.kd(b.teacher[i : i + 1], b.student[i : i + 1]) for i in range(b.n)]
    want = float(np.sum(w * rows) / np.sum(w)) if np.sum(w) > 0 else 0.0
    got = _check_out(F.kd_loss(*b.tensors(), sample_weight=to_tensor(w, "float32")), b)
    assert_close(got, want, b.dtype, atol=_kd_atol(b, 4.0))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _dist_atol(b: Batch, tau: float, beta: float, gamma: float) -> float:
    """Pearson of centred probabilities: error ~ eps * ||p|| / (||p - mean(p)|| + 1e-8).

    Saturated softmax columns (every row ~1 - 1e-9 for one class) are
    centred to rounding noise in float32: DIST is then ill-conditioned
    there, and the bound says so.
    """
    cond = 1.0
    for x in (b.teacher, b.student):
        p = _softmax(x / tau)
        for axis in (0, 1):
            centred = p - p.mean(axis=axis, keepdims=True)
            norm_c = np.sqrt(np.sum(centred**2, axis=axis))
            norm_p = np.sqrt(np.sum(p**2, axis=axis))
            cond = max(cond, float(np.max(norm_p / (norm_c + 1e-8))))
    return 64 * compute_eps(b.dtype) * tau**2 * (beta + gamma) * cond


@given(
    batches(),
    st.sampled_from([1.0, 4.0]),
    st.sampled_from([1.0, 0.5]),
    st.sampled_from([1.0, 2.0]),
)
def test_dist_matches_oracle(b, tau, beta, gamma):
    want = oracle.dist(b.teacher, b.student, beta=beta, gamma=gamma, tau=tau)
    got = _check_out(F.dist_loss(*b.tensors(), beta=beta, gamma=gamma, tau=tau), b)
    assert_close(got, want, b.dtype, atol=_dist_atol(b, tau, beta, gamma))


@given(batches())
def test_rkd_distance_matches_oracle(b):
    if b.dtype != "float64" or BACKEND == "numpy":
        assume(_min_sep_nonzero(b.teacher) >= LOW_PRECISION_MIN_SEPARATION)
        assume(_min_sep_nonzero(b.student) >= LOW_PRECISION_MIN_SEPARATION)
    want = oracle.rkd_distance(b.teacher, b.student)
    got = _check_out(F.rkd_distance_loss(*b.tensors()), b)
    assert_close(got, want, b.dtype, atol=_rkd_atol(b))


@given(batches(max_n=ANGLE_MAX_N))
def test_rkd_angle_matches_oracle(b):
    if b.dtype != "float64" or BACKEND == "numpy":
        # Float32 Gram-form cosines of near-duplicate rows are rounding noise
        # (see LOW_PRECISION_MIN_SEPARATION); exact duplicates are fine.
        assume(_min_sep_nonzero(b.teacher) >= LOW_PRECISION_MIN_SEPARATION)
        assume(_min_sep_nonzero(b.student) >= LOW_PRECISION_MIN_SEPARATION)
    want = oracle.rkd_angle(b.teacher, b.student)
    got = _check_out(F.rkd_angle_loss(*b.tensors()), b)
    assert_close(got, want, b.dtype, atol=_rkd_atol(b))


# ---------------------------------------------------------------------------
# Invariances and identities (backend against itself)
# ---------------------------------------------------------------------------

NOT_HALF = [dt for dt in ("float32", "float64")]


@given(batches(dtypes=NOT_HALF), st.floats(-10, 10))
def test_comparative_translation_invariance(b, shift_scale):
    shift = as_dtype(b.rng(3).standard_normal(b.d) * shift_scale * np.std(b.student), b.dtype)
    moved = as_dtype(b.student + shift, b.dtype)
    t = to_tensor(b.teacher, b.dtype)
    base = to_float(F.comparative_loss(t, to_tensor(b.student, b.dtype)))
    got = to_float(F.comparative_loss(t, to_tensor(moved, b.dtype)))
    # moved - teacher differs from (student - teacher) + shift by rounding:
    # ~eps * max|x| per entry.
    eps = compute_eps(b.dtype)
    atol = (
        16 * eps * _max_abs(b.teacher, b.student, moved) * (np.sqrt(base) + eps * _max_abs(moved))
    )
    assert_close(got, base, b.dtype, atol=atol)


@given(batches())
def test_comparative_symmetry_and_zero(b):
    t, s = b.tensors()
    forward = to_float(F.comparative_loss(t, s))
    backward = to_float(F.comparative_loss(s, t))
    assert_close(backward, forward, b.dtype)
    assert to_float(F.comparative_loss(t, t)) == 0.0
    assert to_float(F.comparative_loss(s, s, sample_weight=_weights(b))) == 0.0


@given(batches(), st.booleans())
def test_all_pairs_equals_mean_over_enumerated_pairs(b, weighted):
    ii, jj = np.nonzero(~np.eye(b.n, dtype=bool))
    w = to_tensor(_weights(b), "float32") if weighted else None
    t, s = b.tensors()
    all_pairs = to_float(F.comparative_loss(t, s, sample_weight=w))
    enumerated = to_float(F.comparative_loss(t, s, sample_weight=w, pairs=(ii, jj)))
    assert_close(all_pairs, enumerated, b.dtype, atol=_comparative_atol(b, enumerated), factor=2)


@given(batches(), sizes(1, 50))
def test_singleton_groups_equal_pairs(b, m):
    rng = b.rng()
    a, c = rng.integers(0, b.n, size=m), rng.integers(0, b.n, size=m)
    t, s = b.tensors()
    by_pairs = to_float(F.comparative_loss(t, s, pairs=(a, c)))
    by_groups = to_float(F.comparative_loss(t, s, groups=(a[:, None], c[:, None])))
    assert_close(by_groups, by_pairs, b.dtype)


@given(batches(), st.booleans())
def test_projected_identity_equals_comparative(b, weighted):
    t, s = b.tensors()
    w = to_tensor(_weights(b), "float32") if weighted else None
    comparative = to_float(F.comparative_loss(t, s, sample_weight=w))
    projected = to_float(F.projected_rkd_loss(t, s, F.make_projection(b.d, b.d, "identity"), w))
    assert_close(projected, comparative, b.dtype, atol=_comparative_atol(b, comparative))


def _orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


@given(batches(dtypes=["float64"]), st.sampled_from([0.25, 3.0, 10.0, 1e3]))
def test_rkd_distance_scale_invariance(b, c):
    # RepDistiller clamps squared distances at 1e-12 in absolute units, which
    # is not scale invariant: keep every pair (duplicates included) far above.
    for x in (b.teacher, b.student):
        assume(min_separation(x) > 1e-3)
        assume(min_separation(x) * np.ptp(x) * min(c, 1.0) > 1e-4)
    t, s = b.tensors()
    base = to_float(F.rkd_distance_loss(t, s))
    scaled = to_float(F.rkd_distance_loss(to_tensor(b.teacher * c), to_tensor(b.student * c)))
    only_student = to_float(F.rkd_distance_loss(t, to_tensor(b.student * c)))
    assert_close(scaled, base, b.dtype, atol=_rkd_atol(b))
    assert_close(only_student, base, b.dtype, atol=_rkd_atol(b))


@given(
    batches(max_n=ANGLE_MAX_N, dtypes=["float64"]),
    st.sampled_from([0.25, 3.0, 1e3]),
    st.sampled_from(["scale", "translate", "rotate", "all"]),
    st.booleans(),
)
def test_rkd_angle_scale_translation_rotation_invariance(b, c, transform, move_teacher):
    sep = min(_min_sep_nonzero(b.teacher), _min_sep_nonzero(b.student))
    assume(sep > 1e-3)
    rng = b.rng(5)
    x = b.teacher if move_teacher else b.student
    if transform in ("rotate", "all"):
        x = x @ _orthogonal(rng, b.d)
    if transform in ("scale", "all"):
        x = x * c
    if transform in ("translate", "all"):
        x = x + rng.standard_normal(b.d) * np.std(x) * 3
    t, s = b.tensors()
    base = to_float(F.rkd_angle_loss(t, s))
    moved = F.rkd_angle_loss(to_tensor(x), s) if move_teacher else F.rkd_angle_loss(t, to_tensor(x))
    assert_close(to_float(moved), base, b.dtype, atol=_rkd_atol(b))


def test_angle_oracle_matches_its_triple_loop_version():
    for n, d, seed in [(2, 1, 0), (5, 3, 1), (7, 2, 2)]:
        rng = np.random.default_rng(seed)
        t, s = rng.standard_normal((n, d)), rng.standard_normal((n, d))
        s[1] = s[0]  # a duplicated row: cosine 0 in both
        assert abs(oracle.rkd_angle(t, s) - oracle.rkd_angle_loops(t, s)) < 1e-15


@given(batches(max_n=ANGLE_MAX_N))
def test_rkd_zero_at_equal_inputs(b):
    t, _ = b.tensors()
    assert to_float(F.rkd_distance_loss(t, t)) == 0.0
    assert to_float(F.rkd_angle_loss(t, t)) == 0.0
    assert to_float(F.kd_loss(t, t)) == 0.0
    assert to_float(F.projected_rkd_loss(t, t, F.make_projection(b.d, 3))) == 0.0


# ---------------------------------------------------------------------------
# Gradients: float64 central finite differences against autodiff
# ---------------------------------------------------------------------------


def _noise_scale(name: str, b: Batch) -> float:
    """Size of the terms that cancel inside a loss (its rounding noise is ~eps times this).

    The comparative family sums non-negative terms (noise ~eps * value).
    """
    if name == "kd":
        return 4.0 * (1 + _max_abs(b.teacher, b.student) / 2)
    if name == "dist":
        return 32.0
    if name.startswith("rkd"):
        return 1.0
    return 0.0


def _check_directional_derivatives(
    fn,
    b: Batch,
    n_dirs: int = 1,
    noise: float = 0.0,
    move_teacher: bool = True,
    max_step: float = float("inf"),
) -> np.ndarray:
    """Central differences along random joint (teacher, student) directions vs autodiff.

    ``move_teacher=False``: student directions only (RKD's teacher side has
    a value but, by design, no gradient). Returns the teacher's gradient.
    """
    args = [b.teacher, b.student]
    f0, grads = value_and_grad(fn, [to_tensor(x) for x in args], wrt=(0, 1))
    assert all(np.all(np.isfinite(g)) for g in grads)
    rng = b.rng(13)
    h = min(1e-6 * max(float(np.sqrt(np.mean(b.student**2))), 1e-3), max_step)
    for _ in range(n_dirs):
        dirs = [rng.standard_normal(x.shape) for x in args]
        if not move_teacher:
            dirs[0] = np.zeros_like(dirs[0])

        def at(step: float, dirs: list[np.ndarray] = dirs) -> float:
            moved = [x + step * v for x, v in zip(args, dirs, strict=True)]
            return to_float(fn(to_tensor(moved[0]), to_tensor(moved[1])))

        fd = (at(h) - at(-h)) / (2 * h)
        ad = sum(float(np.sum(g * v)) for g, v in zip(grads, dirs, strict=True))
        scale = float(np.sqrt(sum(np.sum(g**2) for g in grads) * sum(np.sum(v**2) for v in dirs)))
        # Truncation O(h^2) and rounding noise ~eps |f| / h of the central difference.
        assert abs(fd - ad) <= 1e-6 * scale + 1e-13 * max(abs(f0), noise) / h, (fd, ad, scale)
    return grads[0]


GRAD_LOSSES = forms("gradient")


@requires_gradients
@pytest.mark.parametrize("name", list(GRAD_LOSSES))
@given(
    b=batches(
        max_n=32,
        max_d=32,
        dtypes=["float64"],
        kinds=["independent", "close", "affine"],
        min_scale=0.1,
    )
)
def test_gradients_match_finite_differences(name, b):
    def fn(t, s):
        return call_form(GRAD_LOSSES[name], t, s)

    # KD (T=2) and DIST (tau=4) soften logits by a fixed temperature: their
    # curvature does not shrink with large logits, so neither may the step.
    max_step = 1e-4 if name in ("kd", "dist") else float("inf")
    _check_directional_derivatives(fn, b, noise=_noise_scale(name, b), max_step=max_step)


@requires_gradients
@pytest.mark.parametrize("name", ["rkd_distance", "rkd_angle"])
@given(
    b=batches(
        max_n=ANGLE_MAX_N,
        max_d=32,
        dtypes=["float64"],
        kinds=["independent", "affine"],
        min_scale=0.1,
    )
)
def test_rkd_gradients_match_finite_differences(name, b):
    # Kinks (the 1e-12 distance clamp, the duplicate threshold) only matter
    # for (near-)duplicate rows: keep rows apart so that the loss is smooth.
    assume(min(min_separation(b.teacher), min_separation(b.student)) > 1e-2)
    fn = LOSSES[name].fn
    teacher_grad = _check_directional_derivatives(fn, b, noise=1.0, move_teacher=False)
    # The teacher side carries no gradient.
    assert np.all(teacher_grad == 0)


def naive_rkd_angle(y_true, y_pred):
    """RepDistiller's explicit-difference angle loss (n x n x d), for autodiff."""
    from keras import ops

    def cosines(x):
        diff = x[None, :, :] - x[:, None, :]  # diff[a, j] = x_j - x_a
        sq = ops.sum(ops.square(diff), axis=-1, keepdims=True)
        # F.normalize: zero vectors stay zero. (No ops.maximum with a Python
        # float: Keras computes it in float32 for float64 inputs on torch.)
        positive = sq > 0
        unit = diff / ops.where(positive, ops.sqrt(ops.where(positive, sq, 1)), 1)
        # Explicit products (ops.matmul runs float64 in float32 on torch).
        return ops.reshape(ops.sum(unit[:, :, None, :] * unit[:, None, :, :], axis=-1), (-1,))

    diff = cosines(y_pred) - cosines(ops.stop_gradient(y_true))
    absolute = ops.abs(diff)
    terms = ops.where(absolute < 1, 0.5 * ops.square(diff), absolute - 0.5)
    return ops.sum(terms) / terms.shape[0]


@requires_gradients
@given(
    b=batches(
        max_n=ANGLE_MAX_N,
        max_d=32,
        dtypes=["float64"],
        kinds=["independent", "affine", "clustered"],
    )
)
def test_rkd_angle_custom_gradient_matches_naive_autodiff(b):
    assume(min(min_separation(b.teacher), min_separation(b.student)) > 1e-2)
    value, (grad,) = value_and_grad(F.rkd_angle_loss, b.tensors(), wrt=(1,))
    naive_value, (naive_grad,) = value_and_grad(naive_rkd_angle, b.tensors(), wrt=(1,))
    assert_close(value, naive_value, "float64", atol=1e-13)
    # The loss is scale invariant, so gradients scale like 1 / spread: that
    # is the natural size of the rounding noise when the gradient is ~0
    # (e.g. dim 1, where every cosine is +-1).
    scale = max(float(np.max(np.abs(naive_grad))), 1.0 / float(np.ptp(b.student)))
    err = float(np.max(np.abs(grad - naive_grad)))
    assert err <= 1e-8 * scale, (err, scale)
