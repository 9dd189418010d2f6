"""``torch.nn.Module`` wrappers that call the ckd-core Keras losses.

Each module forwards its options to the core class of the same name (the
core checks them and holds the defaults); ``global_batch=True`` or a
``process_group`` adds the data-parallel hook the loss needs: the core's
``all_reduce=`` (CKD, RKD_d) or ``all_gather=`` (RKD).
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import keras
import torch

import ckd_core
from ckd_core._private_api import keras_torch_device
from ckd_torch.distributed import all_reduce_sum, gather_rows
from ckd_torch.fast_paths import all_pairs_ckd, autocast_enabled

#: torch's ``reduction`` names -> the core's (Keras') ``reduction`` values.
REDUCTIONS: dict[str, str | None] = {"mean": "sum_over_batch_size", "sum": "sum", "none": None}
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_CORE_NAMES = ((re.compile(r"\by_true\b"), "teacher"), (re.compile(r"\by_pred\b"), "student"))


def _check_tensors(student: Any, teacher: Any, loss: str) -> None:
    if isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor):
        return
    role, x = ("student", student)
    if isinstance(student, torch.Tensor):
        role, x = ("teacher", teacher)
    raise TypeError(
        f"ckd_torch.{loss} expects torch.Tensor inputs, got {role} of type "
        f"{type(x).__module__}.{type(x).__name__}; convert it with torch.as_tensor(...) "
        "(or use ckd_core for NumPy arrays)."
    )


def _torch_names(exc: Exception) -> Exception:
    """``exc`` with the core's ``y_true``/``y_pred`` renamed ``teacher``/``student``."""
    message = str(exc)
    for pattern, name in _CORE_NAMES:
        message = pattern.sub(name, message)
    return type(exc)(message)


class _CoreLoss(torch.nn.Module):
    """Runs a :mod:`ckd_core` loss on torch tensors.

    Features of any rank ``(batch, ...)`` are flattened to ``(batch,
    features)`` for the feature losses (CKD, RKD, RKD_d), as RepDistiller's
    RKD does.
    The loss runs on the student's device (Keras' torch backend would
    otherwise move tensors to its global device). The teacher is a target:
    it never receives a gradient (it is detached, for every loss). Under
    ``torch.autocast`` the loss is computed and returned in float32, as
    torch's own losses are; otherwise the result has the student's dtype.

    ``reduction`` takes torch's values: ``"mean"`` (default), ``"sum"``
    or ``"none"`` (per-sample terms, whose mean is the default loss) for
    the losses that decompose over samples; ``"mean"`` only for the
    batch-level ones (RKD, DIST).

    Copies (``copy.deepcopy``, ``pickle``, ``torch.save``) rebuild the core
    loss with the same options, so a ``global_batch`` copy stays global;
    a module with an explicit ``process_group`` deep-copies (sharing the
    group) but refuses to be pickled.

    Subclasses name their core class (``core_class``), which data-parallel
    hook ``global_batch`` supplies (``hook``), whether their inputs are
    features of any rank (``flattens_features``) and whether the loss is a
    sum of per-sample terms (``per_sample``).
    """

    core_class: type[keras.losses.Loss]
    hook: str | None = None
    flattens_features = False
    per_sample = True
    core: keras.losses.Loss

    def __init__(
        self,
        *args: Any,
        reduction: str = "mean",
        process_group: Any = None,
        global_batch: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"{name}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}."
            )
        if reduction != "mean" and not self.per_sample:
            raise ValueError(
                f"{name} is a batch-level loss (its terms couple the samples), so it has no "
                f"per-sample terms: reduction must be 'mean', got {reduction!r}."
            )
        self.reduction = reduction
        self.process_group = process_group
        self.global_batch = bool(global_batch) or process_group is not None
        if self.global_batch and self.hook is None:
            raise ValueError(f"{name} has no global_batch option.")
        self._core_args = args
        self._core_options = options
        self.core = self._build_core()

    def _build_core(self) -> keras.losses.Loss:
        options = dict(self._core_options)
        if self.reduction != "mean":
            options["reduction"] = REDUCTIONS[self.reduction]
        if self.global_batch:
            collective = all_reduce_sum if self.hook == "all_reduce" else gather_rows
            options[str(self.hook)] = functools.partial(collective, group=self.process_group)
        core = self.core_class(*self._core_args, **options)
        # The core's ``dtype=`` casts the inputs in ``Loss.__call__``, which the
        # adapter skips (its name scope costs more than a small loss): cast here.
        cast = options.get("dtype") is not None
        self._input_dtype = getattr(torch, core.dtype) if cast else None
        # Options that only the core handles: no torch-native fast path.
        self._plain = self.reduction == "mean" and not self.global_batch and not cast
        return core

    def __getstate__(self) -> dict[str, Any]:
        if self.process_group is not None:
            raise TypeError(
                f"cannot pickle ckd_torch.{type(self).__name__} with a process_group: a "
                "torch.distributed group belongs to one process. Pickle it with "
                "global_batch=True (the default group), or pass process_group= again after "
                "loading."
            )
        return self._state()

    def _state(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["core"] = None  # rebuilt from the options: the core's hooks do not survive a copy
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.core = self._build_core()

    def __deepcopy__(self, memo: dict[int, Any]) -> _CoreLoss:
        if self.process_group is not None:
            memo.setdefault(id(self.process_group), self.process_group)  # shared, not copied
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self._state(), memo))
        return clone

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(batch, ...)`` as ``(batch, features)`` (feature losses only)."""
        if self.flattens_features and x.ndim > 2:
            return x.reshape(x.shape[0], -1)
        return x

    def _run(self, student: torch.Tensor, teacher: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        student, teacher = self._flat(student), self._flat(teacher).detach()
        device = student.device
        if autocast_enabled(device.type):
            # Like torch's losses under autocast: float32 inside and out.
            with torch.autocast(device.type, enabled=False):
                if student.dtype in _LOW_PRECISION:
                    student = student.float()
                if teacher.dtype in _LOW_PRECISION:
                    teacher = teacher.float()
                return self._on_device(student, teacher, kwargs)
        return self._on_device(student, teacher, kwargs)

    def _on_device(
        self, student: torch.Tensor, teacher: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """The core's ``call`` on the student's device (skips ``__call__``'s name scope)."""
        if self._input_dtype is not None:
            student, teacher = student.to(self._input_dtype), teacher.to(self._input_dtype)
        name = str(student.device)
        try:
            if keras_torch_device() != name:  # a keras.device scope costs ~10-20 us
                with keras.device(name):
                    return self.core.call(teacher, student, **kwargs)
            return self.core.call(teacher, student, **kwargs)
        except (TypeError, ValueError) as exc:
            raise _torch_names(exc) from None

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        sample_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss between ``student`` (input) and ``teacher`` (target)."""
        _check_tensors(student, teacher, type(self).__name__)
        return self._run(student, teacher, sample_weight=sample_weight)

    def extra_repr(self) -> str:
        config = self.core.get_config()
        items = [f"{k}={v!r}" for k, v in config.items() if k not in ("name", "reduction")]
        if self.reduction != "mean":
            items.append(f"reduction={self.reduction!r}")
        if self.global_batch:
            items.append("global_batch=True")
        return ", ".join(items)


class ComparativeLoss(_CoreLoss):
    """CKD loss (:class:`ckd_core.ComparativeLoss`) as an ``nn.Module``.

    ``forward(student, teacher)`` on features ``(batch, ...)`` (flattened to
    ``(batch, features)``) compares all in-batch pairs in O(n·d);
    ``pairs=(a, b)`` equals ``MSELoss()(s[a] - s[b], t[a] - t[b])`` and
    ``groups=(ga, gb)`` compares the means of the indexed rows.

    Data-parallel training (``torch.distributed``, e.g. under
    ``DistributedDataParallel``): with ``global_batch=True`` (or a
    ``process_group``) the pairs run over the global batch, the concatenation
    of every rank's rows in rank order (shards may differ in size), and every
    rank returns that global loss. Three all-reduces of 1, ``dim + 1`` and
    1 numbers per call in the forward pass (2, ``dim + 2`` and 1 with
    ``sample_weight``), two in the backward (``dim + 1`` or ``dim + 2``,
    and 1): O(dim) communication, independent of the
    batch size. Each rank's backward yields ``world_size`` times the global
    loss's gradient through its own rows, so DDP's gradient averaging leaves
    exactly the single-process gradient on the global batch. Without an
    initialized process group the option is a no-op.
    """

    core_class = ckd_core.ComparativeLoss
    hook = "all_reduce"
    flattens_features = True

    def forward(  # type: ignore[override]
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        sample_weight: torch.Tensor | None = None,
        pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
        groups: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        _check_tensors(student, teacher, "ComparativeLoss")
        if self._plain and pairs is None and groups is None and sample_weight is None:
            loss = all_pairs_ckd(self._flat(student), self._flat(teacher).detach())
            if loss is not None:
                return loss
        return self._run(
            student,
            teacher,
            sample_weight=sample_weight,
            pairs="all" if pairs is None else pairs,
            groups=groups,
        )


class RKDLoss(_CoreLoss):
    """Relational KD (:class:`ckd_core.RKDLoss`) on features ``(batch, ...)``, flattened.

    ``RKDLoss(distance_weight=25.0, angle_weight=50.0)``; ``reduction="mean"`` only.
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
    flattens_features = True
    per_sample = False


class ProjectedRKDLoss(_CoreLoss):
    """RKD_d (:class:`ckd_core.ProjectedRKDLoss`) with a fixed seeded projection.

    Features ``(batch, ...)`` are flattened to ``(batch, features)`` first.
    ``ProjectedRKDLoss(out_dim=10, projection="gaussian", seed=0)``.
    ``global_batch=True`` / ``process_group`` work as in
    :class:`ComparativeLoss`, with O(out_dim) communication per call.
    """

    core_class = ckd_core.ProjectedRKDLoss
    hook = "all_reduce"
    flattens_features = True


class KDLoss(_CoreLoss):
    """Hinton KD (:class:`ckd_core.KDLoss`) on logits: ``KDLoss(temperature=4.0)``."""

    core_class = ckd_core.KDLoss


class DISTLoss(_CoreLoss):
    """DIST (:class:`ckd_core.DISTLoss`) on logits: ``DISTLoss(beta=1.0, gamma=1.0, tau=4.0)``.

    A batch-level loss: ``reduction="mean"`` only.
    """

    core_class = ckd_core.DISTLoss
    per_sample = False
