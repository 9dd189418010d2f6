"""Property-based bad-input suite: every bad input fails clearly or gives a non-finite loss.

Each example calls one loss of the shared table (``helpers.LOSSES``) through
one API of the active backend: the function, the Keras class, and the
adapter of the backend (``ckd_torch`` modules on torch, ``ckd_tensorflow``
classes on TensorFlow). It must end in a ``ValueError``/``TypeError``/
``IndexError`` whose message names the bad argument, or, for non-finite
input values, in a non-finite loss: never in a finite number.

Classes: shapes, ranks, dtypes, indices (``pairs``/``groups``), weights,
hyperparameters, non-finite values, and bad values under tracing
(``jax.jit``, ``tf.function`` with unknown static sizes, ``torch.func.vmap``),
where values cannot be checked and must turn the loss into NaN. Extreme but
valid inputs keep their exact value: weights times any scale, Hessians
(against finite differences of the gradient), copies and pickles.

Shapes are tiny, and a loss is drawn per example (not parametrized), so that
each property costs one property's examples; under JAX each property keeps
one input shape (``helpers.sizes``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import pytest
from helpers import BACKEND, LOSSES, NP_DTYPES, WEIGHTED_LOSSES, sizes, to_float, to_numpy
from hypothesis import given
from hypothesis import strategies as st

import ckd_core
from ckd_core import functional as F

ERRORS = (ValueError, TypeError, IndexError)
APIS = ["function", "class"] + {"torch": ["torch"], "tensorflow": ["tensorflow"]}.get(BACKEND, [])

if BACKEND == "torch":
    import ckd_torch
    import torch
if BACKEND == "tensorflow":
    import tensorflow as tf


def _tensor(x: np.ndarray, api: str) -> Any:
    if api == "torch":
        return torch.as_tensor(x)
    return keras.ops.convert_to_tensor(x)


def call(name: str, api: str, t: Any, s: Any, **options: Any) -> Any:
    """``LOSSES[name]`` through ``api`` (teacher ``t``, student ``s``)."""
    case = LOSSES[name]
    if api == "function":
        return case.fn(t, s, **options)
    if api == "torch":
        return case.make_torch()(s, t, **options)
    if api == "tensorflow":
        return case.make_tensorflow()(t, s, **options)
    return case.make()(t, s, **options)


def _arg_names(names: tuple[str, ...], api: str) -> tuple[str, ...]:
    """The core's argument names as ``api`` names them (ckd_torch: ``teacher``/``student``)."""
    if api != "torch":
        return names
    return tuple({"y_true": "teacher", "y_pred": "student"}.get(n, n) for n in names)


def expect_clear_failure(thunk: Callable[[], Any], names: tuple[str, ...]) -> None:
    """``thunk()`` raises a ValueError/TypeError/IndexError naming one of ``names``."""
    with pytest.raises(ERRORS) as info:
        out = thunk()
        pytest.fail(f"no error, returned {out!r}")  # pragma: no cover - the failure itself
    message = str(info.value)
    assert any(name in message for name in names), (names, type(info.value).__name__, message)


def expect_error_or_nonfinite(thunk: Callable[[], Any], names: tuple[str, ...]) -> None:
    try:
        out = thunk()
    except ERRORS as err:
        assert any(name in str(err) for name in names), (names, err)
        return
    value = to_float(out)
    assert not np.isfinite(value), f"finite loss {value} from bad input"


def _values(n: int, d: int, seed: int, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, d)).astype(NP_DTYPES[dtype]),
        rng.standard_normal((n, d)).astype(NP_DTYPES[dtype]),
    )


# ---------------------------------------------------------------------------
# Shapes and ranks
# ---------------------------------------------------------------------------

BAD_SHAPE_PAIRS = [
    ((4, 3), (4, 2)),  # feature dimensions differ
    ((4, 3), (5, 3)),  # batch sizes differ
    ((4,), (4,)),  # rank 1
    ((), ()),  # rank 0
    ((4, 3), (4, 3, 1)),  # ranks differ
    ((2, 3, 4), (2, 3, 4)),  # rank 3
    ((4, 0), (4, 0)),  # no features
]


@given(
    st.sampled_from(list(LOSSES)),
    st.sampled_from(APIS),
    st.sampled_from(BAD_SHAPE_PAIRS),
    st.booleans(),
)
def test_bad_shapes_and_ranks_name_both_shapes(name, api, shapes, swap):
    true_shape, pred_shape = shapes[::-1] if swap else shapes
    t = _tensor(np.zeros(true_shape, "float32"), api)
    s = _tensor(np.ones(pred_shape, "float32"), api)

    def run() -> Any:
        return call(name, api, t, s)

    flat_true, flat_pred = _flattened(true_shape, name, api), _flattened(pred_shape, name, api)
    if (flat_true, flat_pred) != (true_shape, pred_shape) and _valid_features(flat_true, flat_pred):
        # The torch feature modules flatten (batch, ...) to (batch, features)
        # by design: the loss is that of the flattened features (random
        # values: constant rows would give 0 whatever the flattening).
        rng = np.random.default_rng(0)
        t, s = (_tensor(rng.standard_normal(x).astype("float32"), api) for x in shapes)
        if swap:
            t, s = s, t
        flat = to_float(call(name, api, t.reshape(flat_true), s.reshape(flat_pred)))
        assert np.isfinite(flat), flat
        assert to_float(run()) == flat
        return
    with pytest.raises(ValueError) as info:
        run()
    message = str(info.value)
    assert str(true_shape) in message and str(pred_shape) in message, message


def _flattened(shape: tuple[int, ...], name: str, api: str) -> tuple[int, ...]:
    """``shape`` as the API sees it: the torch feature modules flatten rank > 2."""
    if api == "torch" and getattr(LOSSES[name].make_torch(), "flattens_features", False):
        if len(shape) > 2:
            return (shape[0], int(np.prod(shape[1:])))
    return shape


def _valid_features(true_shape: tuple[int, ...], pred_shape: tuple[int, ...]) -> bool:
    return true_shape == pred_shape and len(true_shape) == 2 and min(true_shape) >= 1


@given(st.sampled_from(["kd", "dist"]), st.sampled_from(APIS))
def test_empty_batch_of_a_mean_loss_is_an_error(name, api):
    t, s = (_tensor(np.zeros((0, 3), "float32"), api) for _ in range(2))
    expect_clear_failure(lambda: call(name, api, t, s), ("batch >= 1",))


# ---------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------


@given(
    st.sampled_from(list(LOSSES)),
    st.sampled_from(APIS),
    st.sampled_from(["int32", "int64", "bool", "uint8"]),
    st.sampled_from(["y_true", "y_pred", "both"]),
)
def test_non_float_inputs_name_the_argument(name, api, dtype, which):
    good = np.ones((4, 3), "float32")
    bad = np.ones((4, 3)).astype(dtype)
    t = _tensor(bad if which in ("y_true", "both") else good, api)
    s = _tensor(bad if which in ("y_pred", "both") else good, api)
    names = {"y_true": ("y_true",), "y_pred": ("y_pred",), "both": ("y_true", "y_pred")}[which]
    expect_clear_failure(lambda: call(name, api, t, s), _arg_names(names, api))


# ---------------------------------------------------------------------------
# Index arguments
# ---------------------------------------------------------------------------

N_ROWS = 6


def _bad_index(kind: str, rank: int, rng: np.random.Generator) -> Any:
    m = 3
    shape = (m,) if rank == 1 else (m, 2)
    good = rng.integers(0, N_ROWS, size=shape)
    if kind == "float":
        return good.astype("float32")
    if kind == "bool":
        return good > 2
    if kind == "rank":
        return good[:, None] if rank == 1 else good[:, 0]
    if kind == "empty":
        return np.zeros((0,) if rank == 1 else (0, 2), "int64")
    if kind == "too_large":
        good.flat[0] = N_ROWS + rng.integers(0, 5)
        return good
    if kind == "negative":
        good.flat[0] = -1 - rng.integers(0, 5)
        return good
    raise AssertionError(kind)


@given(
    st.sampled_from(["pairs", "groups"]),
    st.sampled_from(["float", "bool", "rank", "empty", "too_large", "negative", "length"]),
    st.sampled_from([0, 1]),
    st.sampled_from([a for a in APIS if a != "tensorflow"]),
    st.integers(0, 2**16),
)
def test_bad_indices_name_the_argument(option, kind, which, api, seed):
    rng = np.random.default_rng(seed)
    rank = 1 if option == "pairs" else 2
    t, s = (_tensor(x, api) for x in _values(N_ROWS, 3, seed))
    good = rng.integers(0, N_ROWS, size=(3,) if rank == 1 else (3, 2))
    if kind == "length":
        bad = rng.integers(0, N_ROWS, size=(4,) if rank == 1 else (4, 2))
    else:
        bad = _bad_index(kind, rank, rng)
    index = [good, good]
    index[which] = bad
    if api == "torch":
        index = [torch.as_tensor(i) for i in index]
    loss = ckd_core.ComparativeLoss() if api == "class" else None
    kwargs = {option: tuple(index)}
    if api == "function":
        thunk = lambda: F.comparative_loss(t, s, **kwargs)  # noqa: E731
    elif api == "class":
        thunk = lambda: loss(t, s, **kwargs)  # noqa: E731
    else:
        thunk = lambda: ckd_torch.ComparativeLoss()(s, t, **kwargs)  # noqa: E731
    expect_clear_failure(thunk, (option,))


@given(st.sampled_from(["some", None, 3, ("a",), ([0, 1], [1, 0], [2, 2])]))
def test_pairs_must_be_all_or_two_index_vectors(pairs):
    t, s = _values(4, 2, 0)
    expect_clear_failure(lambda: F.comparative_loss(t, s, pairs=pairs), ("pairs",))


# ---------------------------------------------------------------------------
# sample_weight
# ---------------------------------------------------------------------------


def _bad_weight(kind: str, n: int, rng: np.random.Generator) -> Any:
    w = rng.uniform(0.5, 2.0, size=n).astype("float32")
    if kind == "nan":
        w[rng.integers(0, n)] = np.nan
    elif kind == "inf":
        w[rng.integers(0, n)] = np.inf
    elif kind == "negative":
        w[rng.integers(0, n)] = -rng.uniform(0.1, 2.0)
    elif kind == "scalar_nan":
        return np.float32(np.nan)
    elif kind == "scalar_negative":
        return -1.0
    elif kind == "short":
        return w[:-1]
    elif kind == "long":
        return np.concatenate([w, w[:1]])
    elif kind == "2d":
        return w[:, None]
    elif kind == "bool":
        return w > 1
    elif kind == "string":
        return "balanced"
    else:
        raise AssertionError(kind)
    return w


WEIGHT_KINDS = [
    "nan",
    "inf",
    "negative",
    "scalar_nan",
    "scalar_negative",
    "short",
    "long",
    "2d",
    "bool",
    "string",
]


@given(
    st.sampled_from(WEIGHTED_LOSSES),
    st.sampled_from(APIS),
    st.sampled_from(WEIGHT_KINDS),
    sizes(2, 8),
    st.integers(0, 2**16),
)
def test_bad_sample_weight_is_an_error_naming_it(name, api, kind, n, seed):
    t, s = (_tensor(x, api) for x in _values(n, 3, seed))
    w = _bad_weight(kind, n, np.random.default_rng(seed))
    if api == "torch" and isinstance(w, np.ndarray):
        w = torch.as_tensor(w)
    expect_clear_failure(lambda: call(name, api, t, s, sample_weight=w), ("sample_weight",))


@given(st.sampled_from(["rkd_distance", "rkd_angle", "dist"]), st.sampled_from(APIS))
def test_sample_weight_on_a_loss_without_weights_is_an_error(name, api):
    if api == "function":
        return  # the functions have no sample_weight argument at all
    t, s = (_tensor(x, api) for x in _values(4, 3, 0))
    w = np.ones(4, "float32")
    if api == "torch":
        w = torch.as_tensor(w)
    expect_clear_failure(lambda: call(name, api, t, s, sample_weight=w), ("sample_weight",))


# ---------------------------------------------------------------------------
# Hyperparameters
# ---------------------------------------------------------------------------

BAD_NUMBERS = [0.0, -1.0, float("nan"), float("inf"), -float("inf"), True, "4", None]


def _constructors() -> dict[str, Callable[[Any], Any]]:
    made: dict[str, Callable[[Any], Any]] = {
        "temperature": lambda v: ckd_core.KDLoss(temperature=v),
        "tau": lambda v: ckd_core.DISTLoss(tau=v),
        "beta": lambda v: ckd_core.DISTLoss(beta=v),
        "gamma": lambda v: ckd_core.DISTLoss(gamma=v),
        "distance_weight": lambda v: ckd_core.RKDLoss(distance_weight=v),
        "angle_weight": lambda v: ckd_core.RKDLoss(angle_weight=v),
        "out_dim": lambda v: ckd_core.ProjectedRKDLoss(out_dim=v),
        "seed": lambda v: ckd_core.ProjectedRKDLoss(seed=v),
    }
    t, s = _values(4, 3, 0)
    made["temperature "] = lambda v: F.kd_loss(t, s, temperature=v)
    made["tau "] = lambda v: F.dist_loss(t, s, tau=v)
    made["dim"] = lambda v: F.make_projection(v, 2)
    made["out_dim "] = lambda v: F.make_projection(3, v)
    if BACKEND == "torch":
        made["temperature  "] = lambda v: ckd_torch.KDLoss(temperature=v)
        made["out_dim  "] = lambda v: ckd_torch.ProjectedRKDLoss(out_dim=v)
        made["tau  "] = lambda v: ckd_torch.DISTLoss(tau=v)
    return made


CONSTRUCTORS = _constructors()
# Zero is allowed for the weights of a sum (a term switched off).
ZERO_ALLOWED = {"beta", "gamma", "distance_weight", "angle_weight", "seed"}
INTEGERS = {"out_dim", "seed", "dim"}


def _valid(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if name in INTEGERS:
        return isinstance(value, int) and value >= (0 if name == "seed" else 1)
    if not isinstance(value, int | float) or not np.isfinite(value):
        return False
    return value > 0 or (value == 0 and name in ZERO_ALLOWED)


@given(st.sampled_from(list(CONSTRUCTORS)), st.sampled_from(BAD_NUMBERS + [1.5, -3, 2]))
def test_bad_hyperparameters_name_the_argument(argument, value):
    name = argument.strip()
    if _valid(name, value):
        CONSTRUCTORS[argument](value)  # accepted
        return
    expect_clear_failure(lambda: CONSTRUCTORS[argument](value), (name,))


# ---------------------------------------------------------------------------
# Non-finite input values
# ---------------------------------------------------------------------------


@given(
    st.sampled_from(list(LOSSES)),
    st.sampled_from(APIS),
    st.sampled_from([np.nan, np.inf, -np.inf]),
    st.sampled_from(["teacher", "student", "both"]),
    # Under JAX one dtype as well as one shape (each new one compiles every op).
    st.sampled_from(["float32"] if BACKEND == "jax" else ["float32", "float64", "float16"]),
    sizes(1, 6),
    sizes(1, 4),
    st.integers(0, 2**16),
    st.sampled_from(["none", "weights", "pairs", "groups"]),
)
def test_non_finite_input_gives_non_finite_loss(name, api, value, where, dtype, n, d, seed, extra):
    t, s = _values(n, d, seed, dtype)
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, n), rng.integers(0, d)
    if where in ("teacher", "both"):
        t[i, j] = value
    if where in ("student", "both"):
        s[rng.integers(0, n), rng.integers(0, d)] = value
    options: dict[str, Any] = {}
    if extra == "weights" and LOSSES[name].weights:
        w = rng.uniform(0.0, 2.0, size=n)
        w[i] = 0.0  # a zero weight on the bad row must not hide it
        options["sample_weight"] = w if api != "torch" else torch.as_tensor(w)
    elif extra in ("pairs", "groups") and name == "comparative" and n >= 2:
        # Pairs that avoid the bad rows must not hide them either.
        a = np.array([k for k in range(n) if k != i][:1] * 2)
        index = (a, a) if extra == "pairs" else (a[:, None], a[:, None])
        if api == "torch":
            index = tuple(torch.as_tensor(x) for x in index)
        options[extra] = index
    if name in ("kd", "dist") and n == 0:
        return
    t_in, s_in = _tensor(t, api), _tensor(s, api)
    expect_error_or_nonfinite(
        lambda: call(name, api, t_in, s_in, **options), _arg_names(("y_true",), api)
    )


# ---------------------------------------------------------------------------
# Under tracing: values unknown, bad ones give NaN (no host sync, no 0)
# ---------------------------------------------------------------------------


def _traced(fn: Callable[..., Any], n: int, d: int) -> Callable[..., Any]:
    """``fn`` under jax.jit, tf.function (unknown batch and feature sizes) or torch vmap."""
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    if BACKEND == "tensorflow":
        spec = tf.TensorSpec((None, None), tf.float32)
        return tf.function(
            fn,
            input_signature=[spec, spec, tf.TensorSpec((None,), tf.float32)]
            + [tf.TensorSpec((None,), tf.int32)] * 2,
            reduce_retracing=True,
        )
    if BACKEND == "torch":
        from torch.func import vmap

        def stacked(*args: Any) -> Any:
            return vmap(fn)(*(torch.as_tensor(a)[None] for a in args))[0]

        return stacked
    pytest.skip("the numpy backend does not trace")


def _traced_cases() -> dict[str, Callable[..., Any]]:
    return {
        "weights": lambda t, s, w, a, b: F.comparative_loss(t, s, sample_weight=w),
        "kd_weights": lambda t, s, w, a, b: F.kd_loss(t, s, sample_weight=w),
        "pairs": lambda t, s, w, a, b: F.comparative_loss(t, s, pairs=(a, b)),
        "groups": lambda t, s, w, a, b: F.comparative_loss(
            t, s, groups=(keras.ops.expand_dims(a, 1), keras.ops.expand_dims(b, 1))
        ),
        "nan_rkd": lambda t, s, w, a, b: F.rkd_distance_loss(t, s * w[:, None]),
    }


_TRACED: dict[str, Callable[..., Any]] = {}  # compiled once per case


@pytest.mark.skipif(BACKEND == "numpy", reason="the numpy backend does not trace")
@given(
    st.sampled_from(list(_traced_cases())),
    st.sampled_from(["nan", "inf", "negative", "too_large", "negative_index"]),
    st.integers(0, 2**16),
)
def test_bad_values_under_tracing_give_nan(case, kind, seed):
    n, d = 6, 3
    rng = np.random.default_rng(seed)
    t, s = _values(n, d, seed)
    w = rng.uniform(0.5, 2.0, size=n).astype("float32")
    a = rng.integers(0, n, size=4).astype("int32")
    b = rng.integers(0, n, size=4).astype("int32")
    if case in ("weights", "kd_weights", "nan_rkd"):
        if kind in ("too_large", "negative_index"):
            return
        if case == "nan_rkd" and kind == "negative":
            return  # a negative scale of a row is a valid input
        w[rng.integers(0, n)] = {"nan": np.nan, "inf": np.inf, "negative": -1.0}[kind]
    else:
        if kind not in ("too_large", "negative_index"):
            return
        a[rng.integers(0, 4)] = n + 3 if kind == "too_large" else -2
    if case not in _TRACED:
        _TRACED[case] = _traced(_traced_cases()[case], n, d)
    out = _TRACED[case](t, s, w, a, b)
    assert np.isnan(to_float(out)), (case, kind, to_float(out))


# ---------------------------------------------------------------------------
# Adapter input types
# ---------------------------------------------------------------------------


@pytest.mark.skipif(BACKEND != "torch", reason="ckd_torch")
@given(st.sampled_from(list(LOSSES)), st.sampled_from(["student", "teacher"]))
def test_torch_adapter_names_a_numpy_input(name, which):
    s = torch.zeros(4, 3)
    t = torch.zeros(4, 3)
    if which == "student":
        s = s.numpy()
    else:
        t = t.numpy()
    expect_clear_failure(lambda: LOSSES[name].make_torch()(s, t), (which, "numpy"))


# ---------------------------------------------------------------------------
# Extreme but valid: weights times a scale, Hessians, copies
# ---------------------------------------------------------------------------


@given(
    st.sampled_from(WEIGHTED_LOSSES),
    st.sampled_from(APIS),
    st.integers(-30, 19),
    sizes(2, 8),
    st.integers(0, 2**16),
)
def test_weights_times_a_scale_keep_the_loss(name, api, exponent, n, seed):
    """float32 weights times ``10**exponent`` (under- and overflowing squares) change nothing."""
    t, s = (_tensor(x, api) for x in _values(n, 3, seed))
    w = np.random.default_rng(seed).uniform(0.1, 1.0, n).astype("float32")
    scaled = (w * np.float32(10.0) ** exponent).astype("float32")
    if api == "torch":
        w, scaled = torch.as_tensor(w), torch.as_tensor(scaled)
    want = to_float(call(name, api, t, s, sample_weight=w))
    got = to_float(call(name, api, t, s, sample_weight=scaled))
    assert abs(got - want) <= 1e-5 * abs(want) + 1e-30, (exponent, got, want)


@pytest.mark.skipif(BACKEND == "numpy", reason="the numpy backend computes no gradients")
@given(st.sampled_from(list(LOSSES)), sizes(3, 5), st.integers(0, 2**16))
def test_hessian_vector_product_matches_the_gradient(name, n, seed):
    """``H v`` by double backpropagation equals the central difference of the gradient."""
    from helpers import to_tensor, value_and_grad
    from test_core_numerics import hessian

    rng = np.random.default_rng(seed)
    t, s, v = (rng.standard_normal((n, 2)) for _ in range(3))
    fn = LOSSES[name].fn
    h = hessian(fn, t, s)
    np.testing.assert_allclose(h, h.T, rtol=1e-6, atol=1e-8)

    def grad(x):
        return value_and_grad(fn, [to_tensor(t), to_tensor(x)])[1][0]

    step = 1e-5
    fd = (grad(s + step * v) - grad(s - step * v)) / (2 * step)
    np.testing.assert_allclose(h @ v.ravel(), fd.ravel(), rtol=1e-5, atol=1e-6)


@given(
    st.sampled_from(list(LOSSES)),
    st.sampled_from([api for api in APIS if api != "function"]),
    st.sampled_from(["deepcopy", "pickle"]),
    st.integers(0, 2**16),
)
def test_copies_compute_the_same_loss(name, api, how, seed):
    """A deep copy or a pickled loss has the same config and value as the original."""
    import copy
    import pickle

    case = LOSSES[name]
    loss = {"class": case.make, "torch": case.make_torch, "tensorflow": case.make_tensorflow}[api]()
    clone = copy.deepcopy(loss) if how == "deepcopy" else pickle.loads(pickle.dumps(loss))
    t, s = (_tensor(x, api) for x in _values(5, 3, seed))
    args = (s, t) if api == "torch" else (t, s)
    np.testing.assert_allclose(to_numpy(clone(*args)), to_numpy(loss(*args)), rtol=1e-6)
