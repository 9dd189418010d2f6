"""CPU quick start: ``python -m reference_experiments quickstart`` (digits, < 2 minutes).

Trains a small teacher (``digits_cnn``, 15 epochs) on scikit-learn's bundled
digits, then distills ``digits_mlp`` students with CE only / KD / RKD / CKD
(all in-batch pairs) at 3 budgets x 5 seeds through the grid runner (the five
seeds of a method and budget train as one stack), and prints the report.
Everything lands in ``--out`` (default ``runs/quickstart``): ``results.jsonl``
(resumable: a rerun reuses finished runs), ``report.md`` with its figures, and
``teacher/``. The committed copy is ``reference_experiments/results/quickstart/``.

Budget = size n of the seeded subset of the digits training split: 80% trains the
student (teacher calls = those images), 20% validates. Students follow the ``paper``
preset capped at 60 epochs, at lr 0.05 (RKD: 0.025): the full protocol (up to 1000
epochs x 3 lrs) would not fit in two minutes. RKD on logits diverges at 0.05 on this
MLP (its scale-invariant terms have gradients ~ 1/|logits| and the MLP starts with
near-zero logits), hence its lower lr. Every row records its preset, cap and lr.
Torch runs single-threaded and deterministic: tiny models gain nothing from threads.

Same table on every x86-64 CPU with AVX2 or better: :func:`pin_kernel_isa` (called by
the command line before torch is imported) sets ``ATEN_CPU_CAPABILITY=avx2`` and
``ONEDNN_MAX_CPU_ISA=AVX2`` unless the user set them, because PyTorch picks its CPU
kernels (and their rounding) by instruction set: an AVX-512 CPU would print other digits.
Other architectures (ARM) run other kernels and print other digits. Every row records
its environment (``ResultRow.environment``), and the report names it.

The constants below are shared with the Keras quick start (``keras_quickstart``).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from . import grid

DATASET, TEACHER_ARCH, STUDENT_ARCH = "digits", "digits_cnn", "digits_mlp"
METHODS = ("ce", "kd", "rkd", "ckd_all")
BUDGETS = (100, 200, 400)
SEEDS = (0, 1, 2, 3, 4)
TEACHER_EPOCHS = 15
#: CPU kernel ISA pinned on x86-64 (PyTorch and oneDNN; XLA's code generation for JAX)
KERNEL_ISA = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
XLA_ISA_FLAG = "--xla_cpu_max_isa=AVX2"
MAX_EPOCHS = 60
#: lr per method (one lr each, from the paper's sweep {0.1, 0.05, 0.025}; see above)
LRS = {"ce": 0.05, "kd": 0.05, "rkd": 0.025, "ckd_all": 0.05}


def pin_kernel_isa(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Pins the CPU kernels to AVX2 on x86-64 where the user has not chosen; returns what
    it set. Must run before torch (or jax) is imported: they read it once."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    pinned = {k: v for k, v in KERNEL_ISA.items() if k not in environ}
    flags = environ.get("XLA_FLAGS", "")
    if "--xla_cpu_max_isa" not in flags:
        pinned["XLA_FLAGS"] = f"{flags} {XLA_ISA_FLAG}".strip()
    environ.update(pinned)
    return pinned


def config(out: Path) -> dict[str, Any]:
    """The quick start as a grid config."""
    return grid.parse_config(
        {
            "name": "quickstart",
            "teachers_dir": str(out / "teacher"),
            "defaults": {
                "dataset": DATASET,
                "preset": "paper",
                "teacher_view": "clean",
                "max_epochs": MAX_EPOCHS,
                "device": "cpu",
            },
            "teachers": {TEACHER_ARCH: {"arch": TEACHER_ARCH, "train_epochs": TEACHER_EPOCHS}},
            "runs": [
                {
                    "pairs": [[TEACHER_ARCH, STUDENT_ARCH]],
                    "methods": [m],
                    "budgets": list(BUDGETS),
                    "seeds": list(SEEDS),
                    "lr": LRS[m],
                }
                for m in METHODS
            ],
        }
    )


def main(out: str | os.PathLike[str] = "runs/quickstart") -> Path:
    """Runs the quick start; returns the report's path."""
    import torch

    from . import report

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    out = Path(out)
    cfg = config(out)
    runs = grid.expand(cfg)
    results = out / "results.jsonl"
    grid.run_grid(runs, results, grid.Runner(cfg), stack=len(SEEDS), grid_name="quickstart")
    path = report.make_report([results], out)  # ends with the rows' environments
    print(path.read_text(encoding="utf-8"))
    print(f"quick start: {len(runs)} student runs, wall {time.perf_counter() - t0:.1f} s")
    print(f"wrote {results} and {path}", file=sys.stderr)
    return path
