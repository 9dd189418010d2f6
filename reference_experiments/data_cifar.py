"""CIFAR-10/100 loaders: the official python versions (md5-checked before unpickling)
and the project's JPEG q75 copy of CIFAR-10 (decoded once, cached)."""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .datafiles import (
    CACHE_VERSION,
    DataDir,
    DataIntegrityError,
    SplitArrays,
    _cached,
    _file_digest,
    _missing,
    _not_found,
    _require_files,
    _verify_sha256sums,
    decode_jpeg,
    sha256_file,
)

__all__ = [
    "CIFAR100_MD5",
    "CIFAR10_MD5",
    "iter_cifar10_jpeg",
    "load_cifar10",
    "load_cifar100",
    "load_cifar10_jpeg",
]

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


def _find_cifar(spec: _CifarSpec, where: DataDir) -> tuple[Path, bool]:
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


def load_cifar100(where: DataDir, seed: int) -> SplitArrays:
    """CIFAR-100 from the official python version (folder or archive; official split)."""
    return _load_cifar(_CIFAR_SPECS["cifar100"], where)


def load_cifar10(where: DataDir, seed: int) -> SplitArrays:
    """CIFAR-10 from the official python version (folder or archive; official split)."""
    return _load_cifar(_CIFAR_SPECS["cifar10"], where)


def _load_cifar(spec: _CifarSpec, where: DataDir) -> SplitArrays:
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
    return SplitArrays(x_train, y_train, x_test, y_test, num_classes)


# -------------------------------------------------------------------- CIFAR-10 JPEG
CIFAR10_ARCHIVE = "cifar10-jpeg.tar.xz"


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
            yield parts[0], index[parts[1]], decode_jpeg(f.read())
            n += 1
            if limit is not None and n >= limit:
                return


def load_cifar10_jpeg(where: DataDir, seed: int) -> SplitArrays:
    """The project's JPEG q75 copy of CIFAR-10, decoded once and cached (official split)."""
    folder = where.folder("cifar10-jpeg", "cifar10-jpeg", CIFAR10_ARCHIVE)
    _require_files(folder, (CIFAR10_ARCHIVE, "classes.txt"), "cifar10-jpeg", where)
    digests = _verify_sha256sums(folder, (CIFAR10_ARCHIVE, "classes.txt"))
    classes = (folder / "classes.txt").read_text().split()
    archive = folder / CIFAR10_ARCHIVE
    sha = digests.get(CIFAR10_ARCHIVE) or sha256_file(archive)
    key = (
        "cifar10-jpeg-"
        + hashlib.sha256(f"{CACHE_VERSION}:{sha}:{','.join(classes)}".encode()).hexdigest()[:16]
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
    return SplitArrays(a["x_train"], a["y_train"], a["x_test"], a["y_test"], len(classes))
