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

import csv
import hashlib
import io
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .datafiles import (  # noqa: F401  (re-exported: the public data API)
    _CACHE_VERSION,
    _SOURCES,
    DataIntegrityError,
    DatasetNotFoundError,
    _atomic_savez,
    _cached,
    _DataDir,
    _file_digest,
    _load_npz,
    _missing,
    _not_found,
    _read_sha256sums,
    _repo_root,
    _require_files,
    _shared_data_dir,
    _verify_sha256sums,
    cache_dir,
    default_data_dir,
    sha256_file,
)

__all__ = [
    "CARS_DUPLICATE_PAIRS",
    "CIFAR100_MD5",
    "CIFAR10_MD5",
    "DATASET_NAMES",
    "DataIntegrityError",
    "DatasetNotFoundError",
    "ImageDataset",
    "cache_dir",
    "default_data_dir",
    "load_dataset",
    "stratified_group_split",
]

DATASET_NAMES = ("cifar100", "cifar10", "cifar10-jpeg", "cars64", "digits")

#: Published md5s of the official ``cifar-100-python.tar.gz`` and of the files in its
#: ``cifar-100-python`` folder (the same values torchvision checks). Tests patch this.
CIFAR100_MD5: dict[str, str] = {
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}

#: Published md5s of the official ``cifar-10-python.tar.gz`` and of the files in its
#: ``cifar-10-batches-py`` folder (torchvision's table). Tests patch this table.
CIFAR10_MD5: dict[str, str] = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
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


# ------------------------------------------------------------- CIFAR-10 / CIFAR-100
@dataclass(frozen=True)
class _CifarSpec:
    """One official CIFAR python version: its folder, archive, files and md5 table."""

    name: str
    folder: str
    archive: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str
    md5_table: str  # module attribute, looked up at call time (tests patch it)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    torchvision_class: str

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train, *self.test, self.meta)

    def md5(self) -> Mapping[str, str]:
        return globals()[self.md5_table]


_CIFAR_SPECS = {
    "cifar100": _CifarSpec(
        "cifar100",
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        ("train",),
        ("test",),
        "meta",
        "fine_labels",
        "fine_label_names",
        "CIFAR100_MD5",
        CIFAR100_MEAN,
        CIFAR100_STD,
        "CIFAR100",
    ),
    "cifar10": _CifarSpec(
        "cifar10",
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
        "CIFAR10_MD5",
        CIFAR10_MEAN,
        CIFAR10_STD,
        "CIFAR10",
    ),
}


def _md5_mismatch(what: str, expected: str | None, got: str, action: str) -> DataIntegrityError:
    return DataIntegrityError(
        f"md5 mismatch for {what}: expected {expected}, got {got}; refusing to {action} it "
        f"(only the official CIFAR python files are accepted)"
    )


def _unpickle_checked(payload: bytes, md5: str | None, what: str) -> dict:
    """Unpickle ``payload`` only if its md5 is ``md5`` (the bytes hashed are the bytes
    unpickled, so a file swapped in between cannot slip through)."""
    import pickle  # only ever reached after the md5 check below

    got = hashlib.md5(payload).hexdigest()
    if md5 is None or got != md5:
        raise _md5_mismatch(what, md5, got, "unpickle")
    obj = pickle.loads(payload, encoding="bytes")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _torchvision_download(spec: _CifarSpec, root: Path) -> str | None:
    """Try ``torchvision.datasets.<CIFAR>(root, download=True)``; the error, if any.

    Returns None when torchvision is not installed (nothing tried) or it succeeded.
    """
    try:
        import torchvision.datasets as tv_datasets
    except ImportError:
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
        getattr(tv_datasets, spec.torchvision_class)(root=str(root), train=True, download=True)
    except (OSError, RuntimeError) as exc:  # offline, read-only folder, bad download
        return f"torchvision download failed ({type(exc).__name__}: {exc})"
    return None


def _find_cifar(spec: _CifarSpec, where: _DataDir) -> tuple[Path, bool]:
    """The extracted folder (``False``) or the official archive (``True``) to read."""
    folder = where.folder(spec.name, spec.folder, spec.meta)
    if not _missing(folder, spec.files):
        return folder, False
    assert where.path is not None  # where.folder raised otherwise
    archive = where.path / spec.archive
    if archive.is_file():
        return archive, True
    failure = _torchvision_download(spec, where.path)
    if failure is None and not _missing(where.path / spec.folder, spec.files):
        return where.path / spec.folder, False
    found = (
        f"missing {', '.join(_missing(folder, spec.files))}"
        if folder.is_dir()
        else "no such folder"
    )
    searched = f"searched {folder} ({found}) and {archive} (no such file)"
    if failure:
        searched += f"; {failure}"
    raise _not_found(spec.name, searched, where)


def _cifar_payloads(
    spec: _CifarSpec, source: Path, archive: bool
) -> Iterator[tuple[str, str, bytes]]:
    """``(file name, description, raw bytes)`` of each file of ``spec``.

    From an archive, the archive's own md5 is checked first (nothing is read from a
    tar that is not the official one); the members are read in memory, not extracted.
    """
    if not archive:
        _verify_sha256sums(source, spec.files)
        for n in spec.files:
            yield n, str(source / n), (source / n).read_bytes()
        return
    _verify_sha256sums(source.parent, (source.name,))
    expected = spec.md5().get(spec.archive)
    got = _file_digest(source, "md5")
    if expected is None or got != expected:
        raise _md5_mismatch(str(source), expected, got, "open")
    wanted = {f"{spec.folder}/{n}": n for n in spec.files}
    seen: set[str] = set()
    with tarfile.open(source, mode="r:*") as tar:
        for m in tar:
            if m.name in wanted and m.isfile() and m.name not in seen:
                f = tar.extractfile(m)
                assert f is not None
                seen.add(m.name)
                yield wanted[m.name], f"{source}:{m.name}", f.read()
    absent = sorted(set(wanted) - seen)
    if absent:
        raise DataIntegrityError(f"{source} lacks {', '.join(absent)}")


def _cifar_arrays(batches: Sequence[Mapping], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    y = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    return np.ascontiguousarray(x), y


def _load_cifar(spec: _CifarSpec, where: _DataDir) -> ImageDataset:
    """CIFAR-10 or CIFAR-100 from the official python version (folder or archive)."""
    source, archive = _find_cifar(spec, where)
    md5 = spec.md5()
    parts = {
        n: _unpickle_checked(payload, md5.get(n), what)
        for n, what, payload in _cifar_payloads(spec, source, archive)
    }
    x_train, y_train = _cifar_arrays([parts[n] for n in spec.train], spec.label_key)
    x_test, y_test = _cifar_arrays([parts[n] for n in spec.test], spec.label_key)
    num_classes = len(parts[spec.meta].get(spec.names_key, ())) or int(y_train.max()) + 1
    return ImageDataset(
        spec.name,
        x_train,
        y_train,
        x_test,
        y_test,
        num_classes,
        spec.mean,
        spec.std,
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


def _load_cifar10_jpeg(where: _DataDir) -> ImageDataset:
    folder = where.folder("cifar10-jpeg", "cifar10-jpeg", CIFAR10_ARCHIVE)
    _require_files(folder, (CIFAR10_ARCHIVE, "classes.txt"), "cifar10-jpeg", where)
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


def _load_cars64(where: _DataDir, seed: int) -> ImageDataset:
    folder = where.folder("cars64", "stanford-cars-train64", CARS_ARCHIVE)
    _require_files(folder, (CARS_ARCHIVE,), "cars64", where)
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
    try:
        from sklearn.datasets import load_digits

        d = load_digits()
    except (ImportError, OSError) as exc:  # scikit-learn or its bundled files missing
        raise _not_found(
            "digits", f"{type(exc).__name__}: {exc}", _DataDir(None, "unused")
        ) from exc
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
    where = _DataDir.resolve(data_dir)
    if name in _CIFAR_SPECS:
        return _load_cifar(_CIFAR_SPECS[name], where)
    if name == "cifar10-jpeg":
        return _load_cifar10_jpeg(where)
    if name == "cars64":
        return _load_cars64(where, seed)
    if name == "digits":
        return _load_digits(seed)
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASET_NAMES)}")
