"""Import a RepDistiller/mdistiller CIFAR teacher checkpoint as this package's teacher.

RepDistiller's ``train_teacher.py`` saves ``{'model': state_dict, 'epoch', 'optimizer',
...}`` (its ``*_last.pth`` also an ``argparse.Namespace`` ``opt``); mdistiller ships the
same files. ``import_teacher`` reads one with ``torch.load(weights_only=True)`` (the
only class allowed besides tensors is ``argparse.Namespace``; nothing else is
unpickled), renames its keys onto ``models.create_model(arch)``, requires every tensor
to be used and every shape to match, and writes the usual safetensors teacher plus JSON
(``teacher_files.save_teacher``), recording the source file, its sha256 and the
``repdistiller`` recipe's fields (``recipe: "repdistiller"``, 240 epochs, its lr steps,
batch 64, fp32; :data:`teacher_spec.RECIPES`), as ``train-teacher --recipe repdistiller``
records them.

Key names coincide with RepDistiller's ``models/`` for the ResNets and VGGs; the WRNs
differ only in ``blockN.layer.I`` (ours ``blockN.I``) and ``convShortcut`` (ours
``conv_shortcut``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cli_options import IMPORT_DATASETS
from .data import ImageDataset
from .datasets import dataset_spec
from .evaluation import evaluate
from .models import MODEL_NAMES, create_model
from .teacher_files import FORMAT_VERSION, save_teacher
from .teacher_spec import TeacherSpec

__all__ = ["import_teacher", "read_checkpoint", "repdistiller_key"]

_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(block\d+)\.layer\.(\d+)\."), r"\1.\2."),
    (re.compile(r"\.convShortcut\."), ".conv_shortcut."),
)


def repdistiller_key(name: str) -> str:
    """This package's name of RepDistiller state-dict entry ``name``."""
    for pattern, replacement in _RENAMES:
        name = pattern.sub(replacement, name)
    return name


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in a ``{'model': state_dict, ...}`` checkpoint or a bare state dict,
    read without unpickling anything but tensors, containers and ``argparse.Namespace``,
    and the sha256 of the bytes read."""
    blob = Path(path).read_bytes()
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(
            f"{path}: refused to unpickle a non-tensor object ({first}); export the "
            "state dict alone with torch.save(model.state_dict(), PATH)"
        ) from None
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: neither a state dict nor a dict with a 'model' state dict")
    return {str(k): v for k, v in state.items()}, hashlib.sha256(blob).hexdigest()


def _matched_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` renamed onto ``model``; a ``ValueError`` listing every missing,
    unexpected and mismatched key unless each tensor fills one entry of the same shape."""
    renamed = {repdistiller_key(k): v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))
    mismatched = [
        f"{k} {tuple(renamed[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in renamed and renamed[k].shape != v.shape
    ]
    problems = [
        f"{what}: {', '.join(keys)}"
        for what, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch (checkpoint vs model)", mismatched),
        )
        if keys
    ]
    if problems:
        raise ValueError("checkpoint does not fit the model: " + "; ".join(problems))
    return renamed


def import_teacher(
    arch: str,
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dataset: str = "cifar100",
    data: Callable[[], ImageDataset | None] | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Convert ``checkpoint`` to ``<out_dir>/<arch>_<dataset>_repdistiller_<sha12>``
    (safetensors + JSON); returns the ``.safetensors`` path.

    ``data`` is called once the checkpoint fits the model; ``test_accuracy`` is measured
    on the data set it returns (``dataset``), else recorded as None.
    """
    if arch not in MODEL_NAMES:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(MODEL_NAMES)}")
    if dataset not in IMPORT_DATASETS:
        raise ValueError(
            f"dataset {dataset!r}: RepDistiller teachers are for {', '.join(IMPORT_DATASETS)}"
        )
    source = Path(checkpoint)
    num_classes = dataset_spec(dataset).classes
    model = create_model(arch, num_classes)
    state, digest = read_checkpoint(source)
    model.load_state_dict(_matched_state(model, state), strict=True)
    model.eval()
    loaded = data() if data is not None else None
    accuracy = None
    if loaded is not None:
        if loaded.name != dataset:
            raise ValueError(f"data set {loaded.name!r} given to measure a {dataset!r} teacher")
        accuracy = evaluate(model.to(device), loaded, device)
    recipe = TeacherSpec(arch, dataset, recipe="repdistiller")
    meta: dict[str, Any] = {
        "format": FORMAT_VERSION,
        **recipe.metadata(recipe.batch_size),
        "seed": None,  # RepDistiller's files do not say
        "num_classes": num_classes,
        "in_channels": 3,
        "split_seed": None,
        "source_file": source.name,
        "source_sha256": digest,
        "test_accuracy": accuracy,
        "torch": torch.__version__,
    }
    return save_teacher(model, out_dir, f"{arch}_{dataset}_repdistiller_{digest[:12]}", meta)
