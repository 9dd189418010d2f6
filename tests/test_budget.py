"""TeacherBudget: distinct-call counting, budget enforcement, cache persistence."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckd_core import TeacherBudget, TeacherBudgetExceeded

POOL = 40
INPUTS = np.arange(POOL * 3, dtype=np.float32).reshape(POOL, 3)


class CountingTeacher:
    """Records every sample (by its first input value) it is called on."""

    def __init__(self, as_dict: bool = True) -> None:
        self.seen: list[int] = []
        self.batches: list[int] = []
        self.as_dict = as_dict

    def __call__(self, x):
        x = np.asarray(x)
        self.seen.extend((x[:, 0] // 3).astype(int).tolist())
        self.batches.append(len(x))
        logits = x * 2.0
        if not self.as_dict:
            return logits
        return {"logits": logits, "feat": np.repeat(x[:, :1], 4, axis=1).astype(np.float16)}


def loader(ids):
    return INPUTS[np.asarray(ids)]


requests = st.lists(st.lists(st.integers(0, POOL - 1), max_size=25), max_size=8)


@settings(max_examples=60, deadline=None)
@given(requests=requests, budget=st.integers(0, POOL), batch_size=st.integers(1, 9))
def test_calls_never_exceed_budget_and_repeats_are_free(requests, budget, batch_size):
    teacher = CountingTeacher()
    tb = TeacherBudget(teacher, budget, batch_size=batch_size)
    for ids in requests:
        seen_before = set(teacher.seen)
        calls_before = len(teacher.seen)
        new = len(set(ids) - seen_before)
        if tb.used + new > budget:
            with pytest.raises(TeacherBudgetExceeded) as err:
                tb.query(ids, loader)
            assert len(teacher.seen) == calls_before  # raised before calling
            assert f"budget={budget}" in str(err.value)
            assert f"used={tb.used}" in str(err.value)
            assert f"requested={new}" in str(err.value)
            continue
        out = tb.query(ids, loader)
        if not ids:
            continue
        assert out["logits"].shape == (len(ids), 3)
        np.testing.assert_array_equal(out["logits"], INPUTS[ids] * 2)
        # only the new distinct ids were sent, each exactly once, in batches
        assert sorted(teacher.seen[calls_before:]) == sorted(set(ids) - seen_before)
        assert all(b <= batch_size for b in teacher.batches)
    assert len(teacher.seen) == len(set(teacher.seen))  # a repeated id never calls again
    assert len(teacher.seen) <= budget
    assert tb.used == tb.new_calls == len(teacher.seen)


def test_inputs_aligned_with_ids_and_array_output():
    teacher = CountingTeacher(as_dict=False)
    tb = TeacherBudget(teacher, 5)
    ids = [4, 2, 4, 7]
    out = tb.query(ids, INPUTS[ids])
    np.testing.assert_array_equal(out, INPUTS[ids] * 2)
    assert tb.used == 3 and teacher.seen == [4, 2, 7]
    np.testing.assert_array_equal(tb.query([7, 2]), INPUTS[[7, 2]] * 2)  # cached, no inputs needed
    with pytest.raises(ValueError, match="not cached"):
        tb.query([9])


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
@pytest.mark.parametrize("as_dict", [True, False])
def test_save_load_rerun_makes_zero_calls(tmp_path, suffix, as_dict):
    meta = {"teacher": "t.safetensors", "view": "clean"}
    first = CountingTeacher(as_dict)
    tb = TeacherBudget(first, 10, metadata=meta)
    ids = [1, 5, 9, 5, 30]
    expected = tb.query(ids, loader)
    path = tmp_path / f"cache{suffix}"
    tb.save(path)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]

    second = CountingTeacher(as_dict)
    again = TeacherBudget(second, 10, metadata=meta)
    assert again.load(path) == 4
    out = again.query(ids, loader)
    assert second.seen == [] and again.new_calls == 0 and again.used == 4
    if as_dict:
        for k in expected:
            np.testing.assert_array_equal(out[k], expected[k])
            assert out[k].dtype == expected[k].dtype
    else:
        np.testing.assert_array_equal(out, expected)

    from_file = TeacherBudget.from_file(path, teacher=CountingTeacher(as_dict))
    assert from_file.budget == 10 and from_file.used == 4

    with pytest.raises(ValueError, match="was made for"):
        TeacherBudget(first, 10, metadata={"teacher": "other"}).load(path)
    with pytest.raises(TeacherBudgetExceeded):
        TeacherBudget(first, 3, metadata=meta).load(path)


def test_exceeded_leaves_state_unchanged():
    teacher = CountingTeacher()
    tb = TeacherBudget(teacher, 3)
    tb.query([0, 1], loader)
    with pytest.raises(TeacherBudgetExceeded):
        tb.query([1, 2, 3], loader)
    assert tb.used == 2 and teacher.seen == [0, 1]
    tb.query([2, 1], loader)  # fits exactly
    assert tb.used == 3 and tb.remaining == 0


# ----------------------------------------------------------------------------- argument errors
@pytest.mark.parametrize(
    ("budget", "error"),
    [
        (2.7, TypeError),
        (3.0, TypeError),
        (True, TypeError),
        (False, TypeError),
        ("3", TypeError),
        (-1, ValueError),
        (np.int64(-2), ValueError),
    ],
)
def test_budget_must_be_a_nonnegative_integer_or_none(budget, error):
    with pytest.raises(error, match=r"budget must be an integer"):
        TeacherBudget(CountingTeacher(), budget)


@pytest.mark.parametrize(
    ("batch_size", "error"), [(0, ValueError), (2.5, TypeError), (True, TypeError)]
)
def test_batch_size_must_be_a_positive_integer(batch_size, error):
    with pytest.raises(error, match=r"batch_size must be an integer"):
        TeacherBudget(CountingTeacher(), 3, batch_size=batch_size)


def test_valid_counts_are_accepted():
    assert TeacherBudget(CountingTeacher(), np.int64(3), batch_size=np.int32(2)).budget == 3
    assert TeacherBudget(CountingTeacher(), None).budget is None
    assert TeacherBudget(CountingTeacher(), 0).remaining == 0


def test_metadata_must_be_json_able_at_construction():
    with pytest.raises(TypeError, match="metadata must be a JSON-able dict"):
        TeacherBudget(CountingTeacher(), 3, metadata={"path": object()})


def test_missing_inputs_and_missing_teacher_name_the_argument():
    with pytest.raises(ValueError, match=r"no inputs were given: pass inputs="):
        TeacherBudget(CountingTeacher(), 3).query([1])
    with pytest.raises(RuntimeError, match=r"teacher=None"):
        TeacherBudget(None, 3).query([1], loader)


# ----------------------------------------------------------------------------- refused outputs
def _bad(kind, x):
    """One kind of teacher output that must be refused, for inputs ``x``."""
    good = {"logits": x * 2.0}
    if kind == "short":
        return {"logits": (x * 2.0)[:-1]}
    if kind == "long":
        return {"logits": np.concatenate([x, x]) * 2.0}
    if kind == "scalar":
        return {"logits": np.float32(1.0)}
    if kind in ("__ids__", "__meta__", "__output__"):
        return {**good, kind: np.arange(len(x))}
    if kind == "array":
        return x * 2.0
    if kind == "keys":
        return {"other": x}
    if kind == "raises":
        raise RuntimeError("teacher crashed")
    raise AssertionError(kind)


REFUSED = {
    "short": (ValueError, r"'logits' has shape \(1, 3\): expected 2 rows .*got 1 rows"),
    "long": (ValueError, r"'logits' has shape \(4, 3\): expected 2 rows .*got 4 rows"),
    "scalar": (ValueError, r"'logits' has shape \(\): expected 2 rows .*got a scalar"),
    "__ids__": (ValueError, r"output named '__ids__', a reserved name"),
    "__meta__": (ValueError, r"output named '__meta__', a reserved name"),
    "__output__": (ValueError, r"output named '__output__', a reserved name"),
    "array": (TypeError, r"always return an array, or always a dict"),
    "keys": (ValueError, r"keys changed"),
    "raises": (RuntimeError, r"teacher crashed"),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_refused_outputs_raise_and_the_spent_calls_are_charged(kind):
    """The second batch's outputs are refused: nothing of it is cached, but the
    teacher saw it, so its ids are charged to ``used`` (once, also on a retry)."""
    calls = []

    def teacher(x):
        calls.append(len(x))
        return {"logits": x * 2.0} if len(calls) == 1 else _bad(kind, x)

    tb = TeacherBudget(teacher, 5, batch_size=2)
    error, message = REFUSED[kind]
    with pytest.raises(error, match=message):
        tb.query([0, 1, 2, 3, 4], loader)
    assert calls == [2, 2]  # the third batch is never sent
    assert tb.used == 4 and tb.new_calls == 4 and tb.num_batches == 2 and tb.remaining == 1
    assert len(tb) == 2 and 1 in tb and 2 not in tb and 3 not in tb
    np.testing.assert_array_equal(tb.query([1, 0])["logits"], INPUTS[[1, 0]] * 2)
    # 4 is new: charged; 2 and 3 were already charged, so budget=5 still fits
    with pytest.raises(TeacherBudgetExceeded, match=r"used=4, requested=2"):
        tb.query([4, 5], loader)
    tb.teacher = lambda x: {"logits": x * 2.0}
    out = tb.query([3, 2, 4], loader)
    np.testing.assert_array_equal(out["logits"], INPUTS[[3, 2, 4]] * 2)
    assert tb.used == 5 and len(tb) == 5 and tb.new_calls == 7


def test_loader_failure_charges_nothing():
    def failing_loader(ids):
        raise OSError("disk gone")

    tb = TeacherBudget(CountingTeacher(), 3)
    with pytest.raises(OSError, match="disk gone"):
        tb.query([0, 1], failing_loader)
    assert tb.used == 0 and tb.new_calls == 0
    tb.query([0, 1, 2], loader)
    assert tb.used == 3


# ----------------------------------------------------------------------------- corrupted caches
class _Unpickled:
    """Unpickling this creates the file ``UNPICKLED`` names: loading must never do it."""

    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


def _write_case(case, path, tmp_path):
    """Writes a corrupted or foreign cache file of kind ``case`` to ``path``."""
    from safetensors.numpy import save_file

    ok = TeacherBudget(CountingTeacher(), 10)
    ok.query([1, 2, 3], loader)
    if case == "garbage":
        path.write_bytes(b"\x00\x01 this is not a cache " * 10)
    elif case == "truncated":
        ok.save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "pickle":
        import pickle

        _Unpickled.path = str(tmp_path / "UNPICKLED")
        path.write_bytes(pickle.dumps(_Unpickled()))
    elif case == "npy":
        with open(path, "wb") as f:
            np.save(f, np.arange(3))
    elif case == "object_member":
        with open(path, "wb") as f:
            np.savez(f, __ids__=np.arange(2), x=np.array([None, _Unpickled()], dtype=object))
    elif case == "foreign":  # someone else's weights
        if path.suffix == ".npz":
            with open(path, "wb") as f:
                np.savez(f, weight=np.ones((2, 2), np.float32))
        else:
            save_file({"weight": np.ones((2, 2), np.float32)}, str(path))
    elif case == "bad_json":
        with open(path, "wb") as f:
            np.savez(f, __ids__=np.arange(2), __meta__=np.array("{not json"))
    elif case in ("no_ids", "row_mismatch", "float_ids"):
        meta = {"format": "1", "budget": "10", "array_output": "false", "metadata": "{}"}
        logits = np.ones((3, 3), np.float32)
        tensors = {
            "no_ids": {"logits": logits},
            "row_mismatch": {"logits": logits, "__ids__": np.arange(2)},
            "float_ids": {"logits": logits, "__ids__": np.arange(3.0)},
        }[case]
        if path.suffix == ".npz":
            with open(path, "wb") as f:
                np.savez(f, **tensors, __meta__=np.array(json.dumps(meta)))
        else:
            save_file(tensors, str(path), metadata=meta)
    elif case == "other_keys":  # a cache of another teacher's outputs
        other = TeacherBudget(lambda x: {"probs": x}, 10)
        other.query([5], loader)
        other.save(path)
    else:
        raise AssertionError(case)


CORRUPT = {
    "garbage": r"not a valid (safetensors|\.npz) file",
    "truncated": r"not a valid (safetensors|\.npz) file|unreadable member",
    "pickle": r"not a valid \.npz file",
    "npy": r"a single \.npy array",
    "object_member": r"unreadable member",
    "foreign": r"has no '__meta__' entry|its format is None",
    "bad_json": r"'__meta__' entry is not valid JSON",
    "no_ids": r"has no '__ids__' entry",
    "row_mismatch": r"output 'logits' has shape \(3, 3\), expected 2 rows",
    "float_ids": r"'__ids__' must be 1-D integers",
    "other_keys": r"does not fit this TeacherBudget: teacher output keys changed",
}
NPZ_ONLY = {"pickle", "npy", "object_member", "bad_json"}


@pytest.mark.parametrize(
    ("case", "suffix"),
    [
        (case, suffix)
        for case in sorted(CORRUPT)
        for suffix in (".safetensors", ".npz")
        if suffix == ".npz" or case not in NPZ_ONLY
    ],
)
def test_corrupted_or_foreign_cache_names_the_file_and_the_problem(tmp_path, case, suffix):
    path = tmp_path / f"cache{suffix}"
    _write_case(case, path, tmp_path)
    tb = TeacherBudget(CountingTeacher(), 10)
    tb.query([1, 2], loader)
    with pytest.raises(ValueError, match=CORRUPT[case]) as err:
        tb.load(path)
    assert repr(str(path)) in str(err.value)
    assert tb.used == 2 and len(tb) == 2  # unchanged
    if case != "other_keys":
        with pytest.raises(ValueError, match=CORRUPT[case]) as err:
            TeacherBudget.from_file(path)
        assert repr(str(path)) in str(err.value)
    assert not (tmp_path / "UNPICKLED").exists()  # nothing was unpickled


def test_saved_outputs_keep_their_ids_after_a_refused_batch(tmp_path):
    """A refused batch leaves no row behind: a save/load round trip maps every id
    to its own outputs."""
    calls = []

    def teacher(x):
        calls.append(1)
        return {"logits": (x * 2.0)[: 1 if len(calls) == 2 else None]}

    tb = TeacherBudget(teacher, 10, batch_size=2)
    with pytest.raises(ValueError, match="got 1 rows"):
        tb.query([7, 3, 9, 4], loader)
    tb.query([9, 4, 11], loader)
    tb.save(tmp_path / "c.npz")
    again = TeacherBudget(None, 10)
    assert again.load(tmp_path / "c.npz") == 5
    ids = [11, 4, 9, 3, 7]
    np.testing.assert_array_equal(again.query(ids)["logits"], INPUTS[ids] * 2)


def test_torch_teacher_must_return_tensors():
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "torch":
        pytest.skip("ckd_torch is imported in the torch backend session only")
    torch = pytest.importorskip("torch")
    from ckd_torch import TorchTeacherBudget

    tb = TorchTeacherBudget(lambda x: {"logits": x.numpy()}, 4)
    with pytest.raises(TypeError, match=r"a tensor, or a dict of tensors; output 'logits' is"):
        tb.query_tensors([0, 1], lambda ids: torch.from_numpy(INPUTS[ids]))
    assert tb.used == 2 and len(tb) == 0  # the teacher ran: charged


def test_budget_pickles_and_deep_copies_with_its_cache():
    import copy
    import pickle

    cache_only = TeacherBudget(None, 5)
    assert pickle.loads(pickle.dumps(cache_only)).budget == 5
    tb = TeacherBudget(CountingTeacher(), 6, batch_size=2)
    tb.query([3, 1, 3], loader)
    for clone in (copy.deepcopy(tb), pickle.loads(pickle.dumps(tb))):
        assert clone.used == 2 and list(clone.ids) == [3, 1]
        np.testing.assert_array_equal(clone.get([1])["logits"], tb.get([1])["logits"])
        clone.query([7], loader)  # fresh locks: the copy queries on its own
        assert clone.used == 3 and tb.used == 2


def test_uint64_id_beyond_int64_does_not_alias_minus_one():
    tb = TeacherBudget(CountingTeacher(), 5)
    tb.query(np.array([-1]), INPUTS[:1])
    huge = np.array([2**64 - 1], dtype=np.uint64)  # wraps to -1 when cast to int64
    for call in (lambda: tb.query(huge, INPUTS[1:2]), lambda: tb.get(huge), lambda: tb.check(huge)):
        with pytest.raises(ValueError, match="fit in int64"):
            call()
    with pytest.raises(ValueError, match="fit in int64"):
        tb.query([2**63], INPUTS[1:2])
    assert tb.used == 1


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_keeps_the_entries_another_process_saved(tmp_path, suffix):
    path = tmp_path / f"cache{suffix}"
    first, second = TeacherBudget(CountingTeacher(), 10), TeacherBudget(CountingTeacher(), 10)
    first.query([0, 1], loader)
    second.query([1, 2, 3], loader)
    first.save(path)
    second.save(path)  # a plain overwrite would drop id 0
    merged = TeacherBudget.from_file(path)
    assert sorted(merged.ids.tolist()) == [0, 1, 2, 3]
    np.testing.assert_array_equal(merged.get([0, 3])["logits"], INPUTS[[0, 3]] * 2)
    assert len(second) == 3  # saving to a path other than shared_file leaves memory as is
    other = TeacherBudget(lambda x: {"probs": np.asarray(x)}, 10)
    other.query([9], loader)
    with pytest.raises(ValueError, match="cannot merge into cache"):
        other.save(path)


def test_shared_file_holds_one_budget_over_every_object(tmp_path):
    path = tmp_path / "shared.npz"
    teachers = CountingTeacher(), CountingTeacher()
    first, second = (TeacherBudget(t, 3, shared_file=path) for t in teachers)
    first.query([0, 1], loader)
    np.testing.assert_array_equal(second.query([1, 0], loader)["logits"], INPUTS[[1, 0]] * 2)
    assert teachers[1].seen == []  # read from the file, not sent again
    with pytest.raises(TeacherBudgetExceeded, match="used=2, requested=2"):
        second.query([2, 3], loader)
    second.query([2], loader)
    with pytest.raises(TeacherBudgetExceeded):
        first.query([4], loader)  # the file holds 3 ids: the shared budget is spent
    assert sorted(teachers[0].seen + teachers[1].seen) == [0, 1, 2]


class _LoggingTeacher:
    """Appends each id it is sent to a log file shared by processes."""

    def __init__(self, log: str) -> None:
        self.log = log

    def __call__(self, x):
        import time

        with open(self.log, "a") as f:
            f.write("".join(f"{int(v) // 3}\n" for v in np.asarray(x)[:, 0]))
        time.sleep(0.005)  # widens the window in which two processes race
        return {"logits": np.asarray(x) * 2.0}


def _share_cache(path: str, log: str, budget, ids: list[int], barrier) -> None:
    tb = TeacherBudget(_LoggingTeacher(log), budget, batch_size=3, shared_file=path)
    barrier.wait()
    for start in range(0, len(ids), 6):
        try:
            tb.query(ids[start : start + 6], loader)
        except TeacherBudgetExceeded:
            return


@pytest.mark.parametrize(("budget", "ids_a", "ids_b"), [(None, 30, 30), (12, 15, 15)])
def test_two_processes_share_one_cache_file_and_budget(tmp_path, budget, ids_a, ids_b):
    import multiprocessing

    # Spawned, not forked: once JAX (or TensorFlow, torch) has started its
    # threads, fork() may deadlock the child (JAX warns, an error here).
    context = multiprocessing.get_context("spawn")
    path, log = str(tmp_path / "shared.npz"), str(tmp_path / "calls.log")
    barrier = context.Barrier(2)
    ranges = (list(range(ids_a)), list(range(POOL - ids_b, POOL)))
    workers = [
        context.Process(target=_share_cache, args=(path, log, budget, ids, barrier))
        for ids in ranges
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    with open(log) as f:
        sent = [int(line) for line in f]
    assert len(sent) == len(set(sent))  # no id sent twice over the two processes
    saved = TeacherBudget.from_file(path).ids.tolist()
    assert sorted(saved) == sorted(sent)  # no process dropped the other's entries
    if budget is None:
        assert sorted(sent) == sorted(set(ranges[0]) | set(ranges[1]))
    else:
        assert len(sent) <= budget
