"""The GPU campaign: the paper's grids in priority order, within a time limit, resumable.

``python -m reference_experiments campaign --minutes 8 --out DIR`` works through
:data:`PLAN` -- each step a bundled grid config, optionally narrowed (e.g. to
one teacher -> student pair and three seeds first) -- and for each stack of
pending runs checks the clock first: a stack starts only if the time it is
expected to take (the last stack's time of that step, scaled by its runs)
still fits before the deadline, so the campaign ends cleanly before
``--minutes``. Every finished row is appended to ``DIR/<config>/results.jsonl``
at once and every trained teacher lands in ``DIR/teachers/``; runs already in
``DIR`` or in the committed ``reference_experiments/results/<config>/`` are
skipped, and committed teachers (``reference_experiments/teachers/``) are
reused, so each window continues where the last one stopped.

The same code path runs on the CPU in the tests, on a tiny digits plan.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import grid
from .config import RunConfig
from .rows import finished_ids

__all__ = ["PLAN", "Step", "run_campaign"]

PACKAGE = Path(__file__).resolve().parent
COMMITTED_RESULTS = PACKAGE / "results"
COMMITTED_TEACHERS = PACKAGE / "teachers"


@dataclass(frozen=True)
class Step:
    """A grid config, narrowed to runs whose fields take the given values."""

    config: str
    only: Mapping[str, Sequence[Any]] = field(default_factory=dict)

    def runs(self, cfg: Mapping[str, Any]) -> list[RunConfig]:
        runs = grid.expand(cfg)
        return [r for r in runs if all(getattr(r, k) in v for k, v in self.only.items())]


#: priority order: teachers come with their first step; Table 1's first pair
#: with 3 seeds, then the other pairs, seeds 3-4, Table 2, Fig. 3 and Fig. 4
PLAN: tuple[Step, ...] = (
    Step("table1", {"student_arch": ("wrn_16_2",), "seed": (0, 1, 2)}),
    Step("table1", {"seed": (0, 1, 2)}),
    Step("table1", {}),
    Step("table2", {"seed": (0, 1, 2)}),
    Step("fig3_cars", {}),
    Step("fig4_rkd_d", {}),
    Step("table2", {}),
)


def run_campaign(
    minutes: float,
    out: str | Path,
    *,
    plan: Sequence[Step] = PLAN,
    device: str | None = None,
    data_dir: str | None = None,
    stack: int = 32,
    load: Callable[[str], Mapping[str, Any]] | None = None,
    committed: Path = COMMITTED_RESULTS,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    dry_run: bool = False,
) -> dict[str, int]:
    """Runs ``plan`` until ``minutes`` are spent; returns the new rows per config.
    ``dry_run``: validate every step and count its pending runs, train nothing."""
    start = time.monotonic()
    deadline = start + 60.0 * minutes
    out = Path(out)
    counts: dict[str, int] = {}
    for step in plan:
        if load is None:
            raw = dict(grid.load_config(grid.resolve_config(step.config)))
        else:
            raw = dict(load(step.config))
        raw["teachers_dir"] = str(out / "teachers")
        cfg = grid.parse_config(raw)
        results = out / cfg["name"] / "results.jsonl"
        done = finished_ids(results) | finished_ids(committed / cfg["name"] / "results.jsonl")
        runs = grid.with_overrides(step.runs(cfg), device=device, data_dir=data_dir)
        pending = [r for r in runs if r.run_id() not in done]
        if dry_run:
            log(f"campaign: {step.config} {dict(step.only)}: {len(pending)} of {len(runs)} to run")
            continue
        runner = grid.Runner(cfg, teachers=[COMMITTED_TEACHERS])
        per_run: dict[str, float] = {}  # method -> seconds per run of its last stack
        for chunk in grid.stacks(pending, stack):
            left = deadline - time.monotonic()
            guess = per_run.get(chunk[0].method, max(per_run.values(), default=0.0))
            if left <= 0 or guess * len(chunk) > left:
                log(f"campaign: {left:.0f} s left, a stack of {len(chunk)} needs ~"
                    f"{guess * len(chunk):.0f} s: stopping")  # fmt: skip
                return counts
            t0 = time.monotonic()
            got = grid.run_grid(
                chunk,
                results,
                runner,
                stack=stack,
                grid_name=cfg["name"],
                paper_dataset=cfg.get("paper_dataset"),
                progress=False,
            )
            took = time.monotonic() - t0
            per_run[chunk[0].method] = took / len(chunk)
            counts[cfg["name"]] = counts.get(cfg["name"], 0) + got["ran"]
            log(
                f"campaign: {cfg['name']} {chunk[0].method} n={chunk[0].budget} x{len(chunk)} "
                f"in {took:.0f} s; {deadline - time.monotonic():.0f} s left"
            )
    return counts
