"""What a GPU window carries in, and what to do with what came back.

``python -m reference_experiments.carry prepare --plan cifar [--returned DIR ...]`` fills
the folders ``gpu/campaign.sh`` reads, in the repository root (each must be ignored by
git, so it travels only through ``carry``):

* ``.gpu_wheels/`` -- keras, namex and optree wheels for Python 3.12 (the GPU machine
  has none; the command to download them is printed when they are missing);
* ``.gpu_data/<name>/`` -- the plan's data set (``cifar``: cifar10-jpeg; ``cars``:
  stanford-cars-train64), the files its ``SHA256SUMS`` lists;
* ``.gpu_teachers/<key>/`` -- the teachers earlier windows returned (``--returned``:
  copies of their ``$OUT``) for the plan's data set;
* ``.gpu_rows/<k>.jsonl`` -- those windows' rows, so their runs are not run again;

then checks that the working tree and these folders stay under the 64 MiB a call
carries, and prints the ``carry`` list. ``commit --returned DIR ...`` moves returned
rows into ``reference_experiments/results/<grid>/results.jsonl`` (by each row's ``grid``,
without repeats) and teachers into ``reference_experiments/teachers/<key>/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["CARRY_LIMIT", "PLANS", "commit", "prepare"]

ROOT = Path(__file__).resolve().parents[1]
#: bytes a call carries: the working tree and the named folders together
CARRY_LIMIT = 64 * 2**20
#: carry plan -> (data set folder in the shared data, the data set's name in teachers)
PLANS: dict[str, tuple[str, str]] = {
    "cifar": ("cifar10-jpeg", "cifar10-jpeg"),
    "cars": ("stanford-cars-train64", "cars64"),
}
WHEELS = ("keras", "namex", "optree")
DOWNLOAD = (
    "python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 "
    "--implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "
    "-d .gpu_wheels keras namex optree"
)


def _header(path: Path) -> dict:
    """The ``ckd_teacher`` metadata in a safetensors file's header."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(size)).get("__metadata__") or {}
    return json.loads(meta.get("ckd_teacher", "{}"))


def _teacher_dataset(folder: Path) -> str | None:
    weights = sorted(folder.glob("*.safetensors"))
    return _header(weights[0]).get("dataset") if weights else None


def _tree_bytes(root: Path) -> int:
    """Bytes of the files a call sends: tracked, and untracked that git does not ignore."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    names = [n for n in out.decode().split("\0") if n]
    return sum((root / n).stat().st_size for n in names if (root / n).is_file())


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _replace_folder(dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    return dest


def prepare(plan: str, returned: Sequence[Path], *, root: Path, shared: Path) -> list[str]:
    """Fills the carried folders for ``plan`` (see the module docstring); returns the
    ``carry`` list. Raises ``ValueError`` over the limit or with a folder git tracks."""
    data_name, teacher_data = PLANS[plan]
    data = _replace_folder(root / ".gpu_data" / data_name)
    sums = (shared / data_name / "SHA256SUMS").read_text().splitlines()
    for name in ["SHA256SUMS", *(line.split()[-1].lstrip("*") for line in sums if line.strip())]:
        shutil.copy2(shared / data_name / name, data / name)
    teachers = _replace_folder(root / ".gpu_teachers")
    rows = _replace_folder(root / ".gpu_rows")
    for k, window in enumerate(returned):
        for folder in sorted(p for p in window.iterdir() if p.is_dir()):
            if _teacher_dataset(folder) == teacher_data:
                shutil.copytree(folder, teachers / folder.name, dirs_exist_ok=True)
        if (window / "rows.jsonl").is_file():
            shutil.copy2(window / "rows.jsonl", rows / f"{k}.jsonl")
    carry = [".gpu_wheels", ".gpu_data", ".gpu_teachers", ".gpu_rows"]
    missing = [w for w in WHEELS if not list((root / ".gpu_wheels").glob(f"{w}-*.whl"))]
    if missing:
        raise ValueError(f"no wheel of {', '.join(missing)} in .gpu_wheels; run: {DOWNLOAD}")
    tracked = [c for c in carry if not _ignored(root, c)]
    if tracked:
        raise ValueError(f"git does not ignore {', '.join(tracked)}: add them to .gitignore")
    total = _tree_bytes(root) + sum(_folder_bytes(root / c) for c in carry)
    if total > CARRY_LIMIT:
        raise ValueError(f"{total / 2**20:.1f} MiB to carry, over {CARRY_LIMIT / 2**20:.0f} MiB")
    print(f"carry: {total / 2**20:.1f} MiB of {CARRY_LIMIT / 2**20:.0f}", file=sys.stderr)
    return carry


def _ignored(root: Path, path: str) -> bool:
    done = subprocess.run(["git", "check-ignore", "-q", path + "/"], cwd=root)
    return done.returncode == 0


def commit(returned: Sequence[Path], *, root: Path) -> dict[str, int]:
    """Returned rows into the committed results (by grid, no repeats) and teachers into
    the committed teachers; returns the new rows per grid."""
    from .rows import append_row, read_rows

    counts: dict[str, int] = {}
    for window in returned:
        for row in read_rows(window / "rows.jsonl"):
            grid = row.get("grid") or "campaign"
            dest = root / "reference_experiments" / "results" / grid / "results.jsonl"
            if append_row(dest, row):
                counts[grid] = counts.get(grid, 0) + 1
        for folder in sorted(p for p in window.iterdir() if p.is_dir()):
            dest = root / "reference_experiments" / "teachers" / folder.name
            shutil.copytree(folder, dest, dirs_exist_ok=True)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reference_experiments.carry", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="fill the carried folders, print the carry list")
    prep.add_argument("--plan", choices=tuple(PLANS), required=True)
    prep.add_argument("--shared-data", default=str(ROOT.parent / "shared" / "data"))
    com = sub.add_parser("commit", help="returned rows and teachers into the repository")
    for s in (prep, com):
        s.add_argument("--returned", action="append", default=[], metavar="DIR")
    a = p.parse_args(argv)
    returned = [Path(d) for d in a.returned]
    if a.cmd == "prepare":
        print(json.dumps(prepare(a.plan, returned, root=ROOT, shared=Path(a.shared_data))))
    else:
        print(json.dumps(commit(returned, root=ROOT)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
