"""CRD (Tian et al., ICLR 2020) on logits, as the official CKD code runs it.

Embeddings ``v = normalize(W x + b)`` (``Linear(num_classes -> 128)``) of the
student and the cached teacher logits; two momentum memory banks ``M_s, M_t``
over the cached training subset (momentum 0.5); for each anchor i, K = 16384
negatives j drawn from the *other classes* (official ``CRDSample``, mode
``exact``: the positive is i itself; with replacement when fewer exist), and

    h(v, m) = exp(v . m / T) / Z,   T = 0.07,   Z = n * mean(exp(. / T)) of the first batch
    L = NCE(h(v_s, M_t[i, j...])) + NCE(h(v_t, M_s[i, j...]))            (CRD Eq. 18)
    NCE(p) = -(1/B) sum_b [log p_0 / (p_0 + K/n) + sum_k log (K/n) / (p_k + K/n)]

(``crd/criterion.py``, ``crd/memory.py``; weight 0.8 with CE + KD(T=4),
``relational.yml``). The scores are one ``(B, n)`` product with the bank
gathered at the contrast indices, not a ``(B, K+1, 128)`` gather of the bank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .logits import WithKD
from .registry import Batch, Method, MethodContext, register
from .sampling import OtherClassNegatives

__all__ = ["CRD", "CRDLoss", "CRDMixin"]


class CRDLoss(nn.Module):
    """Embeddings, memory banks and the two-sided NCE loss (see the module docstring).

    ``forward(s, t, idx, contrast)``: ``s``/``t`` ``(B, d)`` inputs of the anchors
    ``idx`` (``B``); ``contrast`` ``(B, K+1)`` bank rows, the positive first. The
    banks and ``Z`` are updated in place (buffers; no host sync).
    """

    # buffers, registered in __init__
    memory_s: torch.Tensor
    memory_t: torch.Tensor
    z: torch.Tensor

    def __init__(
        self,
        s_dim: int,
        t_dim: int,
        n_data: int,
        *,
        feat_dim: int = 128,
        nce_t: float = 0.07,
        momentum: float = 0.5,
    ) -> None:
        super().__init__()
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)
        self.n_data = int(n_data)
        self.t = float(nce_t)
        self.momentum = float(momentum)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(n_data, feat_dim) * (2 * stdv) - stdv)
        self.register_buffer("memory_t", torch.rand(n_data, feat_dim) * (2 * stdv) - stdv)
        #: Z of the student-anchor and teacher-anchor scores; < 0 until the first batch
        self.register_buffer("z", torch.full((2,), -1.0))

    def nce(self, p: torch.Tensor) -> torch.Tensor:
        """Official ``ContrastLoss``: column 0 the positive, the rest noise (P_n = 1/n)."""
        mpn = (p.shape[1] - 1) / self.n_data
        log_d1 = torch.log(p[:, 0] / (p[:, 0] + mpn + 1e-7))
        log_d0 = torch.log(mpn / (p[:, 1:] + mpn + 1e-7))
        return -(log_d1.sum() + log_d0.sum()) / p.shape[0]

    def forward(
        self, s: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, contrast: torch.Tensor
    ) -> torch.Tensor:
        v_s = F.normalize(self.embed_s(s.flatten(1)), dim=1)
        v_t = F.normalize(self.embed_t(t.flatten(1)), dim=1)
        # anchor . bank row for every row, then the K+1 contrast columns of each anchor
        # (copies of the banks: autograd keeps them, the banks change in place below)
        bank_s, bank_t = self.memory_s.detach().clone(), self.memory_t.detach().clone()
        out_s = torch.exp((v_s @ bank_t.T).gather(1, contrast) / self.t)
        out_t = torch.exp((v_t @ bank_s.T).gather(1, contrast) / self.t)
        with torch.no_grad():
            first = torch.stack([out_s.mean(), out_t.mean()]) * self.n_data
            z = torch.where(self.z < 0, first, self.z)
            self.z.copy_(z)
        loss = self.nce(out_s / z[0]) + self.nce(out_t / z[1])
        with torch.no_grad():
            m = self.momentum
            new_s = F.normalize(self.memory_s[idx] * m + v_s.detach() * (1 - m), dim=1)
            new_t = F.normalize(self.memory_t[idx] * m + v_t.detach() * (1 - m), dim=1)
            self.memory_s.index_put_((idx,), new_s.to(self.memory_s.dtype))
            self.memory_t.index_put_((idx,), new_t.to(self.memory_t.dtype))
        return loss


class CRDMixin(Method):
    """Adds the ``crd`` term on logits and its negatives to a single-image method.

    ``nce_k`` (class attribute, may be set per instance in tests): negatives per anchor.
    """

    nce_k: ClassVar[int] = 16384

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        c = ctx.num_classes
        self.crd = CRDLoss(c, c, ctx.n_train)
        self._negatives: OtherClassNegatives | None = None

    def negatives(self, device: torch.device) -> OtherClassNegatives:
        """The run's negative sampler (built on first use, once per ``nce_k``)."""
        got = self._negatives
        if got is None or got.k != self.nce_k or got.labels.device != device:
            got = OtherClassNegatives(self.ctx.labels.to(device), self.nce_k)
            self._negatives = got
        return got

    def sample(self, gen: torch.Generator, draw: torch.Tensor) -> Batch:
        batch = super().sample(gen, draw)
        idx = batch["idx"].to(gen.device)
        neg = self.negatives(gen.device)(gen, idx)
        return {**batch, "contrast": torch.cat([idx[:, None], neg], dim=1)}

    def loss(
        self,
        logits: torch.Tensor,
        features: list[torch.Tensor] | None,
        teacher: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        batch: Batch,
    ) -> dict[str, torch.Tensor]:
        terms = super().loss(logits, features, teacher, labels, batch)
        t = teacher["logits"].float()
        terms["crd"] = self.crd(logits, t, batch["idx"], batch["contrast"])
        return terms


@register
class CRD(CRDMixin, WithKD):
    name = "crd"
    label = "CRD"
    description = "CE + KD + 0.8 CRD on logit embeddings, other-class negatives (K=16384)"
    order = 40
    weights = {"ce": 1.0, "kd": 1.0, "crd": 0.8}
