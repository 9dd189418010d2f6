"""Teacher-call budget: the central object of the RTI-KD setting.

In *restricted teacher inference* knowledge distillation the teacher is a
costly oracle: each distinct sample it sees costs one call, and a student
gets a fixed budget of calls. :class:`TeacherBudget` wraps any teacher
callable, caches its outputs by sample id, counts distinct calls and refuses
(raises :class:`TeacherBudgetExceeded`) *before* a call would exceed the
budget. The cache can be saved and reloaded, so that a rerun of an
experiment makes zero new teacher calls.

It is framework-agnostic: inputs and outputs cross the boundary as NumPy
arrays (the teacher callable converts them to and from its framework).

Example:
    >>> import numpy as np
    >>> images = np.arange(20, dtype="float32").reshape(10, 2)
    >>> budget = TeacherBudget(lambda x: {"logits": x * 2}, budget=4)
    >>> load = lambda ids: images[ids]  # inputs of the uncached ids
    >>> budget.query([3, 1, 3], load)["logits"][:, 0]
    array([12.,  4., 12.], dtype=float32)
    >>> budget.used, budget.new_calls
    (2, 2)
    >>> budget.query([1], load)["logits"].shape  # cached: no new call
    (1, 2)
    >>> budget.new_calls
    2
    >>> budget.query([5, 6, 7], load)
    Traceback (most recent call last):
    ...
    ckd_core.budget.TeacherBudgetExceeded: ... budget=4, used=2, requested=3 new ...
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["TeacherBudget", "TeacherBudgetExceeded"]

Outputs = np.ndarray | dict[str, np.ndarray]
# Key used when the teacher returns a bare array instead of a dict.
_ARRAY_KEY = "__output__"
_IDS_KEY = "__ids__"
_FORMAT_VERSION = "1"


class TeacherBudgetExceeded(RuntimeError):
    """A query would make the teacher exceed its call budget.

    Raised before the teacher is called; the cache and counters are unchanged.
    Attributes ``budget``, ``used`` and ``requested`` (new distinct ids).
    """

    def __init__(self, budget: int, used: int, requested: int) -> None:
        self.budget, self.used, self.requested = int(budget), int(used), int(requested)
        super().__init__(
            f"teacher-call budget exceeded: budget={self.budget}, used={self.used}, "
            f"requested={self.requested} new (total would be {self.used + self.requested})"
        )


def _as_ids(ids: Any) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"sample ids must be integers, got dtype {arr.dtype}.")
    return arr.astype(np.int64, copy=False)


class TeacherBudget:
    """Caches a teacher's outputs by sample id and enforces a call budget.

    Args:
        teacher: ``fn(batch_inputs) -> outputs``; ``outputs`` is an array with
            one row per input, or a dict of such arrays (e.g. logits plus the
            features white-box methods need). It is only ever called on
            batches of ids that are not cached yet.
        budget: maximum number of distinct sample ids the teacher may see
            (``None``: unlimited, still counted).
        batch_size: rows per teacher call (never one image at a time).
        metadata: JSON-able dict describing what the cache holds (teacher,
            dataset, view...). Saved with the cache; :meth:`load` refuses a
            file whose metadata differs.

    Counters: ``used`` is the number of distinct ids whose outputs are
    cached, i.e. teacher calls spent by this experiment (including calls
    recorded in a loaded cache); ``new_calls`` counts the ids this object
    actually sent to the teacher; ``num_batches`` counts invocations of
    ``teacher``.
    """

    def __init__(
        self,
        teacher: Callable[[Any], Outputs] | None,
        budget: int | None,
        *,
        batch_size: int = 256,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0 or None, got {budget}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.teacher = teacher
        self.budget = None if budget is None else int(budget)
        self.batch_size = int(batch_size)
        self.metadata = dict(metadata or {})
        self._row: dict[int, int] = {}  # sample id -> row in the storage
        self._chunks: list[dict[str, np.ndarray]] = []
        self._store: dict[str, np.ndarray] | None = None  # consolidated rows
        self._array_output: bool | None = None
        self.new_calls = 0
        self.num_batches = 0

    # ------------------------------------------------------------------ counters
    @property
    def used(self) -> int:
        """Distinct ids cached (teacher calls spent)."""
        return len(self._row)

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.used

    @property
    def ids(self) -> np.ndarray:
        """Cached sample ids, in the order they were first queried."""
        return np.fromiter(self._row.keys(), dtype=np.int64, count=len(self._row))

    def __contains__(self, sample_id: int) -> bool:
        return int(sample_id) in self._row

    def __len__(self) -> int:
        return self.used

    def __repr__(self) -> str:
        return (
            f"TeacherBudget(budget={self.budget}, used={self.used}, "
            f"new_calls={self.new_calls}, keys={self.keys()})"
        )

    def keys(self) -> list[str]:
        store = self._storage()
        return [] if store is None else sorted(store)

    # ------------------------------------------------------------------ queries
    def missing(self, ids: Any) -> np.ndarray:
        """Distinct ids among ``ids`` not cached yet (first-seen order)."""
        ids = _as_ids(ids)
        _, first = np.unique(ids, return_index=True)
        distinct = ids[np.sort(first)]
        return np.array([i for i in distinct.tolist() if i not in self._row], dtype=np.int64)

    def check(self, ids: Any) -> int:
        """Number of new calls ``query(ids)`` would make; raises if over budget."""
        new = len(self.missing(ids))
        if self.budget is not None and self.used + new > self.budget:
            raise TeacherBudgetExceeded(self.budget, self.used, new)
        return new

    def query(self, ids: Any, inputs: Any = None) -> Outputs:
        """Teacher outputs for ``ids`` (rows in the order of ``ids``).

        Args:
            ids: integer sample ids (repeats allowed).
            inputs: how to get the inputs of uncached ids: an indexable
                array-like aligned with ``ids`` (``inputs[k]`` is sample
                ``ids[k]``), or a loader ``fn(missing_ids) -> batch inputs``.
                May be ``None`` when every id is cached.

        Raises:
            TeacherBudgetExceeded: before any teacher call, when the new
                distinct ids would take ``used`` past ``budget``.
        """
        ids = _as_ids(ids)
        missing = self.missing(ids)
        if len(missing):
            if self.budget is not None and self.used + len(missing) > self.budget:
                raise TeacherBudgetExceeded(self.budget, self.used, len(missing))
            if inputs is None:
                raise ValueError(f"{len(missing)} ids are not cached and no inputs were given.")
            if self.teacher is None:
                raise RuntimeError("this TeacherBudget has no teacher (cache-only).")
            self._call_teacher(missing, ids, inputs)
        return self.get(ids)

    def get(self, ids: Any) -> Outputs:
        """Cached outputs for ``ids``; ``KeyError`` if any is not cached."""
        ids = _as_ids(ids)
        try:
            rows = np.fromiter((self._row[i] for i in ids.tolist()), np.int64, count=len(ids))
        except KeyError as exc:
            raise KeyError(f"sample id {exc.args[0]} is not cached") from None
        store = self._storage()
        if store is None:
            return {}
        out = {k: v[rows] for k, v in store.items()}
        return out[_ARRAY_KEY] if self._array_output else out

    def all(self) -> tuple[np.ndarray, Outputs]:
        """``(ids, outputs)`` for everything cached."""
        ids = self.ids
        return ids, self.get(ids)

    # ------------------------------------------------------------------ internals
    def _inputs_for(self, missing: np.ndarray, ids: np.ndarray, inputs: Any) -> Callable:
        if callable(inputs):
            return inputs
        position: dict[int, int] = {}
        for k, i in enumerate(ids.tolist()):
            position.setdefault(i, k)

        def take(batch_ids: np.ndarray) -> Any:
            pos = np.array([position[i] for i in batch_ids.tolist()], dtype=np.int64)
            if isinstance(inputs, np.ndarray) or hasattr(inputs, "__array__"):
                try:
                    return inputs[pos]
                except TypeError:
                    pass
            return [inputs[p] for p in pos.tolist()]

        return take

    def _call_teacher(self, missing: np.ndarray, ids: np.ndarray, inputs: Any) -> None:
        load = self._inputs_for(missing, ids, inputs)
        for start in range(0, len(missing), self.batch_size):
            batch_ids = missing[start : start + self.batch_size]
            outputs = self.teacher(load(batch_ids))  # type: ignore[misc]
            self.num_batches += 1
            self._add(batch_ids, outputs)
            self.new_calls += len(batch_ids)

    def _add(self, batch_ids: np.ndarray, outputs: Outputs, is_array: bool | None = None) -> None:
        if is_array is None:
            is_array = not isinstance(outputs, Mapping)
        else:
            outputs = outputs[_ARRAY_KEY] if is_array else outputs  # type: ignore[index]
        if self._array_output is None:
            self._array_output = is_array
        elif self._array_output != is_array:
            raise TypeError("the teacher must always return an array, or always a dict.")
        chunk = {_ARRAY_KEY: outputs} if is_array else dict(outputs)
        chunk = {k: np.asarray(v) for k, v in chunk.items()}
        for k, v in chunk.items():
            if v.ndim == 0 or v.shape[0] != len(batch_ids):
                raise ValueError(
                    f"teacher output {k!r} has shape {v.shape}; expected {len(batch_ids)} rows."
                )
        known = self._storage()
        if known is not None and set(known) != set(chunk):
            raise ValueError(f"teacher output keys changed: {sorted(known)} -> {sorted(chunk)}.")
        base = self.used
        for offset, i in enumerate(batch_ids.tolist()):
            self._row[i] = base + offset
        self._chunks.append(chunk)

    def _storage(self) -> dict[str, np.ndarray] | None:
        if self._chunks:
            parts = ([self._store] if self._store is not None else []) + self._chunks
            self._store = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            self._chunks = []
        return self._store

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Writes the cache atomically (temporary file + ``os.replace``).

        ``.safetensors`` (needs the ``safetensors`` package) or ``.npz``.
        """
        path = os.fspath(path)
        store = self._storage() or {}
        tensors = {k: np.ascontiguousarray(v) for k, v in store.items()}
        tensors[_IDS_KEY] = self.ids
        meta = {
            "format": _FORMAT_VERSION,
            "budget": "null" if self.budget is None else str(self.budget),
            "array_output": json.dumps(self._array_output),
            "metadata": json.dumps(self.metadata, sort_keys=True),
        }
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
                    np.savez(f, **tensors, __meta__=np.array(json.dumps(meta)))  # type: ignore[arg-type]
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def load(self, path: str | os.PathLike, *, check_metadata: bool = True) -> int:
        """Merges a saved cache into this one; returns the number of ids added.

        Loaded ids count as spent calls (``used``) but not as ``new_calls``.
        Raises :class:`TeacherBudgetExceeded` if they do not fit the budget
        and ``ValueError`` if the saved metadata differs from this object's.
        """
        tensors, meta = _read(os.fspath(path))
        saved_meta = json.loads(meta.get("metadata", "{}"))
        if check_metadata and saved_meta != json.loads(json.dumps(self.metadata, sort_keys=True)):
            raise ValueError(
                f"cache {os.fspath(path)!r} was made for {saved_meta}, not {self.metadata}."
            )
        ids = tensors.pop(_IDS_KEY).astype(np.int64)
        keep = np.array([i not in self._row for i in ids.tolist()], dtype=bool)
        new = int(keep.sum())
        if self.budget is not None and self.used + new > self.budget:
            raise TeacherBudgetExceeded(self.budget, self.used, new)
        if new:
            array_output = bool(json.loads(meta.get("array_output", "null")))
            self._add(ids[keep], {k: v[keep] for k, v in tensors.items()}, array_output)
        return new

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        teacher: Callable[[Any], Outputs] | None = None,
        budget: int | None = None,
        **kwargs: Any,
    ) -> TeacherBudget:
        """A budget whose cache is read from ``path`` (metadata taken from it)."""
        _, meta = _read(os.fspath(path))
        kwargs.setdefault("metadata", json.loads(meta.get("metadata", "{}")))
        if budget is None and meta.get("budget", "null") != "null":
            budget = int(meta["budget"])
        obj = cls(teacher, budget, **kwargs)
        obj.load(path)
        return obj


def _suffix(path: str) -> str:
    return ".safetensors" if path.endswith(".safetensors") else ".npz"


def _read(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, meta
    with np.load(path, allow_pickle=False) as data:
        tensors = {k: data[k] for k in data.files}
    meta = json.loads(str(tensors.pop("__meta__")))
    return tensors, meta
