"""CRD and the white-box methods (FitNets, VID, CC; +CRD, +CKD) of the method registry."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from reference_experiments import models
from reference_experiments.methods import contrastive, registry, whitebox
from reference_experiments.methods.registry import MethodContext

torch.set_num_threads(1)

CLASSES, N_TRAIN, BATCH = 5, 40, 8
IMAGE = (1, 4, 4)
WHITEBOX = ["fitnets", "vid", "cc"]
NAMES = ["crd"] + WHITEBOX + [f"{w}+crd" for w in WHITEBOX] + [f"{w}+ckd" for w in WHITEBOX]

#: small hand-made maps (hint: stride-2 conv; VID: pooling and equal sizes)
SPATIAL = (
    [(4, 4, 4), (6, 4, 4), (8, 4, 4), (8,)],
    [(4, 4, 4), (6, 2, 2), (10, 2, 2), (12,)],
)


def digits_shapes():
    """Flat ``digits_mlp`` student features against the ``digits_cnn`` teacher's maps."""
    s = models.feature_shapes(models.create_model("digits_mlp", CLASSES, 1), (1, 8, 8))
    t = models.feature_shapes(models.create_model("digits_cnn", CLASSES, 1), (1, 8, 8))
    return s, t


SHAPES = {"spatial": SPATIAL, "digits": digits_shapes()}


def make_ctx(shapes=SPATIAL, labels=None, weights=None, batch_size=BATCH) -> MethodContext:
    labels = torch.arange(N_TRAIN) % CLASSES if labels is None else labels
    return MethodContext(
        num_classes=CLASSES,
        n_train=len(labels),
        batch_size=batch_size,
        labels=labels,
        seed=0,
        weights=weights or {},
        student_shapes=shapes[0],
        teacher_shapes=shapes[1],
    )


def build(name, shapes=SPATIAL, **kw):
    torch.manual_seed(0)
    method = registry.build(name, make_ctx(shapes, **kw))
    if isinstance(method, contrastive.CRDMixin):
        method.nce_k = 50  # with replacement: 32 other-class images
    return method


def student_params(shapes, seed=0):
    total = CLASSES + sum(math.prod(s) for s in shapes[0])
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(math.prod(IMAGE), total, generator=g) * 0.5}


def make_student(params, s_shapes, calls=None):
    """A per-image (BatchNorm-free) fake student: one linear map + tanh, sliced."""

    def student(x, with_features):
        if calls is not None:
            calls.append(x)
        out = torch.tanh(x.flatten(1) @ params["w"])
        feats, o = [], CLASSES
        for s in s_shapes:
            feats.append(out[:, o : o + math.prod(s)].reshape(-1, *s))
            o += math.prod(s)
        return out[:, :CLASSES], (feats if with_features else None)

    return student


def make_inputs(method, shapes, seed=0):
    """One step's batch, augmented images, cached teacher outputs and labels."""
    gen = torch.Generator().manual_seed(seed)
    batch = method.sample(gen, method.epoch_order(gen)[0])
    idx = batch["idx"]
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(len(idx), *IMAGE, generator=g)
    cache = {"logits": torch.randn(N_TRAIN, CLASSES, generator=g) * 3}
    for j in method.teacher_features(len(shapes[1])):
        cache[f"feat{j}"] = torch.randn(N_TRAIN, *shapes[1][j], generator=g).half()
    teacher = {k: v[idx] for k, v in cache.items()}
    return x, teacher, method.ctx.labels[idx], batch


# ----------------------------------------------------------------------------- registry
def test_registered_attributes():
    for name in NAMES:
        cls = registry.get(name)
        assert cls.family is None and cls.uses_teacher
        assert cls.whitebox == (name != "crd")
        assert cls.ours == name.endswith("+ckd")
        assert (100 <= cls.order < 140) if cls.ours else (cls.order < 100)
        if name.endswith("+crd"):
            assert "official code cannot" in cls.description
    assert registry.get("crd").order in range(40, 50)
    assert registry.get("fitnets").weights == {"ce": 1.0, "kd": 1.0, "fitnets": 100.0}
    assert registry.get("vid+crd").weights == {"ce": 1.0, "kd": 1.0, "vid": 1.0, "crd": 0.8}
    assert registry.get("cc+ckd").weights == {"ckd_label": 1.0, "ckd_teacher": 1.0, "cc": 0.02}


def test_teacher_features_and_layers():
    s, t = SPATIAL
    assert build("fitnets").teacher_features(4) == (2,)
    assert build("vid+ckd").teacher_features(4) == (1, 2)
    cc = build("cc+crd")
    assert cc.teacher_features(4) == (3,) and cc.inter.s_layers == (3,)
    wrn = [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128,)]
    assert registry.build("vid", make_ctx((wrn, wrn))).teacher_features(5) == (1, 2, 3)
    with pytest.raises(ValueError):
        build("fitnets").teacher_features(5)
    with pytest.raises(ValueError):
        registry.build("vid", make_ctx(((), ())))


def test_convreg_shapes():
    cases = [
        ((8, 8, 8), (16, 4, 4)),  # stride-2 conv
        ((8, 4, 4), (16, 8, 8)),  # transposed conv
        ((8, 4, 4), (16, 4, 4)),  # 1x1 conv
        ((8, 6, 6), (16, 4, 4)),  # valid 3x3 conv
        ((64,), (16, 2, 2)),  # flat student: linear
    ]
    for s, t in cases:
        out = whitebox.ConvReg(s, t)(torch.randn(3, *s))
        assert out.shape == (3, *t)
    with pytest.raises(ValueError):
        whitebox.ConvReg((8, 2, 2), (8, 8, 8))


# ----------------------------------------------------------------------------- CRD
@pytest.mark.parametrize("k", [8, 32, 50, 16384])
@pytest.mark.parametrize("balanced", [True, False])
def test_crd_negatives_other_classes(k, balanced):
    """Negatives never share the anchor's class, with or without replacement."""
    labels = torch.arange(N_TRAIN) % CLASSES
    if not balanced:
        labels = torch.where(torch.arange(N_TRAIN) < 30, 0, labels)  # 30 of class 0
    method = registry.build("crd", make_ctx(labels=labels))
    method.nce_k = k
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        order = method.epoch_order(gen)
        for row in order[:3]:
            contrast = method.sample(gen, row)["contrast"]
            assert contrast.shape == (BATCH, k + 1) and contrast.dtype == torch.int64
            assert torch.equal(contrast[:, 0], row)
            neg = contrast[:, 1:]
            assert bool((labels[neg] != labels[row][:, None]).all())
            others = (labels[None, :] != labels[row][:, None]).sum(1)
            if bool((others >= k).all()):  # without replacement: distinct negatives
                assert all(len(set(r.tolist())) == k for r in neg)
            elif k == 16384:  # with replacement: every other-class image shows up
                for r, o in zip(neg, others, strict=True):
                    assert len(set(r.tolist())) == int(o)


def test_crd_sampling_reproducible():
    method = build("crd")
    rows = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(3)
        rows.append(method.sample(gen, method.epoch_order(gen)[1])["contrast"])
    assert torch.equal(*rows)


def test_crd_loss_matches_official_form():
    """The (B, n) score product equals the official (B, K+1, 128) bank gather; the
    banks move by momentum 0.5 and Z is fixed by the first batch."""
    torch.manual_seed(0)
    crd = contrastive.CRDLoss(CLASSES, CLASSES, N_TRAIN)
    s, t = torch.randn(BATCH, CLASSES), torch.randn(BATCH, CLASSES)
    idx = torch.randperm(N_TRAIN)[:BATCH]
    contrast = torch.cat([idx[:, None], torch.randint(N_TRAIN, (BATCH, 30))], 1)
    mem_s, mem_t = crd.memory_s.clone(), crd.memory_t.clone()
    loss = crd(s, t, idx, contrast)

    v_s = F.normalize(crd.embed_s(s), dim=1)
    v_t = F.normalize(crd.embed_t(t), dim=1)
    out_s = torch.exp(torch.bmm(mem_t[contrast], v_s[:, :, None])[..., 0] / 0.07)
    out_t = torch.exp(torch.bmm(mem_s[contrast], v_t[:, :, None])[..., 0] / 0.07)
    z_s, z_t = out_s.mean() * N_TRAIN, out_t.mean() * N_TRAIN

    def nce(x):
        m = x.shape[1] - 1
        pn = m / N_TRAIN
        d1 = torch.log(x[:, 0] / (x[:, 0] + pn + 1e-7))
        d0 = torch.log(pn / (x[:, 1:] + pn + 1e-7))
        return -(d1.sum() + d0.sum()) / x.shape[0]

    expected = nce(out_s / z_s) + nce(out_t / z_t)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(crd.z, torch.stack([z_s, z_t]).detach())
    torch.testing.assert_close(crd.memory_s[idx], F.normalize(mem_s[idx] + v_s.detach(), dim=1))
    untouched = torch.ones(N_TRAIN, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(crd.memory_t[untouched], mem_t[untouched])
    z = crd.z.clone()
    crd(s * 2, t, idx, contrast)
    assert torch.equal(crd.z, z)


# ----------------------------------------------------------------------------- +CKD
def test_ckd_pairs_from_the_pool():
    method = build("vid+ckd")
    gen = torch.Generator().manual_seed(0)
    order = method.epoch_order(gen)
    steps = math.ceil(N_TRAIN / BATCH)
    assert order.shape == (steps, BATCH, 2)
    assert bool((order[..., 0] != order[..., 1]).all())
    assert bool(((order >= 0) & (order < N_TRAIN)).all())
    idx = method.sample(gen, order[0])["idx"]
    assert torch.equal(idx, torch.cat([order[0, :, 0], order[0, :, 1]]))
    again = build("vid+ckd").epoch_order(torch.Generator().manual_seed(0))
    assert torch.equal(order, again)


@pytest.mark.parametrize("shape_set", ["spatial", "digits"])
def test_ckd_hint_hand_computation(shape_set):
    """fitnets+ckd: two student passes; MSE(ConvReg(df_s), df_t) and the logit CKD terms
    as hand computations, with the same student gradient."""
    shapes = SHAPES[shape_set]
    method = build("fitnets+ckd", shapes, batch_size=4)
    x, teacher, labels, batch = make_inputs(method, shapes)
    b = 4
    params = {"w": student_params(shapes)["w"].requires_grad_()}
    calls = []
    total, terms = method.step(make_student(params, shapes[0], calls), x, teacher, labels, batch)
    assert len(calls) == 2
    assert torch.equal(calls[0], x[:b]) and torch.equal(calls[1], x[b:])
    assert set(terms) == {"ckd_label", "ckd_teacher", "fitnets"}

    s, f = make_student(params, shapes[0])(x, True)
    hand = F.mse_loss(
        method.inter.reg(f[2][:b] - f[2][b:]), teacher["feat2"].float()[:b] - teacher["feat2"][b:]
    )
    y = F.one_hot(labels, CLASSES).float()
    t = teacher["logits"]
    hand_label = F.mse_loss(s[:b] - s[b:], y[:b] - y[b:])
    hand_teacher = F.mse_loss(s[:b] - s[b:], t[:b] - t[b:])
    torch.testing.assert_close(terms["fitnets"], hand.detach())
    torch.testing.assert_close(terms["ckd_label"], hand_label.detach())
    torch.testing.assert_close(terms["ckd_teacher"], hand_teacher.detach())
    expected = hand_label + hand_teacher + 100 * hand
    (g_step,) = torch.autograd.grad(total, [params["w"]])
    (g_hand,) = torch.autograd.grad(expected, [params["w"]])
    torch.testing.assert_close(g_step, g_hand)


def test_ckd_identical_sides_give_zero_loss_and_gradient():
    """Equal images, teacher outputs and labels on both sides: every difference is 0,
    ConvReg(0) is 0 after BatchNorm + ReLU (up to rounding), so the loss and its gradient
    vanish."""
    method = build("fitnets+ckd", batch_size=4)
    x, teacher, labels, batch = make_inputs(method, SPATIAL)
    both = lambda v: torch.cat([v[:4], v[:4]])  # noqa: E731
    x, labels = both(x), both(labels)
    teacher = {k: both(v) for k, v in teacher.items()}
    params = {"w": student_params(SPATIAL)["w"].requires_grad_()}
    total, terms = method.step(make_student(params, SPATIAL[0]), x, teacher, labels, batch)
    assert float(terms["ckd_label"]) == 0.0 and float(terms["ckd_teacher"]) == 0.0
    assert float(terms["fitnets"]) < 1e-10  # BatchNorm of a constant: rounding only
    (g,) = torch.autograd.grad(total, [params["w"]])
    assert float(g.abs().max()) < 1e-5


# ----------------------------------------------------------------------------- every method
@pytest.mark.parametrize("shape_set", ["spatial", "digits"])
@pytest.mark.parametrize("name", NAMES)
def test_weighted_total(name, shape_set):
    shapes = SHAPES[shape_set]
    weights = registry.get(name).weights
    first = sorted(weights)[0]
    for override in ({}, {first: 0.5}):
        method = build(name, shapes, weights=override)
        x, teacher, labels, batch = make_inputs(method, shapes)
        student = make_student(student_params(shapes), shapes[0])
        total, terms = method.step(student, x, teacher, labels, batch)
        assert set(terms) == set(weights)
        w = {**weights, **override}
        expected = sum(w[k] * v for k, v in terms.items())
        torch.testing.assert_close(total.detach(), expected)
        assert all(bool(torch.isfinite(v)) for v in terms.values())


class _Step(nn.Module):
    """``functional_call`` target: the method's step with a parameterised fake student."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, student_p, x, teacher, labels, batch):
        student = make_student(student_p, self.method.ctx.student_shapes)
        return self.method.step(student, x, teacher, labels, batch)[0]


@pytest.mark.parametrize("name", NAMES)
def test_vmap_grad_over_stacked_runs(name):
    """Two stacked copies under vmap(grad(functional_call)) give each run's own loss
    and gradient (as alone), and update their buffers (CRD memory, BatchNorm)."""
    assert registry.get(name).vmappable
    runs = [build(name) for _ in range(2)]
    alone = copy.deepcopy(runs)
    inputs = [make_inputs(m, SPATIAL, seed=i) for i, m in enumerate(runs)]
    sp = [student_params(SPATIAL, seed=i) for i in range(2)]
    wrapped = [_Step(m) for m in runs]
    params, buffers = stack_module_state(wrapped)
    base = copy.deepcopy(wrapped[0]).to("meta")

    def loss(p, bufs, student_p, x, teacher, labels, batch):
        return functional_call(base, (p, bufs), (student_p, x, teacher, labels, batch))

    stack = lambda vs: torch.stack(list(vs))  # noqa: E731
    args = [stack(i[0] for i in inputs)]
    args += [{k: stack(i[1][k] for i in inputs) for k in inputs[0][1]}]
    args += [stack(i[2] for i in inputs)]
    args += [{k: stack(i[3][k] for i in inputs) for k in inputs[0][3]}]
    before = {k: v.clone() for k, v in buffers.items()}
    (g_method, g_student), values = vmap(grad_and_value(loss, argnums=(0, 2)))(
        params, buffers, {"w": stack(p["w"] for p in sp)}, *args
    )
    for r in range(2):
        m = alone[r]
        p = {"w": sp[r]["w"].clone().requires_grad_()}
        x, teacher, labels, batch = inputs[r]
        total, _ = m.step(make_student(p, SPATIAL[0]), x, teacher, labels, batch)
        named = dict(m.named_parameters())
        grads = torch.autograd.grad(total, [p["w"], *named.values()], allow_unused=True)
        torch.testing.assert_close(values[r], total.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g_student["w"][r], grads[0], rtol=1e-3, atol=1e-5)
        for (k, v), g in zip(named.items(), grads[1:], strict=True):
            g = torch.zeros_like(v) if g is None else g
            torch.testing.assert_close(g_method[f"method.{k}"][r], g, rtol=1e-3, atol=1e-5)
        for k, v in m.named_buffers():
            torch.testing.assert_close(buffers[f"method.{k}"][r], v, rtol=1e-4, atol=1e-6)
    if "crd" in name:
        assert bool((buffers["method.crd.z"] > 0).all())
        assert not torch.equal(buffers["method.crd.memory_s"], before["method.crd.memory_s"])
