"""How a teacher is trained, defined once: :class:`TeacherSpec` and its :data:`RECIPES`.

Every field carries its role in ``metadata`` and the rest is derived from it:
the ``train-teacher`` options (:func:`add_teacher_arguments` /
:meth:`TeacherSpec.from_arguments`), the keys of a grid's ``[teachers.NAME]``
table (:data:`GRID_TEACHER_KEYS`, :meth:`TeacherSpec.from_grid`) and the
teacher's metadata (:meth:`TeacherSpec.metadata`). A *recipe* gives every value
the user leaves out (explicit values win): ``fast`` (the default; a per-step
cosine, float32, epochs required) or ``repdistiller`` (RepDistiller's
``train_teacher.py``: 240 epochs, lr 0.05 x0.1 at epochs 150/180/210, batch 64,
float32). The optimiser's momentum and weight decay come from the ``preset``.
Importing this module does not import torch (the CLI's ``--help`` stays fast).

>>> spec = TeacherSpec.from_grid({"arch": "digits_cnn", "train_epochs": 15}, "digits")
>>> spec.epochs, spec.seed, spec.momentum, spec.weight_decay, spec.precision
(15, 0, 0.9, 0.0005, 'fp32')
>>> TeacherSpec("vgg13", "cifar100", recipe="repdistiller").lr_milestones
(150, 180, 210)
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .config import PRESETS, Preset

__all__ = [
    "FROM_RECIPE",
    "GRID_TEACHER_KEYS",
    "PRECISION_NAMES",
    "RECIPES",
    "SEED_MAX",
    "Recipe",
    "TeacherSpec",
    "add_teacher_arguments",
    "int_in",
    "teacher_seconds",
]


SEED_MAX = 2**32 - 1
#: the compute precisions (``devices.PRECISIONS``' keys, named here without torch)
PRECISION_NAMES: tuple[str, ...] = ("fp32", "bf16", "fp16")
#: a field's default meaning "the recipe's value"
FROM_RECIPE: Any = None


@dataclass(frozen=True)
class Recipe:
    """The defaults of a teacher's training. ``milestones``: epochs (of ``epochs``)
    after which the lr is multiplied by ``decay`` (a step schedule); empty: a per-step
    cosine from ``lr`` to 0. With other ``epochs`` the milestones scale with them."""

    epochs: int | None
    batch_size: int
    lr: float
    label_smoothing: float
    warmup_epochs: float
    precision: str
    milestones: tuple[int, ...] = ()
    decay: float = 0.1


RECIPES: dict[str, Recipe] = {
    "fast": Recipe(
        epochs=None,
        batch_size=128,
        lr=0.05,
        label_smoothing=0.0,
        warmup_epochs=0.0,
        precision="fp32",
    ),
    "repdistiller": Recipe(
        epochs=240,
        batch_size=64,
        lr=0.05,
        label_smoothing=0.0,
        warmup_epochs=0.0,
        precision="fp32",
        milestones=(150, 180, 210),
    ),
}


def _opt(
    help: str,
    *,
    grid: str | None = "",
    required: bool = False,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Field metadata: ``help`` for the CLI, ``grid``: its key in a grid's teacher table
    (``""``: the field's name, ``None``: not a grid key), ``required`` on the CLI,
    ``low``/``high``: the value's bounds, ``choices``: its allowed values (checked by
    :meth:`TeacherSpec.validate` and by the CLI, so both give the same limits)."""
    return {
        "help": help,
        "grid": grid,
        "required": required,
        "low": low,
        "high": high,
        "choices": choices,
    }


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher's training: model, data, recipe, schedule (a per-step cosine or the
    recipe's lr steps, after a linear warm-up), optimiser (SGD, the preset's momentum
    and weight decay), precision and seed. Fields left at :data:`FROM_RECIPE` take the
    recipe's value."""

    arch: str = field(metadata=_opt("teacher model", required=True))
    dataset: str = field(metadata=_opt("data set", grid=None, required=True))
    epochs: int = field(
        default=FROM_RECIPE, metadata=_opt("training epochs", grid="train_epochs", low=1)
    )
    seed: int = field(
        default=0, metadata=_opt("seed of the init and the data order", low=0, high=SEED_MAX)
    )
    split_seed: int = field(
        default=0,
        metadata=_opt(
            "seed of the train/test split for cars64/digits", grid=None, low=0, high=SEED_MAX
        ),
    )
    batch_size: int = field(default=FROM_RECIPE, metadata=_opt("images per step", low=1))
    lr: float = field(default=FROM_RECIPE, metadata=_opt("peak learning rate"))
    label_smoothing: float = field(
        default=FROM_RECIPE, metadata=_opt("cross-entropy label smoothing")
    )
    warmup_epochs: float = field(default=FROM_RECIPE, metadata=_opt("linear lr warm-up"))
    preset: str = field(
        default="paper", metadata=_opt("preset whose momentum and weight decay SGD uses")
    )
    recipe: str = field(
        default="fast",
        metadata=_opt("defaults of every value not given", choices=tuple(RECIPES)),
    )
    precision: str = field(
        default=FROM_RECIPE,
        metadata=_opt("autocast precision on CUDA (the CPU: fp32)", choices=PRECISION_NAMES),
    )

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose from {', '.join(RECIPES)}")
        defaults = RECIPES[self.recipe]
        for f in fields(self):
            if getattr(self, f.name) is FROM_RECIPE and hasattr(defaults, f.name):
                object.__setattr__(self, f.name, getattr(defaults, f.name))
        if self.epochs is None:
            raise ValueError(f"epochs required: recipe {self.recipe!r} has no default")

    @property
    def optimiser(self) -> Preset:
        return PRESETS[self.preset]

    @property
    def momentum(self) -> float:
        return self.optimiser.momentum

    @property
    def weight_decay(self) -> float:
        return self.optimiser.weight_decay

    @property
    def lr_milestones(self) -> tuple[int, ...]:
        """Epochs after which the lr steps down: the recipe's, scaled to ``epochs``."""
        recipe = RECIPES[self.recipe]
        scale = self.epochs / (recipe.epochs or self.epochs)
        return tuple(round(m * scale) for m in recipe.milestones)

    def batch_for(self, n_train: int) -> int:
        """The batch size used on ``n_train`` images (at most all of them)."""
        return max(1, min(self.batch_size, n_train))

    def steps_per_epoch(self, n_train: int) -> int:
        """Steps of one epoch (the incomplete last batch is dropped)."""
        return n_train // self.batch_for(n_train)

    def lr_factor(self, step: int, steps_per_epoch: int) -> float:
        """The lr at ``step`` over ``lr``: linear over the warm-up's steps, then the
        recipe's steps (x ``decay`` after each milestone epoch, RepDistiller's
        ``adjust_learning_rate``) or a per-step cosine to 0 at the last step."""
        warm = int(self.warmup_epochs * steps_per_epoch)
        if step < warm:
            return (step + 1) / warm
        milestones = self.lr_milestones
        if milestones:
            epoch = step // max(1, steps_per_epoch)
            return RECIPES[self.recipe].decay ** sum(epoch >= m for m in milestones)
        total = max(1, self.epochs * steps_per_epoch)
        done = min(step - warm, total - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * done))

    def validate(self) -> TeacherSpec:
        for f in fields(self):
            low, high, value = f.metadata["low"], f.metadata["high"], getattr(self, f.name)
            if (low is not None and value < low) or (high is not None and value > high):
                bound = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise ValueError(f"{f.name} must be {bound}, got {value!r}")
            choices = f.metadata["choices"]
            if choices is not None and value not in choices:
                raise ValueError(f"unknown {f.name} {value!r}; choose from {', '.join(choices)}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        return self

    @classmethod
    def from_arguments(cls, ns: argparse.Namespace) -> TeacherSpec:
        """The spec from :func:`add_teacher_arguments`' options (unset: the recipe's)."""
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
        milestones = self.lr_milestones
        return {
            "arch": self.arch,
            "dataset": self.dataset,
            "recipe": self.recipe,
            "epochs": int(self.epochs),
            "seed": int(self.seed),
            "batch_size": batch_size,
            "lr": float(self.lr),
            "schedule": f"step x{RECIPES[self.recipe].decay:g} at epochs "
            + "/".join(map(str, milestones))
            if milestones
            else "cosine-per-step",
            "label_smoothing": float(self.label_smoothing),
            "warmup_epochs": float(self.warmup_epochs),
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "precision": self.precision,
        }


def teacher_seconds(
    spec: TeacherSpec, n_train: int, seconds_per_step: float, epochs_done: int = 0
) -> float:
    """Predicted seconds to train ``spec`` on ``n_train`` images from epoch
    ``epochs_done``: steps per epoch x epochs left x ``seconds_per_step``."""
    left = max(0, spec.epochs - epochs_done)
    return spec.steps_per_epoch(n_train) * left * seconds_per_step


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
        required, choices = f.metadata["required"], f.metadata["choices"]
        help_text = f.metadata["help"]
        if f.name == "preset":
            help_text += " (" + ", ".join(PRESETS) + ")"
        elif choices is not None:
            help_text += " (" + ", ".join(choices) + ")"
        if f.default is FROM_RECIPE and not required:
            values = {k: getattr(r, f.name) for k, r in RECIPES.items()}
            by_recipe = ", ".join(
                f"{k} {'required' if v is None else v}" for k, v in values.items()
            )
            help_text += f" [default: the recipe's: {by_recipe}]"
        elif not required:
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
