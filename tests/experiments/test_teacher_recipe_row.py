"""Every student row names its teacher's recipe (``teacher_recipe``)."""

from __future__ import annotations

import pytest
import torch

from reference_experiments import engine
from reference_experiments.config import RunConfig
from reference_experiments.data import load_dataset
from reference_experiments.teacher import load_teacher, train_teacher
from reference_experiments.teacher_spec import TeacherSpec

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _row(digits, teacher):
    cfg = RunConfig(
        dataset="digits",
        student_arch="digits_mlp",
        method="kd",
        budget=100,
        preset="fast",
        max_epochs=1,
        device="cpu",
    )
    ((_, row),) = engine.train([cfg], dataset=digits, teacher=teacher)
    return row


def test_student_row_records_the_teacher_recipe(digits, tmp_path):
    spec = TeacherSpec("digits_mlp", "digits", epochs=1, recipe="repdistiller")
    path = train_teacher(spec, digits, out_dir=tmp_path, progress=False)
    assert path.name == "digits_mlp_digits_split0_ep1_seed0_repdistiller.safetensors"
    row = _row(digits, load_teacher(path))
    assert row.teacher_recipe == "repdistiller"
    assert _row(digits, (load_teacher(path)[0], {})).teacher_recipe is None
