"""torch.distributed glue: one process per device under torchrun; a no-op in a plain process.

The global batch (``train.batch_size``) is split across ranks: rank r takes rows r, r + W, … of each
global batch, so shards are disjoint and their union is exactly the single-process batch.
"""

from __future__ import annotations

import os
from datetime import timedelta

import attrs
import torch
import torch.distributed as dist
from torch import Tensor, nn


@attrs.define
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, batch: Tensor) -> Tensor:
        """This rank's rows of a global batch."""
        return batch[self.rank :: self.world] if self.active else batch

    def wrap(self, network: nn.Module) -> nn.Module:
        """DistributedDataParallel around the network (gradients averaged across ranks)."""
        if not self.active:
            return network
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(network, device_ids=ids)

    def gather(self, values: Tensor) -> Tensor:
        """Concatenate a 1-D tensor from every rank, in rank order (sizes may differ)."""
        if not self.active:
            return values
        size = torch.tensor([values.numel()], device=values.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size)
        largest = int(max(s.item() for s in sizes))
        padded = torch.zeros(largest, dtype=values.dtype, device=values.device)
        padded[: values.numel()] = values
        parts = [torch.zeros_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def any(self, flag: Tensor | bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        t = torch.as_tensor(flag, device=self.device).to(torch.int32).reshape(1)
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def any_of(self, *flags: bool) -> list[bool]:
        """For each flag, :meth:`any` of it, in one all-reduce."""
        if not self.active:
            return [bool(f) for f in flags]
        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]


def init_from_env(device: torch.device) -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), NCCL on CUDA else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return DistContext(rank, world, local_rank, device)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group together: a rank that tears its group down while rank 0 is still
    writing files can abort (gloo: "terminate called without an active exception")."""
    if ctx.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
