"""Grids: a TOML file expanded into :class:`RunConfig` s, run resumably in stacks.

A config names teachers and one or more ``[[runs]]`` blocks. A block is the
cartesian product of its list-valued axes -- ``pairs`` (``[teacher,
student_arch]``) and the plural of every :data:`config.GRID_AXES` field
(``methods``, ``budgets``, ``seeds``, ``lrs``, ``datasets``, ``presets``,
``teacher_views``) -- over its scalar :class:`RunConfig` fields and
``[defaults]``. A teacher is ``path = "..."`` or trained on first use
(``train_epochs``, ``seed``; saved under ``teachers_dir``).

Finished runs are rows of the results JSONL (:mod:`.rows`), keyed by
:meth:`RunConfig.run_id`; a rerun skips them (and those a cluster job array wrote to
the per-job files beside it, :mod:`.launcher`), so a grid survives any kill.
Pending runs with equal :meth:`RunConfig.stack_key` train together, up to
``stack`` at a time, in one :func:`engine.train` call.

>>> cfg = parse_config({"name": "t", "defaults": {"dataset": "digits", "preset": "fast"},
...     "teachers": {"cnn": {"arch": "digits_cnn", "train_epochs": 5}},
...     "runs": [{"pairs": [["cnn", "digits_mlp"]], "methods": ["ce", "kd"],
...               "budgets": [100, 200], "seeds": [0, 1]}]})
>>> runs = expand(cfg)
>>> len(runs), runs[0].method, runs[0].teacher_arch
(8, 'ce', 'digits_cnn')
>>> runs[0].run_id() == expand(cfg)[0].run_id()
True
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]  # same API under another name

from .config import GRID_AXES, RunConfig
from .result_files import finished_run_ids
from .rows import ResultRow, append_row
from .teacher_spec import TeacherSpec

__all__ = [
    "Runner",
    "Teachers",
    "expand",
    "load_config",
    "parse_config",
    "resolve_config",
    "run_grid",
    "select_shard",
    "stacks",
    "with_overrides",
]

#: a stack's trainer: configs -> (config, row) per config (engine.train, or a stand-in in tests)
Trainer = Callable[[Sequence[RunConfig]], Sequence[tuple[RunConfig, ResultRow]]]
_FIELDS = {f.name for f in fields(RunConfig)}


CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def resolve_config(name: str) -> Path:
    """A path, or the name of a bundled config (``table1`` -> configs/table1.toml)."""
    for cand in (Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.toml"):
        if cand.is_file():
            return cand
    bundled = ", ".join(sorted(c.stem for c in CONFIG_DIR.glob("*.toml")))
    raise FileNotFoundError(f"config {name!r} not found (bundled: {bundled})")


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads and validates a grid config (TOML)."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    raw.setdefault("name", path.stem)
    return parse_config(raw)


def parse_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Validates a config mapping (as read from TOML) and fills in defaults."""
    cfg = copy.deepcopy(dict(raw))
    name = cfg.setdefault("name", "grid")
    cfg.setdefault("defaults", {})
    cfg.setdefault("teachers", {})
    cfg.setdefault("results", f"runs/{name}/results.jsonl")
    cfg.setdefault("teachers_dir", "runs/teachers")
    known = (_FIELDS - {"teacher"}) | set(GRID_AXES) | {"pairs"}
    blocks = cfg.get("runs")
    if not blocks:
        raise ValueError(f"config {name!r} has no [[runs]] block")
    for i, block in enumerate([cfg["defaults"], *blocks]):
        unknown = set(block) - known
        if unknown:
            where = "[defaults]" if i == 0 else f"[[runs]] block {i - 1}"
            raise ValueError(f"{where} of {name!r}: unknown keys {sorted(unknown)}")
    for i, block in enumerate(blocks):
        for pair in block.get("pairs", ()):
            if len(pair) != 2 or pair[0] not in cfg["teachers"]:
                raise ValueError(f"block {i}: pair {pair!r} is not [known teacher, student_arch]")
        if "pairs" not in block and "pairs" not in cfg["defaults"]:
            raise ValueError(f"[[runs]] block {i} of {name!r} has no pairs = [[teacher, student]]")
    for key, t in cfg["teachers"].items():
        if "arch" not in t or ("path" not in t and "train_epochs" not in t):
            raise ValueError(f"teacher {key!r} needs 'arch' and one of 'path', 'train_epochs'")
        if "path" not in t:
            try:
                TeacherSpec.from_grid(t, cfg["defaults"].get("dataset", "digits"))
            except (TypeError, ValueError) as e:
                raise ValueError(f"teacher {key!r}: {e}") from None
    return cfg


def _teacher_key(cfg: Mapping[str, Any], key: str, dataset: str) -> str:
    """``name@hash`` of what determines a teacher: its file, or how and on what it trains."""
    t = dict(cfg["teachers"][key])
    if "path" in t:
        ident = {"arch": t["arch"], "path": str(t["path"])}
    else:
        ident = {**t, "dataset": dataset}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]
    return f"{key}@{digest}"


def expand(cfg: Mapping[str, Any]) -> list[RunConfig]:
    """Every ``[[runs]]`` block's product, in config order, without repeats."""
    out: list[RunConfig] = []
    seen: set[str] = set()
    for block in cfg["runs"]:
        merged = {**cfg["defaults"], **block}
        fixed = {k: v for k, v in merged.items() if k in _FIELDS}
        axes: list[tuple[str, list[Any]]] = []
        for plural, name in GRID_AXES.items():
            if plural in merged:
                fixed.pop(name, None)
                axes.append((name, list(merged[plural])))
        pairs = [tuple(p) for p in merged["pairs"]]
        for pair, *values in itertools.product(pairs, *(v for _, v in axes)):
            kw = {**fixed, **{n: v for (n, _), v in zip(axes, values, strict=True)}}
            teacher, kw["student_arch"] = pair
            kw["teacher_arch"] = cfg["teachers"][teacher]["arch"]
            kw["teacher_key"] = _teacher_key(cfg, teacher, kw.get("dataset", "digits"))
            run = RunConfig.from_dict(kw).validate()
            if run.run_id() not in seen:
                seen.add(run.run_id())
                out.append(run)
    return out


def select_shard(runs: list[RunConfig], shard: str | None) -> list[RunConfig]:
    """``"i/n"``: the runs whose id falls in shard i of n (ids, not timing, decide)."""
    if not shard:
        return runs
    try:
        i, n = (int(v) for v in shard.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N, got {shard!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"bad shard {shard!r}: need 0 <= I < N")
    return [r for r in runs if int(r.run_id(), 16) % n == i]


def stacks(runs: Sequence[RunConfig], size: int) -> list[list[RunConfig]]:
    """Runs grouped by stack key (first-appearance order), in chunks of at most ``size``."""
    groups: dict[str, list[RunConfig]] = {}
    for r in runs:
        groups.setdefault(r.stack_key(), []).append(r)
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), max(1, size))]


class Teachers:
    """Teacher files of a grid: the configured path, or trained once and reused
    (``<dir>/<key>/``, so teachers differing in anything never collide). ``search``:
    more folders holding such ``<key>/`` teachers (e.g. committed ones), read first."""

    def __init__(
        self, cfg: Mapping[str, Any], *, device: str = "auto", search: Sequence[Path] = ()
    ):
        self.cfg = cfg
        self.device = device
        self.search = [Path(p) for p in search]

    def existing(self, run: RunConfig) -> Path | None:
        """The run's teacher file if it is configured or already trained, else None."""
        t = self.cfg["teachers"][run.teacher_key.split("@")[0]]
        if "path" in t:
            return Path(t["path"])
        from .teacher_files import find_teacher

        folder = run.teacher_key.replace("@", "_")
        for d in [*self.search, Path(self.cfg["teachers_dir"])]:
            found = find_teacher(d / folder)
            if found is not None:
                return found
        return None

    def path(self, run: RunConfig, dataset: Any) -> Path:
        """The run's teacher file, trained now (and saved) when it does not exist yet."""
        found = self.existing(run)
        if found is not None:
            return found
        from .teacher import train_teacher

        out_dir = Path(self.cfg["teachers_dir"]) / run.teacher_key.replace("@", "_")
        print(f"training teacher {run.teacher_key} -> {out_dir}", file=sys.stderr)
        table = self.cfg["teachers"][run.teacher_key.split("@")[0]]
        spec = TeacherSpec.from_grid(table, dataset.name)
        return train_teacher(spec, dataset, out_dir=out_dir, device=self.device)


def run_grid(
    runs: Sequence[RunConfig],
    results: str | os.PathLike[str],
    trainer: Trainer,
    *,
    max_runs: int | None = None,
    stack: int = 1,
    keep_going: bool = False,
    grid_name: str | None = None,
    paper_dataset: str | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Trains every run not yet in ``results``, one stack at a time; appends a row per run.

    A stack's rows are appended when it finishes, so a kill loses at most the
    stack in flight. Rows whose every lr diverged go to ``<results>.failed.jsonl``.
    Returns counts ``{"total", "skipped", "ran", "failed"}``.
    """
    if max_runs is not None and max_runs < 0:
        raise ValueError(f"max_runs must be >= 0, got {max_runs}")
    results = Path(results)
    done = finished_run_ids(results)
    pending = [r for r in runs if r.run_id() not in done]
    if max_runs is not None:
        pending = pending[:max_runs]
    counts = {"total": len(runs), "skipped": len(runs) - len(pending), "ran": 0, "failed": 0}
    chunks = stacks(pending, stack)
    print(
        f"grid {grid_name or ''}: {len(runs)} runs, {counts['skipped']} done or skipped, "
        f"{len(pending)} to run in {len(chunks)} stacks",
        file=sys.stderr,
    )
    failed = results.with_name(results.stem + ".failed.jsonl")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(pending), unit="run", disable=not progress, file=sys.stderr)
    try:
        for chunk in chunks:
            bar.set_description(f"{grid_name or 'grid'} {chunk[0].method}@{chunk[0].budget}")
            try:
                outs = list(trainer(chunk))
            except KeyboardInterrupt:
                raise
            except Exception as e:
                counts["failed"] += len(chunk)
                if not keep_going:
                    raise
                for run in chunk:
                    append_row(
                        failed,
                        {"run_id": run.run_id(), **run.as_dict(), "error": repr(e),
                         "traceback": traceback.format_exc()},
                        dedup=False,
                    )  # fmt: skip
                bar.update(len(chunk))
                continue
            for run, row in outs:
                row.grid, row.paper_dataset = grid_name, paper_dataset
                row.finished_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                if row.diverged:
                    counts["failed"] += 1
                    failure = {**row.to_json(run), "error": "every lr diverged"}
                    append_row(failed, failure, dedup=False)
                else:
                    append_row(results, row.to_json(run))
                    counts["ran"] += 1
            bar.update(len(chunk))
    finally:
        bar.close()
    return counts


class LastLoaded:
    """The data set and the teacher of the last stack, kept while the next stacks use
    the same ones (stacks come grouped by data set and teacher)."""

    def __init__(self) -> None:
        self._dataset: tuple[tuple[str, str | None], Any] | None = None
        self._teacher: tuple[str, Any] | None = None

    def dataset(self, run: RunConfig) -> Any:
        """``run``'s data set (``load_dataset``)."""
        from .data import load_dataset

        key = (run.dataset, run.data_dir)
        if self._dataset is None or self._dataset[0] != key:
            self._dataset = (key, load_dataset(run.dataset, run.data_dir))
        return self._dataset[1]

    def teacher(self, path: str | Path, device: str | None) -> Any:
        """The teacher saved at ``path`` (``load_teacher``: model and metadata)."""
        from .devices import resolve_device
        from .teacher import load_teacher

        if self._teacher is None or self._teacher[0] != str(path):
            self._teacher = (str(path), load_teacher(path, resolve_device(device)))
        return self._teacher[1]


class Runner(LastLoaded):
    """The grid's :data:`Trainer`: loads each dataset and teacher once, fills in the
    teacher file of every run, and trains a stack with :func:`engine.train`."""

    def __init__(
        self,
        cfg: Mapping[str, Any],
        *,
        teachers: Sequence[Path] = (),
        log: Callable[[str], None] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.teachers = teachers
        self.log = log

    def __call__(self, chunk: Sequence[RunConfig]) -> list[tuple[RunConfig, ResultRow]]:
        from . import engine, methods

        run = chunk[0]
        ds = self.dataset(run)
        teacher = None
        if methods.get(run.method).uses_teacher or run.teacher:
            path = Path(run.teacher) if run.teacher else None
            if path is None:
                teachers = Teachers(self.cfg, device=run.device, search=self.teachers)
                path = teachers.path(run, ds)
            teacher = self.teacher(path, run.device)
            chunk = [replace(r, teacher=str(path)) for r in chunk]
        return engine.train(chunk, dataset=ds, teacher=teacher, log=self.log)


def with_overrides(runs: Sequence[RunConfig], **values: Any) -> list[RunConfig]:
    """The runs with fields replaced (``None`` values ignored), e.g. ``device``."""
    given = {k: v for k, v in values.items() if v is not None}
    return [replace(r, **given).validate() for r in runs]
