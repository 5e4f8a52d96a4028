"""Data-parallel training with torch.distributed, when a launcher (torchrun, SLURM via torchrun)
starts several processes: NCCL on GPUs, gloo on CPUs. One process (world size 1) touches none of it.

How the work is shared: every rank draws the same global batch (the same seeded order, the same
augmentation and prompts) and trains on its own contiguous share of it; DistributedDataParallel
averages the gradients, so a step equals a single-process step over the global batch (up to the
classifier's BatchNorm statistics, which each rank takes over its share)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a launcher."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device_name: str) -> str:
    """Join the process group a launcher set up (WORLD_SIZE > 1 in the environment), once; returns
    the device name this rank trains on ("cuda" is this rank's own GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device_name
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return device_name


def share(batch, rank: int, size: int):
    """This rank's contiguous share of a global batch (tensor or array) split over `size` ranks."""
    per = -(-len(batch) // size)
    return batch[rank * per:(rank + 1) * per]


def mean_over_ranks(value: float) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t.item() / dist.get_world_size())


def broadcast(obj):
    """`obj` as rank 0 has it, on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wrap(module: torch.nn.Module, device: torch.device, find_unused: bool = False) -> torch.nn.Module:
    """`module` under DistributedDataParallel when there are several ranks, else itself."""
    if world()[1] == 1:
        return module
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)
