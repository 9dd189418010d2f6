"""Batched on-device augmentation for uint8 NHWC image batches.

``augment`` = zero-pad by ``dataset.pad`` + random ``dataset.crop`` crop + random
horizontal flip (where ``dataset.flip``), then normalise; ``preprocess_eval`` = centre crop +
normalise. Both take a uint8 ``(N, H, W, C)`` tensor on any device and return the default
float dtype (float32 unless changed), ``(N, C, crop, crop)``: channels-last memory layout
on accelerators (a permuted view of NHWC data), contiguous NCHW on CPU (faster for CPU
convolutions).

The crop, padding and flip are one gather with per-sample index arithmetic (no
Python loop over samples, no padded copy). Random numbers (:func:`draw_crops`) are drawn on
the ``generator``'s device (default: the CPU) and moved to the input's
device, so a CPU generator gives identical crops on CPU and CUDA, and a CUDA
generator never syncs.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .data import ImageDataset

__all__ = ["augment", "crop_and_flip", "draw_crops", "normalize", "preprocess_eval"]


@functools.cache
def _scale_shift(
    mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 / (255 std)`` and ``-mean / std`` on ``device``, made once (no copy per batch)."""
    mean_t = torch.tensor(mean, dtype=dtype, device=device)
    std_t = torch.tensor(std, dtype=dtype, device=device)
    return 1.0 / (255.0 * std_t), -mean_t / std_t


def normalize(x_uint8_nhwc: torch.Tensor, dataset: ImageDataset) -> torch.Tensor:
    """uint8 NHWC -> NCHW in the default float dtype, ``(x/255 - mean) / std``
    (channels-last off CPU)."""
    c = x_uint8_nhwc.shape[-1]
    dev = x_uint8_nhwc.device
    dtype = torch.get_default_dtype()
    if len(dataset.mean) != c or len(dataset.std) != c:
        raise ValueError(f"dataset mean/std have {len(dataset.mean)} channels, images have {c}")
    scale, shift = _scale_shift(tuple(dataset.mean), tuple(dataset.std), dtype, dev)
    if dev.type == "cpu":
        # CPU convolutions are faster on contiguous NCHW: transpose the uint8 bytes first.
        x = x_uint8_nhwc.permute(0, 3, 1, 2).contiguous().to(dtype)
        return torch.addcmul(shift[:, None, None], x, scale[:, None, None])
    x = torch.addcmul(shift, x_uint8_nhwc.to(dtype), scale)
    return x.permute(0, 3, 1, 2)  # channels-last layout for GPU convolutions


def draw_crops(
    n: int, size: tuple[int, int], dataset: ImageDataset, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop offsets and flips of ``n`` images, ``(n, 3)`` int64 ``(oy, ox, flip)``,
    drawn on the generator's device: uniform over all valid positions in the padded
    frame (like ``RandomCrop``), flip with probability 1/2 where ``dataset.flip``."""
    h, w = size
    crop, pad = int(dataset.crop), int(dataset.pad)
    if crop > h + 2 * pad or crop > w + 2 * pad:
        raise ValueError(f"crop {crop} larger than padded image {h}x{w} (+{pad})")
    dev = generator.device if generator is not None else torch.device("cpu")
    oy = torch.randint(0, h + 2 * pad - crop + 1, (n,), device=dev, generator=generator)
    ox = torch.randint(0, w + 2 * pad - crop + 1, (n,), device=dev, generator=generator)
    if dataset.flip:
        flip = (torch.rand((n,), device=dev, generator=generator) < 0.5).long()
    else:
        flip = torch.zeros((n,), dtype=torch.long, device=dev)
    return torch.stack([oy, ox, flip], dim=1)


def crop_and_flip(x_uint8_nhwc: torch.Tensor, crops: torch.Tensor, dataset: ImageDataset):
    """Applies :func:`draw_crops` offsets to a uint8 batch and normalises it."""
    x = x_uint8_nhwc
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"expected uint8 (N, H, W, C), got {x.dtype} {tuple(x.shape)}")
    n, h, w, _ = x.shape
    crop, pad = int(dataset.crop), int(dataset.pad)
    dev = x.device
    crops = crops.to(dev)
    oy, ox, flip = crops[:, :1], crops[:, 1:2], crops[:, 2:].bool()
    ar = torch.arange(crop, device=dev)
    rows = oy + ar - pad  # (n, crop) source rows, may be out of range (= padding)
    cols = ox + torch.where(flip, crop - 1 - ar, ar) - pad  # (n, crop), flipped per sample
    img = x[
        torch.arange(n, device=dev)[:, None, None],
        rows.clamp(0, h - 1)[:, :, None],
        cols.clamp(0, w - 1)[:, None, :],
    ]  # (n, crop, crop, C)
    if pad:
        valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        img = img * valid[..., None].to(torch.uint8)
    return normalize(img, dataset)


def augment(
    x_uint8_nhwc: torch.Tensor,
    dataset: ImageDataset,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random pad+crop (+ horizontal flip where ``dataset.flip``) and normalise a batch."""
    x = x_uint8_nhwc
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"expected uint8 (N, H, W, C), got {x.dtype} {tuple(x.shape)}")
    crops = draw_crops(len(x), (x.shape[1], x.shape[2]), dataset, generator)
    return crop_and_flip(x, crops, dataset)


def preprocess_eval(x_uint8_nhwc: torch.Tensor, dataset: ImageDataset) -> torch.Tensor:
    """Centre crop to ``dataset.crop`` and normalise."""
    x = x_uint8_nhwc
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"expected uint8 (N, H, W, C), got {x.dtype} {tuple(x.shape)}")
    _, h, w, _ = x.shape
    crop = int(dataset.crop)
    if crop < h or crop < w:
        top, left = (h - crop) // 2, (w - crop) // 2
        x = x[:, top : top + crop, left : left + crop]
    return normalize(x, dataset)
