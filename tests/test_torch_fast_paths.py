"""``ckd_torch``'s torch-native fast path of all-pairs CKD keeps the core's guarantees.

The plain ``ComparativeLoss()(student, teacher)`` call on eager CPU float32/float64
runs one custom autograd node instead of the Keras ops; values, gradients,
Hessians, forward-mode derivatives, overflow safety and errors equal the core's.
"""

from __future__ import annotations

import numpy as np
import oracle
import pytest
from helpers import BACKEND, assert_close, make_batch

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="ckd_torch needs the torch backend")

if BACKEND == "torch":
    import ckd_torch
    import torch

    from ckd_core import functional


def _pair(n: int = 9, d: int = 4, seed: int = 0, dtype=None):
    batch = make_batch(n, d, "float64", seed=seed)
    dtype = dtype or torch.float64
    student = torch.tensor(batch.student, dtype=dtype).requires_grad_(True)
    return student, torch.tensor(batch.teacher, dtype=dtype)


def _node_names(loss) -> set[str]:
    """Names of every autograd node behind ``loss``."""
    names, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.add(type(node).__name__)
            stack.extend(child for child, _ in node.next_functions)
    return names


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_plain_call_runs_the_torch_native_node(dtype):
    student, teacher = _pair(dtype=getattr(torch, dtype))
    loss = ckd_torch.ComparativeLoss()(student, teacher)
    assert any("CentredSquares" in name for name in _node_names(loss))
    assert loss.dtype == student.dtype and loss.ndim == 0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fast_path_equals_the_core(dtype):
    """Value and gradient of the fast path equal the core's Keras path."""
    student, teacher = _pair(n=12, d=7, seed=2, dtype=getattr(torch, dtype))
    fast = ckd_torch.ComparativeLoss()(student, teacher)
    (fast_grad,) = torch.autograd.grad(fast, student)
    core = functional.comparative_loss(teacher, student)
    (core_grad,) = torch.autograd.grad(core, student)
    tol = {"float32": 1e-6, "float64": 1e-13}[dtype]
    torch.testing.assert_close(fast, core, rtol=tol, atol=0)
    torch.testing.assert_close(fast_grad, core_grad, rtol=tol, atol=tol * core_grad.abs().max())


@pytest.mark.parametrize("magnitude", [8.66e18, 1e-19, 1.0])
def test_fast_path_hands_overflow_and_underflow_to_the_core(magnitude):
    """float32 residuals whose squares overflow (or underflow): the loss that fits."""
    signs = np.array([[1.0, 0.5], [-1.0, 0.25], [1.0, -0.5], [-1.0, 1.0]])
    student = torch.tensor(signs * magnitude, dtype=torch.float32)
    teacher = torch.zeros((4, 2))
    got = ckd_torch.ComparativeLoss()(student, teacher)
    want = oracle.comparative(np.zeros((4, 2)), signs * np.float64(np.float32(magnitude)))
    assert abs(got.item() - want) <= 1e-5 * want, (got.item(), want)


def test_fast_path_hessian_is_the_pair_forms():
    """n=4, d=1: row 0 of the Hessian is ``[1, -1/3, -1/3, -1/3]`` (double backward)."""
    student, teacher = _pair(n=4, d=1, seed=3)
    module = ckd_torch.ComparativeLoss()
    h = torch.autograd.functional.hessian(lambda s: module(s, teacher), student.detach())
    np.testing.assert_allclose(h.reshape(4, 4)[0].numpy(), [1, -1 / 3, -1 / 3, -1 / 3], atol=1e-12)


def test_fast_path_gradcheck_and_gradgradcheck():
    student, teacher = _pair(n=5, d=3, seed=4)
    module = ckd_torch.ComparativeLoss()
    assert torch.autograd.gradcheck(lambda s: module(s, teacher), (student,))
    assert torch.autograd.gradgradcheck(lambda s: module(s, teacher), (student,))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_fast_path_forward_mode_derivative():
    """A dual (forward-mode) student: the tangent equals the gradient's dot product.

    (torch's forward AD loads its decompositions through ``torch.jit.script``.)
    """
    import torch.autograd.forward_ad as fwad

    student, teacher = _pair(n=6, d=3, seed=5)
    tangent = torch.randn(
        student.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    module = ckd_torch.ComparativeLoss()
    (grad,) = torch.autograd.grad(module(student, teacher), student)
    with fwad.dual_level():
        dual = fwad.make_dual(student.detach(), tangent)
        derivative = fwad.unpack_dual(module(dual, teacher)).tangent
    assert_close(derivative.item(), float((grad * tangent).sum()), "float64")


def test_fast_path_keeps_the_core_errors_and_edge_cases():
    module = ckd_torch.ComparativeLoss()
    with pytest.raises(ValueError, match="student"):
        module(torch.zeros(4, 3), torch.zeros(4, 2))
    assert module(torch.ones(1, 3), torch.zeros(1, 3)).item() == 0.0
    assert module(torch.ones(4, 3), torch.zeros(4, 3)).item() == 0.0  # zero loss: exact
    nan = torch.zeros(4, 3)
    nan[1, 2] = float("nan")
    assert torch.isnan(module(nan, torch.zeros(4, 3)))


@pytest.mark.parametrize(("n", "d"), [(5, 3), (70, 4), (130, 2)])  # one, two and 4+ chunks
def test_rkd_angle_torch_kernel_equals_the_keras_ops(n, d):
    """The eager torch kernel (unrecorded passes) and the Keras ops give one loss and gradient."""
    from ckd_torch import fast_paths

    from ckd_core import _rkd_angle

    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    y = x + 0.3 * torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    x[1] = x[0]  # an exact duplicate: cosine 0 in both
    gram_s = (x - x.mean(0)) @ (x - x.mean(0)).T
    gram_t = (y - y.mean(0)) @ (y - y.mean(0)).T
    with torch.no_grad():
        assert fast_paths.rkd_angle_kernel(gram_s, gram_t) is not None
        kernel = _rkd_angle._angle_loss_and_gram_grad(gram_s, gram_t)
    with torch.enable_grad():
        assert fast_paths.rkd_angle_kernel(gram_s, gram_t) is None
        keras_ops = _rkd_angle._angle_loss_and_gram_grad(gram_s, gram_t)
    inverse = fast_paths.torch_inverse_distances(gram_s)
    torch.testing.assert_close(inverse, _rkd_angle._inverse_distances(gram_s), rtol=1e-15, atol=0)
    for got, want in zip(kernel, keras_ops, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15 * float(want.abs().max()))
