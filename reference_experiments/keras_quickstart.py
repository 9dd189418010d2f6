"""Keras quick start: the digits quick start through ``ckd_core.distillation``, any backend.

``KERAS_BACKEND=jax python -m reference_experiments.keras_quickstart [--out DIR]``
(JAX by default when ``KERAS_BACKEND`` is unset and JAX is installed; also
PyTorch and TensorFlow). A small Keras CNN teacher is trained with
``model.fit`` on scikit-learn's digits (seeded stratified 80/20 train/test
split), then a small Keras MLP student is distilled with CE only / KD / RKD /
CKD (all in-batch pairs) at the budgets and seeds of the PyTorch quick start through
:class:`ckd_core.distillation.BudgetedDistiller`:

* budget n: a seeded subset of n training images, 80% trains the student (the
  teacher is queried on those, once each, through ``ckd_core.TeacherBudget``),
  20% validates (labels only, no teacher call);
* CE only: ``CE(y, s)``; KD: ``CE + T^2 KL(softmax(t/T) || softmax(s/T))``,
  T = 4 (``keras.distillation.LogitsDistillation``); RKD: ``CE + KD + RKD``
  on logits (distance x25, angle x50); CKD (Wilf et al., WACV 2025):
  ``MSE(ds, dy) + MSE(ds, dt)`` over all in-batch pairs;
* SGD (momentum 0.9, lr 0.05; KD 0.025, RKD 0.0125), batch 64, at most 100 epochs, early
  stopping on validation accuracy (patience 25) restoring the best weights.

Writes ``report.md`` (mean ± std test accuracy per method x budget),
``accuracy_vs_calls.png`` and ``results.jsonl`` under ``out``; each row records its
environment. Run as a script, it pins XLA's CPU code generation to AVX2 (``XLA_FLAGS``,
see :func:`reference_experiments.quickstart.pin_kernel_isa`) unless the user chose.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .quickstart import BUDGETS, METHODS, SEEDS, TEACHER_EPOCHS, pin_kernel_isa
from .rows import describe_environment, run_environment

LABELS = {"ce": "CE only", "kd": "KD", "rkd": "RKD", "ckd_all": "CKD (all pairs)"}
#: the Keras recipe (see the module doc): its own epochs, early stopping and lrs
MAX_EPOCHS = 100
PATIENCE = 25
BATCH_SIZE = 64
#: lr per method: KD (its T^2-scaled term) and RKD diverge on some seeds at 0.05 with
#: Keras' Glorot-initialised MLP (larger initial logits than PyTorch's default init)
LRS = {"ce": 0.05, "kd": 0.025, "rkd": 0.0125, "ckd_all": 0.05}
BACKENDS = ("jax", "torch", "tensorflow")


def select_backend(backend: str | None = None) -> None:
    """Sets ``KERAS_BACKEND`` before keras is imported (JAX if unset and installed)."""
    keras = sys.modules.get("keras")
    active = getattr(getattr(keras, "config", None), "backend", None)
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
        if active is not None and active() != backend:
            raise ValueError(
                f"backend={backend!r}, but keras was already imported with the "
                f"{active()!r} backend: set KERAS_BACKEND={backend} before starting Python."
            )
        os.environ["KERAS_BACKEND"] = backend
    elif active is None and "KERAS_BACKEND" not in os.environ:
        if importlib.util.find_spec("jax") is not None:
            os.environ["KERAS_BACKEND"] = "jax"


def load_digits_splits() -> dict[str, np.ndarray]:
    """Digits as (N, 8, 8, 1) float32, standardised with the training split's statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    mean, std = x_tr.mean(), x_tr.std()
    prep = lambda a: ((a - mean) / std).astype("float32").reshape(-1, 8, 8, 1)  # noqa: E731
    return {"x": prep(x_tr), "y": y_tr, "x_test": prep(x_te), "y_test": y_te}


def teacher_model(keras: Any) -> Any:
    """Small CNN teacher (3 conv-BN-ReLU blocks, global pooling)."""
    layers = [keras.Input((8, 8, 1))]
    for filters, stride in ((32, 1), (64, 2), (128, 2)):
        layers += [
            keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
        ]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    return keras.Sequential(layers, name="digits_cnn")


def student_model(keras: Any) -> Any:
    """Small MLP student (64-128-128-64-64-10)."""
    layers = [keras.Input((8, 8, 1)), keras.layers.Flatten()]
    layers += [keras.layers.Dense(w, activation="relu") for w in (128, 128, 64, 64)]
    return keras.Sequential([*layers, keras.layers.Dense(10)], name="digits_mlp")


def accuracy(keras: Any, model: Any, x: np.ndarray, y: np.ndarray) -> float:
    logits = keras.ops.convert_to_numpy(model(x, training=False))
    return float(np.mean(np.argmax(logits, axis=1) == y))


def make_distiller(keras: Any, method: str) -> tuple[Any, list[np.ndarray]]:
    """A compiled ``BudgetedDistiller`` for ``method`` and its optimizer's initial state.

    One per method, reset for each run: on JAX and TensorFlow, compiling a new
    model for each of the 36 runs would cost more than training them.
    """
    from ckd_core import ComparativeLoss
    from ckd_core.distillation import (
        BudgetedDistiller,
        ComparativeDistillation,
        RelationalDistillation,
    )

    ce = keras.losses.CategoricalCrossentropy(from_logits=True)
    kd = keras.distillation.LogitsDistillation(temperature=4.0)
    label_loss, distillation = {
        "ce": (ce, []),
        "kd": (ce, [kd]),
        "rkd": (ce, [kd, RelationalDistillation()]),
        "ckd_all": (ComparativeLoss(), [ComparativeDistillation()]),
    }[method]
    distiller = BudgetedDistiller(student_model(keras), distillation)
    distiller.compile(
        keras.optimizers.SGD(LRS[method], momentum=0.9), loss=label_loss, metrics=["accuracy"]
    )
    distiller.optimizer.build(distiller.trainable_variables)
    return distiller, [keras.ops.convert_to_numpy(v) for v in distiller.optimizer.variables]


def train_student(
    keras: Any, distiller: Any, optimizer_state: list[np.ndarray], data: dict[str, Any], seed: int
) -> tuple[float, int]:
    """One student run from a fresh seeded initialisation and optimizer state.

    Returns the test accuracy of the best-validation weights and the epochs run.
    """
    keras.utils.set_random_seed(seed)
    distiller.student.set_weights(student_model(keras).get_weights())
    for variable, value in zip(distiller.optimizer.variables, optimizer_state, strict=True):
        variable.assign(value)
    stop = keras.callbacks.EarlyStopping(
        "val_accuracy", patience=PATIENCE, mode="max", restore_best_weights=True
    )
    y = data["targets"] if distiller.distillation_losses else data["targets"]["labels"]
    history = distiller.fit(
        data["x"],
        y,
        batch_size=BATCH_SIZE,
        epochs=MAX_EPOCHS,
        validation_data=(data["x_val"], data["y_val"]),
        callbacks=[stop],
        verbose=0,
    )
    acc = accuracy(keras, distiller.student, data["x_test"], data["y_test"])
    return acc, len(history.history["loss"])


def _table(rows: list[dict[str, Any]]) -> str:
    budgets = sorted({r["budget"] for r in rows})
    calls = {r["budget"]: r["calls"] for r in rows if r["method"] != "ce"}
    head = [f"{calls.get(n, int(0.8 * n))} calls (n={n})" for n in budgets]
    stats = {}
    for m in [m for m in METHODS if any(r["method"] == m for r in rows)]:
        for n in budgets:
            accs = [100 * r["acc"] for r in rows if (r["method"], r["budget"]) == (m, n)]
            stats[m, n] = (float(np.mean(accs)), float(np.std(accs)))
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---:|" * len(budgets)]
    for m in dict.fromkeys(k[0] for k in stats):
        cells = []
        for n in budgets:
            mean, std = stats[m, n]
            best = mean == max(v[0] for k, v in stats.items() if k[1] == n)
            cell = f"{mean:.2f} ± {std:.2f}"
            cells.append(f"**{cell}**" if best else cell)
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figure(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    budgets = sorted({r["budget"] for r in rows})
    for m in METHODS:
        acc = [
            [100 * r["acc"] for r in rows if (r["method"], r["budget"]) == (m, n)] for n in budgets
        ]
        if not all(acc):
            continue
        calls = [int(0.8 * n) for n in budgets]
        ax.errorbar(
            calls,
            [np.mean(a) for a in acc],
            yerr=[np.std(a) for a in acc],
            marker="o",
            capsize=3,
            label=LABELS[m],
        )
    ax.set(xlabel="teacher calls", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(out: str | os.PathLike[str] = "runs/keras_quickstart", backend: str | None = None) -> Path:
    """Runs the Keras quick start on ``backend`` (default: see module doc); returns report.md."""
    select_backend(backend)
    import keras

    from ckd_core import TeacherBudget
    from ckd_core.distillation import budgeted_targets

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = keras.backend.backend()
    if name not in BACKENDS:
        raise RuntimeError(f"the Keras quick start trains models: needs {BACKENDS}, not {name!r}.")
    split = load_digits_splits()
    keras.utils.set_random_seed(0)
    teacher = teacher_model(keras)
    teacher.compile(
        keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    teacher.fit(split["x"], split["y"], batch_size=BATCH_SIZE, epochs=TEACHER_EPOCHS, verbose=0)
    teacher_acc = accuracy(keras, teacher, split["x_test"], split["y_test"])

    def query_teacher(x: np.ndarray) -> np.ndarray:
        return np.asarray(keras.ops.convert_to_numpy(teacher(x, training=False)))

    one_hot = np.eye(10, dtype="float32")[split["y"]]
    environment = {**run_environment(), "keras_backend": name}
    distillers = {m: make_distiller(keras, m) for m in METHODS}
    rows: list[dict[str, Any]] = []
    for n in BUDGETS:
        for seed in SEEDS:
            ids = np.random.default_rng(seed).permutation(len(split["y"]))[:n]
            train, val = ids[: int(0.8 * n)], ids[int(0.8 * n) :]
            budget = TeacherBudget(
                query_teacher, budget=len(train), metadata={"n": n, "seed": seed}
            )
            data = {
                "x": split["x"][train],
                "x_val": split["x"][val],
                "y_val": one_hot[val],
                "x_test": split["x_test"],
                "y_test": split["y_test"],
                "targets": budgeted_targets(
                    budget, train, split["x"][train], labels=one_hot[train]
                ),
            }
            for method in METHODS:
                acc, epochs = train_student(keras, *distillers[method], data, seed)
                calls = 0 if method == "ce" else budget.used
                rows.append(
                    {
                        "method": method,
                        "budget": n,
                        "seed": seed,
                        "calls": calls,
                        "acc": acc,
                        "epochs": epochs,
                        "backend": name,
                        "environment": environment,
                    }
                )
            assert budget.budget is not None
            assert budget.used == budget.new_calls == len(train) <= budget.budget
    with open(out / "results.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    wall = time.perf_counter() - t0
    title = f"digits CNN → MLP, Keras ({name})"
    _figure(rows, out / "accuracy_vs_calls.png", title)
    report = "\n".join(
        [
            f"# Keras quick start — {title}",
            "",
            f"Test accuracy (%) of the best-validation student, mean ± std over {len(SEEDS)} "
            f"seed(s); teacher calls = the 80% training part of the n-image budget (CE only makes "
            f"none). Teacher test accuracy {100 * teacher_acc:.2f}%. SGD (momentum 0.9), "
            f"≤{MAX_EPOCHS} epochs, early stopping (patience {PATIENCE}); best in bold.",
            "",
            _table(rows),
            "",
            "![accuracy vs teacher calls](accuracy_vs_calls.png)",
            "",
            f"{len(rows)} student runs, wall {wall:.1f} s.",
            "",
            describe_environment(rows),
        ]
    )
    path = out / "report.md"
    path.write_text(report, encoding="utf-8")
    print(report)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/keras_quickstart")
    parser.add_argument("--backend", choices=BACKENDS, default=None)
    args = parser.parse_args()
    pin_kernel_isa()
    main(args.out, args.backend)
