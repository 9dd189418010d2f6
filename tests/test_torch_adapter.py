"""``ckd_torch``: the losses as ``torch.nn.Module`` (torch backend session only)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import oracle
import pytest
from helpers import BACKEND, LOSSES, assert_close, make_batch

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="ckd_torch needs the torch backend")

if BACKEND == "torch":
    import ckd_torch
    import keras
    import torch


def _pair(n: int = 8, d: int = 5, seed: int = 0, dtype=None):
    batch = make_batch(n, d, "float64", seed=seed)
    dtype = dtype or torch.float64
    return (
        torch.tensor(batch.student, dtype=dtype),
        torch.tensor(batch.teacher, dtype=dtype),
        batch,
    )


# (module factory, float64 oracle) of every loss of the one loss table.
MODULES = {name: (case.make_torch, case.oracle) for name, case in LOSSES.items()}


@pytest.mark.parametrize("name", list(MODULES))
def test_module_forward_backward(name):
    make, reference = MODULES[name]
    module = make()
    assert isinstance(module, torch.nn.Module)
    student, teacher, batch = _pair()
    student.requires_grad_(True)
    loss = module(student, teacher)  # torch order: (input, target) = (student, teacher)
    assert isinstance(loss, torch.Tensor) and loss.dtype == torch.float64 and loss.ndim == 0
    assert_close(loss.item(), reference(batch.teacher, batch.student), "float64", atol=1e-13)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
    assert LOSSES[name].class_name in repr(module) and "sum_over_batch_size" not in repr(module)
    if LOSSES[name].decomposes:  # torch's reduction names in the repr
        assert "reduction='sum'" in repr(make(reduction="sum"))


@pytest.mark.parametrize("name", list(MODULES))
def test_autograd_gradcheck(name):
    make, _ = MODULES[name]
    module = make()
    student, teacher, _ = _pair(n=5, d=3, seed=1)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: module(s, teacher), (student,), eps=1e-6, atol=1e-6)


def test_plain_torch_training_loop_reduces_loss():
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    teacher_net = torch.nn.Linear(6, 4)
    with torch.no_grad():
        teacher_out = teacher_net(x)
    student = torch.nn.Linear(6, 4)
    criterion = ckd_torch.ComparativeLoss()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = criterion(student(x), teacher_out)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_pairs_and_groups_equal_mse_formulas():
    student, teacher, _ = _pair(n=10, d=6, seed=3, dtype=torch.float32)
    mse = torch.nn.MSELoss()
    a = torch.tensor([0, 1, 2, 3, 4, 9, 9])
    b = torch.tensor([5, 6, 2, 8, 0, 1, 3])
    module = ckd_torch.ComparativeLoss()
    got = module(student, teacher, pairs=(a, b))
    want = mse(student[a] - student[b], teacher[a] - teacher[b])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    ga = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    gb = torch.tensor([[9, 8], [1, 0], [2, 2]])
    got = module(student, teacher, groups=(ga, gb))
    want = mse(student[ga].mean(1) - student[gb].mean(1), teacher[ga].mean(1) - teacher[gb].mean(1))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # All pairs == MSELoss over every ordered pair i != j.
    i, j = torch.nonzero(~torch.eye(10, dtype=torch.bool), as_tuple=True)
    torch.testing.assert_close(
        module(student, teacher),
        mse(student[i] - student[j], teacher[i] - teacher[j]),
        rtol=1e-5,
        atol=1e-7,
    )


def test_sample_weight():
    student, teacher, batch = _pair()
    w = torch.linspace(0, 2, 8, dtype=torch.float64)
    got = ckd_torch.ComparativeLoss()(student, teacher, sample_weight=w)
    assert_close(got.item(), oracle.comparative(batch.teacher, batch.student, w.numpy()), "float64")


def test_torch_compile():
    # backend="eager": exercises dynamo graph capture of the Keras ops
    # without inductor's C++ compilation (minutes on this CPU).
    module = ckd_torch.ComparativeLoss()
    compiled = torch.compile(module, backend="eager", fullgraph=False)
    student, teacher, batch = _pair(dtype=torch.float32)
    student.requires_grad_(True)
    loss = compiled(student, teacher)
    assert_close(loss.item(), oracle.comparative(batch.teacher, batch.student), "float32")
    loss.backward()
    eager_student = student.detach().clone().requires_grad_(True)
    module(eager_student, teacher).backward()
    torch.testing.assert_close(student.grad, eager_student.grad)

    rkd = torch.compile(ckd_torch.RKDLoss(), backend="eager")
    assert_close(
        rkd(student, teacher).item(),
        25 * oracle.rkd_distance(batch.teacher, batch.student)
        + 50 * oracle.rkd_angle(batch.teacher, batch.student),
        "float32",
        atol=1e-5,
    )


@pytest.mark.parametrize("name", list(MODULES))
def test_cpu_autocast_bfloat16(name):
    make, reference = MODULES[name]
    module = make()
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 5)
    student_in, teacher, batch = _pair()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student = layer(student_in.float())  # bf16 under autocast
        assert student.dtype == torch.bfloat16
        loss = module(student, teacher.to(torch.bfloat16))
    assert loss.dtype == torch.float32  # as torch's own losses under autocast
    assert torch.isfinite(loss)
    loss.float().backward()
    for p in layer.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    # Value: the loss of the bf16 values, computed in float32.
    want = reference(teacher.to(torch.bfloat16).double().numpy(), student.detach().double().numpy())
    assert_close(loss.item(), want, "float32", atol=1e-5)


def test_device_kept_when_keras_default_device_differs():
    """Stand-in for a CUDA default: Keras' torch device set to "meta".

    Without ``keras.device(student.device)``, Keras' torch backend would move
    the CPU inputs to its global device ("meta" here, "cuda" on a GPU box)
    and return a meta tensor without values.
    """
    from keras.src.backend.common import global_state

    student, teacher, batch = _pair()
    previous = global_state.get_global_attribute("torch_device")
    global_state.set_global_attribute("torch_device", "meta")
    try:
        # Sanity: the stand-in does redirect Keras' conversions.
        assert keras.ops.convert_to_tensor(np.ones(2)).device.type == "meta"
        for name, (make, reference) in MODULES.items():
            s = student.clone().requires_grad_(True)
            loss = make()(s, teacher)
            assert loss.device.type == "cpu", name
            assert_close(
                loss.item(), reference(batch.teacher, batch.student), "float64", atol=1e-13
            )
            loss.backward()
            assert s.grad.device.type == "cpu" and torch.isfinite(s.grad).all()
        index = (torch.tensor([0, 1]), torch.tensor([2, 3]))
        loss = ckd_torch.ComparativeLoss()(student, teacher, pairs=index)
        assert loss.device.type == "cpu"
        want = oracle.comparative_pairs(batch.teacher, batch.student, [0, 1], [2, 3])
        assert_close(loss.item(), want, "float64")
    finally:
        global_state.set_global_attribute("torch_device", previous)


@pytest.mark.slow
def test_import_error_when_keras_runs_another_backend():
    code = (
        "import keras\ntry:\n    import ckd_torch\nexcept ImportError as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "numpy"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "numpy" in out.stdout and "KERAS_BACKEND=torch" in out.stdout


@pytest.mark.parametrize("name", ["comparative", "kd", "dist", "projected"])
def test_vmap_grad_composability(name):
    """The reference experiments stack runs with ``torch.func.vmap(grad(...))``."""
    from torch.func import grad, vmap

    module = MODULES[name][0]()
    torch.manual_seed(0)
    s, t = torch.randn(3, 6, 4, dtype=torch.float64), torch.randn(3, 6, 4, dtype=torch.float64)
    stacked = vmap(grad(lambda s, t: module(s, t)))(s, t)
    for k in range(3):
        single = s[k].clone().requires_grad_(True)
        module(single, t[k]).backward()
        torch.testing.assert_close(stacked[k], single.grad)


def test_vmap_pairs_buffers_and_traced_bad_values():
    """Index buffers batched by vmap: no host sync; out-of-range or negative weights give NaN."""
    from torch.func import grad, vmap

    ckd = ckd_torch.ComparativeLoss()
    s, t = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    a, b = torch.tensor([[0, 1, 2]] * 2), torch.tensor([[3, 4, 5]] * 2)
    g = vmap(grad(lambda s, t, a, b: ckd(s, t, pairs=(a, b))))(s, t, a, b)
    assert torch.isfinite(g).all()
    bad = torch.tensor([[3, 4, 6]] * 2)
    assert torch.isnan(vmap(lambda s, t, a, b: ckd(s, t, pairs=(a, b)))(s, t, a, bad)).all()
    w = torch.ones(2, 6)
    w[:, 1] = -1.0
    assert torch.isnan(vmap(lambda s, t, w: ckd(s, t, sample_weight=w))(s, t, w)).all()


def test_modules_forward_options_to_the_core():
    assert ckd_torch.KDLoss(temperature=2.0).core.temperature == 2.0
    assert ckd_torch.KDLoss(3.0).core.temperature == 3.0
    rkd = ckd_torch.RKDLoss(distance_weight=1.0, angle_weight=0.0, global_batch=True)
    assert rkd.core.all_gather is not None and rkd.global_batch
    proj = ckd_torch.ProjectedRKDLoss(out_dim=3, seed=2, global_batch=True)
    assert proj.core.out_dim == 3 and proj.core.all_reduce is not None
    assert ckd_torch.ComparativeLoss(process_group=None).core.all_reduce is None
    with pytest.raises(ValueError, match="global_batch"):
        ckd_torch.KDLoss(global_batch=True)
    with pytest.raises(ValueError, match="temperature"):
        ckd_torch.KDLoss(temperature=0.0)


def test_torch_teacher_budget_device_tensors(tmp_path):
    """TorchTeacherBudget: distinct ids counted once, outputs as float32 tensors on the
    inputs' device, over-budget refused before a call, cache saved and reloaded."""
    from ckd_torch import TorchTeacherBudget

    from ckd_core import TeacherBudgetExceeded

    torch.manual_seed(0)
    net = torch.nn.Linear(6, 4)
    seen = []

    def teacher(x):
        seen.append(len(x))
        return {"logits": net(x), "feat": (2 * x[:, :3]).to(torch.bfloat16)}

    images = torch.rand(10, 6)
    tb = TorchTeacherBudget(teacher, budget=5, batch_size=2)
    out = tb.query_tensors(torch.tensor([1, 3, 1]), lambda ids: images[ids])
    assert out["logits"].shape == (3, 4) and out["feat"].dtype == torch.float32
    torch.testing.assert_close(out["logits"][0], out["logits"][2])
    torch.testing.assert_close(out["logits"][1], net(images[3]).detach())
    assert tb.used == 2 and sum(seen) == 2 and tb.num_batches == 1
    with pytest.raises(TeacherBudgetExceeded):
        tb.query_tensors([4, 5, 6, 7], lambda ids: images[ids])
    assert sum(seen) == 2  # refused before any call
    tb.save(tmp_path / "c.safetensors")
    again = TorchTeacherBudget(teacher, budget=5)
    again.load(tmp_path / "c.safetensors")
    torch.testing.assert_close(again.query_tensors([3])["logits"], out["logits"][1:2])
    assert sum(seen) == 2


def test_torch_teacher_budget_copies_and_shares_a_file(tmp_path):
    import copy
    import pickle

    from ckd_torch import TorchTeacherBudget

    torch.manual_seed(0)
    images = torch.rand(6, 4)
    path = tmp_path / "shared.safetensors"
    tb = TorchTeacherBudget(torch.nn.Linear(4, 2), budget=3, shared_file=path)
    out = tb.query_tensors([0, 2], lambda ids: images[ids])
    for clone in (copy.deepcopy(tb), pickle.loads(pickle.dumps(tb))):
        torch.testing.assert_close(clone.query_tensors([2, 0]), out.flip(0))
    other = TorchTeacherBudget(torch.nn.Linear(4, 2), budget=3, shared_file=path)
    torch.testing.assert_close(other.query_tensors([0], lambda ids: images[ids]), out[:1])
    assert other.new_calls == 0 and other.used == 2
