"""``ckd_torch`` behaves like a torch loss: copies, names, shapes, autocast, reduction, compile."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import oracle
import pytest
from helpers import (
    BACKEND,
    DECOMPOSING_LOSSES,
    LOSS_NAMES,
    LOSSES,
    PAIRWISE_LOSSES,
    WEIGHTED_LOSSES,
    assert_close,
    make_batch,
)

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="ckd_torch needs the torch backend")

if BACKEND == "torch":
    import ckd_torch
    import ckd_torch.distributed as torch_distributed
    import torch
    import torch.distributed

GLOBAL_BATCH_LOSSES = PAIRWISE_LOSSES  # the all-pairs and relational losses
BATCH_LEVEL_LOSSES = [name for name in LOSS_NAMES if name not in DECOMPOSING_LOSSES]


def _pair(n: int = 8, d: int = 5, seed: int = 0, dtype=None):
    batch = make_batch(n, d, "float64", seed=seed)
    dtype = dtype or torch.float64
    return torch.tensor(batch.student, dtype=dtype), torch.tensor(batch.teacher, dtype=dtype)


@pytest.fixture
def two_ranks(monkeypatch):
    """A stand-in for two ranks: all-reduce doubles (an identical shard); all-gather adds
    the shard with its features reversed (another shard, so every RKD term changes)."""

    def all_reduce(tensor, op=None, group=None):
        tensor.mul_(2)

    def all_gather(outputs, tensor, group=None):
        outputs[0].copy_(tensor)
        outputs[1].copy_(tensor.flip(-1) if tensor.ndim > 1 else tensor)

    monkeypatch.setattr(torch_distributed, "is_distributed", lambda group=None: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.distributed, "all_gather", all_gather)


def _torch_save_copy(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": _torch_save_copy,
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("name", GLOBAL_BATCH_LOSSES)
def test_copies_of_global_batch_losses_stay_global(name, how, two_ranks):
    student, teacher = _pair()
    module = LOSSES[name].make_torch(global_batch=True)
    local = LOSSES[name].make_torch()(student, teacher)
    global_loss = module(student, teacher)
    assert abs(float(global_loss) - float(local)) > 1e-6 * abs(float(local))  # the test can fail
    clone = COPIES[how](module)
    assert clone.global_batch and "global_batch=True" in repr(clone)
    torch.testing.assert_close(clone(student, teacher), global_loss)


def test_process_group_module_deep_copies_sharing_the_group_and_refuses_pickle():
    group = object()  # stands in for a torch.distributed ProcessGroup (not picklable)
    module = ckd_torch.ComparativeLoss(process_group=group)
    clone = copy.deepcopy(module)
    assert clone.process_group is group and clone.core.all_reduce.keywords["group"] is group
    with pytest.raises(TypeError, match="process_group"):
        pickle.dumps(module)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_error_messages_name_student_and_teacher(name):
    student, teacher = torch.randn(6), torch.randn(6)  # rank 1: no feature axis
    with pytest.raises(ValueError) as info:
        LOSSES[name].make_torch()(student, teacher)
    message = str(info.value)
    assert "student" in message and "teacher" in message
    assert "y_true" not in message and "y_pred" not in message


@pytest.mark.parametrize("name", PAIRWISE_LOSSES)
def test_features_of_any_rank_are_flattened(name):
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 2, 3, 4, dtype=torch.float64), torch.randn(6, 24).double()
    module = LOSSES[name].make_torch()
    flat = module(student.reshape(6, -1), teacher)
    torch.testing.assert_close(module(student, teacher.reshape(6, 4, 6)), flat)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_autocast_computes_and_returns_float32(name):
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 5)
    student_in, teacher = _pair(dtype=torch.float32)
    module = LOSSES[name].make_torch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student = layer(student_in)
        assert student.dtype == torch.bfloat16
        loss = module(student, teacher.to(torch.bfloat16))
    assert loss.dtype == torch.float32
    want = module(student.detach().float(), teacher.to(torch.bfloat16).float())
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_teacher_never_gets_a_gradient(name):
    student, teacher = _pair()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    LOSSES[name].make_torch()(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("name", DECOMPOSING_LOSSES)
def test_reduction_sum_and_none_follow_torch(name):
    student, teacher = _pair()
    mean = LOSSES[name].make_torch()(student, teacher)
    terms = LOSSES[name].make_torch(reduction="none")(student, teacher)
    assert terms.shape == (8,)
    torch.testing.assert_close(terms.mean(), mean)
    summed = LOSSES[name].make_torch(reduction="sum")(student, teacher)
    torch.testing.assert_close(summed, terms.sum())
    with pytest.raises(ValueError, match="'mean', 'sum' or 'none'"):
        LOSSES[name].make_torch(reduction="batchmean")


@pytest.mark.parametrize("name", BATCH_LEVEL_LOSSES)
def test_batch_level_losses_refuse_per_sample_reductions(name):
    for reduction in ("sum", "none"):
        with pytest.raises(ValueError, match="batch-level"):
            LOSSES[name].make_torch(reduction=reduction)


#: case ids, known without torch (other backends collect this module too)
COMPILE_CASES = [
    *LOSS_NAMES,
    "comparative-pairs",
    "comparative-groups",
    *(f"{name}-weights" for name in WEIGHTED_LOSSES),
]


def _compile_cases():
    """Every loss plain, CKD with pairs and groups, and every weighted loss with weights."""
    student, teacher = _pair(n=10, d=6, seed=3, dtype=torch.float32)
    a, b = torch.tensor([0, 1, 2, 3, 9]), torch.tensor([5, 6, 2, 8, 1])
    ga, gb = torch.tensor([[0, 1], [2, 3], [4, 5]]), torch.tensor([[9, 8], [7, 6], [1, 0]])
    w = torch.linspace(0.5, 2.0, 10)
    cases = {name: (name, {}) for name in LOSS_NAMES}
    cases["comparative-pairs"] = ("comparative", {"pairs": (a, b)})
    cases["comparative-groups"] = ("comparative", {"groups": (ga, gb)})
    cases.update({f"{name}-weights": (name, {"sample_weight": w}) for name in WEIGHTED_LOSSES})
    assert list(cases) == COMPILE_CASES
    return student, teacher, cases


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_torch_compile_fullgraph_equals_eager(case):
    """Dynamo captures each loss in one graph (``fullgraph=True``), with equal value and grad."""
    student, teacher, cases = _compile_cases()
    name, kwargs = cases[case]
    module = LOSSES[name].make_torch()
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    s_compiled = student.clone().requires_grad_(True)
    s_eager = student.clone().requires_grad_(True)
    got = compiled(s_compiled, teacher, **kwargs)
    want = module(s_eager, teacher, **kwargs)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(s_compiled.grad, s_eager.grad)


def test_ckd_value_matches_oracle_after_flattening():
    batch = make_batch(6, 12, "float64", seed=1)
    student = torch.tensor(batch.student).reshape(6, 3, 4)
    teacher = torch.tensor(batch.teacher).reshape(6, 2, 6)
    got = ckd_torch.ComparativeLoss()(student, teacher)
    assert_close(got.item(), oracle.comparative(batch.teacher, batch.student), "float64")
    assert np.isfinite(got.item())


def test_core_dtype_option_still_casts_the_inputs():
    student, teacher = _pair(dtype=torch.float32)
    loss = ckd_torch.ComparativeLoss(dtype="float64")(student, teacher)
    assert loss.dtype == torch.float64
    want = ckd_torch.ComparativeLoss()(student.double(), teacher.double())
    torch.testing.assert_close(loss, want)
