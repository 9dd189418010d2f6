"""Mixup baselines as the official code runs them (``mixup.yml``, ``MixupTrainHelpers``).

The student sees only the mixed image ``x = sum_k lam_k x_k`` of k cached images
(each augmented on its own first); with one-hot labels ``y_k`` and cached
teacher logits ``t_k`` of the unmixed images,

    L = sum_k lam_k CE(s, y_k) + sum_k lam_k CE(s, softmax(t_k))

(soft cross-entropy at T = 1, weights 1 and 1, no KD term). Images come as
tuples of distinct images from a pool of 100k drawn once per run (``MixupSample``),
64 tuples per step, one lam per step.

* ``mixup``: two images, ``lam ~ Beta(1, 1)``, ``(lam, 1 - lam)``.
* ``mixup3``: three images, three ``Beta(1, 1)`` draws normalised to sum 1 (the
  official repository's older three-sample mixup; its release no longer runs it).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .registry import Batch, Method, MethodContext, StudentFn, register
from .sampling import PoolCursor

__all__ = ["Mixup", "Mixup3"]


class _Mixing(Method):
    """k-image mixup; subclasses set :attr:`k`."""

    k = 2
    weights = {"ce": 1.0, "mixup": 1.0}

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        # ordered first image, then the others (official MixupSample: ordered pairs)
        self.cursor = PoolCursor(ctx.n_train, 1, self.k - 1, ctx.seed)

    def epoch_order(self, gen: torch.Generator) -> torch.Tensor:
        ctx = self.ctx
        return self.cursor.take(gen, ctx.steps_per_epoch, ctx.batch_size)

    def sample(self, gen: torch.Generator, draw: torch.Tensor) -> Batch:
        u = torch.rand(self.k, generator=gen, device=gen.device)  # Beta(1, 1) = U(0, 1)
        lam = torch.stack([u[0], 1 - u[0]]) if self.k == 2 else u / u.sum()
        # side-major: all first images, then all second images, ...
        return {"idx": draw.T.reshape(-1), "lam": lam}

    def step(
        self,
        student: StudentFn,
        x: torch.Tensor,
        teacher: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        batch: Batch,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = self.ctx.batch_size
        lam = batch["lam"]
        sides = x.unflatten(0, (self.k, b))
        mixed = (sides * lam.to(x.dtype).view(self.k, 1, 1, 1, 1)).sum(0)
        logits, _ = student(mixed, False)
        s = logits.float()
        t = teacher["logits"].float().unflatten(0, (self.k, b))
        y = labels.unflatten(0, (self.k, b))
        log_p = F.log_softmax(s, dim=-1)
        ce = torch.stack([F.nll_loss(log_p, y[j]) for j in range(self.k)])
        soft = torch.stack(
            [-(F.softmax(t[j], dim=-1) * log_p).sum(-1).mean() for j in range(self.k)]
        )
        lam = lam.float()
        return self.combine({"ce": (lam * ce).sum(), "mixup": (lam * soft).sum()})


@register
class Mixup(_Mixing):
    name = "mixup"
    label = "Mixup"
    description = "official mixup: student on mixed pairs, lam-mixed CE + soft CE to teachers"
    order = 50
    k = 2


@register
class Mixup3(_Mixing):
    name = "mixup3"
    label = "Mixup (3 images)"
    description = "three-image mixup, weights from normalised Beta(1,1) draws"
    order = 51
    k = 3
