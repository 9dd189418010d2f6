"""Grid runner: expand a TOML config into run specs and run them resumably.

A config lists teachers and one or more ``[[runs]]`` blocks; each block is the
cartesian product of its list-valued axes (``pairs``, ``methods``, ``budgets``,
``seeds``, optionally ``lrs``, ``teacher_views``, ``presets``, ``datasets``),
with scalar keys as fixed settings and ``[defaults]`` underneath. Every run
spec gets a stable id: a hash of everything that determines its result
(dataset, teacher identity, student, method, budget, seed, preset, ...), but
not of where it runs (device, data directory) nor of which config named it,
so configs that share runs share result rows.

Results are a JSONL file, one row per *finished* run. Each row is added by
rewriting the whole file to a temporary file, ``fsync`` and ``os.replace``
under an exclusive ``flock`` on ``<results>.lock``: a ``kill -9`` at any
moment leaves either the old or the new file, never a partial row, and a row
whose id is already present is never written twice (even with several grid
processes sharing one results file). On restart, runs whose id is in the
results are skipped.

>>> cfg = parse_config({"name": "t", "defaults": {"dataset": "digits", "preset": "fast"},
...     "teachers": {"cnn": {"arch": "digits_cnn", "train_epochs": 5}},
...     "runs": [{"pairs": [["cnn", "digits_mlp"]], "methods": ["ce", "kd"],
...               "budgets": [100, 200], "seeds": [0, 1]}]})
>>> specs = expand(cfg)
>>> len(specs), specs[0]["method"], specs[0]["teacher_arch"]
(8, 'ce', 'digits_cnn')
>>> specs[0]["run_id"] == expand(cfg)[0]["run_id"]
True
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import itertools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process lock
    fcntl = None  # type: ignore[assignment]

RunSpec = dict[str, Any]
RunFn = Callable[[RunSpec], Mapping[str, Any]]

#: list-valued axes of a ``[[runs]]`` block -> the spec key each value sets
AXES = {
    "datasets": "dataset",
    "pairs": ("teacher", "student_arch"),
    "methods": "method",
    "budgets": "budget",
    "seeds": "seed",
    "lrs": "lr",
    "teacher_views": "teacher_view",
    "presets": "preset",
}

#: spec keys that say where/how a run executes, not what it computes
NON_IDENTITY_KEYS = {
    "run_id",
    "device",
    "data_dir",
    "teacher_path",
    "grid",
    "paper_dataset",
    "progress",
    "teachers_dir",
}

SPEC_DEFAULTS: dict[str, Any] = {
    "preset": "paper",
    "teacher_view": "clean",
}


# --------------------------------------------------------------------------- config


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a grid config (TOML)."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    raw.setdefault("name", path.stem)
    cfg = parse_config(raw)
    cfg["config_path"] = str(path)
    return cfg


def parse_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a config mapping (as read from TOML) and fill in defaults."""
    cfg = copy.deepcopy(dict(raw))
    cfg.setdefault("name", "grid")
    cfg.setdefault("defaults", {})
    cfg.setdefault("teachers", {})
    cfg.setdefault("results", f"runs/{cfg['name']}/results.jsonl")
    cfg.setdefault("teachers_dir", "runs/teachers")
    blocks = cfg.get("runs")
    if not blocks:
        raise ValueError(f"config {cfg['name']!r} has no [[runs]] block")
    for i, block in enumerate(blocks):
        for key in ("methods", "budgets", "seeds"):
            if key not in block and key[:-1] not in block and key[:-1] not in cfg["defaults"]:
                raise ValueError(f"[[runs]] block {i} of {cfg['name']!r} lacks {key!r}")
        if "pairs" in block:
            for pair in block["pairs"]:
                if len(pair) != 2:
                    raise ValueError(f"pair {pair!r} is not [teacher, student_arch]")
                if pair[0] not in cfg["teachers"]:
                    raise ValueError(f"pair {pair!r}: unknown teacher {pair[0]!r}")
        elif "teacher" not in block and "teacher" not in cfg["defaults"]:
            raise ValueError(f"[[runs]] block {i} of {cfg['name']!r} names no teacher")
    for name, t in cfg["teachers"].items():
        if "arch" not in t:
            raise ValueError(f"teacher {name!r} lacks 'arch'")
        if "path" not in t and "train_epochs" not in t:
            raise ValueError(f"teacher {name!r} needs 'path' or 'train_epochs'")
    return cfg


def teacher_identity(cfg: Mapping[str, Any], key: str, dataset: str) -> dict[str, Any]:
    """What determines a teacher: its file, or how it is trained (and on what)."""
    t = cfg["teachers"][key]
    if "path" in t:
        return {"arch": t["arch"], "path": str(t["path"])}
    return {
        "arch": t["arch"],
        "dataset": t.get("dataset", dataset),
        "epochs": int(t["train_epochs"]),
        "seed": int(t.get("seed", 0)),
        **({"lr": t["lr"]} if "lr" in t else {}),
        **({"batch_size": t["batch_size"]} if "batch_size" in t else {}),
    }


def run_id(spec: Mapping[str, Any]) -> str:
    """Stable 16-hex id of a spec: sha256 of its identity keys as canonical JSON."""
    ident = {k: v for k, v in spec.items() if k not in NON_IDENTITY_KEYS and v is not None}
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _axis_values(block: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[tuple[str, list]]:
    axes = []
    for plural, key in AXES.items():
        if plural in block:
            axes.append((plural, list(block[plural])))
        elif isinstance(key, str) and key in block:
            axes.append((plural, [block[key]]))
        elif isinstance(key, str) and plural in defaults:
            axes.append((plural, list(defaults[plural])))
    return axes


def expand(cfg: Mapping[str, Any]) -> list[RunSpec]:
    """Cartesian product of every ``[[runs]]`` block, in config order, deduplicated by id."""
    specs: list[RunSpec] = []
    seen: set[str] = set()
    defaults = {k: v for k, v in cfg["defaults"].items() if k not in AXES}
    for block in cfg["runs"]:
        fixed = {k: v for k, v in block.items() if k not in AXES}
        axes = _axis_values(block, cfg["defaults"])
        names = [a for a, _ in axes]
        for combo in itertools.product(*(vals for _, vals in axes)):
            spec: RunSpec = {**SPEC_DEFAULTS, **defaults, **fixed}
            for plural, value in zip(names, combo, strict=True):
                key = AXES[plural]
                if isinstance(key, tuple):
                    spec.update(zip(key, value, strict=True))
                else:
                    spec[key] = value
            tkey = spec["teacher"]
            spec["teacher_arch"] = cfg["teachers"][tkey]["arch"]
            spec["teacher_id"] = teacher_identity(cfg, tkey, spec["dataset"])
            if "paper_dataset" in cfg and "paper_dataset" not in spec:
                spec["paper_dataset"] = cfg["paper_dataset"]
            spec["run_id"] = run_id(spec)
            if spec["run_id"] in seen:
                continue
            seen.add(spec["run_id"])
            specs.append(spec)
    return specs


def select_shard(specs: list[RunSpec], shard: str | None) -> list[RunSpec]:
    """``"i/n"``: every n-th spec starting at i (stable: ids, not timing, decide)."""
    if not shard:
        return specs
    i, n = (int(x) for x in shard.split("/"))
    if not 0 <= i < n:
        raise ValueError(f"bad shard {shard!r}: need 0 <= i < n")
    return [s for s in specs if int(s["run_id"], 16) % n == i]


# --------------------------------------------------------------------------- results file


def read_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All rows of a JSONL results file; a malformed line is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"warning: {path}:{lineno}: malformed row skipped", file=sys.stderr)
    return rows


def finished_ids(path: str | os.PathLike[str]) -> set[str]:
    return {r["run_id"] for r in read_results(path) if "run_id" in r}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a+") as lf:
        if fcntl is not None:
            fcntl.flock(lf.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(lf.fileno(), fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _clean_stale_tmp(path: Path) -> None:
    """Remove temporaries left by writers that were killed (their pid is gone)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            pid = int(tmp.name.rsplit(".", 2)[-2])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            with contextlib.suppress(OSError):
                tmp.unlink()
        except PermissionError:
            pass


def append_row(path: str | os.PathLike[str], row: Mapping[str, Any]) -> bool:
    """Atomically add ``row`` unless a row with its ``run_id`` exists. Returns whether written.

    Whole-file rewrite + fsync + ``os.replace`` under an exclusive lock: a crash at
    any point leaves the old or the new file, both complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(dict(row), sort_keys=True, default=_json_default) + "\n"
    with _locked(path):
        old = path.read_bytes() if path.exists() else b""
        rid = row.get("run_id")
        if rid is not None and old:
            for raw in old.splitlines():
                with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                    if json.loads(raw).get("run_id") == rid:
                        return False
        if old and not old.endswith(b"\n"):
            old += b"\n"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(old)
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    return True


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# --------------------------------------------------------------------------- running


def run_grid(
    specs: Iterable[RunSpec],
    results: str | os.PathLike[str],
    run_fn: RunFn,
    *,
    max_runs: int | None = None,
    keep_going: bool = False,
    progress: bool = True,
    grid_name: str | None = None,
    stack: int = 1,
) -> dict[str, int]:
    """Run every spec whose id is not yet in ``results``; append one row per finished run.

    ``run_fn(spec) -> row`` does the work (injected for testability). With ``stack > 1``
    and a ``run_fn`` that has ``run_batch(specs) -> rows`` and ``batch_key(spec)``, up to
    ``stack`` pending runs with the same key are trained together (one stacked step on
    the device); their rows are appended when the batch finishes, so a kill loses at
    most the batch in flight. Returns counts ``{"total", "skipped", "ran", "failed"}``.
    """
    results = Path(results)
    results.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(results)
    specs = list(specs)
    done = finished_ids(results)
    pending = [s for s in specs if s["run_id"] not in done]
    if max_runs is not None:
        pending = pending[:max_runs]
    counts = {
        "total": len(specs),
        "skipped": sum(s["run_id"] in done for s in specs),
        "ran": 0,
        "failed": 0,
    }
    run_batch = getattr(run_fn, "run_batch", None) if stack > 1 else None
    chunks = (
        batches(pending, run_fn.batch_key, stack)  # type: ignore[attr-defined]
        if run_batch is not None
        else [[s] for s in pending]
    )
    print(
        f"grid {grid_name or ''}: {len(specs)} runs, {counts['skipped']} already in "
        f"{results}, {len(pending)} to run"
        + (f" in {len(chunks)} stacked batches" if run_batch is not None else ""),
        file=sys.stderr,
    )
    failed_path = results.with_name(results.stem + ".failed.jsonl")
    bar = _progress(len(pending), grid_name, progress)
    try:
        for chunk in chunks:
            s0 = chunk[0]
            bar.set_description(
                f"{grid_name or 'grid'} {s0.get('method')}@{s0.get('budget')}"
                + (f" x{len(chunk)}" if len(chunk) > 1 else f" s{s0.get('seed')}")
            )
            t0 = time.perf_counter()
            try:
                outs = list(run_batch(chunk)) if run_batch is not None else [run_fn(chunk[0])]
                if len(outs) != len(chunk):
                    raise RuntimeError(
                        f"run function returned {len(outs)} rows for {len(chunk)} runs"
                    )
            except KeyboardInterrupt:
                raise
            except Exception as e:
                counts["failed"] += len(chunk)
                if not keep_going:
                    raise
                for spec in chunk:
                    append_row(
                        failed_path,
                        {
                            "run_id": spec["run_id"],
                            "spec": spec,
                            "error": repr(e),
                            "time": time.time(),
                            "traceback": traceback.format_exc(),
                        },
                    )
                print(f"{len(chunk)} run(s) from {s0['run_id']} failed: {e!r}", file=sys.stderr)
                bar.update(len(chunk))
                continue
            wall = (time.perf_counter() - t0) / len(chunk)
            for spec, out in zip(chunk, outs, strict=True):
                row = _finalize_row(spec, dict(out), grid_name, wall)
                append_row(results, row)
                counts["ran"] += 1
            acc = row.get("test_acc")
            if isinstance(acc, (int, float)):
                bar.set_postfix_str(f"test_acc={acc:.4f}")
            bar.update(len(chunk))
    finally:
        bar.close()
    return counts


def batches(
    specs: Sequence[RunSpec], key: Callable[[RunSpec], Any], size: int
) -> list[list[RunSpec]]:
    """Group specs by ``key`` (first-appearance order), then split into chunks of <= size.

    >>> [[s["i"] for s in b] for b in batches([{"i": i, "k": i % 2} for i in range(5)],
    ...                                     lambda s: s["k"], 2)]
    [[0, 2], [4], [1, 3]]
    """
    groups: dict[Any, list[RunSpec]] = {}
    for s in specs:
        groups.setdefault(key(s), []).append(s)
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]


def _finalize_row(
    spec: RunSpec, out: Mapping[str, Any], grid_name: str | None, wall: float
) -> dict[str, Any]:
    row = dict(out)
    for key in (
        "dataset",
        "teacher_arch",
        "student_arch",
        "method",
        "budget",
        "seed",
        "preset",
        "teacher_view",
        "lr",
        "paper_dataset",
        "teacher",
        "max_epochs",
        "patience",
    ):
        if key in spec and row.get(key) is None:
            row[key] = spec[key]
    row["run_id"] = spec["run_id"]
    if grid_name:
        row.setdefault("grid", grid_name)
    row.setdefault("wall_s", round(wall, 3))
    row.setdefault("finished_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return row


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_description(self, s: str) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, name: str | None, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return _NoBar()
    return tqdm(
        total=total,
        desc=name or "grid",
        unit="run",
        dynamic_ncols=True,
        file=sys.stderr,
        smoothing=0.1,
    )


def load_run_fn(ref: str) -> RunFn:
    """``"package.module:function"`` -> the function (used by ``--run-fn`` for tests)."""
    mod, _, attr = ref.partition(":")
    if not attr:
        raise ValueError(f"--run-fn needs 'module:function', got {ref!r}")
    return getattr(importlib.import_module(mod), attr)


# --------------------------------------------------------------------------- real runs


class StudentRunner:
    """The default run function: trains/loads teachers and runs ``students.run_student``.

    Datasets and teachers are loaded once and reused across runs (specs are
    ordered teacher-major by :func:`expand`).
    """

    def __init__(
        self,
        cfg: Mapping[str, Any],
        *,
        device: str = "auto",
        data_dir: str | None = None,
        progress: bool = False,
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.data_dir = data_dir
        self.progress = progress
        self.teachers_dir = Path(cfg.get("teachers_dir", "runs/teachers"))
        self._datasets: dict[tuple[str, int], Any] = {}
        self._teachers: dict[str, Any] = {}

    def dataset(self, name: str, seed: int = 0) -> Any:
        from reference_experiments import data

        key = (name, seed)
        if key not in self._datasets:
            self._datasets.clear()  # hold one dataset at a time
            self._datasets[key] = data.load_dataset(name, self.data_dir, seed=seed)
        return self._datasets[key]

    def teacher_path(self, spec: RunSpec) -> Path:
        """The teacher's safetensors; trained (once, shared across configs) when missing.

        Trained teachers live in ``teachers_dir/<arch>_<hash of identity>/`` so that
        teachers differing in anything (epochs, seed, lr, dataset) never collide.
        """
        if spec.get("teacher_path"):
            return Path(spec["teacher_path"])
        t = self.cfg["teachers"][spec["teacher"]]
        if "path" in t:
            return Path(t["path"])
        from reference_experiments import teacher

        ident = spec["teacher_id"]
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]
        out_dir = self.teachers_dir / f"{ident['arch']}_{digest}"
        ds = self.dataset(ident["dataset"])
        path = out_dir / (
            teacher.teacher_name(ident["arch"], ds, ident["epochs"], ident["seed"]) + ".safetensors"
        )
        if not path.exists():
            print(f"training teacher {spec['teacher']} ({ident}) -> {out_dir}", file=sys.stderr)
            kw = {k: ident[k] for k in ("lr", "batch_size") if k in ident}
            path = Path(
                teacher.train_teacher(
                    ident["arch"],
                    ds,
                    epochs=ident["epochs"],
                    seed=ident["seed"],
                    out_dir=out_dir,
                    device=self.device,
                    progress=self.progress,
                    **kw,
                )
            )
        return path

    def teacher(self, spec: RunSpec) -> tuple[Path, Any]:
        """(path, (model, metadata)), loaded once and reused while the teacher is the same."""
        from reference_experiments import teacher

        path = self.teacher_path(spec)
        key = str(path)
        if key not in self._teachers:
            self._teachers.clear()
            self._teachers[key] = teacher.load_teacher(path, self.device)
        return path, self._teachers[key]

    def config(self, spec: RunSpec, teacher_path: Path | None) -> Any:
        """The ``StudentConfig`` of a spec (spec keys it does not know are left out)."""
        import dataclasses

        from reference_experiments.students import StudentConfig

        names = {f.name for f in dataclasses.fields(StudentConfig)}
        values = {
            k: v
            for k, v in spec.items()
            if k in names and k not in ("teacher", "device", "data_dir") and v is not None
        }
        values["teacher"] = str(teacher_path) if teacher_path else None
        values["device"] = self.device
        values["data_dir"] = self.data_dir
        return StudentConfig(**values)

    def __call__(self, spec: RunSpec) -> Mapping[str, Any]:
        from reference_experiments.students import run_student

        ds = self.dataset(spec["dataset"])
        if spec["method"] == "ce":  # CE-only never calls the teacher: don't train one for it
            path = self.teacher_path(spec) if self._teacher_available(spec) else None
            model = self._teachers.get(str(path)) if path else None
        else:
            path, model = self.teacher(spec)
        return run_student(self.config(spec, path), dataset=ds, teacher=model)

    #: spec keys that must agree for runs to share one stacked step
    STACK_KEYS = (
        "dataset",
        "teacher_id",
        "student_arch",
        "method",
        "budget",
        "preset",
        "teacher_view",
        "batch_size",
        "max_epochs",
        "patience",
    )

    def batch_key(self, spec: RunSpec) -> str:
        return json.dumps([spec.get(k) for k in self.STACK_KEYS], sort_keys=True, default=str)

    def run_batch(self, specs: Sequence[RunSpec]) -> list[Mapping[str, Any]]:
        """Several runs (same :meth:`batch_key`) through ``students.run_students``, which
        stacks compatible runs (seeds, lrs) into one ``torch.func.vmap`` step."""
        from reference_experiments.students import run_students

        spec = specs[0]
        ds = self.dataset(spec["dataset"])
        if spec["method"] == "ce":
            path = self.teacher_path(spec) if self._teacher_available(spec) else None
            model = self._teachers.get(str(path)) if path else None
        else:
            path, model = self.teacher(spec)
        return run_students([self.config(s, path) for s in specs], dataset=ds, teacher=model)

    def _teacher_available(self, spec: RunSpec) -> bool:
        if spec.get("teacher_path"):
            return Path(spec["teacher_path"]).exists()
        if spec.get("teacher") not in self.cfg["teachers"]:
            return False
        t = self.cfg["teachers"][spec["teacher"]]
        return "path" in t and Path(t["path"]).exists()
