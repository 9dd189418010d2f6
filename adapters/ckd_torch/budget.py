"""``TorchTeacherBudget``: :class:`ckd_core.TeacherBudget` for a torch teacher.

The core object is framework-agnostic (NumPy at its boundary); this wrapper
runs a torch teacher under ``no_grad`` on ``device`` and returns cached outputs
as tensors on the device you ask for, so a training loop can keep them
device-resident and never touch NumPy in its hot loop.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ckd_core.budget import TeacherBudget

__all__ = ["TorchTeacherBudget"]

TorchOutputs = torch.Tensor | dict[str, torch.Tensor]


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"the torch teacher must return a tensor, or a dict of tensors; {name} is a "
            f"{type(x).__name__}."
        )
    if x.dtype == torch.bfloat16:  # NumPy has no bfloat16
        x = x.float()
    return x.detach().cpu().numpy()


class TorchTeacherBudget(TeacherBudget):
    """A teacher-call budget around ``teacher(x) -> tensor | dict of tensors``.

    Args:
        teacher: a module or callable on a batch tensor (put it in eval mode).
        budget: maximum distinct sample ids (``None``: unlimited, counted).
        device: where the teacher runs (inputs are moved there).
        preprocess: optional ``fn(batch_tensor) -> batch_tensor`` on ``device``.
        batch_size, metadata, shared_file: as :class:`ckd_core.TeacherBudget`
            (``shared_file``: one cache file and budget shared by processes).

    It keeps no counting state of its own: budget checks, the cache and the
    counters are the core object's, so it is thread-safe in the same way
    (see :class:`ckd_core.TeacherBudget`, *Threads*: teacher calls are
    serialised, cached queries never wait for them).

    Example:
        >>> import torch
        >>> images = torch.arange(12.0).reshape(6, 2)
        >>> tb = TorchTeacherBudget(torch.nn.Linear(2, 3), budget=4)
        >>> tb.query_tensors([0, 5, 0], lambda ids: images[ids]).shape
        torch.Size([3, 3])
        >>> tb.used
        2
    """

    def __init__(
        self,
        teacher: Callable[[torch.Tensor], TorchOutputs],
        budget: int | None,
        *,
        device: str | torch.device = "cpu",
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        batch_size: int = 256,
        metadata: Mapping[str, Any] | None = None,
        shared_file: str | os.PathLike | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.torch_teacher = teacher
        self.preprocess = preprocess
        super().__init__(
            self._call, budget, batch_size=batch_size, metadata=metadata, shared_file=shared_file
        )

    @torch.no_grad()
    def _call(self, inputs: Any) -> np.ndarray | dict[str, np.ndarray]:
        x = torch.as_tensor(np.asarray(inputs) if isinstance(inputs, list) else inputs)
        x = x.to(self.device)
        if self.preprocess is not None:
            x = self.preprocess(x)
        out = self.torch_teacher(x)
        if isinstance(out, Mapping):
            return {k: _to_numpy(v, f"output {k!r}") for k, v in out.items()}
        return _to_numpy(out, "its output")

    def query_tensors(
        self, ids: Any, inputs: Any = None, device: str | torch.device | None = None
    ) -> TorchOutputs:
        """:meth:`query` with the outputs as tensors on ``device`` (default: the teacher's)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        out = self.query(ids, inputs)
        dev = self.device if device is None else torch.device(device)
        if isinstance(out, dict):
            return {k: torch.from_numpy(v).to(dev) for k, v in out.items()}
        return torch.from_numpy(out).to(dev)
