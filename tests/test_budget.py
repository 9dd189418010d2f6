"""TeacherBudget: distinct-call counting, budget enforcement, cache persistence."""

from __future__ import annotations

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
