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

__all__ = [
    "GRID_TEACHER_KEYS",
    "SEED_MAX",
    "TeacherSpec",
    "add_teacher_arguments",
    "int_in",
]


SEED_MAX = 2**32 - 1


def _opt(
    help: str,
    *,
    grid: str | None = "",
    required: bool = False,
    low: float | None = None,
    high: float | None = None,
) -> dict[str, Any]:
    """Field metadata: ``help`` for the CLI, ``grid``: its key in a grid's teacher table
    (``""``: the field's name, ``None``: not a grid key), ``required`` on the CLI,
    ``low``/``high``: the value's bounds (checked by :meth:`TeacherSpec.validate` and by
    the CLI's option types, so both give the same limits)."""
    return {"help": help, "grid": grid, "required": required, "low": low, "high": high}


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher's training: model, data, schedule (per-step cosine after a linear
    warm-up), optimiser (SGD, the preset's momentum and weight decay) and seed."""

    arch: str = field(metadata=_opt("teacher model", required=True))
    dataset: str = field(metadata=_opt("data set", grid=None, required=True))
    epochs: int = field(metadata=_opt("training epochs", grid="train_epochs", required=True, low=1))
    seed: int = field(
        default=0, metadata=_opt("seed of the init and the data order", low=0, high=SEED_MAX)
    )
    split_seed: int = field(
        default=0,
        metadata=_opt(
            "seed of the train/test split for cars64/digits", grid=None, low=0, high=SEED_MAX
        ),
    )
    batch_size: int = field(default=128, metadata=_opt("images per step", low=1))
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
        for f in fields(self):
            low, high, value = f.metadata["low"], f.metadata["high"], getattr(self, f.name)
            if (low is not None and value < low) or (high is not None and value > high):
                bound = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise ValueError(f"{f.name} must be {bound}, got {value!r}")
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


def int_in(low: int, high: int | None = None) -> Any:
    """An argparse type: an integer in ``[low, high]`` (error: ``must be an integer ...``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text!r}")
        return value

    return parse


def add_teacher_arguments(parser: argparse.ArgumentParser, *, shared: bool = True) -> None:
    """The ``train-teacher`` options, one per :class:`TeacherSpec` field (integers checked
    against the field's bounds), plus ``--out`` and ``--no-progress``; ``shared``: also
    ``--preset``, ``--device`` and ``--data-dir`` (leave them out where the caller declares
    them, as ``cli_options.add_train_teacher_arguments`` does). Model and data-set names are
    checked after parsing (one-line ``unknown ...`` errors, as for ``student``)."""
    for f in fields(TeacherSpec):
        if f.name == "preset" and not shared:
            continue
        kind: Any = {"int": int, "float": float}.get(str(f.type), str)
        if kind is int and f.metadata["low"] is not None:
            kind = int_in(f.metadata["low"], f.metadata["high"])
        required = f.metadata["required"]
        help_text = f.metadata["help"]
        if f.name == "preset":
            help_text += " (" + ", ".join(PRESETS) + ")"
        if not required:
            help_text += f" [default: {f.default}]"
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=kind,
            required=required,
            default=None if required else f.default,
            metavar=f.name.upper(),
            help=help_text,
        )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--no-progress", action="store_true")
    if shared:
        parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, ...")
        parser.add_argument("--data-dir", default=None, help="data root (default: $CKD_DATA_DIR)")
