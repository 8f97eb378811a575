"""Data-parallel training under ``torchrun``: the process group and the few collectives the trainer needs.

``torchrun --nproc_per_node=N -m longctx train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
variables; :func:`init` then joins the process group (gloo on the CPU, nccl on CUDA). Without them everything here is
a no-op on a single process, so the trainer has one code path.

Each rank owns a contiguous block of the global lanes (``batch_size / world`` lanes), so every token is read once per
epoch across ranks; decoder states stay with their lanes and never cross ranks, except when a checkpoint gathers
them on rank 0 so that a resume can redistribute them over any world size that divides the lanes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from longctx.decoders import State


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """The ranks torchrun announced in the environment (a single process when there are none)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init(dist: Dist, device: torch.device) -> None:
    """Join the process group: nccl for CUDA devices, gloo otherwise."""
    if dist.enabled and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def shutdown(dist: Dist) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()


def mean(dist: Dist, value: float, device: torch.device) -> float:
    """The mean of ``value`` over ranks (float64)."""
    if not dist.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return t.item() / dist.world


def any_true(dist: Dist, flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of boolean flags over ranks, so that every rank takes the same decision."""
    if not dist.enabled:
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def gather_state(dist: Dist, state: State) -> State:
    """The lane states of all ranks, in lane order (rank 0's lanes first). Every rank must call it."""
    if not dist.enabled:
        return state
    out = {}
    for name, t in state.tensors().items():
        parts = [torch.empty_like(t) for _ in range(dist.world)]
        torch_dist.all_gather(parts, t.contiguous())
        out[name] = torch.cat(parts, dim=0)
    return type(state)(**out)


def gather_tensor(dist: Dist, t: torch.Tensor) -> list[torch.Tensor]:
    """``t`` of every rank (same shape on all ranks)."""
    if not dist.enabled:
        return [t]
    parts = [torch.empty_like(t) for _ in range(dist.world)]
    torch_dist.all_gather(parts, t.contiguous())
    return parts
