"""Cluster launcher: a grid's pending stacks as one Slurm job array, through submitit.

``grid CONFIG --launcher submitit`` plans as the local grid does (the runs not yet
finished, grouped into stacks of ``--stack`` runs), packs ``--gpus-per-job`` stacks
into each job, and submits the jobs as one array (``AutoExecutor``: Slurm by default;
``--submitit-cluster local`` runs the same jobs as local processes). A job trains its
stacks, one per GPU at a time, and appends every row to the stack's own file
``<results stem>.parts/stack-<hash>.jsonl``: no two jobs or nodes share a file, so no
cross-node lock is needed. Re-submitting skips every run finished in the main results
file or in any part file (a requeued job also skips its own finished runs);
``report <results folder>`` reads them all. Teachers must exist before submitting
(imported, or trained by a local ``grid`` run): jobs that trained the same teacher
at once would race for its file.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import RunConfig
from .result_files import finished_run_ids, job_parts_dir

__all__ = [
    "ClusterOptions",
    "launch_from_cli",
    "plan_jobs",
    "run_job",
    "stack_results_path",
    "submit_grid",
    "untrained_teachers",
]


@dataclass(frozen=True)
class ClusterOptions:
    """What each array job asks the cluster for, and where submitit keeps its logs."""

    folder: str
    partition: str | None = None
    gpus_per_job: int = 1
    time_limit_min: int = 24 * 60
    array_parallelism: int | None = None
    cluster: str | None = "slurm"  # None: submitit's choice; "local": local processes


def stack_results_path(results: str | os.PathLike[str], chunk: Sequence[RunConfig]) -> Path:
    """The file a stack's rows go to, named after its run ids (the same on re-submission)."""
    digest = hashlib.sha256(" ".join(r.run_id() for r in chunk).encode()).hexdigest()[:16]
    return job_parts_dir(results) / f"stack-{digest}.jsonl"


def plan_jobs(
    runs: Sequence[RunConfig], results: str | os.PathLike[str], stack: int, gpus_per_job: int
) -> list[list[list[RunConfig]]]:
    """The pending runs (finished in neither ``results`` nor its part files) in stacks
    (:func:`grid.stacks`), ``gpus_per_job`` stacks per job."""
    from .grid import stacks

    done = finished_run_ids(results)
    chunks = stacks([r for r in runs if r.run_id() not in done], stack)
    per_job = max(1, gpus_per_job)
    return [chunks[i : i + per_job] for i in range(0, len(chunks), per_job)]


def _train_stack(
    cfg: Mapping[str, Any],
    chunk: Sequence[RunConfig],
    results: str,
    grid_name: str | None,
    paper_dataset: str | None,
    keep_going: bool,
) -> dict[str, int]:
    """One stack, resumably, into its own results file."""
    from .grid import Runner, run_grid

    return run_grid(
        chunk,
        stack_results_path(results, chunk),
        Runner(cfg),
        stack=len(chunk),
        keep_going=keep_going,
        grid_name=grid_name,
        paper_dataset=paper_dataset,
        progress=False,
    )


def run_job(
    job: Sequence[Sequence[RunConfig]],
    *,
    cfg: Mapping[str, Any],
    results: str,
    grid_name: str | None = None,
    paper_dataset: str | None = None,
    keep_going: bool = False,
) -> dict[str, int]:
    """An array job: its stacks, at once on ``cuda:0..`` in spawned processes when it
    holds several (runs on ``auto``/``cuda`` only; others keep their device), else in
    this process. Returns the summed counts of :func:`grid.run_grid`."""
    args = (cfg, results, grid_name, paper_dataset, keep_going)
    if len(job) == 1:
        outs = [_train_stack(cfg, job[0], *args[1:])]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        placed = [
            [replace(r, device=f"cuda:{i}") if r.device in ("auto", "cuda") else r for r in chunk]
            for i, chunk in enumerate(job)
        ]
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=len(job), mp_context=spawn) as pool:
            futures = [pool.submit(_train_stack, cfg, chunk, *args[1:]) for chunk in placed]
            outs = [f.result() for f in futures]
    return {k: sum(o[k] for o in outs) for k in outs[0]}


def untrained_teachers(cfg: Mapping[str, Any], runs: Sequence[RunConfig]) -> list[str]:
    """Teacher keys that ``runs`` need (methods that query a teacher) but that are neither
    configured files nor trained yet."""
    from . import methods
    from .grid import Teachers

    teachers = Teachers(cfg)
    need = {
        r.teacher_key: r
        for r in runs
        if r.teacher_key and not r.teacher and methods.get(r.method).uses_teacher
    }
    return sorted(key for key, run in need.items() if teachers.existing(run) is None)


def submit_grid(
    cfg: Mapping[str, Any],
    runs: Sequence[RunConfig],
    results: str | os.PathLike[str],
    options: ClusterOptions,
    *,
    stack: int,
    keep_going: bool = False,
) -> list[Any]:
    """Submits the pending runs as one job array; returns the submitit jobs ([] when
    every run is finished). ``job.result()`` waits for a job's counts."""
    import submitit

    jobs = plan_jobs(runs, results, stack, options.gpus_per_job)
    missing = untrained_teachers(cfg, [r for job in jobs for chunk in job for r in chunk])
    if missing:
        raise ValueError(
            f"teacher(s) {', '.join(missing)} not trained yet: the jobs would train each at "
            f"once; train them first (e.g. a local `grid {cfg['name']} --max-runs 1` per "
            "teacher, or import-teacher and `path = ...` in the config)"
        )
    pending = sum(len(chunk) for job in jobs for chunk in job)
    print(
        f"grid {cfg['name']}: {len(runs)} runs, {len(runs) - pending} done, {pending} to run "
        f"in {len(jobs)} jobs of at most {options.gpus_per_job} stacks",
        file=sys.stderr,
    )
    if not jobs:
        return []
    executor = submitit.AutoExecutor(folder=options.folder, cluster=options.cluster)
    executor.update_parameters(
        name=f"ckd-{cfg['name']}",
        timeout_min=options.time_limit_min,
        gpus_per_node=options.gpus_per_job,
        slurm_partition=options.partition,
        slurm_array_parallelism=options.array_parallelism,
    )
    task = functools.partial(
        run_job,
        cfg=dict(cfg),
        results=str(results),
        grid_name=cfg["name"],
        paper_dataset=cfg.get("paper_dataset"),
        keep_going=keep_going,
    )
    submitted = executor.map_array(task, jobs)
    ids = ", ".join(str(j.job_id) for j in submitted)
    print(f"submitted {len(submitted)} jobs ({ids}); logs in {options.folder}", file=sys.stderr)
    return list(submitted)


def launch_from_cli(
    a: Any, cfg: Mapping[str, Any], runs: Sequence[RunConfig], results: Path
) -> int | None:
    """``grid``'s launcher options: None for ``--launcher local`` (the caller trains
    here; a submitit-only option given with it is an error), else submits the array and
    returns the exit status (with ``--wait``: 1 if a job failed)."""
    from .cli_options import LAUNCHER_ONLY

    if a.launcher == "local":
        given = [k for k, default in LAUNCHER_ONLY.items() if getattr(a, k) != default]
        if given:
            names = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ValueError(f"{names}: only with --launcher submitit")
        return None
    options = ClusterOptions(
        folder=a.submitit_folder or str(results.parent / "submitit"),
        partition=a.slurm_partition,
        gpus_per_job=a.gpus_per_job,
        time_limit_min=a.time_limit,
        array_parallelism=a.array_parallelism,
        cluster=a.submitit_cluster,
    )
    jobs = submit_grid(cfg, runs, results, options, stack=a.stack, keep_going=a.keep_going)
    if not a.wait:
        return 0
    failed = 0
    for job in jobs:
        try:
            counts = job.result()
        except Exception as e:  # the job's own traceback is in its submitit log
            print(f"job {job.job_id} failed: {' '.join(str(e).split())[:300]}", file=sys.stderr)
            failed += 1
            continue
        print(f"job {job.job_id}: {counts}", file=sys.stderr)
        failed += counts["failed"] > 0
    return 1 if failed else 0
