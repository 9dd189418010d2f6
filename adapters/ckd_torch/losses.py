"""``torch.nn.Module`` wrappers that call the ckd-core Keras losses."""

from __future__ import annotations

from typing import Any

import keras
import torch

import ckd_core


class _CoreLoss(torch.nn.Module):
    """Runs a :mod:`ckd_core` loss on torch tensors.

    The loss runs on the student's device (Keras' torch backend would
    otherwise move tensors to its global device) and outside autocast, so
    low-precision inputs are accumulated in float32 and no matmul is
    downcast; the result has the student's dtype and device.
    """

    core: keras.losses.Loss

    def _run(self, student: torch.Tensor, teacher: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        device = student.device
        with keras.device(str(device)), torch.autocast(device.type, enabled=False):
            return self.core(teacher, student, **kwargs)

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        sample_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss between ``student`` (input) and ``teacher`` (target), both ``(batch, dim)``."""
        return self._run(student, teacher, sample_weight=sample_weight)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.core.get_config().items() if k != "name")


class ComparativeLoss(_CoreLoss):
    """CKD loss (:class:`ckd_core.ComparativeLoss`) as an ``nn.Module``.

    ``forward(student, teacher)`` compares all in-batch pairs in O(n·d);
    ``pairs=(a, b)`` equals ``MSELoss()(s[a] - s[b], t[a] - t[b])`` and
    ``groups=(ga, gb)`` compares the means of the indexed rows.
    """

    def __init__(self) -> None:
        super().__init__()
        self.core = ckd_core.ComparativeLoss()

    def forward(  # type: ignore[override]
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        sample_weight: torch.Tensor | None = None,
        pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
        groups: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return self._run(
            student,
            teacher,
            sample_weight=sample_weight,
            pairs="all" if pairs is None else pairs,
            groups=groups,
        )


class RKDLoss(_CoreLoss):
    """Relational KD (:class:`ckd_core.RKDLoss`); the teacher gets no gradient."""

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.core = ckd_core.RKDLoss(distance_weight=distance_weight, angle_weight=angle_weight)


class ProjectedRKDLoss(_CoreLoss):
    """RKD_d (:class:`ckd_core.ProjectedRKDLoss`) with a fixed seeded projection."""

    def __init__(self, out_dim: int | None = 10, projection: str = "gaussian", seed: int = 0) -> None:
        super().__init__()
        self.core = ckd_core.ProjectedRKDLoss(out_dim=out_dim, projection=projection, seed=seed)


class KDLoss(_CoreLoss):
    """Hinton KD (:class:`ckd_core.KDLoss`) on logits."""

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.core = ckd_core.KDLoss(temperature=temperature)


class DISTLoss(_CoreLoss):
    """DIST (:class:`ckd_core.DISTLoss`) on logits."""

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 4.0) -> None:
        super().__init__()
        self.core = ckd_core.DISTLoss(beta=beta, gamma=gamma, tau=tau)
