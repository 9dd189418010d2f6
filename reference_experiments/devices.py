"""Device choice, memory layout, mixed precision and how a stack steps, in one place.

On CUDA the student and teacher run channels-last, under autocast at the run's
``precision`` (:data:`PRECISIONS`; losses in float32; ``"fp32"``, the default, as
the official code), and a stack of trials takes one ``vmap(grad(...))`` step; on the
CPU everything runs in float32 and the trials step one after another. Both choices
come from ``benchmarks/student_loop.py`` (official-style loop vs the engine, one
process; ``benchmarks/results/student_loop-*.json``): on the CPU vmapped convolutions
are slower than running the trials in turn (a stack of 4 reached 0.32x the official
loop vmapped), on CUDA the vmapped stack is the faster one.

Under reduced precision BatchNorm takes float32 inputs (:func:`prepare_model`):
``vmap`` of ``batch_norm`` with a bf16 input and float32 statistics fails ("expected
scalar type BFloat16 but found Float"). The module constants are the rules; tests and
the GPU preflight flip them (e.g. autocast on the CPU, to reach the stacked bf16 path).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = [
    "PRECISIONS",
    "autocast",
    "compute_precision",
    "prefers_channels_last",
    "prepare_model",
    "resolve_device",
    "vmaps_stacks",
]

#: compute precision of a run's forward passes on CUDA -> autocast dtype (None: float32,
#: as the official code trains). The CPU always computes in float32.
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

#: device types where a reduced ``precision`` autocasts (the CPU computes in float32)
AUTOCAST_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
#: BatchNorm layers compute in float32 under reduced precision (see the module docstring)
BATCHNORM_FP32 = True
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


def _autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision] if device.type in AUTOCAST_DEVICE_TYPES else None


def autocast(device: torch.device, precision: str = "bf16") -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` (a key of :data:`PRECISIONS`) on the
    :data:`AUTOCAST_DEVICE_TYPES`; nothing for ``"fp32"`` or elsewhere."""
    dtype = _autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def compute_precision(device: torch.device, precision: str) -> str:
    """What a run at ``precision`` computes in on ``device``: ``"fp32"`` where nothing
    autocasts, else the precision and, where it applies, ``"(BatchNorm fp32)"``."""
    if _autocast_dtype(device, precision) is None:
        return "fp32"
    return f"{precision} (BatchNorm fp32)" if BATCHNORM_FP32 else precision


def _float32_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].float(), *args[1:])


def prepare_model(model: nn.Module, device: torch.device, precision: str) -> nn.Module:
    """``model`` with float32 BatchNorm inputs where ``precision`` autocasts on ``device``
    and :data:`BATCHNORM_FP32` holds (a forward pre-hook; ``functional_call`` keeps it)."""
    if _autocast_dtype(device, precision) is not None and BATCHNORM_FP32:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.register_forward_pre_hook(_float32_input)
    return model


def vmaps_stacks(device: torch.device) -> bool:
    """Whether a stack of trials on ``device`` steps as one vmapped call."""
    return device.type in VMAP_DEVICE_TYPES


def prefers_channels_last(device: torch.device, model: nn.Module) -> bool:
    """Whether ``model`` runs channels-last on ``device`` (convolutional models only)."""
    if device.type not in CHANNELS_LAST_DEVICE_TYPES:
        return False
    return any(isinstance(m, nn.Conv2d) for m in model.modules())
