"""Data-parallel training with PyTorch's own engine (torchrun + DistributedDataParallel).

`torchrun --nproc_per_node=N [--nnodes=M ...] -m anomaly_diffusion.cli train ...` sets RANK,
LOCAL_RANK and WORLD_SIZE; the CLI reads them and calls `init_distributed`, which joins the
process group (NCCL on CUDA, gloo on CPU). The training loops draw one *global* batch of
`batch_size x world_size` samples (indices, timesteps, noise) from the same seeded generator on
every rank, and each rank trains on its strided shard: DDP's gradient average over ranks is then
exactly the gradient of the global batch, so N processes reach what one process reaches with
the global batch. Only rank 0 logs to MLflow and writes checkpoints and the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a data-parallel job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that logs and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's strided share of a global batch along dim 0: x[rank::world_size]."""
        return x[self.rank :: self.world_size] if self.active else x

    def shard_list(self, items: list[T]) -> list[T]:
        """This rank's strided share of a list: items[rank::world_size]."""
        return items[self.rank :: self.world_size]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over ranks (every rank gets it)."""
        if not self.active:
            return value
        reduced = value.detach().clone().float()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced / self.world_size

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DistributedDataParallel around a model (the model itself when not distributed)."""
        if not self.active:
            return model
        ids = [device.index] if device.type == "cuda" and device.index is not None else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def broadcast(self, value: object) -> object:
        """Rank 0's value, on every rank (any picklable object)."""
        if not self.active:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, value: object) -> list[object]:
        """Every rank's value, in rank order, on rank 0 ([] on other ranks; [value] when not distributed)."""
        if not self.active:
            return [value]
        out: list[object] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, out, dst=0)
        return out or []

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.active:
            dist.barrier()


SINGLE = DistContext()


def init_distributed(rank: int, world_size: int, local_rank: int) -> DistContext:
    """Join the default process group (env:// rendezvous set up by torchrun); NCCL on CUDA, gloo on CPU.

    On CUDA the process uses the GPU `local_rank`.
    """
    if world_size <= 1:
        return SINGLE
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown(context: DistContext) -> None:
    """Leave the process group."""
    if context.active and dist.is_initialized():
        dist.destroy_process_group()
