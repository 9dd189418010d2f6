"""Shared setup of the reference experiments' tests.

The repository root (``reference_experiments``) and this folder (the faithful
RepDistiller copies in ``repdistiller_models.py``) go on ``sys.path``. The
experiments are PyTorch pipelines with the ``experiments`` extra: outside a
torch session (``KERAS_BACKEND=torch``) or without that extra, the folder is
not collected, with one reason printed in the header, instead of a skip line
repeated in every module.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for folder in (ROOT, HERE):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

#: what every test here may import (torch, keras and the ``experiments`` extra)
REQUIRED = ("torch", "keras", "safetensors", "sklearn", "matplotlib", "PIL", "tqdm")


def _why_not_collected() -> str | None:
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        return f"missing {', '.join(missing)} (pip install -e '.[test,experiments]' torch)"
    if os.environ.get("KERAS_BACKEND") != "torch":
        return "they run in the torch session (KERAS_BACKEND=torch)"
    return None


SKIPPED = _why_not_collected()
collect_ignore_glob = ["test_*.py"] if SKIPPED else []


def pytest_report_header(config: pytest.Config) -> str | None:
    if SKIPPED:
        return f"tests/experiments not collected: {SKIPPED}"
    return None


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's digits as an ``ImageDataset`` (the tests' small real data set)."""
    from reference_experiments.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="module")
def teacher():
    """An untrained, seeded ``digits_cnn`` teacher in eval mode, with empty metadata."""
    import torch

    from reference_experiments.models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return create_model("digits_cnn", 10, 1).eval(), {}
