"""A teacher cut mid-training (killed, or stopped for its deadline) resumes from its
checkpoint and ends with the same bytes as one uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

from reference_experiments import teacher
from reference_experiments.data import load_dataset
from reference_experiments.teacher_spec import TeacherSpec

torch.set_num_threads(1)

SPEC = TeacherSpec("digits_cnn", "digits", epochs=3)


class Killed(Exception):
    """Stands for the process being killed."""


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def uninterrupted(digits, tmp_path_factory):
    lines: list[str] = []
    out = tmp_path_factory.mktemp("whole")
    path = teacher.train_teacher(SPEC, digits, out_dir=out, progress=False, log=lines.append)
    return path, lines


def test_one_log_line_per_epoch(uninterrupted):
    _, lines = uninterrupted
    assert len(lines) == 3
    for epoch, line in enumerate(lines, 1):
        assert f"epoch {epoch}/3 loss " in line
        assert all(word in line for word in ("train_acc", " lr ", " s"))


def test_resume_after_a_kill_is_bit_identical(digits, uninterrupted, tmp_path):
    def kill_after_first_epoch(line: str) -> None:
        if "epoch 1/3" in line:
            raise Killed

    with pytest.raises(Killed):
        teacher.train_teacher(
            SPEC, digits, out_dir=tmp_path, progress=False, log=kill_after_first_epoch
        )
    state = json.loads((tmp_path / f"{uninterrupted[0].stem}.resume.json").read_text())
    assert (state["epochs_done"], state["step"]) == (1, 1 * SPEC.steps_per_epoch(1438))
    lines: list[str] = []
    path = teacher.train_teacher(SPEC, digits, out_dir=tmp_path, progress=False, log=lines.append)
    assert [line.split(" loss")[0].rsplit(" ", 1)[1] for line in lines] == ["2/3", "3/3"]
    assert path.read_bytes() == uninterrupted[0].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [path.name, path.with_suffix(".json").name]
    )  # the resume checkpoint is gone


class FakeClock:
    """``perf_counter`` advances 5 s a call (an epoch measures 10 s: before, after
    training, after the checkpoint); ``monotonic`` returns the given times in turn."""

    def __init__(self, monotonic: list[float]) -> None:
        self.now, self.times = 0.0, list(monotonic)

    def perf_counter(self) -> float:
        self.now += 5.0
        return self.now

    def monotonic(self) -> float:
        return self.times.pop(0)


def test_deadline_stops_before_an_epoch_that_cannot_finish(
    digits, uninterrupted, tmp_path, monkeypatch
):
    # before epoch 1: no epoch timed; before epoch 2: 85 + 10 <= 100; before 3: 95 + 10 > 100
    monkeypatch.setattr(teacher, "time", FakeClock([0.0, 85.0, 95.0]))
    with pytest.raises(teacher.TeacherNotFinished) as stopped:
        teacher.train_teacher(SPEC, digits, out_dir=tmp_path, progress=False, deadline=100.0)
    assert (stopped.value.epochs_done, stopped.value.epochs) == (2, 3)
    name = uninterrupted[0].stem
    assert json.loads((tmp_path / f"{name}.resume.json").read_text())["epochs_done"] == 2
    # resumed: before its first epoch, the mean of the 2 epochs trained (5 s each) counts
    monkeypatch.setattr(teacher, "time", FakeClock([96.0]))
    with pytest.raises(teacher.TeacherNotFinished) as late:
        teacher.train_teacher(SPEC, digits, out_dir=tmp_path, progress=False, deadline=100.0)
    assert late.value.epochs_done == 2
    monkeypatch.undo()
    other = TeacherSpec("digits_cnn", "digits", epochs=3, lr=0.1)  # same file name
    with pytest.raises(ValueError, match="another teacher spec"):
        teacher.train_teacher(other, digits, out_dir=tmp_path, progress=False)
    path = teacher.train_teacher(SPEC, digits, out_dir=tmp_path, progress=False)
    assert path.read_bytes() == uninterrupted[0].read_bytes()
