"""Students under a budget: every method runs, budget accounting, CKD formulas."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("runs in the torch session (KERAS_BACKEND=torch)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from reference_experiments import methods, models  # noqa: E402
from reference_experiments.data import ImageDataset  # noqa: E402
from reference_experiments.students import (  # noqa: E402
    StudentConfig,
    run_student,
    split_subset,
)

torch.set_num_threads(1)


def make_dataset(n_train: int = 160, n_test: int = 40, classes: int = 4) -> ImageDataset:
    rng = np.random.default_rng(0)
    y_train = rng.integers(0, classes, n_train)
    y_test = rng.integers(0, classes, n_test)
    # class-dependent brightness so that students can learn something
    x_train = rng.integers(0, 96, (n_train, 8, 8, 1)) + 40 * y_train[:, None, None, None]
    x_test = rng.integers(0, 96, (n_test, 8, 8, 1)) + 40 * y_test[:, None, None, None]
    return ImageDataset(
        name="synthetic",
        x_train=x_train.astype(np.uint8),
        y_train=y_train.astype(np.int64),
        x_test=x_test.astype(np.uint8),
        y_test=y_test.astype(np.int64),
        num_classes=classes,
        mean=(0.5,),
        std=(0.25,),
        crop=8,
        pad=1,
    )


class CountingTeacher(torch.nn.Module):
    """digits_cnn that counts the images it is called on (not the all-zero
    dry run ``models.feature_shapes`` makes to learn the feature shapes)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = models.create_model("digits_cnn", classes, 1)
        self.images = 0

    def forward(self, x, return_features=False):
        if x.abs().sum() > 0:
            self.images += x.shape[0]
        return self.net(x, return_features=return_features)


@pytest.fixture(scope="module")
def dataset():
    return make_dataset()


def cfg(**kw) -> StudentConfig:
    base = dict(
        dataset="synthetic",
        student_arch="digits_cnn",
        method="kd",
        budget=60,
        seed=0,
        preset="fast",
        max_epochs=1,
        batch_size=16,
        device="cpu",
        lr=0.05,
    )
    base.update(kw)
    return StudentConfig(**base)


def test_method_names():
    assert set(methods.METHODS) == set(methods.METHOD_NAMES)
    assert len(methods.METHOD_NAMES) == 19
    assert methods.parse_method("vid+ckd").base == "ckd_pairs"
    assert methods.parse_method("ckd_groups3").group_k == 3
    assert methods.parse_method("rkd_d50").proj_dim == 50
    with pytest.raises(ValueError):
        methods.parse_method("nope")


def test_split_is_seeded_and_disjoint():
    tr, va = split_subset(1000, 100, seed=3)
    tr2, va2 = split_subset(1000, 100, seed=3)
    assert len(tr) == 80 and len(va) == 20 and not set(tr) & set(va)
    np.testing.assert_array_equal(tr, tr2)
    assert not np.array_equal(tr, split_subset(1000, 100, seed=4)[0])


@pytest.mark.parametrize("name", methods.METHOD_NAMES)
def test_every_method_runs_within_budget(dataset, name):
    teacher = CountingTeacher()
    student = "digits_mlp" if name.startswith("vid") else "digits_cnn"  # flat -> spatial VID
    row = run_student(cfg(method=name, student_arch=student), dataset=dataset, teacher=teacher)
    n_train = 60 - 12
    expected_calls = 0 if name == "ce" else n_train
    assert row["teacher_calls"] == expected_calls <= row["budget"]
    assert teacher.images == expected_calls  # each training image once, never the val split
    assert row["steps"] == math.ceil(n_train / 16)
    assert 0.0 <= row["test_acc"] <= 1.0 and 0.0 <= row["best_val_acc"] <= 1.0
    assert row["train_images_per_s"] > 0
    for key in (
        "dataset",
        "teacher_arch",
        "student_arch",
        "method",
        "budget",
        "seed",
        "preset",
        "teacher_view",
        "lr",
        "epochs",
        "wall_s",
    ):
        assert key in row


def test_rerun_with_saved_cache_makes_zero_teacher_calls(dataset, tmp_path):
    for view in ("clean", "augmented-once"):
        first = CountingTeacher()
        c = cfg(method="fitnets", cache_dir=str(tmp_path), teacher_view=view)
        row = run_student(c, dataset=dataset, teacher=first)
        assert row["new_teacher_calls"] == row["teacher_calls"] == first.images == 48
        second = CountingTeacher()
        row2 = run_student(c, dataset=dataset, teacher=second)
        assert second.images == 0 and row2["new_teacher_calls"] == 0
        assert row2["teacher_calls"] == 48
        assert row2["test_acc"] == row["test_acc"]  # same cache, same seed: same run


def test_nan_loss_raises(dataset):
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        run_student(cfg(weights={"kd": float("nan")}), dataset=dataset, teacher=CountingTeacher())


def test_paper_preset_drops_a_diverging_lr_and_raises_when_all_diverge(dataset, monkeypatch):
    import reference_experiments.students as students

    monkeypatch.setattr(students, "PAPER_LRS", (1e30, 0.05))
    row = run_student(
        cfg(preset="paper", lr=None, max_epochs=2), dataset=dataset, teacher=CountingTeacher()
    )
    assert row["lrs_diverged"] == [1e30] and row["lr"] == 0.05
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        run_student(
            cfg(preset="paper", lr=None, max_epochs=2, weights={"kd": float("nan")}),
            dataset=dataset,
            teacher=CountingTeacher(),
        )


def test_paper_preset_chooses_lr_on_validation_and_decays(dataset):
    teacher = CountingTeacher()
    row = run_student(
        cfg(preset="paper", lr=None, max_epochs=5, patience=1), dataset=dataset, teacher=teacher
    )
    assert row["lrs_tried"] == [0.1, 0.05, 0.025] and row["lr"] in row["lrs_tried"]
    assert teacher.images == 48  # three lr trials share one cache
    assert row["preset"] == "paper"


def _method(name, batch_size=4, classes=5):
    return methods.build_method(name, num_classes=classes, n_train=20, batch_size=batch_size)


def test_ckd_pairs_equals_mse_formula():
    torch.manual_seed(0)
    b, c = 4, 5
    m = _method("ckd_pairs", b, c)
    s = torch.randn(2 * b, c)
    t = torch.randn(2 * b, c)
    y = torch.randint(0, c, (2 * b,))
    loss, parts = m(s, None, {"logits": t}, y, {"idx": torch.arange(2 * b)})
    mse = torch.nn.MSELoss()
    onehot = torch.nn.functional.one_hot(y, c).float()
    ds = s[:b] - s[b:]
    expected_label = mse(ds, onehot[:b] - onehot[b:])
    expected_teacher = mse(ds, t[:b] - t[b:])
    torch.testing.assert_close(parts["ckd_label"], expected_label)
    torch.testing.assert_close(parts["ckd_teacher"], expected_teacher)
    torch.testing.assert_close(loss, expected_label + expected_teacher)
    assert set(parts) == {"ckd_label", "ckd_teacher"}  # no CE / KD term


def test_ckd_groups_and_all_pairs_formulas():
    torch.manual_seed(1)
    b, c, k = 4, 3, 2
    s, t = torch.randn(2 * b, c), torch.randn(2 * b, c)
    y = torch.randint(0, c, (2 * b,))
    _, parts = _method(f"ckd_groups{k}", b, c)(
        s, None, {"logits": t}, y, {"idx": torch.arange(2 * b)}
    )
    e = s - t
    ga = [[(m + j) % b for j in range(k)] for m in range(b)]
    delta = torch.stack([e[g].mean(0) - e[[i + b for i in g]].mean(0) for g in ga])
    torch.testing.assert_close(parts["ckd_teacher"], delta.pow(2).mean())

    s, t = torch.randn(b, c), torch.randn(b, c)
    _, parts = _method("ckd_all", b, c)(s, None, {"logits": t}, y[:b], {"idx": torch.arange(b)})
    pairs = [(i, j) for i in range(b) for j in range(b) if i != j]
    a_idx, b_idx = torch.tensor(pairs).T
    expected = torch.nn.functional.mse_loss(s[a_idx] - s[b_idx], t[a_idx] - t[b_idx])
    torch.testing.assert_close(parts["ckd_teacher"], expected)


def test_mixup_and_crd_steps():
    torch.manual_seed(2)
    b, c = 4, 5
    m = _method("mixup", b, c)
    gen = torch.Generator().manual_seed(0)
    batch = m.sample(gen, torch.arange(2 * b))
    assert 0.0 <= float(batch["lam"]) <= 1.0
    x = torch.randn(2 * b, 1, 8, 8)
    inputs = m.inputs(x, batch)
    lam = batch["lam"]
    torch.testing.assert_close(inputs[b:], lam * x[:b] + (1 - lam) * x[b:])

    crd = _method("crd", b, c)
    idx = torch.tensor([0, 3, 7, 9])
    batch = crd.sample(gen, idx)
    assert batch["contrast"].shape == (b, 21) and torch.equal(batch["contrast"][:, 0], idx)
    before = crd.crd.memory_s.clone()
    loss, parts = crd(
        torch.randn(b, c), None, {"logits": torch.randn(b, c)}, torch.randint(0, c, (b,)), batch
    )
    assert torch.isfinite(loss) and set(parts) == {"ce", "kd", "crd"}
    changed = (crd.crd.memory_s != before).any(1).nonzero().flatten()
    assert changed.tolist() == idx.tolist()  # memory updated at the batch's ids only
    assert (crd.crd.z > 0).all()  # normalisation constants set from the first batch


@pytest.mark.parametrize("name", ["kd", "ckd_pairs", "crd", "mixup", "fitnets"])
def test_stacked_step_matches_single_runs(name):
    """vmap(grad(functional_call(Learner))) over stacked runs = each run's own grads."""
    import copy

    from torch.func import functional_call, grad, stack_module_state, vmap

    from reference_experiments.students import Learner

    torch.manual_seed(3)
    b, classes, n_runs = 4, 4, 3
    shapes = models.feature_shapes(models.create_model("digits_cnn", classes, 1), (1, 8, 8))
    learners = [
        Learner(
            models.create_model("digits_cnn", classes, 1),
            methods.build_method(
                name,
                num_classes=classes,
                n_train=12,
                batch_size=b,
                student_shapes=shapes,
                teacher_shapes=shapes,
            ),
            need_features=name == "fitnets",
            device=torch.device("cpu"),
        )
        for _ in range(n_runs)
    ]
    singles = [copy.deepcopy(m) for m in learners]
    params, buffers = stack_module_state(learners)
    base = copy.deepcopy(learners[0]).to("meta")
    m = learners[0].method.images_per_step
    idx = torch.stack([torch.randperm(12)[:m] for _ in range(n_runs)])
    batch = learners[0].method.sample(torch.Generator().manual_seed(0), idx)
    x = torch.randn(n_runs, m, 1, 8, 8)
    teacher = {
        "logits": torch.randn(n_runs, m, classes),
        "feat2": torch.randn(n_runs, m, 128, 2, 2),
    }
    y = torch.randint(0, classes, (n_runs, m))

    def loss_fn(p, bufs, *args):
        return functional_call(base, (p, bufs), args)[0]

    grads = vmap(grad(loss_fn))(params, buffers, x, teacher, y, batch)
    for r, single in enumerate(singles):
        pick = {k: v[r] for k, v in batch.items()}
        loss, _ = single(x[r], {k: v[r] for k, v in teacher.items()}, y[r], pick)
        loss.backward()
        for pname, p in single.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(grads[pname][r], p.grad, atol=1e-5, rtol=1e-4)
        for bname, buf in single.named_buffers():
            torch.testing.assert_close(buffers[bname][r], buf)  # BN stats / CRD memory


def test_run_students_stacks_seeds_and_lrs(dataset):
    from reference_experiments.students import run_students

    teacher = CountingTeacher()
    cfgs = [cfg(method="ckd_pairs", seed=s, preset="paper", lr=None, max_epochs=2) for s in (0, 1)]
    cfgs.append(cfg(method="rkd", seed=0))  # RKD cannot be vmapped: runs alone
    rows = run_students(cfgs, dataset=dataset, teacher=teacher)
    assert [r["method"] for r in rows] == ["ckd_pairs", "ckd_pairs", "rkd"]
    assert [r["seed"] for r in rows] == [0, 1, 0]
    assert teacher.images == 3 * 48  # one query per run, shared by its lr trials
    for r in rows[:2]:
        assert r["stacked_runs"] == 6 and r["lrs_tried"] == [0.1, 0.05, 0.025]
        assert r["teacher_calls"] == 48 and 0 <= r["test_acc"] <= 1
        assert r["epochs"] == 2 and r["lr"] in r["lrs_tried"]
    assert "stacked_runs" not in rows[2]


def test_torch_teacher_budget_device_tensors(tmp_path):
    from ckd_torch import TorchTeacherBudget

    from ckd_core import TeacherBudgetExceeded

    net = CountingTeacher()
    images = torch.rand(10, 1, 8, 8) + 0.1

    def teacher(x):
        logits, feats = net(x, return_features=True)
        return {"logits": logits, "feat2": feats[2].to(torch.bfloat16)}

    tb = TorchTeacherBudget(teacher, budget=5, batch_size=2)
    out = tb.query_tensors(torch.tensor([1, 3, 1]), lambda ids: images[ids])
    assert out["logits"].shape == (3, 4) and out["feat2"].dtype == torch.float32
    torch.testing.assert_close(out["logits"][0], out["logits"][2])
    assert tb.used == 2 and net.images == 2 and tb.num_batches == 1
    with pytest.raises(TeacherBudgetExceeded):
        tb.query_tensors([4, 5, 6, 7], lambda ids: images[ids])
    tb.save(tmp_path / "c.safetensors")
    again = TorchTeacherBudget(teacher, budget=5)
    again.load(tmp_path / "c.safetensors")
    torch.testing.assert_close(again.query_tensors([3])["logits"], out["logits"][1:2])
    assert net.images == 2
