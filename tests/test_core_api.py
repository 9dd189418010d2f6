"""Core API conventions: Keras' ``reduction``, copies that keep their collectives,
``torch.compile(fullgraph=True)`` of every pure function and class.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import keras
import numpy as np
import pytest
from helpers import (
    BACKEND,
    DECOMPOSING_LOSSES,
    LOSS_NAMES,
    LOSSES,
    WEIGHTED_LOSSES,
    projection_for,
    to_numpy,
    to_tensor,
)

import ckd_core
from ckd_core import functional as F


def _batch(n: int = 6, d: int = 4, seed: int = 0) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    return to_tensor(rng.standard_normal((n, d))), to_tensor(rng.standard_normal((n, d)))


def identity_all_reduce(x: Any) -> Any:
    """A one-replica all-reduce (module level: it pickles)."""
    return x


# ---------------------------------------------------------------------------
# reduction
# ---------------------------------------------------------------------------

OPTIONS = {
    "plain": {},
    "weights": {"sample_weight": np.array([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])},
    "scalar": {"sample_weight": 2.5},
    "pairs": {"pairs": (np.array([0, 1, 2, 5]), np.array([3, 4, 5, 0]))},
    "groups": {"groups": (np.array([[0, 1], [2, 3]]), np.array([[4, 5], [1, 2]]))},
}


def _options(name: str) -> list[str]:
    kinds = ["plain"]
    if LOSSES[name].weights:
        kinds += ["weights", "scalar"]
    if name == "comparative":
        kinds += ["pairs", "groups"]
    return kinds


CASES = [(name, kind) for name in DECOMPOSING_LOSSES for kind in _options(name)]


@pytest.mark.parametrize(("name", "kind"), CASES)
@pytest.mark.parametrize("api", ["function", "class"])
def test_reduction_terms_mean_to_the_default_loss(name: str, kind: str, api: str) -> None:
    """``None``/``"none"``: per-sample terms whose mean is the default; ``"sum"``: their sum."""
    t, s = _batch()
    options = OPTIONS[kind]
    if api == "function":
        losses = {r: LOSSES[name].fn(t, s, **options, reduction=r) for r in (None, "none", "sum")}
        default = LOSSES[name].fn(t, s, **options)
        assert float(to_numpy(LOSSES[name].fn(t, s, **options, reduction="sum_over_batch_size")))
    else:
        losses = {r: LOSSES[name].make(reduction=r)(t, s, **options) for r in (None, "none", "sum")}
        default = LOSSES[name].make()(t, s, **options)
    terms = to_numpy(losses[None])
    assert terms.ndim == 1 and terms.shape[0] in (6, 4, 2)
    np.testing.assert_allclose(to_numpy(losses["none"]), terms, rtol=0, atol=0)
    np.testing.assert_allclose(np.mean(terms), to_numpy(default), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(losses["sum"]), np.sum(terms), rtol=1e-12)


@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if n not in DECOMPOSING_LOSSES])
@pytest.mark.parametrize("reduction", ["sum", None, "none"])
def test_batch_level_losses_refuse_reduction(name: str, reduction: Any) -> None:
    t, s = _batch()
    with pytest.raises(ValueError, match="batch-level"):
        LOSSES[name].fn(t, s, reduction=reduction)
    with pytest.raises(ValueError, match="batch-level"):
        LOSSES[name].make(reduction=reduction)
    assert np.isfinite(float(to_numpy(LOSSES[name].fn(t, s, reduction="sum_over_batch_size"))))


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("reduction", ["mean", "SUM", "auto", 1, ["sum"]])
def test_unknown_reduction_is_a_value_error(name: str, reduction: Any) -> None:
    t, s = _batch()
    with pytest.raises(ValueError, match="reduction"):
        LOSSES[name].fn(t, s, reduction=reduction)


def test_all_reduce_needs_the_default_reduction() -> None:
    t, s = _batch()
    with pytest.raises(ValueError, match="reduction"):
        F.comparative_loss(t, s, all_reduce=identity_all_reduce, reduction="sum")


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_keras_serialization_with_reduction(name: str) -> None:
    """Keras' own class serialization test, with ``reduction`` in the config."""
    from keras.src.testing.test_case import TestCase

    reduction = "sum" if LOSSES[name].decomposes else "sum_over_batch_size"
    loss = LOSSES[name].make(reduction=reduction)
    TestCase().run_class_serialization_test(loss)
    assert loss.get_config()["reduction"] == reduction


# ---------------------------------------------------------------------------
# Copies keep all_reduce / all_gather (or refuse)
# ---------------------------------------------------------------------------

GLOBAL_LOSSES = {
    "ComparativeLoss": ("all_reduce", ckd_core.ComparativeLoss),
    "ProjectedRKDLoss": ("all_reduce", ckd_core.ProjectedRKDLoss),
    "RKDLoss": ("all_gather", ckd_core.RKDLoss),
}


@pytest.mark.parametrize("name", list(GLOBAL_LOSSES))
@pytest.mark.parametrize("how", ["deepcopy", "copy", "pickle"])
def test_copies_keep_the_collective(name: str, how: str) -> None:
    """Keras' ``__reduce__`` dropped the collective: the copy computed a local loss."""
    argument, cls = GLOBAL_LOSSES[name]
    loss = cls(**{argument: identity_all_reduce})
    if how == "pickle":
        clone = pickle.loads(pickle.dumps(loss))
    else:
        clone = getattr(copy, how)(loss)
    assert getattr(clone, argument) is identity_all_reduce
    assert clone.get_config() == loss.get_config()
    t, s = _batch()
    np.testing.assert_allclose(to_numpy(clone(t, s)), to_numpy(loss(t, s)), rtol=1e-12)


@pytest.mark.parametrize("name", list(GLOBAL_LOSSES))
def test_pickle_refuses_an_unpicklable_collective(name: str) -> None:
    argument, cls = GLOBAL_LOSSES[name]
    loss = cls(**{argument: lambda x: x})
    with pytest.raises(TypeError, match=argument):
        pickle.dumps(loss)
    assert getattr(copy.deepcopy(loss), argument) is getattr(loss, argument)


# ---------------------------------------------------------------------------
# torch.compile(fullgraph=True): no graph break in core code
# ---------------------------------------------------------------------------


def _compile_cases() -> dict[str, Any]:
    """Callables ``(t, s)`` whose tensors are all made outside the compiled graph."""
    w = to_tensor(np.linspace(0.5, 2.0, 6))
    index = keras.ops.convert_to_tensor
    pairs = (index(np.array([0, 1, 2])), index(np.array([3, 4, 5])))
    ga, gb = index(np.array([[0, 1], [2, 3]])), index(np.array([[4, 5], [1, 2]]))
    projection = to_tensor(projection_for(4))
    functions = {name: LOSSES[name].fn for name in LOSS_NAMES}
    functions["projected"] = lambda t, s, *a, **k: F.projected_rkd_loss(t, s, projection, *a, **k)
    cases: dict[str, Any] = {"rkd": F.rkd_loss}
    for name, fn in functions.items():
        cases[f"{name}-function"] = fn
        cases[f"{name}-class"] = LOSSES[name].make()
        if LOSSES[name].weights:
            cases[f"{name}-weights"] = lambda t, s, fn=fn: fn(t, s, w)
            cases[f"{name}-none"] = lambda t, s, fn=fn: fn(t, s, w, reduction=None)
    cases["comparative-pairs"] = lambda t, s: F.comparative_loss(t, s, w, pairs=pairs)
    cases["comparative-groups"] = lambda t, s: F.comparative_loss(t, s, groups=(ga, gb))
    return cases


COMPILE_CASES = _compile_cases()


@pytest.mark.skipif(BACKEND != "torch", reason="torch.compile")
@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_torch_compile_fullgraph_equals_eager(case: str) -> None:
    import torch

    torch._dynamo.reset()
    fn = COMPILE_CASES[case]
    t, s = _batch()
    compiled = torch.compile(fn, fullgraph=True)
    np.testing.assert_allclose(to_numpy(compiled(t, s)), to_numpy(fn(t, s)), rtol=1e-12)


@pytest.mark.parametrize("name", WEIGHTED_LOSSES)
def test_weighted_copy_equals_original(name: str) -> None:
    """A deep copy of a weighted loss computes the same weighted value."""
    t, s = _batch()
    loss = LOSSES[name].make()
    w = np.linspace(0.5, 2.0, 6)
    np.testing.assert_allclose(
        to_numpy(copy.deepcopy(loss)(t, s, w)), to_numpy(loss(t, s, w)), rtol=1e-12
    )
