"""Result rows and the package's only writer: :class:`ResultRow`, JSONL read/append,
:func:`atomic_write_bytes`.

A results file holds one JSON object per *finished* run: the run's
:class:`~reference_experiments.config.RunConfig` fields followed by the
:class:`ResultRow` fields. Each append rewrites the whole file to a temporary
file, ``fsync`` and ``os.replace``, under an exclusive ``flock`` on
``<results>.lock``: a ``kill -9`` at any moment leaves the old or the new
file, never a partial row, and a ``run_id`` is never written twice (several
processes may share one file).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process lock
    fcntl = None  # type: ignore[assignment]  # (the module is optional there)

__all__ = [
    "ResultRow",
    "append_row",
    "atomic_write_bytes",
    "describe_environment",
    "finished_ids",
    "read_rows",
    "run_environment",
]


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The commit of the clone this package runs from; None when installed or without git."""
    package = Path(__file__).resolve().parent
    with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"],
            cwd=package,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        top, commit = out.stdout.split()
        return commit if Path(top).resolve() == package.parent else None
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_environment() -> dict[str, str | None]:
    """What a row's numbers depend on besides its config: package versions, torch's CPU
    kernel ISA (``torch.backends.cpu.get_cpu_capability()``), CPU model, git commit."""
    return dict(_environment())


@functools.cache
def _environment() -> dict[str, str | None]:
    torch = sys.modules.get("torch")
    return {
        "python": platform.python_version(),
        "torch": getattr(torch, "__version__", None) or _version("torch"),
        "keras": _version("keras"),
        "numpy": _version("numpy"),
        "jax": _version("jax"),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability() if torch else None,
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "git_commit": _git_commit(),
    }


#: how each ``environment`` field is named in the report, in report order
_ENVIRONMENT_LABELS = {
    "torch": "torch",
    "torch_cpu_capability": "torch CPU kernels",
    "keras": "keras",
    "keras_backend": "Keras backend",
    "jax": "jax",
    "xla_flags": "XLA_FLAGS",
    "numpy": "numpy",
    "python": "Python",
    "machine": "machine",
    "cpu_model": "CPU",
    "git_commit": "commit",
}


def describe_environment(rows: list[dict[str, Any]]) -> str:
    """One line per distinct ``environment`` of ``rows``, for the report."""
    seen = {json.dumps(r.get("environment"), sort_keys=True): r.get("environment") for r in rows}
    lines = []
    for env in seen.values():
        fields = [
            f"{label} {env[k]}" for k, label in _ENVIRONMENT_LABELS.items() if env and env.get(k)
        ]
        lines.append("- " + ("; ".join(fields) or "(rows without a recorded environment)"))
    return "Environment of the rows:\n\n" + "\n".join(lines) + "\n"


@dataclass
class ResultRow:
    """What one run produced (its config travels beside it, see :meth:`to_json`).

    Accuracies are fractions in [0, 1]; ``test_acc`` is the best-validation
    checkpoint's, of the lr chosen on validation (``lr_used``; each tried lr's best
    validation accuracy in ``best_val_by_lr``, NaN where it diverged); ``ran_on``: the device
    used (the config's ``device`` may say ``auto``); ``ran_precision``: what it computed in
    (:func:`devices.compute_precision`: the config's ``precision`` asks, the CPU computes
    in fp32; None in rows written before it was recorded). ``flat_dims``:
    directions holding 90% of the within-class variance of the student's
    penultimate features on test images (Fig. 5); ``spectrum``: the normalised
    singular values behind it. ``teacher_recipe``: the teacher's training recipe (its
    metadata's ``recipe``; None without one). ``environment``: :func:`run_environment`
    of the process that built the row (empty for rows written before it was recorded).
    """

    run_id: str
    teacher_calls: int
    new_teacher_calls: int
    lr_used: float
    lrs_tried: list[float]
    best_val_by_lr: list[float]
    lrs_diverged: list[float]
    best_val_acc: float
    test_acc: float
    best_epoch: int
    epochs: int
    epoch_cap: int
    phases_reached: int
    steps: int
    total_steps: int
    n_train: int
    n_val: int
    train_images_per_s: float
    stack_images_per_s: float
    stacked_runs: int
    wall_s: float
    ran_on: str
    ran_precision: str | None = None
    teacher_test_acc: float | None = None
    teacher_recipe: str | None = None
    flat_dims: int | None = None
    spectrum: list[float] = field(default_factory=list)
    grid: str | None = None
    paper_dataset: str | None = None
    finished_at: str | None = None
    environment: dict[str, str | None] = field(default_factory=run_environment)

    @property
    def diverged(self) -> bool:
        """Every candidate lr diverged: the row has no accuracy."""
        return not math.isfinite(self.test_acc)

    def to_json(self, config: Any) -> dict[str, Any]:
        """One results-file object: ``config.as_dict()`` then the row's fields."""
        return {**config.as_dict(), **asdict(self)}

    @classmethod
    def split(cls, obj: Mapping[str, Any]) -> tuple[dict[str, Any], ResultRow]:
        """A results-file object -> (config fields, row)."""
        names = {f.name for f in fields(cls)}
        row = cls(**{"environment": {}, **{k: v for k, v in obj.items() if k in names}})
        return {k: v for k, v in obj.items() if k not in names}, row


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically: temporary file, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All objects of a JSONL results file; a malformed line is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"warning: {path}:{lineno}: malformed row skipped", file=sys.stderr)
    return out


def finished_ids(path: str | os.PathLike[str]) -> set[str]:
    """The ``run_id`` of every row in ``path``."""
    return {r["run_id"] for r in read_rows(path) if "run_id" in r}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def append_row(path: str | os.PathLike[str], obj: Mapping[str, Any], *, dedup: bool = True) -> bool:
    """Atomically adds ``obj`` unless (``dedup``) an object with its ``run_id`` is there.

    Returns whether it was written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(dict(obj), sort_keys=True, default=_json_default) + "\n"
    with _locked(path):
        old = path.read_bytes() if path.exists() else b""
        rid = obj.get("run_id")
        if dedup and rid is not None:
            for raw in old.splitlines():
                with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                    if json.loads(raw).get("run_id") == rid:
                        return False
        if old and not old.endswith(b"\n"):
            old += b"\n"
        atomic_write_bytes(path, old + line.encode("utf-8"))
    return True
