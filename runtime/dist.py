"""The only module that talks to ``torch.distributed``.

Every helper works without an initialised process group (a single process is world size 1), so losses and
models can be unit-tested on the CPU and call these helpers unconditionally. Losses take a ``gather`` flag
and call :func:`gather_with_grad` / :func:`all_reduce_sum`; they never import ``torch.distributed``.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as tdist


def is_dist() -> bool:
    """True when a process group is initialised and has more than one rank."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_type: str) -> None:
    """Initialise the default process group from torchrun's environment variables (no-op without them).

    NCCL on CUDA, gloo on CPU. torchrun sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT for single- and
    multi-node launches alike, so this one call serves both.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or tdist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    tdist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        tdist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the summed upstream gradient.

    The sum over ranks makes the gradient of a loss computed identically on every rank from the gathered
    tensor equal to the single-process gradient once DDP averages gradients over ranks (each rank's copy of
    the loss contributes 1/W, and there are W copies).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.batch = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size())]
        tdist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        tdist.all_reduce(grad, op=tdist.ReduceOp.SUM)
        start = rank() * ctx.batch
        return grad[start : start + ctx.batch]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from all ranks along dim 0 -> (W*B, ...), differentiable.

    All ranks must pass the same shape. Identity in a single process.
    """
    if not is_dist():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from all ranks along dim 0 -> (W*B, ...), without gradient."""
    if not is_dist():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    tdist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(x: torch.Tensor, async_op: bool = False):
    """In-place SUM over ranks. Returns a work handle when ``async_op`` (call ``.wait()``), else None."""
    if not is_dist():
        return None
    return tdist.all_reduce(x, op=tdist.ReduceOp.SUM, async_op=async_op)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, in place; returns ``x`` for chaining."""
    if is_dist():
        tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
        x /= world_size()
    return x


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_dist():
        tdist.broadcast(x, src=src)
    return x


def broadcast_object(obj, src: int = 0):
    """Broadcast a picklable object from ``src`` (e.g. a resume path chosen on rank 0)."""
    if not is_dist():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]
