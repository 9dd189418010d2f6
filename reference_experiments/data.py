"""Dataset loading for the reference experiments.

``load_dataset(name, data_dir=None, *, seed=0)`` returns an :class:`ImageDataset` of
uint8 NHWC arrays; augmentation happens later, batched on the training device
(``reference_experiments.augment``).

Datasets (folder names are relative to ``data_dir``):

``cifar100``
    The official ``cifar-100-python/`` folder (``train``, ``test``, ``meta``), or the
    official ``cifar-100-python.tar.gz`` archive itself (read in memory, not
    extracted). Every file's md5 (the archive's, then each member's) is checked against
    the published md5s (``CIFAR100_MD5``) *before* anything is unpickled. If neither is
    there and torchvision is installed, ``torchvision.datasets.CIFAR100(data_dir,
    download=True)`` fetches it. Official train/test split; crop 32, pad 4.
``cifar10``
    The same for the official CIFAR-10 python version: ``cifar-10-batches-py/``
    (``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``; what
    ``torchvision.datasets.CIFAR10(root, download=True)`` leaves under ``root``) or
    ``cifar-10-python.tar.gz``, md5-checked against ``CIFAR10_MD5``. Official split
    (50,000 / 10,000); crop 32, pad 4.
``cifar10-jpeg``
    ``cifar10-jpeg/cifar10-jpeg.tar.xz`` + ``classes.txt`` (the JPEG q75 copy of
    CIFAR-10). Decoded once (about 20-30 s) and cached as ``.npz`` in the cache
    directory. Official train/test split; crop 32, pad 4.
``cars64``
    ``stanford-cars-train64/cars-train64-jpeg.tar.xz`` (training half of Stanford Cars
    at 64x64, 196 classes). Seeded stratified 80/20 split (``seed``) in which each group
    of duplicate images (the 11 listed pairs plus any exact pixel duplicates found) is
    kept whole on the *training* side, so no test image has an identical copy (with a
    conflicting label) anywhere. Crop 56 (random in training, centre at test), pad 0.
``digits``
    scikit-learn's 8x8 digits (1,797 images, 0..16 scaled to 0..255 uint8,
    shape (N, 8, 8, 1)); seeded stratified 80/20 split; crop 8, pad 1 (random
    one-pixel translations; no flip). Mean/std computed on the training split.

Each data set is one :class:`datasets.DatasetSpec` (loader, title, source and how
to get it, image size, classes, crop/pad/flip, mean/std) in :mod:`.datasets`.

``data_dir`` (``--data-dir``) defaults to ``$CKD_DATA_DIR``, else ``<repo>/../shared/data``
when that exists. A dataset folder may also be passed directly as ``data_dir``. When a
dataset's files are missing, :class:`DatasetNotFoundError` (a ``FileNotFoundError``)
says in one line which folder was searched and how to get the data. Whenever a
dataset folder contains ``SHA256SUMS``, every listed file the loader reads is
verified against it. Decoded caches go to ``$CKD_CACHE_DIR``, else
``~/.cache/ckd-core``; cache files are keyed by the archive's sha256 and written
atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .data_cars import CARS_DUPLICATE_PAIRS, cars_split, read_cars_archive
from .data_cifar import CIFAR10_MD5, CIFAR100_MD5, iter_cifar10_jpeg
from .datafiles import (
    DataDir,
    DataIntegrityError,
    DatasetNotFoundError,
    cache_dir,
    default_data_dir,
)
from .datasets import dataset_names, dataset_spec
from .splits import stratified_group_split

__all__ = [
    "CARS_DUPLICATE_PAIRS",
    "CIFAR100_MD5",
    "CIFAR10_MD5",
    "DATASET_NAMES",
    "DataIntegrityError",
    "DatasetNotFoundError",
    "ImageDataset",
    "cache_dir",
    "cars_split",
    "default_data_dir",
    "iter_cifar10_jpeg",
    "load_dataset",
    "read_cars_archive",
    "stratified_group_split",
]

DATASET_NAMES = dataset_names()


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """uint8 image arrays plus what augmentation/normalisation needs.

    ``crop`` is the training random-crop and test centre-crop size, ``pad`` the
    zero padding before the random crop. ``split_seed`` records the seed of a
    loader-made split (``None`` for official splits); ``flip``: horizontal flips in
    training augmentation.
    """

    name: str
    x_train: np.ndarray  # (N, H, W, C) uint8
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray  # (M, H, W, C) uint8
    y_test: np.ndarray  # (M,) int64
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: int
    pad: int
    split_seed: int | None = None
    flip: bool = True  # horizontal flips in training augmentation

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[-1])

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, x_train={self.x_train.shape}, "
            f"x_test={self.x_test.shape}, num_classes={self.num_classes}, crop={self.crop}, "
            f"pad={self.pad}, split_seed={self.split_seed})"
        )


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, *, seed: int = 0
) -> ImageDataset:
    """Load dataset ``name`` (one of ``DATASET_NAMES``); ``seed`` seeds made splits."""
    spec = dataset_spec(name)
    a = spec.loader(DataDir.resolve(data_dir), seed)
    mean, std = spec.mean, spec.std
    if mean is None or std is None:  # measured on the training split
        xt = a.x_train.astype(np.float64) / 255.0
        mean, std = (float(xt.mean()),), (float(xt.std()),)
    return ImageDataset(
        name,
        a.x_train,
        a.y_train,
        a.x_test,
        a.y_test,
        a.num_classes,
        mean,
        std,
        crop=spec.crop,
        pad=spec.pad,
        split_seed=a.split_seed,
        flip=spec.flip,
    )
