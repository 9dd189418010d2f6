"""Teacher-call budget: the central object of the RTI-KD setting.

In *restricted teacher inference* knowledge distillation the teacher is a
costly oracle: each distinct sample it sees costs one call, and a student
gets a fixed budget of calls. :class:`TeacherBudget` wraps any teacher
callable, caches its outputs by sample id, counts distinct calls and refuses
(raises :class:`TeacherBudgetExceeded`) *before* a call would exceed the
budget. The cache can be saved and reloaded, so that a rerun of an
experiment makes zero new teacher calls. One object may be shared by
several threads (see :class:`TeacherBudget`, *Threads*).

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
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ckd_core._checks import check_int
from ckd_core.budget_files import (
    _ARRAY_KEY,
    _FORMAT_VERSION,
    _IDS_KEY,
    RESERVED_KEYS,
    file_lock,
    file_stamp,
    read_cache,
    saved_metadata,
    validated_outputs,
    write_cache,
)

__all__ = ["RESERVED_KEYS", "TeacherBudget", "TeacherBudgetExceeded"]

Outputs = np.ndarray | dict[str, np.ndarray]
Rows = tuple[np.ndarray, dict[str, np.ndarray], bool | None]  # ids, outputs, array_output
_INT64_MAX = np.iinfo(np.int64).max


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
        raise TypeError(f"ids must be integer sample ids, got an array of dtype {arr.dtype}.")
    if arr.size and arr.dtype.kind == "u" and int(arr.max()) > _INT64_MAX:
        # a cast would wrap 2**64 - 1 onto -1: two samples under one id
        raise ValueError(f"sample ids must fit in int64 (at most 2**63 - 1), got {int(arr.max())}.")
    return arr.astype(np.int64, copy=False)


def _distinct(ids: np.ndarray) -> list[int]:
    """Distinct ids in first-seen order."""
    return list(dict.fromkeys(ids.tolist()))


def _merged(path: str, ours: Rows, theirs: Rows) -> Rows:
    """``ours`` plus the rows of ``theirs`` (read from ``path``) whose ids ``ours`` lacks."""
    ids, rows, array_output = ours
    other_ids, other_rows, other_array = theirs
    keep = ~np.isin(other_ids, ids)
    if not keep.any():
        return ours
    extra = {k: v[keep] for k, v in other_rows.items()}
    if not len(ids):
        return other_ids[keep], extra, other_array
    same = array_output == other_array and set(rows) == set(extra)
    if not same or any(rows[k].shape[1:] != v.shape[1:] for k, v in extra.items()):
        raise ValueError(
            f"cannot merge into cache {path!r}: it holds other outputs ({sorted(extra)}, rows "
            f"{[v.shape[1:] for v in extra.values()]}) than this TeacherBudget; save elsewhere."
        )
    return (
        np.concatenate([ids, other_ids[keep]]),
        {k: np.concatenate([v, extra[k]]) for k, v in rows.items()},
        array_output,
    )


class TeacherBudget:
    """Caches a teacher's outputs by sample id and enforces a call budget.

    Args:
        teacher: ``fn(batch_inputs) -> outputs``; ``outputs`` is an array with
            one row per input, or a dict of such arrays (e.g. logits plus the
            features white-box methods need) whose names are strings other
            than ``__ids__``, ``__meta__`` and ``__output__`` (the cache
            file's own entries). It is only ever called on batches of ids
            that are not cached yet. ``None``: a cache-only object.
        budget: maximum number of distinct sample ids the teacher may see,
            an integer >= 0 (``None``: unlimited, still counted).
        batch_size: rows per teacher call (never one image at a time), an
            integer >= 1.
        metadata: JSON-able dict describing what the cache holds (teacher,
            dataset, view...). Saved with the cache; :meth:`load` refuses a
            file whose metadata differs.
        shared_file: a cache path shared with other processes (see
            *Processes*); ``None``: this object's cache lives in memory
            until :meth:`save`.

    Counters: ``used`` is the number of distinct ids the teacher has been
    charged for, i.e. teacher calls spent by this experiment (including
    calls recorded in a loaded cache, and calls whose outputs were refused,
    see below); ``new_calls`` counts the ids this object actually sent to
    the teacher; ``num_batches`` counts invocations of ``teacher``;
    ``len(obj)`` and ``id in obj`` count and test the *cached* ids.

    Failed calls: once a batch has been passed to ``teacher`` the call is
    spent, even if the teacher raises or returns outputs that are refused
    (wrong number of rows, reserved or changed names...): those ids stay
    charged to ``used`` without being cached, and a later query of them
    sends them again without charging them a second time (``used`` counts
    *distinct* ids the teacher saw). An ``inputs`` loader that fails before
    the teacher is called charges nothing.

    Threads:
        An object can be shared by threads (e.g. data-loader workers). All
        state is guarded by locks, with this design: a query whose ids are
        all cached only takes a short state lock, so it never waits for a
        teacher call. A query that needs the teacher holds a *call lock* for
        its whole check-call-store sequence: under it, it recomputes which
        ids are missing (another thread may just have cached them), checks
        the budget, calls the teacher batch by batch and stores each batch's
        outputs with their own ids. So teacher calls are serialised (one
        batch at a time, as one teacher on one device runs anyway), a budget
        check can never be overtaken by another thread's calls (the budget is
        never exceeded, even transiently), an id is never sent twice by two
        racing threads, and outputs are always stored and returned under
        their own id. :meth:`load` takes the same call lock. The teacher and
        the ``inputs`` loader run under the call lock: they may read this
        object (``in``, ``used``, cached :meth:`query`), but a query from
        them that needs the teacher raises ``RuntimeError``, and they must
        not wait on another thread that queries uncached ids (deadlock).

    Processes:
        Several processes (or objects) share one cache file and one budget
        with ``shared_file=path`` (e.g. ``TeacherBudget.from_file(path,
        teacher, budget, shared_file=path)``, or a fresh object if the file
        does not exist yet). A query that needs the teacher holds an
        inter-process lock on ``path`` (``path + ".lock"``, an OS file lock)
        for its check-call-store: it first merges the rows other processes
        added to the file, then checks the budget against everything the
        file holds (the budget counts all processes' calls in total), calls
        the teacher, and rewrites the file with the new rows before
        releasing the lock. An id is thus sent once over all processes, and
        the budget is never exceeded in total. Each such query rewrites the
        whole file; queries of ids cached in memory take no file lock. Calls
        whose outputs were refused are charged only in their own process.
        Every :meth:`save` also merges (under the same lock): it never drops
        ids another process wrote to the file.
    """

    def __init__(
        self,
        teacher: Callable[[Any], Outputs] | None,
        budget: int | None,
        *,
        batch_size: int = 256,
        metadata: Mapping[str, Any] | None = None,
        shared_file: str | os.PathLike | None = None,
    ) -> None:
        if teacher is not None and not callable(teacher):
            raise TypeError(
                f"teacher must be a callable fn(batch_inputs) -> outputs, or None (cache only); "
                f"got {type(teacher).__name__}."
            )
        self.budget = None if budget is None else check_int(budget, "budget", minimum=0)
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(
                f"metadata must be a JSON-able dict or None, got {type(metadata).__name__}."
            )
        try:
            json.dumps(dict(metadata or {}), sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metadata must be a JSON-able dict: {exc}.") from None
        self.teacher = teacher
        self.metadata = dict(metadata or {})
        # _state_lock guards every field below (short critical sections only);
        # _call_lock serialises check-call-store and load (see "Threads").
        # Lock order: _call_lock, then _state_lock.
        self._state_lock = threading.RLock()
        self._call_lock = threading.Lock()
        self._call_owner: int | None = None  # thread holding _call_lock
        self._row: dict[int, int] = {}  # cached sample id -> row in the storage
        self._spent: set[int] = set()  # ids sent to the teacher, outputs refused
        self._nrows = 0  # rows stored (== len(self._row))
        self._chunks: list[dict[str, np.ndarray]] = []
        self._store: dict[str, np.ndarray] | None = None  # consolidated rows
        self._array_output: bool | None = None
        self.new_calls = 0
        self.num_batches = 0
        self.shared_file = None if shared_file is None else os.path.abspath(shared_file)
        self._file_stamp: tuple[int, int, int] | None = None  # shared file as last merged

    def __getstate__(self) -> dict[str, Any]:
        """Pickle and deep-copy support: the state without its locks."""
        with self._state_lock:
            self._storage()
            state = dict(self.__dict__)
        for lock in ("_state_lock", "_call_lock", "_call_owner"):
            del state[lock]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._state_lock = threading.RLock()
        self._call_lock = threading.Lock()
        self._call_owner = None

    # ------------------------------------------------------------------ counters
    @property
    def used(self) -> int:
        """Distinct ids charged: cached, plus sent whose outputs were refused."""
        with self._state_lock:
            return len(self._row) + len(self._spent)

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.used

    @property
    def ids(self) -> np.ndarray:
        """Cached sample ids, in the order they were first queried."""
        with self._state_lock:
            return self._ids_by_row()

    def __contains__(self, sample_id: int) -> bool:
        with self._state_lock:
            return int(sample_id) in self._row

    def __len__(self) -> int:
        """Number of cached ids (``used`` also counts refused calls)."""
        with self._state_lock:
            return len(self._row)

    def __repr__(self) -> str:
        return (
            f"TeacherBudget(budget={self.budget}, used={self.used}, "
            f"new_calls={self.new_calls}, keys={self.keys()})"
        )

    def keys(self) -> list[str]:
        with self._state_lock:
            store = self._storage()
            return [] if store is None else sorted(store)

    # ------------------------------------------------------------------ queries
    def missing(self, ids: Any) -> np.ndarray:
        """Distinct ids among ``ids`` not cached yet (first-seen order)."""
        distinct = _distinct(_as_ids(ids))
        with self._state_lock:
            return np.array([i for i in distinct if i not in self._row], dtype=np.int64)

    def check(self, ids: Any) -> int:
        """Number of new calls ``query(ids)`` would charge; raises if over budget.

        (A snapshot: with other threads querying, the answer may change.)
        """
        distinct = _distinct(_as_ids(ids))
        with self._state_lock:
            return self._check_budget(distinct)

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
            ValueError: the teacher's outputs are refused (wrong number of
                rows, reserved or changed names); the call is still charged.
        """
        ids = _as_ids(ids)
        distinct = _distinct(ids)
        with self._state_lock:
            if all(i in self._row for i in distinct):
                return self._get(ids)
        if self._call_owner == threading.get_ident():
            raise RuntimeError(
                "TeacherBudget.query of uncached ids from inside this object's own teacher "
                "or inputs loader (only cached ids may be queried there)."
            )
        with self._call_lock:
            self._call_owner = threading.get_ident()
            try:
                if self.shared_file is None:
                    self._fetch_missing(distinct, ids, inputs)
                else:
                    with file_lock(self.shared_file):
                        self._merge_file(self.shared_file)
                        stored = self._nrows
                        try:
                            self._fetch_missing(distinct, ids, inputs)
                        finally:
                            if self._nrows != stored:
                                self._write(self.shared_file, None)
                                self._file_stamp = file_stamp(self.shared_file)
            finally:
                self._call_owner = None
        with self._state_lock:
            return self._get(ids)

    def _fetch_missing(self, distinct: list[int], ids: np.ndarray, inputs: Any) -> None:
        """Check-call-store of the uncached ids (with _call_lock held)."""
        with self._state_lock:
            # recomputed under the call lock: another thread may have cached some
            missing = [i for i in distinct if i not in self._row]
            if missing:
                self._check_budget(missing)
        if not missing:
            return
        if inputs is None:
            raise ValueError(
                f"{len(missing)} ids are not cached (e.g. {missing[:5]}) and no inputs were "
                "given: pass inputs= (an array aligned with ids, or a loader "
                "fn(missing_ids) -> batch inputs)."
            )
        if self.teacher is None:
            raise RuntimeError(
                f"{len(missing)} ids are not cached (e.g. {missing[:5]}) and this "
                "TeacherBudget has no teacher (teacher=None: cache only)."
            )
        self._call_teacher(np.array(missing, dtype=np.int64), ids, inputs)

    def get(self, ids: Any) -> Outputs:
        """Cached outputs for ``ids``; ``KeyError`` if any is not cached."""
        ids = _as_ids(ids)
        with self._state_lock:
            return self._get(ids)

    def all(self) -> tuple[np.ndarray, Outputs]:
        """``(ids, outputs)`` for everything cached."""
        with self._state_lock:
            ids = self._ids_by_row()
            return ids, self._get(ids)

    # ------------------------------------------------------------------ internals
    # (the helpers below expect _state_lock to be held by the caller)
    def _ids_by_row(self) -> np.ndarray:
        out = np.empty(self._nrows, dtype=np.int64)
        for i, row in self._row.items():
            out[row] = i
        return out

    def _check_budget(self, distinct: list[int]) -> int:
        """New ids among ``distinct`` to charge; raises if they do not fit."""
        new = sum(1 for i in distinct if i not in self._row and i not in self._spent)
        if self.budget is not None and self.used + new > self.budget:
            raise TeacherBudgetExceeded(self.budget, self.used, new)
        return new

    def _get(self, ids: np.ndarray) -> Outputs:
        try:
            rows = np.fromiter((self._row[i] for i in ids.tolist()), np.int64, count=len(ids))
        except KeyError as exc:
            raise KeyError(f"sample id {exc.args[0]} is not cached") from None
        store = self._storage()
        if store is None:
            return {}
        out = {k: v[rows] for k, v in store.items()}
        return out[_ARRAY_KEY] if self._array_output else out

    def _inputs_for(self, ids: np.ndarray, inputs: Any) -> Callable:
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
        """Called with _call_lock held (and _state_lock not held)."""
        load = self._inputs_for(ids, inputs)
        for start in range(0, len(missing), self.batch_size):
            batch_ids = missing[start : start + self.batch_size]
            batch = load(batch_ids)  # a failing loader charges nothing
            try:
                outputs = self.teacher(batch)  # type: ignore[misc]
                chunk, is_array = validated_outputs(len(batch_ids), outputs)
            except BaseException:
                with self._state_lock:  # the teacher saw the batch: charged, not cached
                    self._spent.update(batch_ids.tolist())
                    self.num_batches += 1
                    self.new_calls += len(batch_ids)
                raise
            with self._state_lock:
                self.num_batches += 1
                self.new_calls += len(batch_ids)
                try:
                    self._append(batch_ids, chunk, is_array)
                except BaseException:
                    self._spent.update(batch_ids.tolist())
                    raise

    def _append(self, batch_ids: np.ndarray, chunk: dict[str, np.ndarray], is_array: bool) -> None:
        """Stores validated rows (with _state_lock held); raises before any change."""
        if self._array_output is not None and self._array_output != is_array:
            before, now = ("an array", "a dict") if self._array_output else ("a dict", "an array")
            raise TypeError(
                f"the teacher must always return an array, or always a dict: it returned "
                f"{before} before and {now} now."
            )
        known = self._storage()
        if known is not None and set(known) != set(chunk):
            raise ValueError(f"teacher output keys changed: {sorted(known)} -> {sorted(chunk)}.")
        if known is not None:
            for k, v in chunk.items():
                if v.shape[1:] != known[k].shape[1:]:
                    raise ValueError(
                        f"teacher output {k!r} changed shape: rows of shape {known[k].shape[1:]} "
                        f"before, {v.shape[1:]} now."
                    )
        dup = [i for i in batch_ids.tolist() if i in self._row]
        if dup or len(set(batch_ids.tolist())) != len(batch_ids):
            raise RuntimeError(f"internal error: ids {dup or batch_ids} stored twice.")
        self._array_output = is_array
        for offset, i in enumerate(batch_ids.tolist()):
            self._row[i] = self._nrows + offset
            self._spent.discard(i)
        self._nrows += len(batch_ids)
        self._chunks.append(chunk)

    def _storage(self) -> dict[str, np.ndarray] | None:
        if self._chunks:
            parts = ([self._store] if self._store is not None else []) + self._chunks
            self._store = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            self._chunks = []
        return self._store

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Writes the cache atomically (temporary file + ``os.replace``), merging.

        ``.safetensors`` (needs the ``safetensors`` package) or ``.npz``.
        Under an inter-process lock on ``path``, the ids the file already
        holds and this object lacks (e.g. another process's) are kept in the
        written file, so a save never drops another process's entries;
        ``ValueError`` if that file is not a cache of the same metadata and
        outputs. Saving to the ``shared_file`` also merges them into this object.
        """
        path = os.path.abspath(path)
        with file_lock(path):
            if path == self.shared_file:
                self._merge_file(path)
                self._write(path, None)
                self._file_stamp = file_stamp(path)
            else:
                saved = read_cache(path, self.metadata) if os.path.exists(path) else None
                self._write(path, None if saved is None else saved[:3])

    def _write(self, path: str, theirs: Rows | None) -> None:
        """Writes this object's rows, plus ``theirs`` rows of ids it lacks, to ``path``."""
        with self._state_lock:  # a consistent snapshot; written outside the lock
            ours: Rows = (self._ids_by_row(), dict(self._storage() or {}), self._array_output)
        ids, rows, array_output = ours if theirs is None else _merged(path, ours, theirs)
        tensors = {k: np.ascontiguousarray(v) for k, v in rows.items()}
        tensors[_IDS_KEY] = ids
        meta = {
            "format": _FORMAT_VERSION,
            "budget": "null" if self.budget is None else str(self.budget),
            "array_output": json.dumps(array_output),
            "metadata": json.dumps(self.metadata, sort_keys=True),
        }
        write_cache(path, tensors, meta)

    def _merge_file(self, path: str) -> None:
        """Adds the shared file's rows this object lacks (charged by their process, not here)."""
        stamp = file_stamp(path)
        if stamp is None or stamp == self._file_stamp:
            return
        ids, rows, array_output, _ = read_cache(path, self.metadata)
        with self._state_lock:
            self._add_rows(path, ids, rows, array_output, check_budget=False)
        self._file_stamp = stamp

    def _add_rows(
        self,
        path: str,
        ids: np.ndarray,
        rows: dict[str, np.ndarray],
        array_output: bool,
        *,
        check_budget: bool,
    ) -> int:
        """Stores the rows of uncached ``ids`` read from ``path`` (with _state_lock held)."""
        keep = np.array([i not in self._row for i in ids.tolist()], dtype=bool)
        if check_budget:
            self._check_budget(ids[keep].tolist())
        new = int(keep.sum())
        if new:
            try:
                self._append(ids[keep], {k: v[keep] for k, v in rows.items()}, array_output)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"cache {path!r} does not fit this TeacherBudget: {exc}") from None
        return new

    def load(self, path: str | os.PathLike, *, check_metadata: bool = True) -> int:
        """Merges a saved cache into this one; returns the number of ids added.

        Loaded ids count as spent calls (``used``) but not as ``new_calls``.
        Raises :class:`TeacherBudgetExceeded` if they do not fit the budget,
        ``ValueError`` naming the file if it is not a readable TeacherBudget
        cache (corrupted, foreign, other output names) or if the saved
        metadata differs from this object's.
        """
        path = os.fspath(path)
        ids, rows, array_output, _ = read_cache(path, self.metadata if check_metadata else None)
        if self._call_owner == threading.get_ident():
            raise RuntimeError("TeacherBudget.load from inside this object's own teacher/loader.")
        with self._call_lock, self._state_lock:
            return self._add_rows(path, ids, rows, array_output, check_budget=True)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        teacher: Callable[[Any], Outputs] | None = None,
        budget: int | None = None,
        **kwargs: Any,
    ) -> TeacherBudget:
        """A budget whose cache is read from ``path`` (metadata taken from it)."""
        path = os.fspath(path)
        meta = read_cache(path, None)[3]
        kwargs.setdefault("metadata", saved_metadata(path, meta))
        if budget is None and meta.get("budget", "null") != "null":
            try:
                budget = check_int(int(meta["budget"]), "budget", minimum=0)
            except (TypeError, ValueError):
                raise ValueError(
                    f"cache {path!r} is corrupted: its saved budget {meta['budget']!r} is not an "
                    "integer >= 0."
                ) from None
        obj = cls(teacher, budget, **kwargs)
        obj.load(path)
        return obj
