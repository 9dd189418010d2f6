"""Device choice, memory layout, mixed precision and how a stack steps, in one place.

On CUDA the student and teacher run channels-last, under autocast at the run's
``precision`` (:data:`PRECISIONS`; losses in float32), and a stack of trials
takes one ``vmap(grad(...))`` step; on the CPU everything runs in float32 and
the trials step one after another. Both choices come from
``benchmarks/student_loop.py`` (official-style loop vs the engine, one process;
``benchmarks/results/student_loop-*.json``): on the CPU vmapped convolutions are
slower than running the trials in turn (a stack of 4 reached 0.32x the official
loop vmapped), on CUDA the vmapped stack is the faster one.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["PRECISIONS", "autocast", "prefers_channels_last", "resolve_device", "vmaps_stacks"]

#: compute precision of a run's forward passes on CUDA -> autocast dtype (None: float32,
#: as the official code trains). The CPU always computes in float32.
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

#: device types whose stacks of trials step under ``vmap`` (measured faster there)
VMAP_DEVICE_TYPES = ("cuda",)
#: device types where convolutional models run channels-last (measured faster there)
CHANNELS_LAST_DEVICE_TYPES = ("cuda", "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``: CUDA if available, else the CPU; a CUDA device that is not there
    raises ``ValueError`` naming what is."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


def autocast(device: torch.device, precision: str = "bf16") -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` (a key of :data:`PRECISIONS`) on CUDA; nothing for
    ``"fp32"`` or elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if device.type == "cuda" and dtype is not None:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def vmaps_stacks(device: torch.device) -> bool:
    """Whether a stack of trials on ``device`` steps as one vmapped call."""
    return device.type in VMAP_DEVICE_TYPES


def prefers_channels_last(device: torch.device, model: nn.Module) -> bool:
    """Whether ``model`` runs channels-last on ``device`` (convolutional models only)."""
    if device.type not in CHANNELS_LAST_DEVICE_TYPES:
        return False
    return any(isinstance(m, nn.Conv2d) for m in model.modules())
