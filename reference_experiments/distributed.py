"""Process-group helpers for ``torchrun`` (data-parallel teacher and student runs).

``torchrun --nproc_per_node=N -m reference_experiments {student,train-teacher} ...``
starts N processes with ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in the
environment. :func:`init_from_env` then joins the process group (gloo for CPU
tensors, NCCL for CUDA tensors) and pins each rank to ``cuda:LOCAL_RANK``;
without those variables it does nothing and every helper below answers as a
one-process run (rank 0 of 1), so the same code runs unchanged in a single
process.

What the reference experiments do with it (see docs/distributed.md):

* rank 0 alone queries the teacher (so the budget is counted once) and
  :func:`broadcast_tensors` sends the cached outputs to the other ranks;
* every rank draws the same epoch order and takes its :func:`shard`
  ``order[step][rank::world]`` of each global batch;
* rank 0 evaluates and writes results; the others write nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "barrier",
    "broadcast_float",
    "broadcast_object",
    "broadcast_tensors",
    "cleanup",
    "device_for",
    "init_from_env",
    "is_distributed",
    "is_main",
    "launched_by_torchrun",
    "local_rank",
    "rank",
    "shard",
    "shard_size",
    "sum_over_ranks",
    "world_size",
]

_OWNED = False  # whether init_from_env created the group (cleanup destroys only that one)


def launched_by_torchrun() -> bool:
    """Whether ``WORLD_SIZE`` (set by ``torchrun``) asks for more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init_from_env() -> bool:
    """Join the process group described by torchrun's environment variables.

    Backend: ``"cpu:gloo,cuda:nccl"`` when CUDA is available (CPU tensors such
    as pickled objects go through gloo, device tensors through NCCL), else
    ``"gloo"``. On CUDA the rank's current device becomes ``cuda:LOCAL_RANK``.
    Idempotent; a no-op (returns ``False``) without ``torchrun``.
    """
    global _OWNED
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if not launched_by_torchrun():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    _OWNED = True
    return True


def cleanup() -> None:
    """Destroy the process group if :func:`init_from_env` created it."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 (or a single process): the one that queries, evaluates and writes."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def device_for(device: str | torch.device) -> torch.device:
    """The device of this rank: ``auto``/``cuda`` without an index become
    ``cuda:LOCAL_RANK`` under torchrun; anything else is kept."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and is_distributed():
        dev = torch.device("cuda", local_rank() % torch.cuda.device_count())
    return dev


def shard(indices: torch.Tensor, rank_: int | None = None, world: int | None = None):
    """This rank's share ``indices[..., rank::world]`` of a global batch
    (``DistributedSampler``'s interleaving; shards differ by at most one)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return indices if w == 1 else indices[..., r::w]


def shard_size(n: int, rank_: int | None = None, world: int | None = None) -> int:
    """``len(range(rank, n, world))``: the size of this rank's share of ``n``."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return len(range(r, n, w))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; small objects only)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_float(value: float, src: int = 0) -> float:
    """A Python float of rank ``src`` on every rank."""
    return float(broadcast_object(float(value), src))


def broadcast_tensors(
    tensors: Mapping[str, torch.Tensor] | None, device: torch.device, src: int = 0
) -> dict[str, torch.Tensor]:
    """Rank ``src``'s dict of tensors on every rank, on ``device``.

    The names, shapes and dtypes travel pickled, then one broadcast per
    tensor. Other ranks may pass ``None``.
    """
    if not is_distributed():
        return dict(tensors or {})
    meta = None
    if rank() == src:
        assert tensors is not None
        meta = [
            (k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()
        ]
    meta = broadcast_object(meta, src)
    out: dict[str, torch.Tensor] = {}
    for name, shape, dtype in meta:
        if rank() == src:
            t = tensors[name].to(device).contiguous()  # type: ignore[index]
        else:
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.broadcast(t, src=src)
        out[name] = t
    return out


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no autograd); ``t`` itself in one process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
