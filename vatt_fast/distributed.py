"""Process-group helpers: rank/world queries, collectives for contrastive losses, set-up.

Everything here works with or without an initialised ``torch.distributed`` process
group (outside one, world size is 1 and the collectives return their input), on the
``gloo`` (CPU) and ``nccl`` (CUDA) backends.

Gathered tensors are laid out rank-major: rank ``r``'s local rows sit at
``[r * B, (r + 1) * B)`` of the result, so the local batch size ``B`` must be the same
on every rank (checked, with an error that names every rank's size).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.nn.functional import all_reduce as _differentiable_all_reduce

__all__ = [
    "GlobalBatchNorm1d",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "all_reduce_value",
    "broadcast_object",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_dist",
    "sync_batchnorm",
]

ProcessGroup = Optional["dist.ProcessGroup"]

_REDUCE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN", "mean": "SUM"}


def is_dist() -> bool:
    """True inside an initialised ``torch.distributed`` process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group: ProcessGroup = None) -> int:
    """This process's rank in ``group`` (default: the world); 0 outside a process group."""
    return dist.get_rank(group) if is_dist() else 0


def get_world_size(group: ProcessGroup = None) -> int:
    """Number of processes in ``group`` (default: the world); 1 outside a process group."""
    return dist.get_world_size(group) if is_dist() else 1


def _check_equal_batch(x: Tensor, world: int, group: ProcessGroup) -> None:
    """Raise on every rank when the ranks' leading sizes differ (one tiny all_gather)."""
    size = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes_list = [int(s.item()) for s in sizes]
    if len(set(sizes_list)) != 1:
        raise ValueError(
            f"all_gather needs the same local batch size on every rank (rank-major layout), got "
            f"{sizes_list} (rank {get_rank(group)} has {x.shape[0]}); give every rank the same batch "
            f"size, e.g. drop_last=True in the loader"
        )


def _gather(x: Tensor, world: int, group: ProcessGroup) -> Tensor:
    x = x.contiguous()
    wire = x.to(torch.uint8) if x.dtype == torch.bool else x  # gloo has no bool collectives
    parts = [torch.empty_like(wire) for _ in range(world)]
    dist.all_gather(parts, wire, group=group)
    out = torch.cat(parts, dim=0)
    return out.to(torch.bool) if x.dtype == torch.bool else out


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all_gather along dim 0. Backward: all_reduce(sum) the gradient, keep our slice.

    Each rank's loss depends on every rank's rows, so the gradient of rank ``r``'s
    rows is the sum over ranks of the gradient each rank computed for that slice.
    All-reduce then slice (rather than reduce-scatter) works on gloo as well as nccl.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:  # type: ignore[override]
        world = get_world_size(group)
        ctx.group = group
        ctx.rank = get_rank(group)
        ctx.batch = x.shape[0]
        return _gather(x, world, group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.batch
        return grad[start : start + ctx.batch], None


def all_gather_with_grad(x: Tensor, group: ProcessGroup = None, check_sizes: bool = True) -> Tensor:
    """Gather ``x`` from every rank, keeping the autograd graph.

    Every rank must call it (and, when the result takes part in a loss, call backward),
    since the backward is a collective too.

    Args:
        x: ``[B, ...]`` this rank's rows; same ``B`` and trailing shape on every rank.
        group: process group (default: the world).
        check_sizes: verify that every rank has the same ``B`` (one extra tiny
            collective); turn off only when the loader guarantees it.

    Returns:
        ``[world * B, ...]``, rank-major (rank ``r``'s rows at ``r * B``). Outside a
        process group, or with world size 1, ``x`` itself.
    """
    world = get_world_size(group)
    if world == 1:
        return x
    if check_sizes:
        _check_equal_batch(x, world, group)
    return _AllGatherWithGrad.apply(x, group)


def all_gather_no_grad(x: Tensor, group: ProcessGroup = None, check_sizes: bool = True) -> Tensor:
    """Gather ``x`` (any dtype, bool included) from every rank without autograd.

    Args:
        x: ``[B, ...]``; same ``B`` and trailing shape on every rank.
        group: process group (default: the world).
        check_sizes: as in :func:`all_gather_with_grad`.

    Returns:
        ``[world * B, ...]`` rank-major, detached; ``x.detach()`` outside a process group.
    """
    world = get_world_size(group)
    if world == 1:
        return x.detach()
    if check_sizes:
        _check_equal_batch(x, world, group)
    with torch.no_grad():
        return _gather(x.detach(), world, group)


def all_reduce_value(x: Tensor, op: str = "sum", group: ProcessGroup = None) -> Tensor:
    """Reduce ``x`` over ranks and return the result, detached (for values and counts).

    Args:
        x: tensor of any shape, the same shape on every rank.
        op: ``"sum"``, ``"mean"``, ``"max"`` or ``"min"``.
        group: process group (default: the world).

    Returns:
        A new tensor (``x`` is not modified), without gradient; ``x.detach().clone()``
        outside a process group.
    """
    if op not in _REDUCE_OPS:
        raise ValueError(f"op must be one of {sorted(_REDUCE_OPS)}, got {op!r}")
    out = x.detach().clone()
    world = get_world_size(group)
    if world == 1:
        return out
    dist.all_reduce(out, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]), group=group)
    if op == "mean":
        out = out / world
    return out


def init_distributed(device: torch.device) -> None:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1): NCCL on CUDA, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_dist():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself outside a process group)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch, for gloo (CPU) process groups.

    torch's ``nn.SyncBatchNorm`` refuses CPU tensors. Here sums and sums of squares are
    all-reduced with ``torch.distributed.nn.functional.all_reduce`` (differentiable: its
    backward all-reduces the gradients), so outputs and gradients equal those of one
    process holding the whole batch. Same parameters and buffers as ``nn.BatchNorm1d``, so
    state dicts load either way.
    """

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C)
        if not self.training or not is_dist():
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        local = torch.cat([xf.sum(0), (xf * xf).sum(0), xf.new_tensor([float(x.shape[0])])])  # (2C + 1,)
        total = _differentiable_all_reduce(local)
        count = total[-1]
        mean = total[:c] / count
        var = (total[c : 2 * c] / count - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = var * (count / (count - 1).clamp_min(1.0))
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * unbiased.detach())
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Make every ``BatchNorm1d`` global over ranks: ``nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm1d` on CPU."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm1d:
                new = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new.to(child.weight.device))
    return model
