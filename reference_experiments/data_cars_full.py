"""Stanford Cars as the official code loads it: every full image resized to 64x64.

The official ``dataset/stanfordcars.py`` reads torchvision's ``StanfordCars`` (both
official halves: 8,144 training and 8,041 test images, 196 classes) and applies
``Resize((64, 64))`` to the whole image (no crop to the car's box), then 56x56 random
crops and flips for training, a centre crop for test. This reader takes the same
folder layout (``stanford_cars/``: ``devkit/cars_train_annos.mat``, ``cars_train/``,
``cars_test_annos_withlabels.mat``, ``cars_test/``), reads the ``.mat`` annotations
with ``scipy.io.loadmat`` (no pickle), converts each image to RGB and resizes it with
PIL's bilinear filter, as torchvision's ``Resize`` does on PIL images.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .datafiles import CACHE_VERSION, DataDir, SplitArrays, _cached, _not_found, sha256_file

__all__ = ["CARS_SIZE", "cars_annotations", "load_cars_official", "read_cars_images"]

CARS_SIZE = 64
#: (annotation file, image folder) of each official half, relative to ``stanford_cars/``
HALVES = {
    "train": ("devkit/cars_train_annos.mat", "cars_train"),
    "test": ("cars_test_annos_withlabels.mat", "cars_test"),
}


def cars_annotations(path: str | Path) -> tuple[list[str], np.ndarray]:
    """``(file names, 0-based labels)`` of a Stanford Cars annotation ``.mat`` file
    (its ``annotations`` struct: ``fname`` and 1-based ``class`` per image)."""
    from scipy.io import loadmat

    ann = np.atleast_1d(loadmat(str(path), squeeze_me=True)["annotations"])
    names = [str(a["fname"]) for a in ann]
    labels = np.asarray([int(a["class"]) - 1 for a in ann], dtype=np.int64)
    return names, labels


def read_cars_images(folder: Path, names: list[str], size: int = CARS_SIZE) -> np.ndarray:
    """The named images of ``folder`` as uint8 ``(n, size, size, 3)``: RGB, the whole
    image resized (bilinear, aspect ratio not kept) as the official ``Resize((64, 64))``."""
    from PIL import Image

    out = np.empty((len(names), size, size, 3), dtype=np.uint8)
    for i, name in enumerate(names):
        with Image.open(folder / name) as img:
            rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            out[i] = np.asarray(rgb, dtype=np.uint8)
    return out


def _check_layout(base: Path, where: DataDir) -> dict[str, tuple[list[str], np.ndarray]]:
    """Each half's annotations, after checking that every annotated image is there."""
    halves = {}
    for half, (ann, images) in HALVES.items():
        if not (base / ann).is_file():
            raise _not_found("cars", f"searched {base} for {ann} (missing)", where)
        names, labels = cars_annotations(base / ann)
        missing = [n for n in names if not (base / images / n).is_file()]
        if missing:
            shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            searched = f"{len(missing)} of the {len(names)} images in {base / images} ({shown})"
            raise _not_found("cars", f"missing {searched}", where)
        halves[half] = (names, labels)
    return halves


def load_cars_official(where: DataDir, seed: int) -> SplitArrays:
    """Both official halves of Stanford Cars at 64x64 (the official split; ``seed`` is
    not used), decoded once and cached."""
    del seed  # the official split
    base = where.folder("cars", "stanford_cars", "cars_train")
    halves = _check_layout(base, where)
    ident = [sha256_file(base / ann) for ann, _ in HALVES.values()]
    ident += [str((base / HALVES[h][1] / n).stat().st_size) for h in halves for n in halves[h][0]]
    digest = hashlib.sha256(f"{CACHE_VERSION}:{CARS_SIZE}:{':'.join(ident)}".encode())
    key = "cars-official-" + digest.hexdigest()[:16]

    def build() -> dict[str, np.ndarray]:
        arrays = {}
        for half, (names, labels) in halves.items():
            arrays[f"x_{half}"] = read_cars_images(base / HALVES[half][1], names)
            arrays[f"y_{half}"] = labels
        return arrays

    a = _cached(key, build, ("x_train", "y_train", "x_test", "y_test"))
    num_classes = int(max(a["y_train"].max(), a["y_test"].max())) + 1
    return SplitArrays(a["x_train"], a["y_train"], a["x_test"], a["y_test"], num_classes)
