"""The run configuration, defined once: :class:`RunConfig` and its presets.

Every field carries its role in ``metadata`` and everything else is derived
from it: the CLI options (``cli_options.add_run_arguments`` / :func:`from_arguments`,
with help text and checked types), the run id (:meth:`RunConfig.run_id`: a hash of the
fields that determine a result), the grid axes (:data:`GRID_AXES`: the plural
TOML key of each list-valued field) and the "can train together" key
(:meth:`RunConfig.stack_key`: every identity field except seed and lr, which
differ between the runs of one stacked step).

>>> cfg = RunConfig(dataset="digits", student_arch="digits_mlp", method="kd", budget=100)
>>> cfg.run_id() == RunConfig(**{**cfg.as_dict(), "device": "cpu"}).run_id()
True
>>> cfg.stack_key() == replace(cfg, seed=3, lr=0.1).stack_key()
True
>>> GRID_AXES["budgets"], GRID_AXES["methods"]
('budget', 'method')
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

__all__ = [
    "GRID_AXES",
    "PAPER_LRS",
    "PRESETS",
    "TEACHER_VIEWS",
    "Preset",
    "RunConfig",
    "from_arguments",
    "replace",
]

#: the paper's learning-rate sweep (official ``train_student.py`` scripts)
PAPER_LRS: tuple[float, ...] = (0.1, 0.05, 0.025)
#: which images the teacher is called on: the augmented view drawn once per image
#: (official), or the clean centre crop
TEACHER_VIEWS: tuple[str, ...] = ("augmented-once", "clean")


@dataclass(frozen=True)
class Preset:
    """An optimisation schedule.

    ``plateau``: the official protocol -- evaluate on validation every epoch;
    after ``patience`` epochs without improvement move to the next lr phase
    (lr x ``lr_decay``), stopping at the end of phase ``phases``; the reported
    model is the best-validation checkpoint. ``cosine``: a fixed per-step cosine
    schedule over ``max_epochs``, best-validation checkpoint.
    """

    name: str
    schedule: str  # "plateau" | "cosine"
    max_epochs: int
    patience: int = 50
    phases: int = 3
    lr_decay: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lrs: tuple[float, ...] = PAPER_LRS
    description: str = ""


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        "paper",
        "plateau",
        max_epochs=1000,
        description="official protocol: SGD, lr sweep, early stopping, 3 lr phases",
    ),
    "fast": Preset(
        "fast",
        "cosine",
        max_epochs=30,
        lrs=(0.05,),
        description="fixed 30-epoch cosine schedule at lr 0.05, for iteration",
    ),
}


def _opt(
    help: str,
    *,
    identity: bool = True,
    stack: bool = True,
    axis: str | None = None,
    choices: Any = None,
    cli: bool = True,
    hashed_at_default: bool = True,
) -> dict[str, Any]:
    """Field metadata. ``identity``: part of the run id; ``stack``: must be equal
    for runs to share a step; ``axis``: plural TOML key of a grid axis;
    ``choices``: allowed values, or a zero-argument callable returning them;
    ``hashed_at_default``: False for a field added later, whose default value stays
    out of the run id (the ids of earlier rows, which ran at that default, hold)."""
    return {
        "help": help,
        "identity": identity,
        "hashed_at_default": hashed_at_default,
        "stack": identity and stack,
        "axis": axis,
        "choices": choices,
        "cli": cli,
    }


def _datasets() -> Sequence[str]:
    from reference_experiments.data import DATASET_NAMES

    return DATASET_NAMES


def _archs() -> Sequence[str]:
    from reference_experiments.models import MODEL_NAMES

    return MODEL_NAMES


def _precisions() -> Sequence[str]:
    from reference_experiments.devices import PRECISIONS

    return tuple(PRECISIONS)


def _methods() -> Sequence[str]:
    from reference_experiments.methods import registry

    return registry.names()


@dataclass(frozen=True)
class RunConfig:
    """One student run: a method under a teacher-call budget.

    ``budget`` is the size n of the seeded training subset; 80% of it trains
    the student (the teacher is called once on each of those images) and 20%
    validates. ``lr=None`` sweeps the preset's lrs and keeps the best on
    validation (all candidates train in one stacked step).
    """

    dataset: str = field(
        default="digits", metadata=_opt("dataset", axis="datasets", choices=_datasets)
    )
    student_arch: str = field(default="digits_mlp", metadata=_opt("student model", choices=_archs))
    method: str = field(
        default="kd", metadata=_opt("distillation method", axis="methods", choices=_methods)
    )
    budget: int = field(
        default=500, metadata=_opt("subset size n (teacher calls: its 80%% split)", axis="budgets")
    )
    seed: int = field(default=0, metadata=_opt("seed", axis="seeds", stack=False))
    teacher_key: str = field(
        default="",
        metadata=_opt("teacher identity (grid teacher name + spec hash)", cli=False),
    )
    teacher_arch: str = field(
        default="", metadata=_opt("teacher model (from the teacher file)", cli=False)
    )
    preset: str = field(
        default="paper", metadata=_opt("schedule", axis="presets", choices=lambda: list(PRESETS))
    )
    teacher_view: str = field(
        default="augmented-once",
        metadata=_opt("teacher input view", axis="teacher_views", choices=TEACHER_VIEWS),
    )
    lr: float | None = field(
        default=None,
        metadata=_opt("learning rate (default: the preset's sweep)", axis="lrs", stack=False),
    )
    precision: str = field(
        default="fp32",
        metadata=_opt(
            "compute precision on CUDA (autocast; fp32 as the official code; the CPU "
            "always computes in fp32)",
            axis="precisions",
            choices=_precisions,
            hashed_at_default=False,
        ),
    )
    batch_size: int = field(
        default=64, metadata=_opt("images (or tuples) per step, as the official code")
    )
    max_epochs: int | None = field(
        default=None, metadata=_opt("cap on the preset's epochs (also recorded in the row)")
    )
    patience: int | None = field(default=None, metadata=_opt("override of the preset's patience"))
    weights: tuple[tuple[str, float], ...] = field(
        default=(), metadata=_opt("loss-weight overrides (name, value)", cli=False)
    )
    teacher: str | None = field(
        default=None,
        metadata=_opt("teacher .safetensors (not needed for ce)", identity=False),
    )
    device: str = field(
        default="auto", metadata=_opt("auto (cuda if available), cpu, cuda:N", identity=False)
    )
    data_dir: str | None = field(
        default=None, metadata=_opt("dataset folder (default: ../shared/data)", identity=False)
    )
    eval_batch_size: int = field(
        default=1000, metadata=_opt("evaluation batch", identity=False, cli=False)
    )

    # ----------------------------------------------------------------- derived
    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weights"] = dict(self.weights)
        return d

    @property
    def preset_spec(self) -> Preset:
        return PRESETS[self.preset]

    @property
    def epoch_cap(self) -> int:
        """The epochs this run may take: the preset's, capped by ``max_epochs``."""
        cap = self.preset_spec.max_epochs
        return cap if self.max_epochs is None else min(cap, self.max_epochs)

    @property
    def lrs(self) -> tuple[float, ...]:
        """The learning rates this run tries."""
        return (float(self.lr),) if self.lr is not None else self.preset_spec.lrs

    def identity(self) -> dict[str, Any]:
        d = self.as_dict()
        return {
            f.name: d[f.name]
            for f in fields(self)
            if f.metadata["identity"]
            and (f.metadata["hashed_at_default"] or d[f.name] != f.default)
        }

    def run_id(self) -> str:
        """Stable id: a hash of everything that determines the result."""
        blob = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def stack_key(self) -> str:
        """Runs with equal keys can share one stacked training step."""
        d = self.as_dict()
        key = {f.name: d[f.name] for f in fields(self) if f.metadata["stack"]}
        key["device"] = self.device  # one stack lives on one device
        return json.dumps(key, sort_keys=True, default=str)

    def validate(self) -> RunConfig:
        """Checks names against their choices and numbers against their ranges."""
        for f in fields(self):
            choices = _choices(f)
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                raise ValueError(
                    f"unknown {f.name} {value!r}; choose from {', '.join(map(str, choices))}"
                )
        if self.budget < 2:
            raise ValueError(f"budget must be >= 2, got {self.budget}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {self.max_epochs}")
        return self

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunConfig:
        """From a mapping (grid spec, result row); unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in values.items() if k in names}
        if isinstance(kw.get("weights"), Mapping):
            kw["weights"] = tuple(sorted(kw["weights"].items()))
        elif kw.get("weights") is not None:
            kw["weights"] = tuple((str(k), float(v)) for k, v in kw["weights"])
        return cls(**kw)


#: plural TOML key of each grid axis -> the RunConfig field it sets
GRID_AXES: dict[str, str] = {
    f.metadata["axis"]: f.name for f in fields(RunConfig) if f.metadata["axis"]
}


def _choices(f: Any) -> Sequence[Any] | None:
    c = f.metadata["choices"]
    return c() if callable(c) else c


def from_arguments(ns: argparse.Namespace) -> RunConfig:
    """The :class:`RunConfig` of parsed ``cli_options.add_run_arguments`` options, validated."""
    values = {f.name: getattr(ns, f.name) for f in fields(RunConfig) if hasattr(ns, f.name)}
    return RunConfig(**values).validate()
