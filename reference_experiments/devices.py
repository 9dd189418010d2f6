"""Device choice and mixed precision, in one place.

On CUDA the student and teacher run channels-last under bf16 autocast (losses
in float32); on the CPU everything runs in the default dtype.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast", "resolve_device"]


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
