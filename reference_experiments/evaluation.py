"""Top-1 accuracy, one definition for the engine's trials and the teachers."""

from __future__ import annotations

import torch
from torch import nn

from .augment import preprocess_eval
from .data import ImageDataset
from .devices import autocast, resolve_device

__all__ = ["evaluate", "top1_hits"]


def top1_hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many rows of ``logits`` have their arg-max at ``labels`` (an int64 tensor where
    the logits are: no host sync)."""
    return (logits.argmax(-1) == labels).sum()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ImageDataset,
    device: str | torch.device = "cpu",
    batch_size: int = 512,
    precision: str = "fp32",
) -> float:
    """Top-1 test accuracy (fraction in [0, 1]) of ``model`` on ``dataset.x_test`` (centre
    crop), its forward passes under ``precision`` on CUDA.

    The model is used where it is (not moved); its train/eval flag is restored.
    """
    dev = resolve_device(device)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    n = len(dataset.y_test)
    try:
        for i in range(0, n, batch_size):
            xb = torch.from_numpy(dataset.x_test[i : i + batch_size]).to(dev, non_blocking=True)
            yb = torch.from_numpy(dataset.y_test[i : i + batch_size]).to(dev, non_blocking=True)
            with autocast(dev, precision):
                logits = model(preprocess_eval(xb, dataset))
            correct += top1_hits(logits, yb)
    finally:
        model.train(was_training)
    return float(correct.item()) / max(n, 1)
