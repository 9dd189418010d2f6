"""Shared test helpers: backend tensors, gradients, tolerances, hypothesis data.

The Keras backend is fixed by ``KERAS_BACKEND`` before keras is imported; the
suite runs once per backend (numpy, jax, torch, tensorflow), each in its own
process. Test modules import these helpers with ``from helpers import ...``
(``tests/conftest.py`` puts ``tests/`` on ``sys.path`` and loads the
hypothesis profiles).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

if os.environ.get("KERAS_BACKEND") == "jax":
    import jax

    # Before keras creates any array: float64 tests need real float64 on JAX.
    jax.config.update("jax_enable_x64", True)

import keras  # noqa: E402
import ml_dtypes  # noqa: E402
import pytest  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BACKEND = keras.backend.backend()
if BACKEND == "jax":
    import jax

    jax.config.update("jax_enable_x64", True)

HAS_GRADIENTS = BACKEND in ("jax", "tensorflow", "torch")
requires_gradients = pytest.mark.skipif(
    not HAS_GRADIENTS, reason="the numpy backend computes values only, no gradients"
)

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
HALF_DTYPES = ("float16", "bfloat16")
NP_DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}
# Largest finite value and subnormal spacing of each dtype.
DTYPE_MAX = {name: float(ml_dtypes.finfo(dt).max) for name, dt in NP_DTYPES.items()}
DTYPE_TINY = {name: float(ml_dtypes.finfo(dt).smallest_subnormal) for name, dt in NP_DTYPES.items()}

# Relative tolerance of a loss value against the float64 oracle, by input
# dtype. Half types are accumulated in float32 and only the result is rounded,
# so they get ~2 ulps of the output type. Every backend, numpy included,
# computes float64 in float64.
RTOL = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 1e-5, "float64": 1e-10}


def rtol(dtype: str) -> float:
    return RTOL[dtype]


def compute_eps(dtype: str) -> float:
    """Machine epsilon of the precision the losses compute in for ``dtype``."""
    if dtype in HALF_DTYPES:
        return float(np.finfo(np.float32).eps)
    return float(np.finfo(NP_DTYPES[dtype]).eps)


def expected_out_dtypes(dtype: str) -> tuple[str, ...]:
    """Allowed output dtypes of a loss for inputs of ``dtype``: ``dtype`` itself."""
    return (dtype,)


def as_dtype(x: Any, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` and returned as float64 (what the oracle sees)."""
    return np.asarray(x, np.float64).astype(NP_DTYPES[dtype]).astype(np.float64)


def to_tensor(x: Any, dtype: str = "float64") -> Any:
    """A backend tensor of ``dtype`` holding ``x``."""
    return keras.ops.convert_to_tensor(np.asarray(x).astype(NP_DTYPES[dtype]), dtype=dtype)


def to_numpy(x: Any) -> np.ndarray:
    """A float64 NumPy copy of a backend tensor (any float dtype)."""
    if dtype_of(x) in HALF_DTYPES:
        x = keras.ops.cast(x, "float32")
    return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)


def to_float(x: Any) -> float:
    return float(to_numpy(x))


def dtype_of(x: Any) -> str:
    return keras.backend.standardize_dtype(x.dtype)


def assert_close(got: Any, want: float, dtype: str, atol: float = 0.0, factor: float = 1.0) -> None:
    """``|got - want| <= factor * rtol(dtype) * |want| + atol + spacing``.

    ``spacing`` is the subnormal spacing of ``dtype``: a result rounded to a
    float16 subnormal has an absolute error, not a relative one.
    """
    got = float(got) if np.ndim(got) == 0 else got
    err = np.abs(np.asarray(got, np.float64) - want)
    bound = factor * rtol(dtype) * np.abs(want) + atol + DTYPE_TINY[dtype]
    assert np.all(np.isfinite(got)), f"non-finite result {got} (want {want})"
    assert np.all(err <= bound), (
        f"{BACKEND}/{dtype}: got {got!r}, want {want!r}, |err|={np.max(err):.3g} > "
        f"bound {np.max(bound):.3g} (rtol {factor * rtol(dtype):.1g}, atol {atol:.3g})"
    )


def value_and_grad(
    fn: Callable[..., Any], args: Sequence[Any], wrt: Sequence[int] = (1,)
) -> tuple[float, list[np.ndarray]]:
    """Value of ``fn(*args)`` and its gradients w.r.t. ``args[i]`` for ``i in wrt``.

    ``args`` are backend tensors; gradients come back as float64 NumPy arrays
    (zeros where ``fn`` does not depend on an argument). Uses ``jax.grad``,
    ``tf.GradientTape`` or ``torch.autograd``; skips on the numpy backend.
    """
    args = list(args)
    if BACKEND == "jax":
        import jax

        value, grads = jax.value_and_grad(lambda *a: fn(*a), argnums=tuple(wrt))(*args)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape(persistent=False) as tape:
            for i in wrt:
                tape.watch(args[i])
            value = fn(*args)
        grads = tape.gradient(value, [args[i] for i in wrt])
        pairs = zip(wrt, grads, strict=True)
        grads = [tf.zeros_like(args[i]) if g is None else g for i, g in pairs]
    elif BACKEND == "torch":
        import torch

        args = [
            a.detach().clone().requires_grad_(True) if i in wrt else a for i, a in enumerate(args)
        ]
        value = fn(*args)
        if value.requires_grad:
            grads = torch.autograd.grad(value, [args[i] for i in wrt], allow_unused=True)
        else:  # e.g. only the teacher side, which carries no gradient
            grads = [None] * len(wrt)
        pairs = zip(wrt, grads, strict=True)
        grads = [torch.zeros_like(args[i]) if g is None else g for i, g in pairs]
        value = value.detach()
        grads = [g.detach() for g in grads]
    else:
        pytest.skip("the numpy backend computes values only, no gradients")
    return to_float(value), [to_numpy(g) for g in grads]


# ---------------------------------------------------------------------------
# Hypothesis data. Arrays are generated from a drawn seed (hypothesis cannot
# draw 2 x 64 x 128 floats element-wise within its buffer), with the
# structure drawn by hypothesis: scale, offset, how the student relates to the
# teacher, duplicated rows.
# ---------------------------------------------------------------------------

SCALES = {
    "float16": (0.1, 1.0, 8.0),
    "bfloat16": (0.1, 1.0, 8.0),
    "float32": (1e-2, 1.0, 10.0, 1e3),
    "float64": (1e-3, 1.0, 10.0, 1e4),
}
KINDS = ("independent", "close", "affine", "duplicates", "clustered")


@dataclass
class Batch:
    """A drawn (teacher, student) pair, exactly representable in ``dtype``.

    ``teacher``/``student`` are float64 arrays holding the dtype-rounded
    values, so the oracle sees exactly what the backend sees.
    """

    teacher: np.ndarray
    student: np.ndarray
    dtype: str
    kind: str
    seed: int

    @property
    def n(self) -> int:
        return self.teacher.shape[0]

    @property
    def d(self) -> int:
        return self.teacher.shape[1]

    def tensors(self, dtype: str | None = None) -> tuple[Any, Any]:
        dtype = dtype or self.dtype
        return to_tensor(self.teacher, dtype), to_tensor(self.student, dtype)

    def rng(self, salt: int = 1) -> np.random.Generator:
        return np.random.default_rng([self.seed, salt])


def make_batch(
    n: int,
    d: int,
    dtype: str,
    seed: int,
    scale: float = 1.0,
    offset: float = 0.0,
    kind: str = "independent",
) -> Batch:
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((n, d)) * scale + offset * rng.standard_normal(d)
    if kind == "independent":
        student = rng.standard_normal((n, d)) * scale
    elif kind == "close":
        student = teacher + rng.standard_normal((n, d)) * scale * 1e-2
    elif kind == "affine":
        student = 0.5 * teacher + rng.standard_normal(d) * scale
    elif kind == "duplicates":
        student = rng.standard_normal((n, d)) * scale
        src = rng.integers(0, n, size=n)
        keep = rng.random(n) < 0.5
        src = np.where(keep, np.arange(n), src)
        teacher, student = teacher[src], student[src]
    elif kind == "clustered":
        centres = rng.standard_normal((3, d)) * scale
        labels = rng.integers(0, 3, size=n)
        teacher = centres[labels] + rng.standard_normal((n, d)) * scale * 0.1
        student = centres[labels] * 2 + rng.standard_normal((n, d)) * scale * 0.1
    else:
        raise ValueError(kind)
    return Batch(as_dtype(teacher, dtype), as_dtype(student, dtype), dtype, kind, seed)


def sizes(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Sizes in ``[lo, hi]``; under JAX one fixed size in that range.

    JAX compiles every op anew for every new shape and dtype (seconds per
    loss call on a loaded 2-core machine, so minutes per property with drawn
    shapes). Under JAX the values, dtypes and structure are still drawn, but
    each property uses one shape, whose compiled ops are then reused; shape
    coverage comes from the other three backend sessions.
    """
    if BACKEND != "jax":
        return st.integers(lo, hi)
    return st.just(min(max(lo, 13), hi))


@st.composite
def batches(
    draw: Any,
    min_n: int = 2,
    max_n: int = 64,
    min_d: int = 1,
    max_d: int = 128,
    dtypes: Sequence[str] = FLOAT_DTYPES,
    kinds: Sequence[str] = KINDS,
    min_scale: float = 0.0,
) -> Batch:
    """Hypothesis strategy of :class:`Batch` (n in [min_n, max_n], d in [min_d, max_d])."""
    n = draw(sizes(min_n, max_n))
    d = draw(sizes(min_d, max_d))
    dtype = draw(st.sampled_from(list(dtypes)))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([s for s in SCALES[dtype] if s >= min_scale]))
    offset = draw(st.sampled_from((0.0, 0.0, 1.0, 5.0))) * scale
    kind = draw(st.sampled_from(list(kinds)))
    return make_batch(n, d, dtype, seed, scale, offset, kind)


def min_separation(x: np.ndarray) -> float:
    """Smallest distance between two distinct rows, relative to the batch spread."""
    diff = x[:, None, :] - x[None, :, :]
    dist = np.sqrt(np.sum(diff**2, axis=-1))
    spread = np.max(dist)
    np.fill_diagonal(dist, np.inf)
    if spread == 0:
        return 0.0
    return float(np.min(dist) / spread)


# ---------------------------------------------------------------------------
# The losses under test: one name -> loss table for every test module
# ---------------------------------------------------------------------------


def projection_for(d: int) -> np.ndarray:
    """The projection the table's ``projected`` entry uses for ``d`` features."""
    from ckd_core import functional

    return functional.make_projection(d, 2, "gaussian", seed=3)


#: Uses of a table entry: which table-driven test runs it.
#: ``traceable``: under ``tf.function`` with unknown batch and feature sizes;
#: ``weighted``: the ``sample_weight`` checks (entries that accept weights);
#: ``gradient``: the finite-difference gradient property; ``backends``: the
#: cross-backend script of ``test_backends.py``.
USES = frozenset({"traceable", "weighted", "gradient", "backends"})


@dataclass(frozen=True)
class Golden:
    """A fixed value of the original implementation on ``GOLDEN_T``/``GOLDEN_S``.

    Computed once with a float64 NumPy transcription of the original code
    (see ``test_golden.py``); ``options`` are passed to the loss function, or
    to its class when ``via_class``.
    """

    label: str
    value: float
    options: dict[str, Any] = field(default_factory=dict)
    via_class: bool = False


@dataclass(frozen=True)
class Form:
    """Another way of calling a loss of the table: extra options built from the student ``s``.

    ``uses``: the table-driven tests that run it (see ``USES``).
    """

    options: Callable[[Any], dict[str, Any]]
    uses: frozenset[str] = USES


@dataclass(frozen=True)
class LossCase:
    """A loss of the table: ``fn(t, s, **options)``, its oracle and its classes.

    ``class_name`` names the class in ``ckd_core``, ``ckd_torch`` and
    ``ckd_tensorflow``, built with ``hyperparameters`` (``RKDLoss`` with one
    term) so that it means the same as ``fn``. ``weights``: accepts
    ``sample_weight``; ``pairwise``: 0 for fewer than two rows (else the
    batch must not be empty); ``decomposes``: a mean of per-sample terms
    (``reduction`` has Keras' meaning; else only its default is accepted).
    ``golden``: fixed values of the original implementation; ``forms``:
    other named ways of calling it; ``uses``: the table-driven tests that
    run it (see ``USES``).
    """

    name: str
    fn: Callable[..., Any]
    oracle: Callable[..., float]
    class_name: str
    hyperparameters: dict[str, Any]
    weights: bool
    pairwise: bool
    decomposes: bool
    golden: tuple[Golden, ...] = ()
    forms: dict[str, Form] = field(default_factory=dict)
    uses: frozenset[str] = USES

    def make(self, **options: Any) -> Any:
        """The ``ckd_core`` (Keras) class (``options`` override ``hyperparameters``)."""
        import ckd_core

        return getattr(ckd_core, self.class_name)(**{**self.hyperparameters, **options})

    def make_torch(self, **options: Any) -> Any:
        """The ``ckd_torch`` module (torch backend only)."""
        import ckd_torch

        return getattr(ckd_torch, self.class_name)(**self.hyperparameters, **options)

    def make_tensorflow(self, **options: Any) -> Any:
        """The ``ckd_tensorflow`` class (TensorFlow backend only)."""
        import ckd_tensorflow

        return getattr(ckd_tensorflow, self.class_name)(**self.hyperparameters, **options)


def _projected(t: Any, s: Any, *args: Any, **kw: Any) -> Any:
    from ckd_core import functional as F

    shape = tuple(s.shape)
    d = shape[1] if len(shape) == 2 and shape[1] else 1  # bad shapes: any projection
    return F.projected_rkd_loss(t, s, projection_for(d), *args, **kw)


def _ramp_weights(s: Any) -> dict[str, Any]:
    """Weights ``1.25, 1.5, ...`` (any batch size, traced too)."""
    return {"sample_weight": 1 + keras.ops.cumsum(keras.ops.ones_like(s[:, 0])) * 0.25}


def _index_pairs(s: Any) -> dict[str, Any]:
    """Pairs ``(i, 2i + 1 mod n)``, twice as many as rows (static batch size)."""
    rows = np.arange(2 * s.shape[0]) % s.shape[0]
    return {"pairs": (rows, (2 * rows + 1) % s.shape[0])}


def _index_groups(s: Any) -> dict[str, Any]:
    """Groups of 3 rows against groups of 2, one pair of groups per row (static batch size)."""
    rows = np.arange(s.shape[0])
    ga = np.stack([rows, (rows + 1) % len(rows), (rows + 3) % len(rows)], axis=1)
    return {"groups": (ga, np.stack([(rows + 2) % len(rows), (2 * rows) % len(rows)], axis=1))}


# The forms of CKD besides all pairs.
_COMPARATIVE_FORMS = {
    "weighted": Form(_ramp_weights, USES - {"weighted"}),
    "pairs": Form(_index_pairs, USES - {"traceable"}),
    "groups": Form(_index_groups, USES - {"traceable", "weighted"}),
    "all_reduce": Form(lambda s: {"all_reduce": lambda v: v}, frozenset({"traceable"})),
}


#: The fixed input of the golden values (``Golden``, ``test_golden.py``).
GOLDEN_T = np.array(
    [
        [0.5, -1.0, 2.0, 0.25],
        [1.5, 0.0, -0.5, 1.0],
        [-2.0, 0.75, 1.0, -1.25],
        [0.0, 2.5, -1.5, 0.5],
        [1.0, -0.25, 0.0, 3.0],
    ]
)
GOLDEN_S = np.array(
    [
        [1.0, -0.5, 1.5, 0.0],
        [0.5, 0.25, -1.0, 1.5],
        [-1.5, 1.0, 0.5, -0.75],
        [0.25, 2.0, -2.0, 1.0],
        [2.0, 0.0, 0.5, 2.5],
    ]
)


def _table() -> dict[str, LossCase]:
    import oracle

    from ckd_core import functional as F

    distance_only = {"distance_weight": 1.0, "angle_weight": 0.0}
    angle_only = {"distance_weight": 0.0, "angle_weight": 1.0}
    projected = lambda t, s: oracle.projected(t, s, projection_for(t.shape[1]))  # noqa: E731
    rkd_25_50 = {"distance_weight": 25.0, "angle_weight": 50.0}
    no_gradient_property = USES - {"gradient"}  # RKD: its own property (rows kept apart)
    cases = [
        LossCase(
            "comparative",
            F.comparative_loss,
            oracle.comparative,
            "ComparativeLoss",
            {},
            True,
            True,
            True,
            golden=(Golden("comparative", 45.75 / 80),),  # exact binary fractions, by hand
            forms=_COMPARATIVE_FORMS,
        ),
        LossCase(
            "projected",
            _projected,
            projected,
            "ProjectedRKDLoss",
            {"out_dim": 2, "seed": 3},
            True,
            True,
            True,
        ),
        LossCase(
            "kd",
            F.kd_loss,
            oracle.kd,
            "KDLoss",
            {},
            True,
            False,
            True,
            golden=(
                Golden("kd_T4", 0.13488528399440697, {"temperature": 4.0}),
                Golden("KDLoss_T1", 0.12937098004716302, {"temperature": 1.0}, via_class=True),
            ),
        ),
        LossCase(
            "dist",
            F.dist_loss,
            oracle.dist,
            "DISTLoss",
            {},
            False,
            False,
            False,
            golden=(
                Golden("dist_tau4", 4.135779212213627, {"tau": 4.0}),
                Golden(
                    "DISTLoss",
                    0.5153316592545263,
                    {"beta": 2.0, "gamma": 0.5, "tau": 1.0},
                    via_class=True,
                ),
            ),
        ),
        LossCase(
            "rkd_distance",
            F.rkd_distance_loss,
            oracle.rkd_distance,
            "RKDLoss",
            distance_only,
            False,
            True,
            False,
            golden=(
                Golden("rkd_distance", 0.004409100218433853),
                Golden("RKDLoss", 0.40918093764934127, rkd_25_50, via_class=True),
            ),
            uses=no_gradient_property,
        ),
        LossCase(
            "rkd_angle",
            F.rkd_angle_loss,
            oracle.rkd_angle,
            "RKDLoss",
            angle_only,
            False,
            True,
            False,
            golden=(Golden("rkd_angle", 0.005979068643769899),),
            uses=no_gradient_property,
        ),
    ]
    return {case.name: case for case in cases}


# The one table of losses: every loss test iterates over it (or a filter of it).
LOSSES: dict[str, LossCase] = _table()
LOSS_NAMES = list(LOSSES)
WEIGHTED_LOSSES = [name for name, case in LOSSES.items() if case.weights]
PAIRWISE_LOSSES = [name for name, case in LOSSES.items() if case.pairwise]
DECOMPOSING_LOSSES = [name for name, case in LOSSES.items() if case.decomposes]
GOLDEN = {golden.label: (case, golden) for case in LOSSES.values() for golden in case.golden}


def forms(use: str) -> dict[str, tuple[LossCase, Form | None]]:
    """Every entry and form of the table with ``use`` (``USES``): name -> (case, form).

    A form is named as in its case's ``forms``; ``None`` is the plain call.
    ``"weighted"`` keeps only the losses that accept ``sample_weight``.
    """
    assert use in USES, use
    out: dict[str, tuple[LossCase, Form | None]] = {}
    for case in LOSSES.values():
        if use == "weighted" and not case.weights:
            continue
        if use in case.uses:
            out[case.name] = (case, None)
        out.update({name: (case, f) for name, f in case.forms.items() if use in f.uses})
    return out


def call_form(entry: tuple[LossCase, Form | None], t: Any, s: Any, *args: Any) -> Any:
    """The loss of a :func:`forms` entry on ``(t, s)`` (``args``: e.g. ``sample_weight``)."""
    case, form = entry
    return case.fn(t, s, *args, **(form.options(s) if form else {}))
