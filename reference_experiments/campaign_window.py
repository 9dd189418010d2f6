"""What a GPU window returns and how it gets its teachers (see :mod:`.campaign`).

:class:`Window` is ``$OUT``: the log, ``rows.jsonl``, ``failures.jsonl`` and the
teachers' files (``<key>/<file>``, one folder below it), at most :data:`MAX_FILES`
files in all, each under :data:`MAX_FILE_BYTES` (the device tool's limits).
:class:`Teachers` finds a step's teachers or trains them (fp16, shards under
:data:`SHARD_BYTES`) and returns them through the window.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import RunConfig
from .rows import atomic_write_bytes

if TYPE_CHECKING:
    from .campaign import Guard

__all__ = ["MAX_FILES", "MAX_FILE_BYTES", "SHARD_BYTES", "Teachers", "Window"]

#: files and bytes per file that come back from a window (the device tool's limits)
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
#: teachers are saved in shards below this (a margin under MAX_FILE_BYTES)
SHARD_BYTES = 15 * 2**20
Log = Callable[[str], None]


class Window:
    """``$OUT`` of one window and its file budget: the log, ``rows.jsonl``,
    ``failures.jsonl`` and the teachers' files (``<key>/<file>``), at most
    :data:`MAX_FILES` in all, each under :data:`MAX_FILE_BYTES`."""

    RESERVED = ("log", "rows.jsonl", "failures.jsonl")

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rows = out / "rows.jsonl"
        self.failures = out / "failures.jsonl"

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.rglob("*") if p.is_file())

    def free(self) -> int:
        """Files the teachers may still add."""
        teachers = [p for p in self.files() if p.name not in self.RESERVED]
        return MAX_FILES - len(self.RESERVED) - len(teachers)

    def publish(self, key_folder: str, files: Sequence[Path], log: Log) -> bool:
        """Copies a teacher's ``files`` to ``$OUT/<key_folder>/`` if they fit the budget."""
        big = [p.name for p in files if p.stat().st_size >= MAX_FILE_BYTES]
        if big or len(files) > self.free():
            log(f"campaign: teacher {key_folder} not returned: {len(files)} files "
                f"({', '.join(big) or 'sizes ok'}), {self.free()} free")  # fmt: skip
            return False
        (self.out / key_folder).mkdir(parents=True, exist_ok=True)
        for p in files:
            shutil.copy2(p, self.out / key_folder / p.name)
        log(f"campaign: teacher {key_folder} returned in {len(files)} files")
        return True

    def append(self, path: Path, obj: Mapping[str, Any]) -> None:
        """Adds one JSON line (atomically; this process is the only writer)."""
        old = path.read_bytes() if path.exists() else b""
        line = json.dumps(dict(obj), sort_keys=True, default=str) + "\n"
        atomic_write_bytes(path, old + line.encode())


class Teachers:
    """A step's teachers: found (``--teachers-in``, committed, trained earlier into
    ``work``), or trained into ``work`` when the guard predicts they finish, then
    returned through the window."""

    def __init__(
        self,
        cfg: Mapping[str, Any],
        dirs: Iterable[Path],
        work: Path,
        window: Window,
        device: str | None,
        log: Log,
    ) -> None:
        self.cfg, self.dirs, self.work = cfg, [Path(d) for d in dirs], Path(work)
        self.window, self.device, self.log = window, device, log
        self.step_s: dict[str, float] = {}

    def find(self, run: RunConfig) -> Path | None:
        from .teacher_files import find_teacher

        spec = self.cfg["teachers"][run.teacher_key.split("@")[0]]
        if "path" in spec:
            return Path(spec["path"])
        folder = run.teacher_key.replace("@", "_")
        for d in [*self.dirs, self.work]:
            if (d / folder).is_dir():
                found = find_teacher(d / folder)
                if found is not None:
                    return found
        return None

    def ensure(self, run: RunConfig, dataset: Any, guard: Guard) -> Path | None:
        """The teacher's path; trained first if it is missing and fits, else None."""
        from .preflight import measure_teacher_step
        from .teacher import TeacherNotFinished, train_teacher
        from .teacher_spec import TeacherSpec

        found = self.find(run)
        if found is not None:
            return found
        name = run.teacher_key.split("@")[0]
        spec = TeacherSpec.from_grid(self.cfg["teachers"][name], dataset.name)
        if spec.arch not in self.step_s:
            self.step_s[spec.arch] = measure_teacher_step(spec, dataset, self.device)
        need = guard.teacher_seconds(spec, len(dataset.y_train), self.step_s[spec.arch])
        if not guard.fits(need):
            self.log(f"campaign: teacher {run.teacher_key} needs ~{need:.0f} s, "
                     f"{guard.left():.0f} s left: not started")  # fmt: skip
            return None
        folder = run.teacher_key.replace("@", "_")
        self.log(f"campaign: training teacher {run.teacher_key} (~{need:.0f} s predicted)")
        import torch

        try:
            path = train_teacher(
                spec, dataset, out_dir=self.work / folder, device=self.device or "auto",
                progress=False, deadline=guard.deadline, log=self.log,
                save_dtype=torch.float16, max_shard_bytes=SHARD_BYTES,
            )  # fmt: skip
        except TeacherNotFinished as e:
            self.log(f"campaign: teacher {run.teacher_key}: {e} (resume kept in {self.work})")
            return None
        self.window.publish(folder, _returned_files(self.work / folder), self.log)
        return path


def _returned_files(folder: Path) -> list[Path]:
    """A saved teacher's weights, and its JSON only where the weights are shards."""
    weights = sorted(p for p in folder.glob("*.safetensors") if ".resume" not in p.name)
    sharded = any("-of-" in p.name for p in weights)
    jsons = [p for p in folder.glob("*.json") if ".resume" not in p.name] if sharded else []
    return weights + sorted(jsons)
