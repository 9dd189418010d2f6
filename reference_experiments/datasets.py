"""The data set registry: one :class:`DatasetSpec` per data set.

Loading (:func:`data.load_dataset`), the missing-data message
(:class:`datafiles.DatasetNotFoundError`), augmentation (crop, pad, flip,
mean/std) and the report's titles all read these specs. Adding a data set is
one :func:`register_dataset` call here (with its loader) plus its test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .data_cars import load_cars64
from .data_cars_full import load_cars_official
from .data_cifar import load_cifar10, load_cifar10_jpeg, load_cifar100
from .datafiles import DataDir, SplitArrays, _not_found
from .splits import stratified_group_split

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "dataset_names",
    "dataset_spec",
    "dataset_title",
    "register_dataset",
]

#: ``loader(data dir, split seed) -> SplitArrays``
Loader = Callable[[DataDir, int], SplitArrays]


@dataclass(frozen=True)
class DatasetSpec:
    """A data set: how to load it, where it comes from, and how its images are shaped.

    ``source``/``how_to_get`` fill the missing-data message (``{d}``: the data dir,
    ``{copy}``: "copy the folder <shared copy> into {d}; or " where ``shared_copy``, the
    project's copy in its shared data folder, exists); ``image_size`` is the stored
    size, ``crop`` the training random-crop and test centre-crop size after
    ``pad`` pixels of zero padding; ``mean``/``std`` ``None``: measured on the
    training split.
    """

    name: str
    title: str
    loader: Loader
    source: str
    how_to_get: str
    image_size: int
    classes: int
    crop: int
    pad: int
    flip: bool = True
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    uses_data_dir: bool = True
    shared_copy: str | None = None


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Adds ``spec`` to the registry under its (unique) name."""
    if spec.name in DATASETS:
        raise ValueError(f"data set {spec.name!r} is already registered")
    DATASETS[spec.name] = spec
    return spec


def dataset_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; choose from {', '.join(dataset_names())}"
        ) from None


def dataset_names() -> tuple[str, ...]:
    return tuple(DATASETS)


def dataset_title(name: str) -> str:
    """The data set's title (the name itself for an unknown one)."""
    spec = DATASETS.get(name)
    return spec.title if spec is not None else name


def load_digits(where: DataDir, seed: int) -> SplitArrays:
    """scikit-learn's 8x8 digits (0..16 scaled to 0..255), seeded stratified 80/20 split."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits

        d = sklearn_digits()
    except (ImportError, OSError) as exc:  # scikit-learn or its bundled files missing
        raise _not_found("digits", f"{type(exc).__name__}: {exc}", where) from exc
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    tr, te = stratified_group_split(y, test_fraction=0.2, seed=seed)
    return SplitArrays(x[tr], y[tr], x[te], y[te], 10, split_seed=seed)


CIFAR_URL = "https://www.cs.toronto.edu/~kriz"
register_dataset(
    DatasetSpec(
        "cifar100",
        "CIFAR-100",
        load_cifar100,
        f"the official CIFAR-100 python version ({CIFAR_URL}/cifar.html)",
        "run torchvision.datasets.CIFAR100('{d}', download=True) on a machine with internet "
        f"access, or download {CIFAR_URL}/cifar-100-python.tar.gz "
        "into {d} (extracting it is optional)",
        image_size=32,
        classes=100,
        crop=32,
        pad=4,
        # RepDistiller's CIFAR-100 normalisation (the official code's)
        mean=(0.5071, 0.4867, 0.4408),
        std=(0.2675, 0.2565, 0.2761),
    )
)
register_dataset(
    DatasetSpec(
        "cifar10",
        "CIFAR-10",
        load_cifar10,
        f"the official CIFAR-10 python version ({CIFAR_URL}/cifar.html)",
        "run torchvision.datasets.CIFAR10('{d}', download=True) on a machine with internet "
        f"access, or download {CIFAR_URL}/cifar-10-python.tar.gz "
        "into {d} (extracting it is optional); or use --dataset cifar10-jpeg, the JPEG q75 "
        "copy (python -m reference_experiments prepare-data builds it from that archive)",
        image_size=32,
        classes=10,
        crop=32,
        pad=4,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    )
)
register_dataset(
    DatasetSpec(
        "cifar10-jpeg",
        "CIFAR-10 (JPEG q75 copy)",
        load_cifar10_jpeg,
        "the project's JPEG q75 copy of CIFAR-10 (cifar10-jpeg.tar.xz + classes.txt, "
        "see its README.md)",
        "{copy}run python -m reference_experiments prepare-data --source "
        "cifar-10-python.tar.gz --data-dir {d}, which builds it from the official archive "
        f"({CIFAR_URL}/cifar-10-python.tar.gz); or use --dataset cifar10 with that archive",
        image_size=32,
        classes=10,
        crop=32,
        pad=4,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        shared_copy="cifar10-jpeg",
    )
)
register_dataset(
    DatasetSpec(
        "cars64",
        "Stanford Cars (training half, 64×64, seeded 80/20 split)",
        load_cars64,
        "the project's 64x64 copy of the 8,144 Stanford Cars training images "
        "(cars-train64-jpeg.tar.xz + classes.txt, see its README.md)",
        "{copy}rebuild it from "
        "torchvision.datasets.StanfordCars's folder layout (stanford_cars/devkit + "
        "cars_train, which torchvision no longer downloads: get it by hand, e.g. from "
        "Kaggle) by cropping each training image to its box and resizing it to 64x64 as "
        "that README describes",
        image_size=64,
        classes=196,
        crop=56,
        pad=0,
        # measured on all 8,144 64x64 images (shared folder README)
        mean=(0.4022, 0.4001, 0.4211),
        std=(0.2716, 0.2666, 0.2707),
        shared_copy="stanford-cars-train64",
    )
)
register_dataset(
    DatasetSpec(
        "cars",
        "Stanford Cars (official split, full images resized to 64×64)",
        load_cars_official,
        "Stanford Cars in torchvision's StanfordCars folder layout (stanford_cars/: "
        "devkit/cars_train_annos.mat, cars_train/, cars_test_annos_withlabels.mat, "
        "cars_test/), the setting of the official code",
        "get both halves and the devkit by hand (torchvision no longer downloads them; e.g. "
        "from Kaggle) and put the stanford_cars folder into {d}; or use --dataset cars64, "
        "the 64-pixel car-crop copy of the training half",
        image_size=64,
        classes=196,
        crop=56,
        pad=0,
        # the official code's (ImageNet) normalisation
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
)
register_dataset(
    DatasetSpec(
        "digits",
        "scikit-learn digits (8×8, 10 classes)",
        load_digits,
        "scikit-learn, which bundles them (nothing to download; --data-dir is not used)",
        "pip install scikit-learn",
        image_size=8,
        classes=10,
        crop=8,
        pad=1,  # random one-pixel translations
        flip=False,
        uses_data_dir=False,
    )
)
