"""``torch.nn.Module`` wrappers that call the ckd-core Keras losses.

Each module forwards its options to the core class of the same name (the
core checks them and holds the defaults); ``global_batch=True`` or a
``process_group`` adds the data-parallel hook the loss needs: the core's
``all_reduce=`` (CKD, RKD_d) or ``all_gather=`` (RKD).
"""

from __future__ import annotations

import functools
from typing import Any

import keras
import torch

import ckd_core
from ckd_core._private_api import keras_torch_device
from ckd_torch.distributed import all_reduce_sum, gather_rows


def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # pragma: no cover - torch < 2.4: always leave autocast
        return True


def _check_tensors(student: Any, teacher: Any, loss: str) -> None:
    if isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor):
        return
    role, x = ("student (input)", student)
    if isinstance(student, torch.Tensor):
        role, x = ("teacher (target)", teacher)
    raise TypeError(
        f"ckd_torch.{loss} expects torch.Tensor inputs, got {role} of type "
        f"{type(x).__module__}.{type(x).__name__}; convert it with torch.as_tensor(...) "
        "(or use ckd_core for NumPy arrays)."
    )


class _CoreLoss(torch.nn.Module):
    """Runs a :mod:`ckd_core` loss on torch tensors.

    The loss runs on the student's device (Keras' torch backend would
    otherwise move tensors to its global device) and outside autocast, so
    low-precision inputs are accumulated in float32 and no matmul is
    downcast; the result has the student's dtype and device.

    Subclasses name their core class (``core_class``) and which
    data-parallel hook ``global_batch`` supplies (``hook``).
    """

    core_class: type[keras.losses.Loss]
    hook: str | None = None
    core: keras.losses.Loss

    def __init__(
        self,
        *args: Any,
        process_group: Any = None,
        global_batch: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        self.process_group = process_group
        self.global_batch = bool(global_batch) or process_group is not None
        if self.global_batch:
            if self.hook is None:
                raise ValueError(f"{type(self).__name__} has no global_batch option.")
            collective = all_reduce_sum if self.hook == "all_reduce" else gather_rows
            options[self.hook] = functools.partial(collective, group=process_group)
        self.core = self.core_class(*args, **options)

    def _run(self, student: torch.Tensor, teacher: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        device = student.device
        # Enter the two scopes only when they change something: each costs
        # ~10-20 us per call, more than a small loss itself.
        if _autocast_enabled(device.type):
            with torch.autocast(device.type, enabled=False):
                return self._run(student, teacher, **kwargs)
        name = str(device)
        if keras_torch_device() != name:
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
        _check_tensors(student, teacher, type(self).__name__)
        return self._run(student, teacher, sample_weight=sample_weight)

    def extra_repr(self) -> str:
        items = [f"{k}={v!r}" for k, v in self.core.get_config().items() if k != "name"]
        if self.global_batch:
            items.append("global_batch=True")
        return ", ".join(items)


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

    core_class = ckd_core.ComparativeLoss
    hook = "all_reduce"

    def forward(  # type: ignore[override]
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        sample_weight: torch.Tensor | None = None,
        pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
        groups: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        _check_tensors(student, teacher, "ComparativeLoss")
        return self._run(
            student,
            teacher,
            sample_weight=sample_weight,
            pairs="all" if pairs is None else pairs,
            groups=groups,
        )


class RKDLoss(_CoreLoss):
    """Relational KD (:class:`ckd_core.RKDLoss`); the teacher gets no gradient.

    ``RKDLoss(distance_weight=25.0, angle_weight=50.0)``.
    ``global_batch=True`` (or a ``process_group``) all-gathers the student
    and teacher embeddings of every rank (``2 · world_size · n · dim``
    numbers received per rank per call; the core's ``all_gather`` hook with
    :func:`ckd_torch.distributed.gather_rows`) and evaluates RKD on the
    global batch ``N = world_size · n`` on every rank: memory O(N^2) for the
    distance term and the bounded angle chunks, time O(N^3) for the angle
    term, on every rank. Gradients reach only the local rows, scaled by
    ``world_size``, so that DDP's averaging yields the single-process
    gradient on the global batch.
    """

    core_class = ckd_core.RKDLoss
    hook = "all_gather"


class ProjectedRKDLoss(_CoreLoss):
    """RKD_d (:class:`ckd_core.ProjectedRKDLoss`) with a fixed seeded projection.

    ``ProjectedRKDLoss(out_dim=10, projection="gaussian", seed=0)``.
    ``global_batch=True`` / ``process_group`` work as in
    :class:`ComparativeLoss`, with O(out_dim) communication per call.
    """

    core_class = ckd_core.ProjectedRKDLoss
    hook = "all_reduce"


class KDLoss(_CoreLoss):
    """Hinton KD (:class:`ckd_core.KDLoss`) on logits: ``KDLoss(temperature=4.0)``."""

    core_class = ckd_core.KDLoss


class DISTLoss(_CoreLoss):
    """DIST (:class:`ckd_core.DISTLoss`) on logits: ``DISTLoss(beta=1.0, gamma=1.0, tau=4.0)``."""

    core_class = ckd_core.DISTLoss
