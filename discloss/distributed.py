"""Multi-process data-parallel training for the demo (``torchrun``), in one place.

    torchrun --standalone --nproc_per_node 2 -m discloss.demo

torchrun starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; ``setup`` reads them and joins the process
group (gloo on CPU, nccl on CUDA, one GPU per local rank). Without them
everything here is a no-op for a single process, so the same code runs
either way.

How the loss's reductions combine across ranks: DistributedDataParallel
averages the gradients of the ranks. With ``reduction="mean"`` and the same
number of images on every rank, the average of the per-rank means is the mean
over the global batch, so the gradients equal those of one process on the
whole batch. ``reduction="sum"`` needs the loss multiplied by the world size
for that. Chainer's normalisation pools over the batch it is given, which
under DDP is the rank's batch.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

__all__ = ["Context", "setup", "cleanup", "wrap_model", "RankShard", "agree_max", "gather"]


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among world_size processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: Optional[str] = None, timeout_seconds: float = 300.0) -> Context:
    """Join torchrun's process group, if launched by it; choose this rank's device.

    device: "cpu", "cuda" or None (CUDA when available). On CUDA each rank
    takes the GPU of its LOCAL_RANK. The backend is nccl for CUDA, gloo for
    CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(device)
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Context(device=chosen)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if chosen.type == "cuda":
        if chosen.index is None:
            chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds))
    return Context(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


def cleanup(context: Context) -> None:
    """Leave the process group, all ranks together.

    Without the barrier, a rank that finished early could hang for good in
    destroy_process_group while another was still at work (seen with gloo
    under torch 2.4: 1 run in about 10).
    """
    if context.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, context: Context) -> torch.nn.Module:
    """The model DistributedDataParallel averages gradients for, or the model itself for one process.

    BatchNorm statistics stay per rank (no SyncBatchNorm: it needs CUDA).
    """
    if not context.distributed:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


class RankShard:
    """The samples of a data set that one rank sees: rank, rank + world_size, rank + 2 world_size, ...

    ``batch(range(s * b, (s + 1) * b))`` on every rank then covers the global
    batch of images s * b * world_size .. (s + 1) * b * world_size - 1 between
    them, each image on one rank. The shard has len(dataset) // world_size
    samples, plus one on the first len(dataset) % world_size ranks. Other
    attributes are the data set's.
    """

    def __init__(self, dataset, context: Context) -> None:
        self.dataset = dataset
        self.rank = context.rank
        self.world_size = context.world_size

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.world_size))

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index: {index} out of range for a shard of {len(self)} samples")
        return self.dataset[index * self.world_size + self.rank]

    def batch(self, indices):
        for index in indices:
            if not 0 <= int(index) < len(self):
                raise IndexError(f"indices: {int(index)} out of range for a shard of {len(self)} samples")
        return self.dataset.batch([int(index) * self.world_size + self.rank for index in indices])

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def agree_max(value: float, context: Context) -> float:
    """The largest of the ranks' values, on every rank (a decision all ranks must take together)."""
    if not context.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device(context))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def gather(tensor: torch.Tensor, context: Context) -> torch.Tensor:
    """The ranks' 1-D tensors concatenated in rank order, on every rank (sizes may differ by rank)."""
    if not context.distributed:
        return tensor
    parts: List[Optional[torch.Tensor]] = [None] * context.world_size
    dist.all_gather_object(parts, tensor.detach().cpu())
    return torch.cat(parts)


def _collective_device(context: Context) -> torch.device:
    return context.device if context.device.type == "cuda" else torch.device("cpu")

