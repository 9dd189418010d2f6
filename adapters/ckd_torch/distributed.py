"""Global-batch collectives for the torch adapter (``torch.distributed``).

Under data-parallel training each rank holds a shard of the global batch.
The all-pairs losses (CKD, RKD_d) then need sums over the global batch: the
core computes them with an ``all_reduce`` callable (O(dim) numbers per call);
:func:`all_reduce_sum` is that callable for torch. RKD needs every pairwise
distance and angle, so the core's ``all_gather`` hook gets
:func:`gather_rows`, which all-gathers the embeddings (O(batch·dim) per
call, and the loss then costs memory and time of the global batch on every
rank). ``ckd_torch``'s ``global_batch=True`` passes these two.

Gradient convention (both functions): the backward of rank ``r`` returns
``world_size`` times the partial derivative of the (global, replicated) loss
with respect to rank ``r``'s rows. ``DistributedDataParallel`` averages the
parameter gradients over ranks, so after ``backward()`` every parameter
gradient equals the single-process gradient on the concatenated global
batch. If you sum gradients yourself instead of averaging, divide by
``world_size``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum", "gather_rows", "is_distributed", "world_size"]

ProcessGroup = Any


def is_distributed(group: ProcessGroup | None = None) -> bool:
    """Whether ``torch.distributed`` is initialized (and ``group`` has several ranks)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: ProcessGroup | None = None) -> int:
    """Ranks in ``group`` (1 when ``torch.distributed`` is not initialized)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward is again a sum over ranks.

    Same semantics as ``torch.distributed.nn.functional.all_reduce`` (which
    is deprecated), without its warning.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


def all_reduce_sum(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Autograd-aware sum of ``tensor`` over the ranks of ``group``.

    Identity when ``torch.distributed`` is not initialized, so the same code
    runs in a single process.
    """
    if not is_distributed(group):
        return tensor
    return _AllReduceSum.apply(tensor, group)


class _GatherRows(torch.autograd.Function):
    """All-gather of ``(n_r, ...)`` shards of possibly different sizes.

    The backward keeps only this rank's slice of the upstream gradient,
    scaled by the world size: every rank evaluates the same loss of the
    same gathered tensor, so this equals the exact backward of an all-gather
    (a sum over ranks of the upstream gradients) without communication.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        size = dist.get_world_size(group)
        rank = dist.get_rank(group)
        local = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
        counts = [torch.zeros_like(local) for _ in range(size)]
        dist.all_gather(counts, local, group=group)
        sizes = [int(c.item()) for c in counts]
        longest = max(sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        shards = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(shards, padded.contiguous(), group=group)
        ctx.start = sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        ctx.scale = size
        return torch.cat([shard[:n] for shard, n in zip(shards, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad[ctx.start : ctx.stop] * ctx.scale, None


def gather_rows(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Concatenation of every rank's ``tensor`` along dim 0, in rank order.

    Shards may differ in size. Gradients flow to this rank's rows only,
    scaled by the world size (see the module docstring). Identity when
    ``torch.distributed`` is not initialized.
    """
    if not is_distributed(group):
        return tensor
    return _GatherRows.apply(tensor, group)
