"""``prepare-data``: builds the ``cifar10-jpeg`` dataset folder from the official archive.

``python -m reference_experiments prepare-data --source cifar-10-python.tar.gz
--data-dir DATA`` reads the official CIFAR-10 python version (the archive from
https://www.cs.toronto.edu/~kriz/cifar.html, or its extracted ``cifar-10-batches-py``
folder) through the loader of ``--dataset cifar10`` -- the archive's and every member's
md5 are checked against the published ones before anything is unpickled -- and writes
``DATA/cifar10-jpeg/``: ``cifar10-jpeg.tar.xz`` (``train/<class>/NNNN.jpg`` then
``test/<class>/NNNN.jpg``, numbered per class in the official order, JPEG quality 75
by Pillow), ``classes.txt`` and ``SHA256SUMS``. The images are the official pixels
through the same JPEG quality as the project's shared copy, not its bytes: Pillow
versions may encode differently. The first training run decodes the archive once and
caches the arrays in ``$CKD_CACHE_DIR`` (default ``~/.cache/ckd-core``).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = ["CIFAR10_CLASSES", "build_cifar10_jpeg"]

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
JPEG_QUALITY = 75


def _jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _write_split(tar: tarfile.TarFile, split: str, x: np.ndarray, y: np.ndarray) -> None:
    counts = [0] * len(CIFAR10_CLASSES)
    for image, label in zip(x, y, strict=True):
        name = f"{split}/{CIFAR10_CLASSES[label]}/{counts[label]:04d}.jpg"
        counts[label] += 1
        _add(tar, name, _jpeg(image))


def build_cifar10_jpeg(
    source: str | os.PathLike[str], data_dir: str | os.PathLike[str], *, limit: int | None = None
) -> Path:
    """Writes ``data_dir/cifar10-jpeg`` from the official CIFAR-10 python version at
    ``source`` (archive, its folder, or the folder holding either); returns the folder.
    ``limit``: only the first ``limit`` images of each split (for tests)."""
    from .data import load_dataset
    from .rows import atomic_write_bytes

    source = Path(source)
    root = source.parent if source.is_file() else source
    if not root.is_dir():
        raise FileNotFoundError(f"--source {source}: no such file or folder")
    official = load_dataset("cifar10", root)
    out = Path(data_dir) / "cifar10-jpeg"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".cifar10-jpeg.tar.xz.tmp"
    with tarfile.open(tmp, "w:xz", format=tarfile.USTAR_FORMAT) as tar:
        _write_split(tar, "train", official.x_train[:limit], official.y_train[:limit])
        _write_split(tar, "test", official.x_test[:limit], official.y_test[:limit])
    os.replace(tmp, out / "cifar10-jpeg.tar.xz")
    atomic_write_bytes(out / "classes.txt", ("\n".join(CIFAR10_CLASSES) + "\n").encode())
    sums = [
        f"{hashlib.sha256((out / n).read_bytes()).hexdigest()}  {n}"
        for n in ("cifar10-jpeg.tar.xz", "classes.txt")
    ]
    atomic_write_bytes(out / "SHA256SUMS", ("\n".join(sums) + "\n").encode())
    return out


#: per dataset that nothing downloads, the files (relative to the data folder) whose
#: presence means it is there; either alternative suffices (``reference_experiments.data``;
#: cifar10 and cifar100 are left to the loader, which may download them with torchvision)
DATASET_FILES: dict[str, tuple[str, ...]] = {
    "cifar10-jpeg": ("cifar10-jpeg/cifar10-jpeg.tar.xz", "cifar10-jpeg.tar.xz"),
    "cars64": ("stanford-cars-train64/cars-train64-jpeg.tar.xz", "cars-train64-jpeg.tar.xz"),
}


def check_dataset_files(name: str, data_dir: str | os.PathLike[str] | None) -> None:
    """Raises a one-line ``FileNotFoundError`` if dataset ``name``'s files are not in the
    data folder; reads and creates nothing. The message names only folders that exist."""
    from .datafiles import default_data_dir

    if name not in DATASET_FILES:
        return
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    how = (
        "python -m reference_experiments prepare-data builds it from the official archive"
        if name == "cifar10-jpeg"
        else "see the data section of the README"
    )
    if root is None or not root.is_dir():
        where = f"--data-dir {root} does not exist" if root else "no data folder is set"
        raise FileNotFoundError(
            f"dataset {name}: {where}; pass --data-dir or set $CKD_DATA_DIR ({how})"
        )
    if not any((root / f).is_file() for f in DATASET_FILES[name]):
        raise FileNotFoundError(
            f"dataset {name} not found in {root} (looked for "
            f"{' or '.join(DATASET_FILES[name])}); {how}"
        )
