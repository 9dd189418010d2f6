"""Where the reference experiments' data lives, how it is verified and cached.

The data directory (``--data-dir``, else ``$CKD_DATA_DIR``, else
``<repo>/../shared/data``) and the one-line :class:`DatasetNotFoundError` that
says where a missing dataset comes from; sha256 checks against a folder's
``SHA256SUMS``; decoded arrays cached as ``.npz`` under ``$CKD_CACHE_DIR`` (else
``~/.cache/ckd-core``), written atomically.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .rows import atomic_write_bytes

CACHE_VERSION = 1


@dataclass(frozen=True, eq=False)
class SplitArrays:
    """What a data set's loader returns: uint8 NHWC images and int64 labels per split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    split_seed: int | None = None  # the seed of a loader-made split (None: official)


def decode_jpeg(data: bytes) -> np.ndarray:
    """One JPEG's bytes as a uint8 RGB ``(H, W, 3)`` array."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


class DataIntegrityError(ValueError):
    """A file's checksum does not match the expected value."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message (one line) says how to get them."""


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


def _shared_data_dir() -> Path:
    return _repo_root().parent / "shared" / "data"


@dataclass(frozen=True)
class DataDir:
    """The data directory in use and where it came from (for error messages)."""

    path: Path | None
    origin: str

    @classmethod
    def resolve(cls, data_dir: str | os.PathLike | None) -> DataDir:
        if data_dir is not None:
            return cls(Path(data_dir).expanduser(), "--data-dir")
        if os.environ.get("CKD_DATA_DIR"):
            return cls(default_data_dir(), "$CKD_DATA_DIR")
        return cls(default_data_dir(), "the default")

    def describe(self) -> str:
        default = _shared_data_dir()
        how = f"choose it with --data-dir or $CKD_DATA_DIR; default {default}"
        how += "" if default.is_dir() else ", which does not exist"
        if self.path is None:
            return f"no data directory ({how})"
        return f"data dir {self.path} from {self.origin} ({how})"

    def folder(self, dataset: str, name: str, marker: str) -> Path:
        """``path/name``, or ``path`` itself if it directly holds ``marker``."""
        if self.path is None:
            raise _not_found(dataset, "", self)
        if (self.path / marker).exists():
            return self.path
        return self.path / name


def _not_found(name: str, searched: str, where: DataDir) -> DatasetNotFoundError:
    """One-line error: what was searched, where the data dir came from, how to get it."""
    from .datasets import dataset_spec

    spec = dataset_spec(name)
    d = str(where.path) if where.path is not None else "<data dir>"
    parts = [f"{spec.title} not found"]
    if searched:
        parts.append(f": {searched}")
    if spec.uses_data_dir:
        parts.append(f"; {where.describe()}")
    shared = _shared_data_dir() / (spec.shared_copy or "")
    copy = f"copy the folder {shared} into {d}; or " if spec.shared_copy and shared.is_dir() else ""
    how = spec.how_to_get.format(d=d, copy=copy)
    parts.append(f"; it comes from {spec.source}; to get it, {how}")
    return DatasetNotFoundError(re.sub(r"\s*[\r\n]+\s*", " ", "".join(parts)))  # one line


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


def _missing(folder: Path, names: Sequence[str]) -> list[str]:
    return [n for n in names if not (folder / n).is_file()]


def _require_files(folder: Path, names: Sequence[str], name: str, where: DataDir) -> None:
    missing = _missing(folder, names)
    if missing:
        raise _not_found(
            name, f"searched {folder} for {', '.join(names)} (missing: {', '.join(missing)})", where
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
        # our own handle: np.load leaves its file open when the archive is corrupt
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
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
