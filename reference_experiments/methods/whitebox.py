"""White-box methods: FitNets, VID and CC alone, with CRD, and with CKD.

Terms on the student's / teacher's feature lists ``f`` (``[f0, ..., f_L-1]``,
``f_L-1`` the pooled penultimate feature), as the official CKD code
(``train_student.py``, ``helper/loops.py``, RepDistiller's ``distiller_zoo``):

* ``fitnets`` (Romero et al. 2015): ``MSE(ConvReg(f_s[2]), f_t[2])``, weight 100.
* ``vid`` (Ahn et al. 2019): ``sum_l mean NLL_N(f_t[l]; mu(f_s[l]), sigma_l^2)``,
  l = 1..L-2, weight 1.
* ``cc`` (Peng et al. 2019, RepDistiller form): ``e = LinearEmbed(f[-1])`` (128-d,
  trainable on both sides), ``mean_i sum_d |e_s - e_t|_{i,d} |e_s - e_t|_{i+1,d}``,
  weight 0.02.

``X`` is ``CE + KD(T=4) + w X`` (``white_box.yml``); ``X+crd`` adds ``0.8 CRD``
(ours: the official code cannot run white-box + CRD); ``X+ckd`` is the official
``ckd_inter`` (``InterCKDSample``, ``InterCKDTrainHelpers``): 1 vs 1 tuples from a
100k pool, one student pass per side, ``MSE(ds, dy) + MSE(ds, dt)`` on logit
differences and ``w X`` on feature differences ``df = f(first) - f(second)``, the
regressor / embeddings applied *after* differencing; no CE or KD. As officially,
ConvReg keeps its final ReLU there although ``df_t`` may be negative.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .comparative import OfficialGroups
from .contrastive import CRDMixin
from .logits import KD, WithKD
from .registry import Batch, Method, MethodContext, StudentFn, register_variant

__all__ = [
    "CC",
    "CCTerm",
    "ConvReg",
    "FitNets",
    "HintTerm",
    "Term",
    "VID",
    "VIDLayer",
    "VIDTerm",
    "WITH_CKD",
    "WITH_CRD",
    "WhiteBox",
    "WhiteBoxCKD",
    "WhiteBoxKD",
]

#: FitNets hint layer (official ``--hint_layer 2``)
HINT_LAYER = 2
Shape = tuple[int, ...]


# ----------------------------------------------------------------------------- modules
class ConvReg(nn.Module):
    """FitNets regressor (RepDistiller ``ConvReg``): student map -> teacher map.

    Conv 3x3 stride 2 if the student map is twice as large, transposed conv 4x4
    stride 2 if half as large, a valid conv otherwise (1x1 when equal), then
    BatchNorm + ReLU. Flat features on either side: a Linear layer to the
    flattened teacher shape.
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
    """One VID term (official ``VIDLoss(C_s, C_t, C_t)``): 1x1 convs C_s->C_t->C_t->C_t
    with ReLUs predict the mean, variance ``softplus(alpha) + eps`` per channel (init 5);
    ``mean(0.5 ((mu - t)^2 / var + log var))``. Flat features are 1x1 maps; the larger
    map is average-pooled to the smaller."""

    def __init__(
        self, s_channels: int, t_channels: int, init_pred_var: float = 5.0, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(s_channels, t_channels, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(t_channels, t_channels, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(t_channels, t_channels, 1, bias=False),
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


class Term(nn.Module):
    """A white-box term: ``forward(s, t)`` on the student features ``s_layers`` and
    the teacher features ``t_layers`` (aligned lists); ``key``/``weight``: its loss
    name and official weight (``w_inter_defaults``)."""

    key: ClassVar[str] = ""
    weight: ClassVar[float] = 1.0
    s_layers: tuple[int, ...]
    t_layers: tuple[int, ...]

    def forward(self, s: list[torch.Tensor], t: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class HintTerm(Term):
    """``MSE(ConvReg(f_s[2]), f_t[2])``."""

    key = "fitnets"
    weight = 100.0

    def __init__(self, s_shapes: Sequence[Shape], t_shapes: Sequence[Shape]) -> None:
        super().__init__()
        self.s_layers = self.t_layers = (HINT_LAYER,)
        self.reg = ConvReg(s_shapes[HINT_LAYER], t_shapes[HINT_LAYER])

    def forward(self, s, t):
        return F.mse_loss(self.reg(s[0]), t[0])


class VIDTerm(Term):
    """``sum_l VID(f_s[l], f_t[l])`` over l = 1..L-2 (official ``feat[1:-1]``, zipped)."""

    key = "vid"
    weight = 1.0

    def __init__(self, s_shapes: Sequence[Shape], t_shapes: Sequence[Shape]) -> None:
        super().__init__()
        n = min(len(s_shapes), len(t_shapes))
        self.s_layers = self.t_layers = tuple(range(1, n - 1))
        self.layers = nn.ModuleList(VIDLayer(s_shapes[i][0], t_shapes[i][0]) for i in self.s_layers)

    def forward(self, s, t):
        return sum(layer(a, b) for layer, a, b in zip(self.layers, s, t, strict=True))


class CCTerm(Term):
    """Correlation congruence (official ``Correlation`` on ``LinearEmbed(f[-1])``, 128-d)."""

    key = "cc"
    weight = 0.02

    def __init__(
        self, s_shapes: Sequence[Shape], t_shapes: Sequence[Shape], feat_dim: int = 128
    ) -> None:
        super().__init__()
        self.s_layers, self.t_layers = (len(s_shapes) - 1,), (len(t_shapes) - 1,)
        self.embed_s = nn.Linear(math.prod(s_shapes[-1]), feat_dim)
        self.embed_t = nn.Linear(math.prod(t_shapes[-1]), feat_dim)

    def forward(self, s, t):
        delta = torch.abs(self.embed_s(s[0].flatten(1)) - self.embed_t(t[0].flatten(1)))
        return torch.mean((delta[:-1] * delta[1:]).sum(1))


# ----------------------------------------------------------------------------- bases
class WhiteBox(Method):
    """Builds :attr:`term_cls` from the context's feature shapes and caches its
    teacher features (``teacher["feat{i}"]``, fp16, cast to float here)."""

    whitebox = True
    family: ClassVar[str | None] = None  # not a CKD variant of the report's CKD row
    term_cls: ClassVar[type[Term]] = Term

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        if not ctx.student_shapes or not ctx.teacher_shapes:
            raise ValueError(f"{self.name} needs student_shapes and teacher_shapes")
        s_shapes = [tuple(int(v) for v in s) for s in ctx.student_shapes]
        t_shapes = [tuple(int(v) for v in s) for s in ctx.teacher_shapes]
        self.inter = self.term_cls(s_shapes, t_shapes)

    def teacher_features(self, num_features: int) -> tuple[int, ...]:
        if num_features != len(self.ctx.teacher_shapes):
            raise ValueError(
                f"teacher has {num_features} features, context {len(self.ctx.teacher_shapes)}"
            )
        return self.inter.t_layers

    def s_feats(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The term's student features, as float."""
        return [features[i].float() for i in self.inter.s_layers]

    def t_feats(self, teacher: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The term's cached teacher features, as float."""
        return [teacher[f"feat{j}"].float() for j in self.inter.t_layers]


class WhiteBoxKD(WhiteBox, WithKD):
    """``CE + KD + w * term(f_s, f_t)`` (official ``InterTrainHelpers``, ``w_kd = 1``)."""

    def loss(self, logits, features, teacher, labels, batch):
        terms = super().loss(logits, features, teacher, labels, batch)
        terms[self.term_cls.key] = self.inter(self.s_feats(features), self.t_feats(teacher))
        return terms


class WhiteBoxCKD(WhiteBox, OfficialGroups):
    """Official ``ckd_inter``: the 1 vs 1 CKD of ``ckd_pn2`` (tuple pool, two
    student passes, CKD on logit differences) + ``w * term(df_s, df_t)`` on
    feature differences (the regressor/embedding applied after differencing)."""

    k = 2

    def step(
        self,
        student: StudentFn,
        x: torch.Tensor,
        teacher: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        batch: Batch,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, (f_a, f_b) = self.two_passes(student, x, True)
        if f_a is None or f_b is None:
            raise RuntimeError(f"{type(self).__name__} needs the student's features")
        b = self.ctx.batch_size
        ds = [a - c for a, c in zip(self.s_feats(f_a), self.s_feats(f_b), strict=True)]
        dt = [f[:b] - f[b:] for f in self.t_feats(teacher)]
        terms = self.loss(logits, None, teacher, labels, batch)
        terms[self.term_cls.key] = self.inter(ds, dt)
        return self.combine(terms)


# ----------------------------------------------------------------------------- methods
_KD = KD.weights
_CKD = OfficialGroups.weights
_NOT_OFFICIAL = "(ours: the official code cannot run white-box + CRD)"


FitNets = register_variant(
    WhiteBoxKD,
    "fitnets",
    "FitNets",
    "CE + KD + 100 MSE(ConvReg(f_s[2]), f_t[2]) (FitNets hint)",
    60,
    term_cls=HintTerm,
    weights={**_KD, "fitnets": HintTerm.weight},
)
VID = register_variant(
    WhiteBoxKD,
    "vid",
    "VID",
    "CE + KD + 1 sum of VID Gaussian NLLs on layers 1..L-2",
    62,
    term_cls=VIDTerm,
    weights={**_KD, "vid": VIDTerm.weight},
)
CC = register_variant(
    WhiteBoxKD,
    "cc",
    "CC",
    "CE + KD + 0.02 correlation congruence of 128-d penultimate embeddings",
    64,
    term_cls=CCTerm,
    weights={**_KD, "cc": CCTerm.weight},
)
#: ``X+crd``: ``X`` + 0.8 CRD on logits
WITH_CRD = {
    base.name: register_variant(
        (CRDMixin, base),
        f"{base.name}+crd",
        f"{base.label}+CRD",
        f"{base.label} + 0.8 CRD on logits {_NOT_OFFICIAL}",
        base.order + 10,
        weights={**base.weights, "crd": 0.8},
    )
    for base in (FitNets, VID, CC)
}
#: ``X+ckd``: the official InterCKD
WITH_CKD = {
    term.key: register_variant(
        WhiteBoxCKD,
        f"{term.key}+ckd",
        f"{label}+CKD",
        f"official InterCKD: CKD on 1 vs 1 pairs + {text}",
        order,
        term_cls=term,
        weights={**_CKD, term.key: term.weight},
    )
    for term, label, order, text in (
        (HintTerm, "FitNets", 132, "100 MSE(ConvReg(df_s[2]), df_t[2])"),
        (VIDTerm, "VID", 134, "1 VID on feature differences"),
        (CCTerm, "CC", 136, "0.02 CC of embedded differences"),
    )
}
