"""Dataset loading for the reference experiments.

``load_dataset(name, data_dir=None, *, seed=0)`` returns an :class:`ImageDataset` of
uint8 NHWC arrays; augmentation happens later, batched on the training device
(``reference_experiments.augment``).

Datasets (folder names are relative to ``data_dir``):

``cifar100``
    The official ``cifar-100-python/`` folder (``train``, ``test``, ``meta``). Each file's
    md5 is checked against the published md5 (``CIFAR100_MD5``) *before* it is
    unpickled. If the folder is missing and torchvision is installed, it is downloaded
    with ``torchvision.datasets.CIFAR100(download=True)`` into ``data_dir``.
    Official train/test split; crop 32, pad 4.
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

``data_dir`` defaults to ``$CKD_DATA_DIR``, else ``<repo>/../shared/data`` when that
exists. A dataset folder may also be passed directly as ``data_dir``. Whenever a
dataset folder contains ``SHA256SUMS``, every listed file the loader reads is
verified against it. Decoded caches go to ``$CKD_CACHE_DIR``, else
``~/.cache/ckd-core``; cache files are keyed by the archive's sha256 and written
atomically.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import tarfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .rows import atomic_write_bytes

__all__ = [
    "CARS_DUPLICATE_PAIRS",
    "CIFAR100_MD5",
    "DATASET_NAMES",
    "DataIntegrityError",
    "ImageDataset",
    "cache_dir",
    "default_data_dir",
    "load_dataset",
    "stratified_group_split",
]

DATASET_NAMES = ("cifar100", "cifar10-jpeg", "cars64", "digits")

#: Published md5s of the files in the official ``cifar-100-python`` folder
#: (the same values torchvision checks). Tests patch this table.
CIFAR100_MD5: dict[str, str] = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}

#: Byte-identical image pairs with conflicting labels in the Stanford Cars training
#: half (1-based ``idx`` of ``labels.csv``), from the shared folder's README.
CARS_DUPLICATE_PAIRS: tuple[tuple[int, int], ...] = (
    (50, 3436),
    (151, 4892),
    (595, 3516),
    (2045, 4665),
    (2456, 2598),
    (2641, 7765),
    (2843, 6839),
    (4223, 6153),
    (4250, 6713),
    (5334, 5614),
    (6353, 7381),
)

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# Measured on all 8,144 64x64 images (shared folder README).
CARS_MEAN = (0.4022, 0.4001, 0.4211)
CARS_STD = (0.2716, 0.2666, 0.2707)

_CACHE_VERSION = 1


class DataIntegrityError(ValueError):
    """A file's checksum does not match the expected value."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """uint8 image arrays plus what augmentation/normalisation needs.

    ``crop`` is the training random-crop and test centre-crop size, ``pad`` the
    zero padding before the random crop. ``split_seed`` records the seed of a
    loader-made split (``None`` for official splits).
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

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[-1])

    @property
    def flip(self) -> bool:
        """Whether training augmentation uses horizontal flips (not for digits)."""
        return self.name != "digits"

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, x_train={self.x_train.shape}, "
            f"x_test={self.x_test.shape}, num_classes={self.num_classes}, crop={self.crop}, "
            f"pad={self.pad}, split_seed={self.split_seed})"
        )


# ------------------------------------------------------------------------- paths
def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_data_dir() -> Path | None:
    """``$CKD_DATA_DIR``, else ``<repo>/../shared/data`` if it exists, else None."""
    env = os.environ.get("CKD_DATA_DIR")
    if env:
        return Path(env).expanduser()
    shared = _repo_root().parent / "shared" / "data"
    return shared if shared.is_dir() else None


def cache_dir() -> Path:
    """``$CKD_CACHE_DIR``, else ``~/.cache/ckd-core``."""
    env = os.environ.get("CKD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ckd-core"


def _dataset_folder(data_dir: Path | None, folder: str, marker: str) -> Path:
    """``data_dir/folder``, or ``data_dir`` itself if it directly holds ``marker``."""
    if data_dir is None:
        raise FileNotFoundError(
            f"no data directory: pass data_dir, set CKD_DATA_DIR, or create "
            f"{_repo_root().parent / 'shared' / 'data'} containing {folder}/{marker}"
        )
    if (data_dir / marker).exists():
        return data_dir
    return data_dir / folder


# --------------------------------------------------------------------- checksums
def _file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return _file_digest(Path(path), "sha256")


def _read_sha256sums(folder: Path) -> dict[str, str] | None:
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return None
    table: dict[str, str] = {}
    for line in sums.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        table[name.strip().lstrip("*")] = digest.lower()
    return table


def _verify_sha256sums(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """Verify ``names`` against ``folder/SHA256SUMS`` (if present); return digests.

    Returns ``{name: sha256}`` for every name checked (computed digests), so callers
    can reuse them as cache keys.
    """
    table = _read_sha256sums(folder)
    out: dict[str, str] = {}
    if table is None:
        return out
    for name in names:
        if name not in table:
            continue
        got = sha256_file(folder / name)
        if got != table[name]:
            raise DataIntegrityError(
                f"sha256 mismatch for {folder / name}: expected {table[name]} "
                f"(SHA256SUMS), got {got}; the file is corrupt or was replaced"
            )
        out[name] = got
    return out


def _require_files(folder: Path, names: Sequence[str], what: str, hint: str) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{what}: missing {', '.join(str(folder / n) for n in missing)}. {hint}"
        )


# ------------------------------------------------------------------------ caching
def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    # allow_pickle=True is numpy's default, spelled out so that numpy's stubs do not
    # match the ** keys against that bool parameter
    np.savez(buffer, allow_pickle=True, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None  # unreadable/corrupt cache: rebuild


def _cached(key: str, build, keys: Sequence[str]) -> dict[str, np.ndarray]:
    path = cache_dir() / f"{key}.npz"
    if path.is_file():
        arrays = _load_npz(path)
        if arrays is not None and all(k in arrays for k in keys):
            return arrays
    arrays = build()
    try:
        _atomic_savez(path, **arrays)
    except OSError:  # read-only home etc.: work without a cache
        pass
    return arrays


# ---------------------------------------------------------------------- splitting
def stratified_group_split(
    y: np.ndarray,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    train_only: Iterable[int] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of indices ``0..len(y)-1`` into (train, test).

    Per class, ``round(test_fraction * n_class)`` indices go to test, drawn from the
    indices not in ``train_only`` (which always go to train, e.g. duplicate groups).
    Both index arrays are sorted.
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    forced = np.zeros(len(y), dtype=bool)
    forced[np.asarray(list(train_only), dtype=np.int64)] = True
    test_mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n_test = int(round(test_fraction * len(members)))
        free = members[~forced[members]]
        pick = rng.permutation(free)[: min(n_test, len(free))]
        test_mask[pick] = True
    return np.flatnonzero(~test_mask), np.flatnonzero(test_mask)


def _duplicate_groups(x: np.ndarray, extra_pairs: Iterable[tuple[int, int]] = ()) -> list[set]:
    """Groups (size >= 2) of indices with identical pixels, merged with ``extra_pairs``."""
    parent = list(range(len(x)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        parent[find(a)] = find(b)

    first: dict[bytes, int] = {}
    for i in range(len(x)):
        h = hashlib.sha256(np.ascontiguousarray(x[i]).tobytes()).digest()
        if h in first:
            union(i, first[h])
        else:
            first[h] = i
    for a, b in extra_pairs:
        union(a, b)
    groups: dict[int, set] = {}
    for i in range(len(x)):
        groups.setdefault(find(i), set()).add(i)
    return [g for g in groups.values() if len(g) > 1]


# ----------------------------------------------------------------------- CIFAR-100
def _unpickle_checked(path: Path, md5: str | None) -> dict:
    import pickle  # only ever reached after the md5 check below

    got = _file_digest(path, "md5")
    if md5 is None or got != md5:
        raise DataIntegrityError(
            f"md5 mismatch for {path}: expected {md5}, got {got}; refusing to unpickle it "
            f"(only the official cifar-100-python files are accepted)"
        )
    with open(path, "rb") as f:
        obj = pickle.load(f, encoding="bytes")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_arrays(batch: Mapping) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(batch["data"], dtype=np.uint8)
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    y = np.asarray(batch["fine_labels"], dtype=np.int64)
    return np.ascontiguousarray(x), y


def _load_cifar100(data_dir: Path | None) -> ImageDataset:
    files = ("train", "test", "meta")
    hint = (
        "Put the official CIFAR-100 python version (cifar-100-python.tar.gz from "
        "https://www.cs.toronto.edu/~kriz/cifar.html, extracted) so that "
        "<data_dir>/cifar-100-python/{train,test,meta} exist, and pass --data-dir or set "
        "CKD_DATA_DIR; or install torchvision on a machine with internet access to "
        "download it automatically."
    )
    folder = _dataset_folder(data_dir, "cifar-100-python", "meta")
    if not all((folder / n).is_file() for n in files) and data_dir is not None:
        try:
            import torchvision  # noqa: F401  (optional, only for the download)
        except ImportError:
            pass
        else:
            from torchvision.datasets import CIFAR100

            data_dir.mkdir(parents=True, exist_ok=True)
            CIFAR100(root=str(data_dir), train=True, download=True)
            CIFAR100(root=str(data_dir), train=False, download=True)
            folder = data_dir / "cifar-100-python"
    _require_files(folder, files, "CIFAR-100 not found", hint)
    _verify_sha256sums(folder, files)
    train = _unpickle_checked(folder / "train", CIFAR100_MD5.get("train"))
    test = _unpickle_checked(folder / "test", CIFAR100_MD5.get("test"))
    meta = _unpickle_checked(folder / "meta", CIFAR100_MD5.get("meta"))
    x_train, y_train = _cifar_arrays(train)
    x_test, y_test = _cifar_arrays(test)
    num_classes = len(meta.get("fine_label_names", ())) or 100
    return ImageDataset(
        "cifar100",
        x_train,
        y_train,
        x_test,
        y_test,
        num_classes,
        CIFAR100_MEAN,
        CIFAR100_STD,
        crop=32,
        pad=4,
    )


# -------------------------------------------------------------------- CIFAR-10 JPEG
CIFAR10_ARCHIVE = "cifar10-jpeg.tar.xz"


def _decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def iter_cifar10_jpeg(
    archive: str | os.PathLike, classes: Sequence[str], limit: int | None = None
) -> Iterator[tuple[str, int, np.ndarray]]:
    """Stream ``(split, label, image)`` from the archive in archive order."""
    index = {c: i for i, c in enumerate(classes)}
    n = 0
    with tarfile.open(archive, mode="r|*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            parts = m.name.split("/")
            if len(parts) != 3 or parts[0] not in ("train", "test") or parts[1] not in index:
                raise ValueError(f"unexpected member {m.name!r} in {archive}")
            f = tar.extractfile(m)
            assert f is not None
            yield parts[0], index[parts[1]], _decode_jpeg(f.read())
            n += 1
            if limit is not None and n >= limit:
                return


def _load_cifar10_jpeg(data_dir: Path | None) -> ImageDataset:
    folder = _dataset_folder(data_dir, "cifar10-jpeg", CIFAR10_ARCHIVE)
    _require_files(
        folder,
        (CIFAR10_ARCHIVE, "classes.txt"),
        "CIFAR-10 JPEG copy not found",
        "Expected the shared cifar10-jpeg folder (cifar10-jpeg.tar.xz, classes.txt).",
    )
    digests = _verify_sha256sums(folder, (CIFAR10_ARCHIVE, "classes.txt"))
    classes = (folder / "classes.txt").read_text().split()
    archive = folder / CIFAR10_ARCHIVE
    sha = digests.get(CIFAR10_ARCHIVE) or sha256_file(archive)
    key = (
        "cifar10-jpeg-"
        + hashlib.sha256(f"{_CACHE_VERSION}:{sha}:{','.join(classes)}".encode()).hexdigest()[:16]
    )

    def build() -> dict[str, np.ndarray]:
        xs: dict[str, list[np.ndarray]] = {"train": [], "test": []}
        ys: dict[str, list[int]] = {"train": [], "test": []}
        for split, label, img in iter_cifar10_jpeg(archive, classes):
            xs[split].append(img)
            ys[split].append(label)
        return {
            f"{k}_{s}": (np.stack(xs[s]) if k == "x" else np.asarray(ys[s], dtype=np.int64))
            for s in ("train", "test")
            for k in ("x", "y")
        }

    a = _cached(key, build, ("x_train", "y_train", "x_test", "y_test"))
    return ImageDataset(
        "cifar10-jpeg",
        a["x_train"],
        a["y_train"],
        a["x_test"],
        a["y_test"],
        len(classes),
        CIFAR10_MEAN,
        CIFAR10_STD,
        crop=32,
        pad=4,
    )


# ------------------------------------------------------------------ Stanford Cars
CARS_ARCHIVE = "cars-train64-jpeg.tar.xz"


def read_cars_archive(
    archive: str | os.PathLike, decode: bool = True
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Return ``(x, y, idx)`` from the cars archive in ``labels.csv`` row order.

    With ``decode=False`` images are skipped and ``x`` is None (labels only).
    """
    images: dict[str, np.ndarray] = {}
    rows: list[dict[str, str]] | None = None
    with tarfile.open(archive, mode="r|*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            f = tar.extractfile(m)
            assert f is not None
            if m.name == "labels.csv":
                rows = list(csv.DictReader(io.StringIO(f.read().decode("utf-8"))))
            elif decode:
                images[m.name] = _decode_jpeg(f.read())
    if rows is None:
        raise ValueError(f"{archive} has no labels.csv")
    y = np.asarray([int(r["label"]) for r in rows], dtype=np.int64)
    idx = np.asarray([int(r["idx"]) for r in rows], dtype=np.int64)
    x = np.stack([images[r["file"]] for r in rows]) if decode else None
    return x, y, idx


def cars_split(
    y: np.ndarray,
    idx: np.ndarray,
    x: np.ndarray | None = None,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    pairs: Iterable[tuple[int, int]] = CARS_DUPLICATE_PAIRS,
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split (row indices) keeping every duplicate group on the train side.

    Groups = the listed ``pairs`` (by 1-based ``idx``) merged with exact pixel
    duplicates in ``x`` (if given).
    """
    pos = {int(v): i for i, v in enumerate(idx)}
    row_pairs = [(pos[a], pos[b]) for a, b in pairs if a in pos and b in pos]
    if x is not None:
        groups = _duplicate_groups(x, row_pairs)
    else:
        groups = [{a, b} for a, b in row_pairs]
    forced = sorted(set().union(*groups)) if groups else []
    return stratified_group_split(y, test_fraction=test_fraction, seed=seed, train_only=forced)


def _load_cars64(data_dir: Path | None, seed: int) -> ImageDataset:
    folder = _dataset_folder(data_dir, "stanford-cars-train64", CARS_ARCHIVE)
    _require_files(
        folder,
        (CARS_ARCHIVE,),
        "Stanford Cars (train64) not found",
        "Expected the shared stanford-cars-train64 folder (cars-train64-jpeg.tar.xz).",
    )
    digests = _verify_sha256sums(folder, (CARS_ARCHIVE, "classes.txt"))
    archive = folder / CARS_ARCHIVE
    sha = digests.get(CARS_ARCHIVE) or sha256_file(archive)
    key = "cars64-" + hashlib.sha256(f"{_CACHE_VERSION}:{sha}".encode()).hexdigest()[:16]

    def build() -> dict[str, np.ndarray]:
        x, y, idx = read_cars_archive(archive)
        assert x is not None
        return {"x": x, "y": y, "idx": idx}

    a = _cached(key, build, ("x", "y", "idx"))
    x, y, idx = a["x"], a["y"], a["idx"]
    tr, te = cars_split(y, idx, x, seed=seed)
    classes_file = folder / "classes.txt"
    num_classes = (
        len(classes_file.read_text(encoding="utf-8").splitlines())
        if classes_file.is_file()
        else int(y.max()) + 1
    )
    return ImageDataset(
        "cars64",
        x[tr],
        y[tr],
        x[te],
        y[te],
        num_classes,
        CARS_MEAN,
        CARS_STD,
        crop=56,
        pad=0,
        split_seed=seed,
    )


# ------------------------------------------------------------------------- digits
def _load_digits(seed: int) -> ImageDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    tr, te = stratified_group_split(y, test_fraction=0.2, seed=seed)
    xt = x[tr].astype(np.float64) / 255.0
    mean = (float(xt.mean()),)
    std = (float(xt.std()),)
    return ImageDataset(
        "digits", x[tr], y[tr], x[te], y[te], 10, mean, std, crop=8, pad=1, split_seed=seed
    )


# --------------------------------------------------------------------------- API
def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, *, seed: int = 0
) -> ImageDataset:
    """Load dataset ``name`` (one of ``DATASET_NAMES``); ``seed`` seeds made splits."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if name == "cifar100":
        return _load_cifar100(root)
    if name == "cifar10-jpeg":
        return _load_cifar10_jpeg(root)
    if name == "cars64":
        return _load_cars64(root, seed)
    if name == "digits":
        return _load_digits(seed)
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASET_NAMES)}")
