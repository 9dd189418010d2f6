"""The :class:`~ckd_core.budget.TeacherBudget` cache file: read, validate, write, lock.

A cache is a ``.safetensors`` or ``.npz`` file of one array per teacher
output (one row per cached id), the ids (``__ids__``) and string metadata;
reading it never unpickles. :func:`file_lock` is the inter-process lock that
a shared cache file is read, extended and rewritten under.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

# Key used when the teacher returns a bare array instead of a dict.
_ARRAY_KEY = "__output__"
_IDS_KEY = "__ids__"
_META_KEY = "__meta__"  # npz only: the JSON metadata
#: Output names a teacher may not use: they name the cache file's own entries.
RESERVED_KEYS = (_IDS_KEY, _META_KEY, _ARRAY_KEY)
_FORMAT_VERSION = "1"


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Exclusive inter-process lock for the cache ``path`` (held on ``path + ".lock"``).

    An advisory OS lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows):
    it serialises every process (and every thread holding its own lock
    object) that locks the same path, and is released if the process dies.
    """
    lock_path = path + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    with open(lock_path, "a+b") as handle:
        if sys.platform == "win32":
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def file_stamp(path: str) -> tuple[int, int, int] | None:
    """``(inode, size, mtime_ns)`` of ``path``, or ``None`` if it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def write_cache(path: str, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> None:
    """Writes a cache atomically (temporary file + ``os.replace``)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=_suffix(path))
    os.close(fd)
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import save_file

            save_file(tensors, tmp, metadata=meta)
        else:
            with open(tmp, "wb") as f:
                np.savez(f, **tensors, **{_META_KEY: np.array(json.dumps(meta))})  # type: ignore[arg-type]
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_cache(
    path: str, metadata: Mapping[str, Any] | None
) -> tuple[np.ndarray, dict[str, np.ndarray], bool, dict[str, str]]:
    """``(ids, rows by output name, array_output, raw meta)`` of a cache file.

    ``metadata``: refuse (``ValueError``) a file made for other metadata;
    ``None`` accepts any.
    """
    tensors, meta = _read(path)
    saved = saved_metadata(path, meta)
    if metadata is not None and saved != json.loads(json.dumps(dict(metadata), sort_keys=True)):
        raise ValueError(f"cache {path!r} was made for {saved}, not {dict(metadata)}.")
    ids, rows, array_output = _validated_cache(path, tensors, meta)
    return ids, rows, array_output, meta


def validated_outputs(expected: int, outputs: Any) -> tuple[dict[str, np.ndarray], bool]:
    """The outputs of one teacher call as a chunk of rows; raises if refused."""
    is_array = not isinstance(outputs, Mapping)
    if is_array:
        chunk = {_ARRAY_KEY: np.asarray(outputs)}
    else:
        if not outputs:
            raise ValueError(
                "the teacher returned an empty dict; it must return an array, or a dict of "
                "arrays, with one row per input."
            )
        chunk = {}
        for k, v in outputs.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"teacher output names must be strings, got {k!r} ({type(k).__name__})."
                )
            if k in RESERVED_KEYS:
                raise ValueError(
                    f"the teacher returned an output named {k!r}, a reserved name (the "
                    f"cache file's own entries are {', '.join(RESERVED_KEYS)}); rename it."
                )
            chunk[k] = np.asarray(v)
    for k, v in chunk.items():
        name = "the teacher's output" if is_array else f"teacher output {k!r}"
        if v.dtype == object:
            raise ValueError(
                f"{name} has dtype object; it must be a numeric (or bool) array, which the "
                "cache can store without pickling."
            )
        if v.ndim == 0 or v.shape[0] != expected:
            got = "a scalar" if v.ndim == 0 else f"{v.shape[0]} rows"
            raise ValueError(
                f"{name} has shape {v.shape}: expected {expected} rows (one per input of "
                f"the batch), got {got}."
            )
    return chunk, is_array


def _suffix(path: str) -> str:
    return ".safetensors" if path.endswith(".safetensors") else ".npz"


def _not_a_cache(path: str, what: str) -> ValueError:
    return ValueError(f"{path!r} is not a readable TeacherBudget cache: {what}.")


def _read(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and string metadata of a cache file; never unpickles."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TeacherBudget cache {path!r} does not exist (or is not a file).")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="numpy") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # SafetensorError derives from Exception only
            raise _not_a_cache(path, f"not a valid safetensors file ({exc})") from None
        return tensors, meta
    with open(path, "rb") as handle:  # closed on every error (np.load leaks it on some)
        tensors = _npz_members(path, handle)
    raw = tensors.pop(_META_KEY, None)
    if raw is None:
        raise _not_a_cache(path, f"it has no {_META_KEY!r} entry (a foreign .npz?)")
    try:
        meta = json.loads(str(raw))
    except ValueError as exc:
        raise _not_a_cache(path, f"its {_META_KEY!r} entry is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _not_a_cache(path, f"its {_META_KEY!r} entry is not a dict of strings")
    return tensors, meta


def _npz_members(path: str, handle: Any) -> dict[str, np.ndarray]:
    """Every member of the ``.npz`` archive open in ``handle``; raises naming ``path``."""
    try:
        data = np.load(handle, allow_pickle=False)
    except Exception as exc:
        raise _not_a_cache(path, f"not a valid .npz file ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise _not_a_cache(path, "a single .npy array, not an .npz archive")
    try:
        with data:
            return {k: data[k] for k in data.files}
    except Exception as exc:  # pickled (object) arrays, truncated members...
        raise _not_a_cache(path, f"unreadable member ({type(exc).__name__}: {exc})") from None


def saved_metadata(path: str, meta: Mapping[str, str]) -> Any:
    if meta.get("format") != _FORMAT_VERSION:
        raise _not_a_cache(
            path,
            f"its format is {meta.get('format')!r}, this version reads format "
            f"{_FORMAT_VERSION!r} (a foreign file, or one from another version?)",
        )
    try:
        return json.loads(meta.get("metadata", "{}"))
    except ValueError as exc:
        raise _not_a_cache(path, f"its saved metadata is not valid JSON ({exc})") from None


def _validated_cache(
    path: str, tensors: dict[str, np.ndarray], meta: Mapping[str, str]
) -> tuple[np.ndarray, dict[str, np.ndarray], bool]:
    """``(ids, rows by output name, array_output)`` of a read cache; raises naming the file."""
    tensors = dict(tensors)
    ids = tensors.pop(_IDS_KEY, None)
    if ids is None:
        raise _not_a_cache(path, f"it has no {_IDS_KEY!r} entry")
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise _not_a_cache(
            path, f"{_IDS_KEY!r} must be 1-D integers, got shape {ids.shape} dtype {ids.dtype}"
        )
    ids = ids.astype(np.int64)
    if len(np.unique(ids)) != len(ids):
        raise _not_a_cache(path, f"{_IDS_KEY!r} holds repeated ids")
    try:
        array_output = json.loads(meta.get("array_output", "null"))
    except ValueError:
        array_output = "?"
    if array_output not in (True, False, None):
        raise _not_a_cache(path, f"its array_output {meta.get('array_output')!r} is not a bool")
    if len(ids) and array_output is None:
        raise _not_a_cache(path, f"it holds {len(ids)} ids but array_output is null")
    if array_output and set(tensors) != {_ARRAY_KEY}:
        raise _not_a_cache(
            path,
            f"array_output is true but its outputs are {sorted(tensors)}, not [{_ARRAY_KEY!r}]",
        )
    if array_output is False and (not tensors or set(tensors) & set(RESERVED_KEYS)):
        raise _not_a_cache(
            path,
            f"array_output is false but its outputs are {sorted(tensors)} (none of "
            f"{', '.join(RESERVED_KEYS)} may be an output name)",
        )
    for k, v in tensors.items():
        if v.ndim == 0 or v.shape[0] != len(ids):
            raise _not_a_cache(
                path, f"output {k!r} has shape {v.shape}, expected {len(ids)} rows (one per id)"
            )
    return ids, tensors, bool(array_output)
