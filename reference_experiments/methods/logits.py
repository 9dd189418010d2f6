"""Black-box baselines on the student's logits: CE, KD, RKD, RKD_d, DIST.

Weights follow the official code (``relational.yml``, ``w_rel_defaults``):
every distillation baseline is ``CE + KD(T=4) + w * term``.

* ``ce``: cross-entropy only (no teacher call).
* ``kd``: Hinton et al. 2015, ``CE + T^2 KL(softmax(t/T) || softmax(s/T))``, T = 4.
* ``rkd``: Park et al. 2019 on logits, distance x25 + angle x50 (``ckd_torch.RKDLoss``),
  weight 1, on class-balanced batches (5 images per class, official ``RKDSampler``).
* ``rkd_d{K}``: the CKD paper's projected RKD_d (Sec. 5.3, Fig. 4),
  ``MSE(P(s_i - s_j), P(t_i - t_j))`` over in-batch pairs with a fixed seeded
  Gaussian projection ``P`` to K dimensions.
* ``dist``: Huang et al. 2022 (tau = 4, beta = gamma = 1), weight 2.
"""

from __future__ import annotations

import ckd_torch
import torch
import torch.nn.functional as F

from .registry import Method, MethodContext, register, register_variant
from .sampling import class_balanced

__all__ = ["CE", "DIST", "KD", "RKD", "ProjectedRKD", "WithKD"]


@register
class CE(Method):
    name = "ce"
    label = "CE only"
    description = "cross-entropy on labels, no teacher (0 calls)"
    order = 0
    weights = {"ce": 1.0}
    uses_teacher = False

    def loss(self, logits, features, teacher, labels, batch):
        return {"ce": F.cross_entropy(logits, labels)}


class WithKD(Method):
    """``CE + KD(T=4)``; subclasses add terms to ``super().loss(...)``."""

    temperature = 4.0

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.kd = ckd_torch.KDLoss(temperature=self.temperature)

    def loss(self, logits, features, teacher, labels, batch):
        t = teacher["logits"].float()
        return {"ce": F.cross_entropy(logits, labels), "kd": self.kd(logits, t)}


@register
class KD(WithKD):
    name = "kd"
    label = "KD"
    description = "CE + Hinton KD (T=4)"
    order = 10
    weights = {"ce": 1.0, "kd": 1.0}


@register
class RKD(WithKD):
    name = "rkd"
    label = "RKD"
    description = "CE + KD + RKD distance/angle on logits, class-balanced batches"
    order = 20
    weights = {"ce": 1.0, "kd": 1.0, "rkd": 1.0}
    #: the angle term's hand-derived gradient is an autograd.Function that
    #: functorch transforms refuse: stacked runs take per-run gradients
    vmappable = False
    per_class = 5

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.rkd = ckd_torch.RKDLoss()

    def epoch_order(self, gen: torch.Generator) -> torch.Tensor:
        ctx = self.ctx
        return class_balanced(
            gen, ctx.labels, ctx.num_classes, ctx.steps_per_epoch, ctx.batch_size, self.per_class
        )

    def loss(self, logits, features, teacher, labels, batch):
        terms = super().loss(logits, features, teacher, labels, batch)
        terms["rkd"] = self.rkd(logits, teacher["logits"].float())
        return terms


@register
class DIST(WithKD):
    name = "dist"
    label = "DIST"
    description = "CE + KD + DIST (tau=4), weight 2"
    order = 30
    weights = {"ce": 1.0, "kd": 1.0, "dist": 2.0}

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.dist = ckd_torch.DISTLoss()

    def loss(self, logits, features, teacher, labels, batch):
        terms = super().loss(logits, features, teacher, labels, batch)
        terms["dist"] = self.dist(logits, teacher["logits"].float())
        return terms


class ProjectedRKD(WithKD):
    """RKD_d with a fixed projection to :attr:`out_dim` dimensions (subclassed per K)."""

    out_dim = 0
    weights = {"ce": 1.0, "kd": 1.0, "rkd_d": 1.0}
    order = 80

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.rkd_d = ckd_torch.ProjectedRKDLoss(out_dim=self.out_dim, seed=ctx.seed)

    def loss(self, logits, features, teacher, labels, batch):
        terms = super().loss(logits, features, teacher, labels, batch)
        terms["rkd_d"] = self.rkd_d(logits, teacher["logits"].float())
        return terms


#: K = 2, 5 for 10-class sets (where 10/50/100 project nothing away), 10/50/100 as the paper
PROJECTED = {
    k: register_variant(
        ProjectedRKD,
        f"rkd_d{k}",
        f"RKD_{k}",
        f"CE + KD + projected RKD_d to {k} dims (paper Fig. 4)",
        80 + i,
        out_dim=k,
    )
    for i, k in enumerate((2, 5, 10, 50, 100))
}
