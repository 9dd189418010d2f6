"""Black-box methods of the registry against the official code, by hand on tiny batches.

* mixup / mixup3 (``MixupSample``, ``MixupTrainHelpers``): one student pass on the
  mixed image, lam-weighted CE + soft CE to the unmixed cached teacher logits;
* ckd_pn2 / ckd_pn3 (``CKDSample``, ``CKDTrainHelpers``): 1 vs 1 / 2 vs 1 tuples,
  two student passes, MSE on group-mean differences of raw logits;
* the samplers (:mod:`reference_experiments.methods.sampling`): tuple pools,
  RKD's class-balanced batches, CRD's other-class negatives;
* the registry itself.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch

from reference_experiments import methods
from reference_experiments.methods import registry, sampling
from reference_experiments.methods.registry import MethodContext

torch.set_num_threads(1)

C, N, B = 3, 7, 4  # classes, cached training images, tuples per step
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0])
DIM = 5  # pixels per fake image


def ctx(labels=LABELS, batch_size=B, weights=None, num_classes=C) -> MethodContext:
    return MethodContext(
        num_classes=num_classes,
        n_train=len(labels),
        batch_size=batch_size,
        labels=labels,
        seed=0,
        weights=weights or {},
    )


def data(seed: int = 0):
    """float64 cached images ``(N, 1, 1, DIM)``, teacher logits ``(N, C)``, a linear student."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 1, 1, DIM, generator=g, dtype=torch.float64)
    t = 3 * torch.randn(N, C, generator=g, dtype=torch.float64)
    w = torch.randn(DIM, C, generator=g, dtype=torch.float64)
    return x, t, w


class FakeStudent:
    """``student(x, with_features)``: a fixed linear map of the input; records its calls."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w
        self.calls: list[torch.Tensor] = []

    def __call__(self, x, with_features):
        self.calls.append(x.detach().clone())
        return x.flatten(1) @ self.w, None


def log_softmax(s: torch.Tensor) -> torch.Tensor:
    return s - torch.logsumexp(s, dim=-1, keepdim=True)


def one_hot(y: torch.Tensor) -> torch.Tensor:
    return torch.eye(C, dtype=torch.float64)[y]


# --------------------------------------------------------------------------- mixup
@pytest.mark.parametrize("name, k", [("mixup", 2), ("mixup3", 3)])
def test_mixup_student_sees_only_the_mix_and_loss_by_hand(name, k):
    method = methods.build(name, ctx())
    assert method.w == {"ce": 1.0, "mixup": 1.0}  # mixup.yml: w_cls = w_rel = 1, w_kd = 0
    gen = torch.Generator().manual_seed(3)
    order = method.epoch_order(gen)
    assert order.shape == (math.ceil(N / B), B, k)
    for tup in order.reshape(-1, k).tolist():
        assert len(set(tup)) == k  # distinct images within a tuple
    draw = order[0]
    batch = method.sample(gen, draw)
    idx, lam = batch["idx"], batch["lam"].double()
    # side-major: all first images, then all second images (...)
    assert idx.tolist() == draw.T.reshape(-1).tolist()
    assert lam.shape == (k,) and (lam >= 0).all() and lam.sum() == pytest.approx(1.0)
    if k == 2:
        assert lam[1] == pytest.approx(1 - lam[0])

    x_all, t_all, w = data()
    student = FakeStudent(w)
    loss, terms = method.step(student, x_all[idx], {"logits": t_all[idx]}, LABELS[idx], batch)

    sides = draw.T  # (k, B) image ids per side
    mixed = sum(lam[j] * x_all[sides[j]] for j in range(k))
    assert len(student.calls) == 1  # one forward pass, on the mixed images only
    assert student.calls[0].shape == mixed.shape
    torch.testing.assert_close(student.calls[0], mixed, rtol=0, atol=1e-6)

    s = mixed.flatten(1) @ w
    logp = log_softmax(s)
    expected_ce = expected_soft = 0.0
    for j in range(k):
        y = LABELS[sides[j]]
        ce = -logp[torch.arange(B), y].mean()
        p_t = torch.exp(log_softmax(t_all[sides[j]]))  # softmax of the unmixed teacher, T = 1
        soft = -(p_t * logp).sum(-1).mean()
        expected_ce = expected_ce + lam[j] * ce
        expected_soft = expected_soft + lam[j] * soft
    # the method's loss runs in float32 (``logits.float()``): float32 tolerances
    assert float(terms["ce"]) == pytest.approx(float(expected_ce), rel=1e-5)
    assert float(terms["mixup"]) == pytest.approx(float(expected_soft), rel=1e-5)
    assert float(loss) == pytest.approx(float(expected_ce + expected_soft), rel=1e-5)


def test_mixup_lambda_is_uniform_and_drawn_per_step():
    method = methods.build("mixup", ctx())
    gen = torch.Generator().manual_seed(0)
    draw = method.epoch_order(gen)[0]
    lams = torch.stack([method.sample(gen, draw)["lam"][0] for _ in range(2000)]).double()
    assert len(set(lams.tolist())) == 2000  # a fresh lam per step
    # Beta(1, 1) = U(0, 1): mean 1/2, variance 1/12, every decile populated
    assert float(lams.mean()) == pytest.approx(0.5, abs=0.03)
    assert float(lams.var()) == pytest.approx(1 / 12, abs=0.01)
    counts = torch.histc(lams, bins=10, min=0, max=1)
    assert counts.min() > 140 and counts.max() < 260


# --------------------------------------------------------------------------- ckd_pn*
@pytest.mark.parametrize("name, pos, neg", [("ckd_pn2", 1, 1), ("ckd_pn3", 2, 1)])
def test_official_ckd_two_passes_and_loss_by_hand(name, pos, neg):
    method = methods.build(name, ctx())
    assert method.w == {"ckd_label": 1.0, "ckd_teacher": 1.0}  # ckd.yml: w_kd = 0
    assert (method.pos, method.neg) == (pos, neg)
    gen = torch.Generator().manual_seed(5)
    order = method.epoch_order(gen)
    assert order.shape == (math.ceil(N / B), B, pos + neg)
    for tup in order.reshape(-1, pos + neg).tolist():
        assert len(set(tup)) == pos + neg
        assert tup[:pos] == sorted(tup[:pos])  # a side is a set
    draw = order[0]
    batch = method.sample(gen, draw)
    idx = batch["idx"]
    assert idx.shape == ((pos + neg) * B,)
    # first the positives, grouped per tuple, then the negatives
    assert idx[: pos * B].tolist() == draw[:, :pos].reshape(-1).tolist()
    assert idx[pos * B :].tolist() == draw[:, pos:].reshape(-1).tolist()

    x_all, t_all, w = data(1)
    student = FakeStudent(w)
    x = x_all[idx]
    loss, terms = method.step(student, x, {"logits": t_all[idx]}, LABELS[idx], batch)
    assert len(student.calls) == 2  # one pass per side: BatchNorm statistics per side
    torch.testing.assert_close(student.calls[0], x[: pos * B], rtol=0, atol=0)
    torch.testing.assert_close(student.calls[1], x[pos * B :], rtol=0, atol=0)

    def delta(per_image: torch.Tensor) -> torch.Tensor:
        """mean over each tuple's positives minus mean over its negatives, ``(B, C)``."""
        return per_image[draw[:, :pos]].mean(1) - per_image[draw[:, pos:]].mean(1)

    s_all = x_all.flatten(1) @ w
    ds = delta(s_all)
    label_term = ((ds - delta(one_hot(LABELS))) ** 2).mean()  # nn.MSELoss: mean over B x C
    teacher_term = ((ds - delta(t_all)) ** 2).mean()
    assert float(terms["ckd_label"]) == pytest.approx(float(label_term), rel=1e-5)
    assert float(terms["ckd_teacher"]) == pytest.approx(float(teacher_term), rel=1e-5)
    assert float(loss) == pytest.approx(float(label_term + teacher_term), rel=1e-5)


@pytest.mark.parametrize("name, k", [("ckd_pn3", 3), ("mixup", 2)])
def test_tuple_pool_is_fixed_per_run_and_walked_across_epochs(name, k):
    """The official loader walks the 100k-tuple pool across evaluation epochs (it
    only restarts, reshuffled, when the pool is exhausted)."""
    # mixup: ordered pairs, as the official pool
    pos = 1 if name == "mixup" else k - k // 2
    every = set()
    for perm in itertools.permutations(range(N), k):
        every.add(tuple(sorted(perm[:pos])) + tuple(sorted(perm[pos:])))
    method = methods.build(name, ctx())
    gen = torch.Generator().manual_seed(0)
    per_epoch = math.ceil(N / B) * B
    epochs = len(every) // per_epoch  # less than one pass over the pool
    drawn = [
        tuple(r) for _ in range(epochs) for r in method.epoch_order(gen).reshape(-1, k).tolist()
    ]
    assert set(drawn) <= every
    assert len(set(drawn)) == len(drawn)  # no tuple twice within a pass
    # same seed: same pool, another generator: another order
    other = methods.build(name, ctx())
    again = [
        tuple(r)
        for r in other.epoch_order(torch.Generator().manual_seed(1)).reshape(-1, k).tolist()
    ]
    assert set(again) <= every and again != drawn[: len(again)]
    # the next pass covers the whole pool (small n: every tuple)
    rest = [
        tuple(r)
        for _ in range(2 * epochs + 2)
        for r in method.epoch_order(gen).reshape(-1, k).tolist()
    ]
    assert set(drawn + rest) == every


# --------------------------------------------------------------------------- tuple_pool
def test_tuple_pool_random_branch():
    n, pos, neg, size = 30, 2, 1, 400
    assert math.comb(n, pos) * math.comb(n - pos, neg) >= 5 * size  # the sampled branch
    pool = sampling.tuple_pool(n, pos, neg, size, seed=3)
    assert pool.shape == (size, 3) and pool.dtype == np.int64
    assert ((pool >= 0) & (pool < n)).all()
    assert all(len(set(r)) == 3 for r in pool.tolist())  # distinct within a tuple
    assert (pool[:, 0] < pool[:, 1]).all()  # positives sorted
    assert len({tuple(r) for r in pool.tolist()}) == size  # no repeated tuple
    np.testing.assert_array_equal(pool, sampling.tuple_pool(n, pos, neg, size, seed=3))
    assert not np.array_equal(pool, sampling.tuple_pool(n, pos, neg, size, seed=4))
    # every image is used (the draw is over all n, not a prefix)
    assert set(pool.reshape(-1).tolist()) == set(range(n))


@pytest.mark.parametrize("n, pos, neg", [(6, 2, 1), (5, 1, 1), (6, 2, 0), (4, 1, 2)])
def test_tuple_pool_enumerates_small_n(n, pos, neg):
    every = set()
    for perm in itertools.permutations(range(n), pos + neg):
        every.add(tuple(sorted(perm[:pos])) + tuple(sorted(perm[pos:])))
    possible = math.comb(n, pos) * math.comb(n - pos, neg)
    assert len(every) == possible
    pool = sampling.tuple_pool(n, pos, neg, 1000, seed=0)
    assert {tuple(r) for r in pool.tolist()} == every and len(pool) == possible
    if (pos, neg) == (1, 1):
        assert (0, 1) in every and (1, 0) in every  # 1 vs 1: ordered pairs
    # fewer than 5x size: enumerate, then keep `size` of them at random
    size = possible // 2
    part = sampling.tuple_pool(n, pos, neg, size, seed=0)
    rows = [tuple(r) for r in part.tolist()]
    assert len(rows) == size and len(set(rows)) == size and set(rows) <= every
    np.testing.assert_array_equal(part, sampling.tuple_pool(n, pos, neg, size, seed=0))
    other = {tuple(r) for r in sampling.tuple_pool(n, pos, neg, size, seed=1).tolist()}
    assert other != set(rows)


def test_tuple_pool_needs_enough_images():
    with pytest.raises(ValueError):
        sampling.tuple_pool(2, 2, 1, 10, seed=0)


# --------------------------------------------------------------------------- class_balanced
def blocks(labels_in_order: list[int]) -> list[tuple[int, int]]:
    """Runs of equal classes: ``[(class, length), ...]``."""
    return [(c, len(list(g))) for c, g in itertools.groupby(labels_in_order)]


def shuffled_labels(counts: list[int], seed: int = 0) -> torch.Tensor:
    labels = np.repeat(np.arange(len(counts)), counts)
    return torch.tensor(np.random.default_rng(seed).permutation(labels))


@pytest.mark.parametrize("batch", [17, 64])
def test_class_balanced_batches(batch):
    """Every class has >= 5 images: exactly the official ``RKDSampler``."""
    counts = [7, 5, 6, 9, 5, 8]
    labels = shuffled_labels(counts)
    gen = torch.Generator().manual_seed(0)
    steps = 300
    rows = sampling.class_balanced(gen, labels, len(counts), steps, batch, per_class=5)
    m = min(batch, sum(min(5, c) for c in counts))  # 17 or 30
    assert rows.shape == (steps, m)
    first_classes = Counter()
    for row in rows.tolist():
        assert len(set(row)) == m  # distinct images
        runs = blocks(labels[row].tolist())
        classes = [c for c, _ in runs]
        assert len(set(classes)) == len(classes)  # each class in one block
        assert all(size == 5 for _, size in runs[:-1])  # whole classes of 5 images
        assert 1 <= runs[-1][1] <= 5  # only the last block is cut
        if batch >= 30:
            assert sorted(classes) == list(range(len(counts)))  # all classes, all whole
        first_classes[classes[0]] += 1
    # classes come in random order; images within a class at random
    assert set(first_classes) == set(range(len(counts)))
    assert set(rows.reshape(-1).tolist()) == set(range(len(labels)))
    again = sampling.class_balanced(
        torch.Generator().manual_seed(0), labels, len(counts), steps, batch, per_class=5
    )
    assert torch.equal(rows, again)


def test_class_balanced_small_classes_keep_the_batch_size():
    """Classes with < 5 images: the official batch shrinks to sum_c min(5, n_c); here
    (documented deviation) random other images fill it to min(batch, 5 C, n)."""
    counts = [7, 3, 5, 1, 6, 9]
    labels = shuffled_labels(counts)
    whole = sum(min(5, c) for c in counts)  # 24
    rows = sampling.class_balanced(torch.Generator().manual_seed(0), labels, 6, 200, 64)
    assert rows.shape == (200, min(64, 5 * len(counts), len(labels)))  # 30
    for row in rows.tolist():
        assert len(set(row)) == len(row)
        head = blocks(labels[row[:whole]].tolist())  # first: every class, whole, once
        assert sorted(c for c, _ in head) == list(range(len(counts)))
        assert all(size == min(5, counts[c]) for c, size in head)


def test_rkd_epoch_order_is_class_balanced():
    labels = torch.arange(16).repeat_interleave(6)  # 16 classes x 6 images
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    method = methods.build("rkd", ctx(labels=labels, batch_size=64, num_classes=16))
    order = method.epoch_order(torch.Generator().manual_seed(1))
    assert order.shape == (math.ceil(96 / 64), 64)
    for row in order.tolist():
        per_class = Counter(labels[row].tolist())
        assert max(per_class.values()) <= 5
        # the official RKDSampler: 12 whole classes of 5, then 4 of a 13th
        assert sorted(per_class.values()) == [4] + [5] * 12


# --------------------------------------------------------------------------- negatives
NEG_LABELS = torch.tensor([0] * 3 + [1] * 4 + [2] * 5)


def test_other_class_negatives_without_replacement():
    gen = torch.Generator().manual_seed(0)
    anchors = torch.arange(12)
    k = 6  # every anchor has >= 7 other-class images
    for _ in range(50):
        neg = sampling.other_class_negatives(gen, NEG_LABELS, anchors, k)
        assert neg.shape == (12, k)
        assert (NEG_LABELS[neg] != NEG_LABELS[anchors][:, None]).all()
        assert all(len(set(r)) == k for r in neg.tolist())  # no repeats


def test_other_class_negatives_with_replacement_is_uniform():
    gen = torch.Generator().manual_seed(0)
    anchors = torch.tensor([[3, 8], [0, 11]])  # classes 1, 2, 0, 2
    k = 8  # class-2 anchors have only 7 other-class images: with replacement
    neg = sampling.other_class_negatives(gen, NEG_LABELS, anchors, k)
    assert neg.shape == (2, 2, k)
    assert (NEG_LABELS[neg] != NEG_LABELS[anchors][..., None]).all()
    assert len(set(neg[0, 1].tolist())) < k  # pigeonhole: repeats
    draws = sampling.other_class_negatives(gen, NEG_LABELS, torch.full((400,), 3), k)
    assert (NEG_LABELS[draws] != 1).all()
    counts = Counter(draws.reshape(-1).tolist())
    others = [i for i in range(12) if NEG_LABELS[i] != 1]
    assert sorted(counts) == others  # every other-class image, nothing else
    expected = 400 * k / len(others)  # 400
    assert all(abs(c - expected) < 0.2 * expected for c in counts.values())


def test_other_class_negatives_need_two_classes():
    with pytest.raises(ValueError):
        sampling.other_class_negatives(
            torch.Generator().manual_seed(0), torch.zeros(5, dtype=torch.long), torch.arange(5), 2
        )


# --------------------------------------------------------------------------- registry
def test_registry_names_labels_descriptions():
    names = methods.names()
    assert len(names) == len(set(names))
    for must in ("ce", "kd", "rkd", "dist", "mixup", "mixup3", "ckd_pn2", "ckd_pn3", "ckd_all"):
        assert must in names
    orders = [methods.get(n).order for n in names]
    assert orders == sorted(orders)  # report order
    for n in names:
        cls = methods.get(n)
        assert cls.name == n
        assert cls.label.strip() and cls.description.strip()
        assert methods.describe()[n] == cls.description
        assert cls.weights and all(isinstance(v, float) for v in cls.weights.values())
    with pytest.raises(ValueError, match="taken"):
        registry.register(type("Dup", (methods.get("kd"),), {"name": "kd"}))


def test_unknown_method_lists_the_choices():
    with pytest.raises(ValueError) as err:
        methods.get("nope")
    msg = str(err.value)
    assert "nope" in msg
    assert all(n in msg for n in methods.names())


def test_weight_overrides():
    kd = methods.build("kd", ctx(weights={"kd": 0.5}))
    assert kd.w == {"ce": 1.0, "kd": 0.5}
    assert methods.get("kd").weights == {"ce": 1.0, "kd": 1.0}  # the class default is kept
    with pytest.raises(ValueError) as err:
        methods.build("kd", ctx(weights={"ckd_label": 1.0}))
    msg = str(err.value)
    assert "'kd'" in msg and "ckd_label" in msg and "'ce'" in msg and "'kd'" in msg.split(":")[-1]


# --------------------------------------------------------------------------- declaring
def test_a_variant_is_one_register_variant_call(monkeypatch):
    from reference_experiments.methods import logits

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    cls = registry.register_variant(
        logits.KD, "kd_half", "KD (half)", "KD at half weight", 11, weights={"ce": 1.0, "kd": 0.5}
    )
    assert methods.get("kd_half") is cls and issubclass(cls, logits.KD)
    assert methods.describe()["kd_half"] == "KD at half weight"
    assert methods.names().index("kd_half") == methods.names().index("kd") + 1
    assert (cls.__name__, cls.label, cls.weights["kd"]) == ("KdHalf", "KD (half)", 0.5)
    with pytest.raises(ValueError, match="taken"):
        registry.register_variant(logits.KD, "kd_half", "x", "y", 22)


def test_white_box_variants_are_declared_from_their_family():
    from reference_experiments.methods import contrastive, whitebox

    for base in ("fitnets", "vid", "cc"):
        crd, ckd = methods.get(f"{base}+crd"), methods.get(f"{base}+ckd")
        assert issubclass(crd, contrastive.CRDMixin) and issubclass(crd, methods.get(base))
        assert crd.order == methods.get(base).order + 10 and crd.weights["crd"] == 0.8
        assert issubclass(ckd, whitebox.WhiteBoxCKD) and ckd.term_cls.key == base


def test_wrapped_permutations_walk_every_image_before_repeating():

    order = registry.wrapped_permutations(
        torch.Generator().manual_seed(0), 10, 3, 4
    )  # 12 draws of 10
    assert order.shape == (3, 4)
    flat = order.flatten().tolist()
    assert sorted(flat[:10]) == list(range(10)) and len(set(flat[10:])) == 2
