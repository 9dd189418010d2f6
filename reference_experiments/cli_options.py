"""The command line's names and options, declared once and importable without torch.

``python -m reference_experiments --help`` must answer at once, so the parser is built
from this module alone: the dataset, model and method names (the engine modules that
implement them import torch; ``tests/experiments/test_cli.py`` checks that these lists
equal theirs), the options every subcommand shares (``--device``, ``--data-dir``,
``--preset``: one help text each), checked number types (each error names its option),
and a parser whose mistakes print one line ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, fields
from typing import Any, NoReturn

from .config import PRESETS, TEACHER_VIEWS, RunConfig
from .teacher_spec import PRECISION_NAMES, SEED_MAX, add_teacher_arguments, int_in

__all__ = [
    "DATASET_NAMES",
    "METHOD_DESCRIPTIONS",
    "MODEL_NAMES",
    "Parser",
    "add_data_dir",
    "add_campaign_arguments",
    "add_device",
    "add_launcher_arguments",
    "add_precision",
    "add_preset",
    "add_run_arguments",
    "check_choice",
    "misspelt_option",
    "non_negative_int",
    "positive_int",
    "seed_int",
]

DATASET_NAMES: tuple[str, ...] = (
    "cifar100",
    "cifar10",
    "cifar10-jpeg",
    "cars64",
    "cars",
    "digits",
)
MODEL_NAMES: tuple[str, ...] = (
    "resnet110",
    "resnet32",
    "resnet32x4",
    "resnet8x4",
    "wrn_40_2",
    "wrn_16_2",
    "vgg13",
    "vgg8",
    "digits_cnn",
    "digits_mlp",
)
#: every registered method and its one-line description, in registry order
METHOD_DESCRIPTIONS: dict[str, str] = {
    "ce": "cross-entropy on labels, no teacher (0 calls)",
    "kd": "CE + Hinton KD (T=4)",
    "rkd": "CE + KD + RKD distance/angle on logits, class-balanced batches",
    "dist": "CE + KD + DIST (tau=4), weight 2",
    "crd": "CE + KD + 0.8 CRD on logit embeddings, other-class negatives (K=16384)",
    "mixup": "official mixup: student on mixed pairs, lam-mixed CE + soft CE to teachers",
    "mixup3": "three-image mixup, weights from normalised Beta(1,1) draws",
    "fitnets": "CE + KD + 100 MSE(ConvReg(f_s[2]), f_t[2]) (FitNets hint)",
    "vid": "CE + KD + 1 sum of VID Gaussian NLLs on layers 1..L-2",
    "cc": "CE + KD + 0.02 correlation congruence of 128-d penultimate embeddings",
    "fitnets+crd": (
        "FitNets + 0.8 CRD on logits (ours: the official code cannot run white-box + CRD)"
    ),
    "vid+crd": "VID + 0.8 CRD on logits (ours: the official code cannot run white-box + CRD)",
    "cc+crd": "CC + 0.8 CRD on logits (ours: the official code cannot run white-box + CRD)",
    "rkd_d2": "CE + KD + projected RKD_d to 2 dims (paper Fig. 4)",
    "rkd_d5": "CE + KD + projected RKD_d to 5 dims (paper Fig. 4)",
    "rkd_d10": "CE + KD + projected RKD_d to 10 dims (paper Fig. 4)",
    "rkd_d50": "CE + KD + projected RKD_d to 50 dims (paper Fig. 4)",
    "rkd_d100": "CE + KD + projected RKD_d to 100 dims (paper Fig. 4)",
    "ckd_pn2": "official CKD: 1 vs 1 images, two passes",
    "ckd_pn3": "official CKD: 2 vs 1 images, two passes",
    "ckd_pairs": "ours: CKD on 64 random pairs per step, one forward pass",
    "ckd_groups2": "ours: CKD on overlapping 2-image group means",
    "ckd_groups3": "ours: CKD on overlapping 3-image group means",
    "ckd_all": "ours: CKD over all in-batch pairs, O(n d), one forward pass",
    "fitnets+ckd": "official InterCKD: CKD on 1 vs 1 pairs + 100 MSE(ConvReg(df_s[2]), df_t[2])",
    "vid+ckd": "official InterCKD: CKD on 1 vs 1 pairs + 1 VID on feature differences",
    "cc+ckd": "official InterCKD: CKD on 1 vs 1 pairs + 0.02 CC of embedded differences",
}
#: the data sets of RepDistiller's CIFAR teachers (``import-teacher --dataset``)
IMPORT_DATASETS: tuple[str, ...] = ("cifar100", "cifar10", "cifar10-jpeg")
#: the names each RunConfig field may take, known without importing the engine
RUN_CHOICES: dict[str, Sequence[str]] = {
    "dataset": DATASET_NAMES,
    "student_arch": MODEL_NAMES,
    "method": tuple(METHOD_DESCRIPTIONS),
    "preset": tuple(PRESETS),
    "teacher_view": TEACHER_VIEWS,
    "precision": PRECISION_NAMES,
}

DEVICE_HELP = "auto (cuda if available), cpu, cuda or cuda:N"
DATA_DIR_HELP = (
    "folder holding the datasets (default: $CKD_DATA_DIR, else ../shared/data beside "
    "the clone when it exists; `prepare-data` builds cifar10-jpeg there)"
)
PRECISION_HELP = (
    "compute precision on CUDA: fp32 (default; the official code and the paper preset), "
    "bf16 or fp16 (autocast, losses in fp32; BatchNorm in fp32); the CPU computes in "
    "fp32. Part of the run id unless fp32; recorded in every row"
)
PRESET_HELP = "schedule: " + "; ".join(f"{k}: {p.description}" for k, p in PRESETS.items())
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line ``error: ...``, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


positive_int = int_in(1)
non_negative_int = int_in(0)
seed_int = int_in(0, SEED_MAX)


def device_name(text: str) -> str:
    """``--device``: auto, cpu, mps, cuda or cuda:N (whether CUDA is there is checked later)."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use {DEVICE_HELP}")
    return text


def add_device(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--device", type=device_name, default=default, help=DEVICE_HELP)


def add_data_dir(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--data-dir", default=default, metavar="DIR", help=DATA_DIR_HELP)


def add_preset(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--preset", default=default, help=PRESET_HELP)


def add_precision(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument(
        "--precision", choices=PRECISION_NAMES, default=default, help=PRECISION_HELP
    )


#: checked types of RunConfig's number options; the shared options declared above
_RUN_TYPES: dict[str, Any] = {
    "seed": seed_int,
    "patience": non_negative_int,
    "max_epochs": positive_int,
    "budget": int,
    "batch_size": int,
    "lr": float,
}
_SHARED = {
    "device": add_device,
    "data_dir": add_data_dir,
    "preset": add_preset,
    "precision": add_precision,
}


def add_run_arguments(parser: argparse.ArgumentParser, *, required: Sequence[str] = ()) -> None:
    """One ``--option`` per command-line field of :class:`RunConfig` (names are checked
    by ``RunConfig.validate``, so a wrong one gets the same error everywhere)."""
    for f in fields(RunConfig):
        if not f.metadata["cli"]:
            continue
        default = None if f.default is MISSING else f.default
        if f.name in _SHARED:
            _SHARED[f.name](parser, default)
            continue
        help_text = f.metadata["help"]
        if f.name in RUN_CHOICES:
            help_text += " (" + ", ".join(RUN_CHOICES[f.name]) + ")"
        if f.name not in required and default is not None:
            help_text += f" [default: {default}]"
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_RUN_TYPES.get(f.name, str),
            default=default,
            required=f.name in required,
            metavar=f.name.upper(),
            help=help_text,
        )


def add_campaign_arguments(parser: argparse.ArgumentParser) -> None:
    """``campaign``'s options (see ``reference_experiments.campaign``)."""
    parser.add_argument("--minutes", type=float, required=True, help="end cleanly before this")
    parser.add_argument("--out", required=True, help="rows, teachers and failures go here")
    parser.add_argument(
        "--plan",
        default="paper",
        help="paper (every step, in order), cifar (Tables 1 and 2), cars (Figs. 3 and 4) "
        "or a TOML file of [[steps]] (config, only, by)",
    )
    add_device(parser)
    add_data_dir(parser)
    add_precision(parser, "fp32")
    parser.add_argument(
        "--stack", type=positive_int, default=32, metavar="N", help="runs per stacked step"
    )
    parser.add_argument(
        "--teachers-in",
        action="append",
        default=[],
        metavar="DIR",
        help="teachers an earlier window brought back (<key>/<files>; read, never written)",
    )
    parser.add_argument(
        "--rows-in",
        action="append",
        default=[],
        metavar="FILE",
        help="rows of earlier windows not yet committed (their runs are skipped)",
    )
    parser.add_argument(
        "--work",
        default=None,
        metavar="DIR",
        help="teachers in training and their resume files (default: <out>.work)",
    )
    parser.add_argument(
        "--stop-on-failure",
        action="store_true",
        help="end at the first failed stack (default: record it, run the next)",
    )
    parser.add_argument("--skip-preflight", action="store_true", help="no preflight checks")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="the preflight's CPU-checkable parts and the pending runs; train nothing",
    )


def add_train_teacher_arguments(parser: argparse.ArgumentParser) -> None:
    """``train-teacher``'s options: one per :class:`~.teacher_spec.TeacherSpec` field (its
    bounds give the checked number types), plus the shared ``--device``/``--data-dir``/
    ``--preset`` (see ``reference_experiments.teacher.train_teacher``)."""
    add_teacher_arguments(parser, shared=False)
    for action in parser._actions:  # name the choices known without importing the engine
        if action.dest == "arch":
            action.help = f"{action.help} ({', '.join(MODEL_NAMES)})"
        elif action.dest == "dataset":
            action.help = f"{action.help} ({', '.join(DATASET_NAMES)})"
    add_device(parser, "auto")
    add_data_dir(parser)
    add_preset(parser)


#: ``grid`` options that only the submitit launcher reads: (dest, default)
LAUNCHER_ONLY = {
    "slurm_partition": None,
    "gpus_per_job": 1,
    "time_limit": 24 * 60,
    "array_parallelism": None,
    "submitit_folder": None,
    "submitit_cluster": "slurm",
    "wait": False,
}


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    """``grid``'s launcher options (see ``reference_experiments.launcher``)."""
    group = parser.add_argument_group("launcher")
    group.add_argument(
        "--launcher",
        choices=("local", "submitit"),
        default="local",
        help="local: train here, one stack after another [default]; submitit: submit the "
        "pending stacks as a Slurm job array, each job writing its own results file in "
        "<results stem>.parts/ (re-submitting skips finished runs; `report <results "
        "folder>` reads them all)",
    )
    group.add_argument("--slurm-partition", default=None, metavar="NAME", help="Slurm partition")
    group.add_argument(
        "--gpus-per-job",
        type=positive_int,
        default=1,
        metavar="N",
        help="GPUs per array job; a job trains N stacks at once, one per GPU [default: 1]",
    )
    group.add_argument(
        "--time-limit",
        type=positive_int,
        default=24 * 60,
        metavar="MINUTES",
        help="time limit of each job [default: 1440]",
    )
    group.add_argument(
        "--array-parallelism",
        type=positive_int,
        default=None,
        metavar="N",
        help="at most N jobs of the array at once [default: the cluster's]",
    )
    group.add_argument(
        "--submitit-folder",
        default=None,
        metavar="DIR",
        help="submitit's job files and logs [default: <results folder>/submitit]",
    )
    group.add_argument(
        "--submitit-cluster",
        choices=("slurm", "local"),
        default="slurm",
        help="slurm [default]; local: the same jobs as local processes (a dry rehearsal)",
    )
    group.add_argument(
        "--wait", action="store_true", help="wait for the jobs; exit 1 if one failed"
    )


def add_import_teacher_arguments(parser: argparse.ArgumentParser) -> None:
    """``import-teacher``'s options (see ``reference_experiments.import_teacher``)."""
    parser.add_argument(
        "--arch", required=True, help="the checkpoint's model (" + ", ".join(MODEL_NAMES) + ")"
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH.pth",
        help="RepDistiller/mdistiller checkpoint ({'model': state_dict, ...} or a state dict)",
    )
    parser.add_argument(
        "--dataset",
        default="cifar100",
        help="the data set it was trained on (" + ", ".join(IMPORT_DATASETS) + ") "
        "[default: cifar100]; its test accuracy is measured when the data are there",
    )
    parser.add_argument("--out", required=True, help="output folder")
    add_data_dir(parser)
    add_device(parser, "auto")


def check_choice(kind: str, value: str, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``, else the one-line ``ValueError`` of
    ``RunConfig.validate``."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose from {', '.join(choices)}")
    return value


def misspelt_option(argv: Sequence[str], known: Iterable[str]) -> str | None:
    """The message for the first ``--option`` in ``argv`` that is neither a known option
    nor an unambiguous prefix of one, with the closest known option; None if all are."""
    known = sorted(known)
    for token in argv:
        if token == "--":
            return None
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        if name in known or sum(k.startswith(name) for k in known) == 1:
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"unrecognized option {name}{hint}"
    return None


def option_strings(parsers: Iterable[argparse.ArgumentParser]) -> set[str]:
    """Every ``--long`` option of ``parsers``."""
    return {s for p in parsers for a in p._actions for s in a.option_strings if s.startswith("--")}


def describe_methods(descriptions: Mapping[str, str] = METHOD_DESCRIPTIONS) -> str:
    """The ``student --help`` epilog: one line per method."""
    return "methods:\n" + "\n".join(f"  {k:<14} {v}" for k, v in descriptions.items())
