"""Distillation methods of the RTI-KD experiments, as per-step student losses.

Every method is a small ``nn.Module`` (its own trainable parts: regressors,
embeddings; its buffers: CRD's memory bank) that computes one step's loss
from the student's outputs and the **cached** teacher outputs of the batch
(teacher logits, and the teacher features white-box methods need: one
teacher call returns all of them and counts once against the budget).

A step is split into a random part and a pure part, so that many runs can
later share one GPU step under ``torch.func.vmap``:

1. ``method.sample(generator, order_row)``: every random choice of the step
   (which cached samples, pairs/groups, mixup lambda, CRD negatives), as a
   dict of tensors (:class:`Batch`); no host sync.
2. ``method.inputs(x_aug, batch)``: the images the student runs on.
3. ``method(logits, features, teacher, labels, batch)``: the loss, a pure
   function of its tensor arguments (plus CRD's memory update).

Loss composition (weights in :data:`DEFAULT_WEIGHTS`, overridable):

==================  =========================================================
method              loss
==================  =========================================================
``ce``              CE (no teacher, 0 calls)
``kd``              CE + KD (T=4)
``rkd``             CE + KD + 1 * RKD(logits)  (distance 25, angle 50)
``rkd_d{10,50,100}`` CE + KD + 1 * RKD_d(logits), fixed Gaussian projection
``dist``            CE + KD + 2 * DIST
``mixup``           CE + KD on the batch + 1 * [lam KD(s(x_mix), t_a) +
                    (1 - lam) KD(s(x_mix), t_b)], x_mix = lam x_a + (1-lam) x_b
                    of two cached samples, lam ~ Beta(1, 1) per step
``crd``             CE + KD + 0.8 * CRD(logit embeddings, memory bank)
``ckd_pairs``       1 * MSE(ds, dy_onehot) + 1 * MSE(ds, dt) on 64 random pairs
``ckd_groups{2,3}`` same on differences of k-sample group means
``ckd_all``         same over all in-batch pairs, O(n d), one forward/sample
``fitnets``         CE + KD + 100 * MSE(regressor(s_feat[2]), t_feat[2])
``vid``             CE + KD + 1 * sum_l VID(s_feat[l], t_feat[l]), l in 1..L-2
``X+crd``           X's white-box term + CE + KD + 0.8 * CRD
``X+ckd``           X's white-box term + the ``ckd_pairs`` terms (no CE/KD)
==================  =========================================================

Choices (documented deviations): baselines carry CE + KD with weight 1 (the
issue's "w_kd 1 for baselines"; RepDistiller's scripts use CE + term for
FitNets/VID, we add KD so every baseline has it); CKD variants carry no CE/KD.
Pairwise methods (``ckd_pairs``, ``ckd_groups*``, ``mixup``, ``X+ckd``) run the
student on 2 x batch_size images per step; ``ckd_all`` and the rest on
batch_size. CRD draws its negatives uniformly over the cached training
subset (the noise distribution its NCE loss assumes), K = min(16384, n_train).
``ckd_groups{k}`` forwards the same 2 x 64 images as ``ckd_pairs``: comparison m
contrasts the mean of rows (m + j) % 64, j < k, of the first half with the same
rows of the second half (rows are in random order), so each image sits in k groups.
Batch-size effects: ``ckd_pairs`` sees 128 images per step, ``ckd_all`` 64.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ckd_torch
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_WEIGHTS",
    "METHODS",
    "METHOD_NAMES",
    "Batch",
    "Method",
    "MethodSpec",
    "build_method",
    "parse_method",
]

Batch = dict[str, torch.Tensor]

#: default loss weights, from the official code (issue 3, section 5)
DEFAULT_WEIGHTS: dict[str, float] = {
    "ce": 1.0,
    "kd": 1.0,
    "kd_temperature": 4.0,
    "rkd": 1.0,
    "rkd_d": 1.0,
    "dist": 2.0,
    "mixup": 1.0,
    "crd": 0.8,
    "ckd_label": 1.0,
    "ckd_teacher": 1.0,
    "fitnets": 100.0,
    "vid": 1.0,
}

_BASES = ("ce", "kd", "rkd", "rkd_d", "dist", "mixup", "crd", "ckd_pairs", "ckd_groups", "ckd_all")
_WHITEBOX = ("fitnets", "vid")

METHOD_NAMES: tuple[str, ...] = (
    "ce", "kd", "rkd", "dist", "mixup", "crd",
    "ckd_pairs", "ckd_groups2", "ckd_groups3", "ckd_all",
    "rkd_d10", "rkd_d50", "rkd_d100",
    "fitnets", "fitnets+crd", "fitnets+ckd",
    "vid", "vid+crd", "vid+ckd",
)  # fmt: skip

#: FitNets hint layer (RepDistiller's default ``--hint_layer 2``)
HINT_LAYER = 2


@dataclass(frozen=True)
class MethodSpec:
    """What a method name means. ``base``: the black-box part; ``whitebox``:
    ``"fitnets"``/``"vid"`` or ``None``; ``group_k``/``proj_dim`` parameters."""

    name: str
    base: str
    whitebox: str | None = None
    group_k: int = 0
    proj_dim: int = 0

    @property
    def uses_teacher(self) -> bool:
        return self.base != "ce" or self.whitebox is not None

    @property
    def is_ckd(self) -> bool:
        return self.base.startswith("ckd")

    @property
    def pairwise(self) -> bool:
        """The student runs on 2 x batch_size images per step."""
        return self.base in ("ckd_pairs", "ckd_groups", "mixup")

    @property
    def stackable(self) -> bool:
        """Runs with torch.func.vmap (RKD's angle term is an autograd.Function
        without ``setup_context``, which functorch transforms reject)."""
        return self.base != "rkd"

    def teacher_feature_indices(self, num_features: int) -> tuple[int, ...]:
        """Indices of ``teacher(x, return_features=True)[1]`` to cache."""
        if self.whitebox == "fitnets":
            return (HINT_LAYER,)
        if self.whitebox == "vid":
            return tuple(range(1, num_features - 1))
        return ()

    def images_per_step(self, batch_size: int) -> int:
        return 2 * batch_size if self.pairwise else batch_size


def parse_method(name: str) -> MethodSpec:
    """``"vid+ckd"`` -> ``MethodSpec(base="ckd_pairs", whitebox="vid")`` etc."""
    parts = name.split("+")
    whitebox = None
    if parts[0] in _WHITEBOX:
        whitebox = parts.pop(0)
        if not parts:
            parts = ["kd"]
        elif len(parts) != 1:
            raise ValueError(f"unknown method {name!r}")
        elif parts[0] == "ckd":
            parts = ["ckd_pairs"]
    if len(parts) != 1:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
    base = parts[0]
    if m := re.fullmatch(r"ckd_groups(\d+)", base):
        k = int(m.group(1))
        if k < 1:
            raise ValueError(f"group size must be >= 1 in {name!r}")
        return MethodSpec(name, "ckd_groups", whitebox, group_k=k)
    if m := re.fullmatch(r"rkd_d(\d+)", base):
        return MethodSpec(name, "rkd_d", whitebox, proj_dim=int(m.group(1)))
    if base not in _BASES or base in ("ckd_groups", "rkd_d"):
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
    return MethodSpec(name, base, whitebox)


METHODS: dict[str, MethodSpec] = {name: parse_method(name) for name in METHOD_NAMES}


# ----------------------------------------------------------------------------- parts
class ConvReg(nn.Module):
    """FitNets regressor (RepDistiller ``ConvReg``): student map -> teacher map.

    Conv (stride 2 if the student map is twice as large, transposed conv if
    half as large, a valid conv otherwise) + BatchNorm + ReLU. Flat features
    (MLP students/teachers) use a linear layer to the flattened teacher shape.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int]) -> None:
        super().__init__()
        self.t_shape = tuple(t_shape)
        self.spatial = len(s_shape) == 3 and len(t_shape) == 3
        if not self.spatial:
            self.linear = nn.Linear(math.prod(s_shape), math.prod(t_shape))
            return
        s_c, s_h, s_w = s_shape
        t_c, t_h, t_w = t_shape
        if s_h == 2 * t_h:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, 3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, 4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, (1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(f"student map {s_shape} smaller than teacher map {t_shape}")
        self.bn = nn.BatchNorm2d(t_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spatial:
            return self.linear(x.flatten(1)).view(-1, *self.t_shape)
        return F.relu(self.bn(self.conv(x)))


class VIDLayer(nn.Module):
    """One VID term (official formulation, as in RepDistiller): a 1x1-conv
    regressor predicts the teacher map's mean; a learned per-channel variance
    ``softplus(alpha) + eps`` (init 5); loss = mean Gaussian NLL. Flat
    features are treated as 1x1 maps."""

    def __init__(
        self,
        s_channels: int,
        t_channels: int,
        mid: int | None = None,
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        mid = t_channels if mid is None else mid
        self.regressor = nn.Sequential(
            nn.Conv2d(s_channels, mid, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid, mid, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid, t_channels, 1, bias=False),
        )
        self.log_scale = nn.Parameter(
            torch.full((t_channels,), math.log(math.expm1(init_pred_var - eps)))
        )
        self.eps = eps

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = s[:, :, None, None] if s.dim() == 2 else s
        t = t[:, :, None, None] if t.dim() == 2 else t
        s_h, t_h = s.shape[2], t.shape[2]
        if s_h > t_h:
            s = F.adaptive_avg_pool2d(s, (t_h, t_h))
        elif s_h < t_h:
            t = F.adaptive_avg_pool2d(t, (s_h, s_h))
        mean = self.regressor(s)
        var = (F.softplus(self.log_scale) + self.eps).view(1, -1, 1, 1)
        return torch.mean(0.5 * ((mean - t) ** 2 / var + torch.log(var)))


class CRD(nn.Module):
    """Contrastive representation distillation (Tian et al. 2020) with a
    memory bank over the cached training subset, on logit embeddings.

    Linear embeddings (student and teacher side) to ``feat_dim``, L2
    normalised; two momentum memory banks; NCE loss with K negatives and
    temperature ``T``; the normalisation constants Z are set from the first
    batch (as RepDistiller) without a host sync.
    """

    def __init__(
        self,
        s_dim: int,
        t_dim: int,
        n_data: int,
        *,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        momentum: float = 0.5,
    ) -> None:
        super().__init__()
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)
        self.n_data = int(n_data)
        self.k = int(min(nce_k, n_data))
        self.t = float(nce_t)
        self.momentum = float(momentum)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(n_data, feat_dim) * (2 * stdv) - stdv)
        self.register_buffer("memory_t", torch.rand(n_data, feat_dim) * (2 * stdv) - stdv)
        self.register_buffer("z", torch.full((2,), -1.0))

    def sample(self, generator: torch.Generator | None, idx: torch.Tensor) -> torch.Tensor:
        """``(len(idx), K + 1)`` memory indices: the positive, then K negatives."""
        shape = (*idx.shape, self.k)  # idx may carry leading run dims
        neg = torch.randint(self.n_data, shape, device=idx.device, generator=generator)
        return torch.cat([idx[..., None], neg], dim=-1)

    def _nce(self, p: torch.Tensor) -> torch.Tensor:
        """RepDistiller ``ContrastLoss``: column 0 positive, the rest noise."""
        m = p.shape[1] - 1
        mpn = m / self.n_data
        log_d1 = torch.log(p[:, 0] / (p[:, 0] + mpn + 1e-7))
        log_d0 = torch.log(mpn / (p[:, 1:] + mpn + 1e-7))
        return -(log_d1.sum() + log_d0.sum()) / p.shape[0]

    def forward(
        self, s: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, contrast: torch.Tensor
    ) -> torch.Tensor:
        v_s = F.normalize(self.embed_s(s), dim=1)
        v_t = F.normalize(self.embed_t(t), dim=1)
        w_s = self.memory_s[contrast].detach()  # (B, K+1, D) student memory
        w_t = self.memory_t[contrast].detach()
        # teacher anchor vs student memory, and student anchor vs teacher memory
        out_t = torch.exp(torch.einsum("bkd,bd->bk", w_s, v_t) / self.t)
        out_s = torch.exp(torch.einsum("bkd,bd->bk", w_t, v_s) / self.t)
        with torch.no_grad():
            first = torch.stack([out_s.mean(), out_t.mean()]) * self.n_data
            z = torch.where(self.z < 0, first, self.z)
            self.z.copy_(z)
        loss = self._nce(out_s / z[0]) + self._nce(out_t / z[1])
        with torch.no_grad():
            m = self.momentum
            new_s = F.normalize(self.memory_s[idx] * m + v_s.detach() * (1 - m), dim=1)
            new_t = F.normalize(self.memory_t[idx] * m + v_t.detach() * (1 - m), dim=1)
            self.memory_s.index_put_((idx,), new_s.to(self.memory_s.dtype))
            self.memory_t.index_put_((idx,), new_t.to(self.memory_t.dtype))
        return loss


# ----------------------------------------------------------------------------- method
def _shape(s: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in s)


class Method(nn.Module):
    """The loss of one method (see the module docstring).

    Args:
        spec: a :class:`MethodSpec` (see :func:`parse_method`).
        num_classes: logit dimension.
        n_train: size of the cached training subset (CRD's memory bank).
        student_shapes / teacher_shapes: per-sample shapes of the student's
            and teacher's feature lists (``models.feature_shapes``); needed
            for white-box methods only.
        weights: overrides of :data:`DEFAULT_WEIGHTS`.
        seed: seed of RKD_d's fixed projection.
    """

    def __init__(
        self,
        spec: MethodSpec,
        *,
        num_classes: int,
        n_train: int,
        batch_size: int = 64,
        student_shapes: Sequence[Sequence[int]] = (),
        teacher_shapes: Sequence[Sequence[int]] = (),
        weights: Mapping[str, float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        unknown = set(weights or {}) - set(DEFAULT_WEIGHTS)
        if unknown:
            known = sorted(DEFAULT_WEIGHTS)
            raise ValueError(f"unknown loss weights {sorted(unknown)}; known: {known}")
        self.spec = spec
        self.w = {**DEFAULT_WEIGHTS, **(weights or {})}
        self.num_classes = int(num_classes)
        self.n_train = int(n_train)
        self.batch_size = int(batch_size)
        base = spec.base
        self.kd = ckd_torch.KDLoss(temperature=self.w["kd_temperature"])
        if base == "rkd":
            self.rkd = ckd_torch.RKDLoss()
        elif base == "rkd_d":
            self.rkd_d = ckd_torch.ProjectedRKDLoss(out_dim=spec.proj_dim, seed=seed)
        elif base == "dist":
            self.dist = ckd_torch.DISTLoss()
        elif spec.is_ckd:
            self.ckd = ckd_torch.ComparativeLoss()
        if base == "crd":
            self.crd = CRD(num_classes, num_classes, self.n_train)
        if base == "ckd_groups":
            b, k = self.batch_size, spec.group_k
            # group m of side A: rows (m + j) % B, j < k, of the first half;
            # side B: the same in the second half (rows are in random order)
            ga = (torch.arange(b)[:, None] + torch.arange(k)[None, :]) % b
            self.register_buffer("group_a", ga, persistent=False)
            self.register_buffer("group_b", ga + b, persistent=False)
        if base == "ckd_pairs":
            self.register_buffer("pair_a", torch.arange(self.batch_size), persistent=False)
            self.register_buffer(
                "pair_b", torch.arange(self.batch_size) + self.batch_size, persistent=False
            )
        self.feature_indices: tuple[int, ...] = spec.teacher_feature_indices(len(teacher_shapes))
        if spec.whitebox is not None:
            if not student_shapes or not teacher_shapes:
                raise ValueError(f"{spec.name} needs student_shapes and teacher_shapes")
            if spec.whitebox == "fitnets":
                self.hint = ConvReg(
                    _shape(student_shapes[HINT_LAYER]), _shape(teacher_shapes[HINT_LAYER])
                )
            else:
                n = min(len(student_shapes), len(teacher_shapes))
                self.feature_indices = tuple(range(1, n - 1))
                self.vid = nn.ModuleList(
                    VIDLayer(_shape(student_shapes[i])[0], _shape(teacher_shapes[i])[0])
                    for i in self.feature_indices
                )

    # ------------------------------------------------------------------ sampling
    @property
    def images_per_step(self) -> int:
        return self.spec.images_per_step(self.batch_size)

    def sample(self, generator: torch.Generator | None, idx: torch.Tensor) -> Batch:
        """All random choices of one step, given the ``images_per_step``
        cached-sample indices ``idx`` drawn by the runner (``idx`` may have
        leading dimensions, one per stacked run)."""
        batch: Batch = {"idx": idx}
        if self.spec.base == "mixup":
            # lam ~ Beta(1, 1) = U(0, 1); one lam per step, as in mixup
            batch["lam"] = torch.rand(idx.shape[:-1], device=idx.device, generator=generator)
        if self.spec.base == "crd":
            batch["contrast"] = self.crd.sample(generator, idx)
        return batch

    def inputs(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Student inputs from the augmented images of ``batch["idx"]``."""
        if self.spec.base == "mixup":
            b = self.batch_size
            lam = batch["lam"].to(x.dtype)
            mixed = x[:b] * lam + x[b:] * (1 - lam)
            return torch.cat([x[:b], mixed])
        return x

    # ------------------------------------------------------------------ loss
    def forward(
        self,
        logits: torch.Tensor,
        features: Sequence[torch.Tensor] | None,
        teacher: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        batch: Batch,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, parts)``: the weighted loss and its unweighted terms.

        ``logits`` are the student's outputs on ``inputs(...)``; ``teacher``
        holds the cached ``"logits"`` (and ``"feat{i}"``) rows of
        ``batch["idx"]``; ``labels`` the labels of ``batch["idx"]``.
        """
        spec, w = self.spec, self.w
        s = logits.float()
        t = teacher["logits"].float() if "logits" in teacher else None
        parts: dict[str, torch.Tensor] = {}
        base = spec.base
        b = self.batch_size
        if base == "mixup":
            s, s_mix = s[:b], s[b:]
            t_b = t[b:]  # teacher outputs of the mixing partners
            t, labels = t[:b], labels[:b]
        if not spec.is_ckd:
            parts["ce"] = F.cross_entropy(s, labels)
        if base != "ce" and not spec.is_ckd:
            parts["kd"] = self.kd(s, t)
        if base == "rkd":
            parts["rkd"] = self.rkd(s, t)
        elif base == "rkd_d":
            parts["rkd_d"] = self.rkd_d(s, t)
        elif base == "dist":
            parts["dist"] = self.dist(s, t)
        elif base == "mixup":
            lam = batch["lam"].float()
            parts["mixup"] = lam * self.kd(s_mix, t) + (1 - lam) * self.kd(s_mix, t_b)
        elif base == "crd":
            parts["crd"] = self.crd(s, t, batch["idx"], batch["contrast"])
        elif spec.is_ckd:
            # (not F.one_hot: it syncs with the host on CUDA and breaks vmap)
            classes = torch.arange(self.num_classes, device=labels.device)
            onehot = (labels[:, None] == classes).to(s.dtype)
            kw: dict[str, Any] = {}
            if base == "ckd_pairs":
                kw["pairs"] = (self.pair_a, self.pair_b)
            elif base == "ckd_groups":
                kw["groups"] = (self.group_a, self.group_b)
            parts["ckd_label"] = self.ckd(s, onehot, **kw)
            parts["ckd_teacher"] = self.ckd(s, t, **kw)
        if spec.whitebox == "fitnets":
            f_s = self.hint(features[HINT_LAYER].float())
            parts["fitnets"] = F.mse_loss(f_s, teacher[f"feat{HINT_LAYER}"].float())
        elif spec.whitebox == "vid":
            parts["vid"] = sum(
                layer(features[i].float(), teacher[f"feat{i}"].float())
                for layer, i in zip(self.vid, self.feature_indices, strict=True)
            )
        loss = sum(w[k] * v for k, v in parts.items())
        return loss, {k: v.detach() for k, v in parts.items()}


def build_method(name: str | MethodSpec, **kwargs: Any) -> Method:
    """``Method(parse_method(name), **kwargs)``."""
    spec = name if isinstance(name, MethodSpec) else parse_method(name)
    return Method(spec, **kwargs)
