"""Minimal torch.distributed helpers: torchrun setup and a differentiable all-gather for contrastive losses.

Contrastive losses need every rank to see the global batch: :func:`all_gather_with_grad` follows OpenCLIP's
``gather_features(gather_with_grad=True, local_loss=False)``. Every rank then computes the same global loss;
the gather's backward sums the per-rank gradients, which DDP's gradient averaging turns back into exactly the
single-process gradient of the global batch. All ranks must pass the same batch size (use ``drop_last``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_with_grad",
    "cleanup",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient for this rank's slice.

    Written out (instead of ``torch.distributed.nn.functional.all_gather``, deprecated in torch 2.13 in favour
    of a private module) with an all_reduce backward, which every backend implements (gloo has no
    reduce_scatter); embeddings are small, so the extra traffic does not matter.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.rank, ctx.batch = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0, in rank order; gradients flow back to each rank's slice.

    Returns ``x`` itself when not distributed or with a single process.
    """
    if not is_distributed() or world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def init_distributed(backend: str | None = None) -> tuple[int, int, int, torch.device]:
    """Join the process group described by torchrun's env vars; return ``(rank, world, local_rank, device)``.

    Without torchrun (``WORLD_SIZE`` unset or 1) nothing is initialised and ``(0, 1, 0, device)`` comes back.
    The backend defaults to nccl with CUDA, gloo otherwise; ``backend="gloo"`` keeps the device on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    global_rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and backend in (None, "nccl")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not is_distributed():
        dist.init_process_group(
            backend=backend or ("nccl" if use_cuda else "gloo"),
            rank=global_rank,
            world_size=world,
            # Binding the device up front lets nccl set up communicators eagerly (and silences a warning).
            device_id=device if use_cuda else None,
        )
    return global_rank, world, local_rank, device


def cleanup() -> None:
    """Destroy the process group if one was initialised."""
    if is_distributed():
        dist.destroy_process_group()
