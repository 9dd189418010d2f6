"""Device choice, memory layout, mixed precision and how a stack steps, in one place.

On CUDA the student and teacher run channels-last under bf16 autocast (losses
in float32), and a stack of trials takes one ``vmap(grad(...))`` step; on the
CPU everything runs in the default dtype and the trials step one after another.
Both choices come from ``benchmarks/student_loop.py`` (official-style loop vs
the engine, one process; ``benchmarks/results/student_loop-*.json``): on the CPU
vmapped convolutions are slower than running the trials in turn (a stack of 4
reached 0.32x the official loop vmapped), on CUDA the vmapped stack is the
faster one.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["autocast", "prefers_channels_last", "resolve_device", "vmaps_stacks"]

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


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def vmaps_stacks(device: torch.device) -> bool:
    """Whether a stack of trials on ``device`` steps as one vmapped call."""
    return device.type in VMAP_DEVICE_TYPES


def prefers_channels_last(device: torch.device, model: nn.Module) -> bool:
    """Whether ``model`` runs channels-last on ``device`` (convolutional models only)."""
    if device.type not in CHANNELS_LAST_DEVICE_TYPES:
        return False
    return any(isinstance(m, nn.Conv2d) for m in model.modules())
