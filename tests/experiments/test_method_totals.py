"""VID+CKD and CC+CKD (official ``ckd_inter``) against hand computations in float64.

For a 1 vs 1 batch (side A = first b images, side B = the next b), with student logits
``s``, features ``f``, cached teacher logits ``t`` and features ``g``, one-hot labels y:

    total = MSE(s_A - s_B, y_A - y_B) + MSE(s_A - s_B, t_A - t_B) + w * term(df, dg)

with ``df = f_A - f_B``, ``dg = g_A - g_B`` and
``vid``: w = 1, ``sum_l mean_{n,c,h,w} 0.5 ((mu_l(df_l) - dg_l)^2 / var_l + log var_l)``
(mu_l: three 1x1 convs with ReLUs, var_l = softplus(alpha_l) + 1e-5, the larger map
average-pooled to the smaller), layers 1..L-2;
``cc``: w = 0.02, ``mean_{i<b-1} sum_d |e_i| |e_{i+1}|``,
``e = W_s df_{L-1} + b_s - (W_t dg_{L-1} + b_t)`` (embeddings after differencing).
Every sum below is an explicit loop over images, pixels and classes.
"""

from __future__ import annotations

import math

import pytest
import torch

from reference_experiments.methods import registry
from reference_experiments.methods.registry import MethodContext

torch.set_num_threads(1)

CLASSES, N_TRAIN, B = 5, 40, 4
IMAGE = (1, 4, 4)
TEACHER = [(4, 4, 4), (6, 2, 2), (10, 2, 2), (12,)]
#: student maps larger than the teacher's (student pooled), or flat (teacher pooled)
STUDENTS = {
    "spatial": [(4, 4, 4), (6, 4, 4), (8, 4, 4), (8,)],
    "flat": [(16,), (12,), (10,), (8,)],
}


def build(name: str, s_shapes):
    torch.manual_seed(0)
    ctx = MethodContext(
        num_classes=CLASSES,
        n_train=N_TRAIN,
        batch_size=B,
        labels=torch.arange(N_TRAIN) % CLASSES,
        seed=0,
        weights={},
        student_shapes=s_shapes,
        teacher_shapes=TEACHER,
    )
    return registry.build(name, ctx)


def student_fn(w: torch.Tensor, s_shapes):
    """A per-image fake student: ``tanh(x W)`` sliced into logits and features."""

    def student(x, with_features=True):
        out = torch.tanh(x.flatten(1).to(w.dtype) @ w)
        feats, o = [], CLASSES
        for shape in s_shapes:
            feats.append(out[:, o : o + math.prod(shape)].reshape(-1, *shape))
            o += math.prod(shape)
        return out[:, :CLASSES], (feats if with_features else None)

    return student


def inputs(method):
    gen = torch.Generator().manual_seed(0)
    batch = method.sample(gen, method.epoch_order(gen)[0])
    idx = batch["idx"]
    assert idx.shape == (2 * B,)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * B, *IMAGE, generator=g)
    teacher = {"logits": torch.randn(2 * B, CLASSES, generator=g) * 3}
    for j, shape in enumerate(TEACHER):
        teacher[f"feat{j}"] = torch.randn(2 * B, *shape, generator=g).half()
    return x, teacher, method.ctx.labels[idx], batch


# ------------------------------------------------------------------ hand computations
def ckd_term(s, target):
    """``(1 / (b C)) sum_i sum_c ((s_i - s_{b+i}) - (target_i - target_{b+i}))_c^2``."""
    total = s.new_zeros(())
    for i in range(B):
        for c in range(CLASSES):
            total = total + ((s[i, c] - s[B + i, c]) - (target[i, c] - target[B + i, c])) ** 2
    return total / (B * CLASSES)


def as_map(a):
    return a[:, :, None, None] if a.dim() == 2 else a


def block_mean(a, size):
    """Average pool a (n, c, h, w) map to (n, c, size, size), block by block."""
    k = a.shape[2] // size
    out = a.new_zeros(a.shape[0], a.shape[1], size, size)
    for h in range(size):
        for v in range(size):
            out[:, :, h, v] = a[:, :, h * k : (h + 1) * k, v * k : (v + 1) * k].mean((2, 3))
    return out


def vid_layer(layer, ds, dt):
    ds, dt = as_map(ds), as_map(dt)
    size = min(ds.shape[2], dt.shape[2])
    ds, dt = block_mean(ds, size), block_mean(dt, size)
    w1, w2, w3 = (layer.regressor[i].weight.detach().double()[:, :, 0, 0] for i in (0, 2, 4))
    var = torch.log1p(torch.exp(layer.log_scale.detach().double())) + 1e-5
    total, count = ds.new_zeros(()), 0
    for n in range(B):
        for h in range(size):
            for v in range(size):
                mu = w3 @ torch.relu(w2 @ torch.relu(w1 @ ds[n, :, h, v]))
                for c in range(len(var)):
                    total = total + 0.5 * ((mu[c] - dt[n, c, h, v]) ** 2 / var[c] + var[c].log())
                    count += 1
    return total / count


def vid_term(method, df, dg):
    layers = range(1, len(TEACHER) - 1)
    return sum(vid_layer(method.inter.layers[k], df[i], dg[i]) for k, i in enumerate(layers))


def cc_term(method, df, dg):
    term = method.inter
    ws, bs = term.embed_s.weight.detach().double(), term.embed_s.bias.detach().double()
    wt, bt = term.embed_t.weight.detach().double(), term.embed_t.bias.detach().double()
    e = [(ws @ df[-1][i].flatten() + bs) - (wt @ dg[-1][i].flatten() + bt) for i in range(B)]
    total = df[-1].new_zeros(())
    for i in range(B - 1):
        for d in range(len(bs)):
            total = total + e[i][d].abs() * e[i + 1][d].abs()
    return total / (B - 1)


HAND = {"vid+ckd": (vid_term, 1.0), "cc+ckd": (cc_term, 0.02)}


def hand_total(name, method, w, s_shapes, x, teacher, labels):
    s, f = student_fn(w, s_shapes)(x)
    df = [a[:B] - a[B:] for a in f]
    dg = [teacher[f"feat{j}"].double()[:B] - teacher[f"feat{j}"].double()[B:] for j in range(4)]
    y = torch.zeros(2 * B, CLASSES, dtype=torch.float64)
    for i, label in enumerate(labels.tolist()):
        y[i, label] = 1.0
    term, weight = HAND[name]
    t = teacher["logits"].double()
    return ckd_term(s, y) + ckd_term(s, t) + weight * term(method, df, dg)


@pytest.mark.parametrize("student", sorted(STUDENTS))
@pytest.mark.parametrize("name", sorted(HAND))
def test_total_loss_and_gradient_by_hand(name, student):
    s_shapes = STUDENTS[student]
    method = build(name, s_shapes)
    assert method.weights == {"ckd_label": 1.0, "ckd_teacher": 1.0, name[:-4]: HAND[name][1]}
    x, teacher, labels, batch = inputs(method)
    n_out = CLASSES + sum(math.prod(s) for s in s_shapes)
    w = torch.randn(math.prod(IMAGE), n_out, generator=torch.Generator().manual_seed(2))
    w32 = (0.5 * w).requires_grad_()
    w64 = (0.5 * w).double().requires_grad_()
    total, _ = method.step(student_fn(w32, s_shapes), x, teacher, labels, batch)
    want = hand_total(name, method, w64, s_shapes, x, teacher, labels)
    assert total.dtype == torch.float32 and float(want.detach()) > 0.1
    torch.testing.assert_close(total.double(), want.detach(), rtol=2e-6, atol=1e-6)
    (g_step,) = torch.autograd.grad(total, [w32])
    (g_hand,) = torch.autograd.grad(want, [w64])
    torch.testing.assert_close(g_step.double(), g_hand, rtol=1e-4, atol=1e-6)
