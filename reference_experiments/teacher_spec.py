"""How a teacher is trained, defined once: :class:`TeacherSpec`.

Every field carries its role in ``metadata`` and the rest is derived from it:
the ``train-teacher`` options (:func:`add_teacher_arguments` /
:meth:`TeacherSpec.from_arguments`), the keys of a grid's ``[teachers.NAME]``
table (:data:`GRID_TEACHER_KEYS`, :meth:`TeacherSpec.from_grid`) and the
teacher's metadata (:meth:`TeacherSpec.metadata`). The optimiser's momentum and
weight decay come from the ``preset``. Importing this module does not import
torch (the CLI's ``--help`` stays fast).

>>> spec = TeacherSpec.from_grid({"arch": "digits_cnn", "train_epochs": 15}, "digits")
>>> spec.epochs, spec.seed, spec.momentum, spec.weight_decay
(15, 0, 0.9, 0.0005)
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .config import PRESETS, Preset

__all__ = ["GRID_TEACHER_KEYS", "TeacherSpec", "add_teacher_arguments"]


def _opt(help: str, *, grid: str | None = "", required: bool = False) -> dict[str, Any]:
    """Field metadata: ``help`` for the CLI, ``grid``: its key in a grid's teacher table
    (``""``: the field's name, ``None``: not a grid key), ``required`` on the CLI."""
    return {"help": help, "grid": grid, "required": required}


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher's training: model, data, schedule (per-step cosine after a linear
    warm-up), optimiser (SGD, the preset's momentum and weight decay) and seed."""

    arch: str = field(metadata=_opt("teacher model", required=True))
    dataset: str = field(metadata=_opt("data set", grid=None, required=True))
    epochs: int = field(metadata=_opt("training epochs", grid="train_epochs", required=True))
    seed: int = field(default=0, metadata=_opt("seed of the init and the data order"))
    split_seed: int = field(
        default=0, metadata=_opt("seed of the train/test split for cars64/digits", grid=None)
    )
    batch_size: int = field(default=128, metadata=_opt("images per step"))
    lr: float = field(default=0.05, metadata=_opt("peak learning rate"))
    label_smoothing: float = field(default=0.0, metadata=_opt("cross-entropy label smoothing"))
    warmup_epochs: float = field(
        default=0.0, metadata=_opt("linear lr warm-up (Nesterov momentum when > 0)")
    )
    preset: str = field(
        default="paper", metadata=_opt("preset whose momentum and weight decay SGD uses")
    )

    @property
    def optimiser(self) -> Preset:
        return PRESETS[self.preset]

    @property
    def momentum(self) -> float:
        return self.optimiser.momentum

    @property
    def weight_decay(self) -> float:
        return self.optimiser.weight_decay

    def validate(self) -> TeacherSpec:
        if self.epochs < 0:
            raise ValueError("epochs must be >= 0")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        return self

    @classmethod
    def from_arguments(cls, ns: argparse.Namespace) -> TeacherSpec:
        """The spec from :func:`add_teacher_arguments`' options."""
        given = {f.name: getattr(ns, f.name, None) for f in fields(cls)}
        return cls(**{k: v for k, v in given.items() if v is not None}).validate()

    @classmethod
    def from_grid(cls, table: Mapping[str, Any], dataset: str) -> TeacherSpec:
        """The spec of a grid's ``[teachers.NAME]`` table (``path`` tables have none)."""
        unknown = set(table) - set(GRID_TEACHER_KEYS) - {"path"}
        if unknown:
            raise ValueError(
                f"teacher table has unknown keys {sorted(unknown)}; "
                f"known: {sorted(GRID_TEACHER_KEYS)} or path"
            )
        values = {GRID_TEACHER_KEYS[k]: v for k, v in table.items() if k in GRID_TEACHER_KEYS}
        return cls(dataset=dataset, **values).validate()

    def metadata(self, batch_size: int) -> dict[str, Any]:
        """The training fields of the teacher's JSON (``batch_size``: the one used)."""
        return {
            "arch": self.arch,
            "dataset": self.dataset,
            "epochs": int(self.epochs),
            "seed": int(self.seed),
            "batch_size": batch_size,
            "lr": float(self.lr),
            "schedule": "cosine-per-step",
            "label_smoothing": float(self.label_smoothing),
            "warmup_epochs": float(self.warmup_epochs),
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
        }


#: grid teacher-table key -> :class:`TeacherSpec` field
GRID_TEACHER_KEYS: dict[str, str] = {
    (f.metadata["grid"] or f.name): f.name
    for f in fields(TeacherSpec)
    if f.metadata["grid"] is not None
}


def add_teacher_arguments(parser: argparse.ArgumentParser, *, shared: bool = True) -> None:
    """The ``train-teacher`` options, one per :class:`TeacherSpec` field, plus ``--out`` and
    ``--no-progress``; ``shared``: also ``--device`` and ``--data-dir`` (leave them out
    where a parent parser declares them)."""
    from .datasets import dataset_names  # numpy, not torch

    choices = {"dataset": dataset_names(), "preset": list(PRESETS)}
    for f in fields(TeacherSpec):
        if f.name == "preset" and not shared:
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            required=f.metadata["required"],
            default=None if f.metadata["required"] else f.default,
            choices=choices.get(f.name),
            help=f.metadata["help"],
        )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--no-progress", action="store_true")
    if shared:
        parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, ...")
        parser.add_argument("--data-dir", default=None, help="data root (default: $CKD_DATA_DIR)")
