"""``torch.nn.Module`` wrappers that call the ckd-core Keras losses."""

from __future__ import annotations

import functools
from typing import Any

import keras
import torch

import ckd_core
from ckd_torch.distributed import all_reduce_sum, gather_rows

try:  # Keras' current torch device (what ``keras.device`` sets)
    from keras.src.backend.torch.core import get_device as _keras_device
except ImportError:  # pragma: no cover - other Keras layouts: always enter the scope

    def _keras_device() -> str:
        return ""


def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # pragma: no cover - torch < 2.4: always leave autocast
        return True


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
        # Enter the two scopes only when they change something: each costs
        # ~10-20 us per call, more than a small loss itself.
        if _autocast_enabled(device.type):
            with torch.autocast(device.type, enabled=False):
                return self._run(student, teacher, **kwargs)
        name = str(device)
        if _keras_device() != name:
            with keras.device(name):
                return self.core(teacher, student, **kwargs)
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
        items = [f"{k}={v!r}" for k, v in self.core.get_config().items() if k != "name"]
        if getattr(self, "global_batch", False):
            items.append("global_batch=True")
        return ", ".join(items)


def _global_batch_all_reduce(
    global_batch: bool, process_group: Any
) -> functools.partial[torch.Tensor] | None:
    """The core's ``all_reduce`` for the ``global_batch``/``process_group`` options."""
    if not (global_batch or process_group is not None):
        return None
    return functools.partial(all_reduce_sum, group=process_group)


class ComparativeLoss(_CoreLoss):
    """CKD loss (:class:`ckd_core.ComparativeLoss`) as an ``nn.Module``.

    ``forward(student, teacher)`` compares all in-batch pairs in O(n·d);
    ``pairs=(a, b)`` equals ``MSELoss()(s[a] - s[b], t[a] - t[b])`` and
    ``groups=(ga, gb)`` compares the means of the indexed rows.

    Data-parallel training (``torch.distributed``, e.g. under
    ``DistributedDataParallel``): with ``global_batch=True`` (or a
    ``process_group``) the pairs run over the global batch, the concatenation
    of every rank's rows in rank order (shards may differ in size), and every
    rank returns that global loss. Two all-reduces of ``dim + 1`` (``dim +
    2`` with ``sample_weight``) and 1 numbers per call in the forward pass,
    one number in the backward: O(dim) communication, independent of the
    batch size. Each rank's backward yields ``world_size`` times the global
    loss's gradient through its own rows, so DDP's gradient averaging leaves
    exactly the single-process gradient on the global batch. Without an
    initialized process group the option is a no-op.
    """

    def __init__(self, process_group: Any = None, global_batch: bool = False) -> None:
        super().__init__()
        self.process_group = process_group
        self.global_batch = global_batch or process_group is not None
        all_reduce = _global_batch_all_reduce(global_batch, process_group)
        self.core = ckd_core.ComparativeLoss(all_reduce=all_reduce)

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
    """Relational KD (:class:`ckd_core.RKDLoss`); the teacher gets no gradient.

    ``global_batch=True`` (or a ``process_group``) all-gathers the student
    and teacher embeddings of every rank (``2 · world_size · n · dim``
    numbers received per rank per call) and evaluates RKD on the global
    batch ``N = world_size · n`` on every rank: memory O(N^2) for the
    distance term and the bounded angle chunks, time O(N^3) for the angle
    term, on every rank. Gradients reach only the local rows, scaled by
    ``world_size``, so that DDP's averaging yields the single-process
    gradient on the global batch.
    """

    def __init__(
        self,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        process_group: Any = None,
        global_batch: bool = False,
    ) -> None:
        super().__init__()
        self.core = ckd_core.RKDLoss(distance_weight=distance_weight, angle_weight=angle_weight)
        self.process_group = process_group
        self.global_batch = global_batch or process_group is not None

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        sample_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.global_batch:
            student = gather_rows(student, self.process_group)
            teacher = gather_rows(teacher.detach(), self.process_group)
        return self._run(student, teacher, sample_weight=sample_weight)


class ProjectedRKDLoss(_CoreLoss):
    """RKD_d (:class:`ckd_core.ProjectedRKDLoss`) with a fixed seeded projection.

    ``global_batch=True`` / ``process_group`` work as in
    :class:`ComparativeLoss`, with O(out_dim) communication per call.
    """

    def __init__(
        self,
        out_dim: int | None = 10,
        projection: str = "gaussian",
        seed: int = 0,
        process_group: Any = None,
        global_batch: bool = False,
    ) -> None:
        super().__init__()
        self.process_group = process_group
        self.global_batch = global_batch or process_group is not None
        self.core = ckd_core.ProjectedRKDLoss(
            out_dim=out_dim,
            projection=projection,
            seed=seed,
            all_reduce=_global_batch_all_reduce(global_batch, process_group),
        )


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
