"""Data-parallel training across processes with torch.distributed (DDP), launched by ``torchrun``.

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`setup`
reads them and joins the process group (NCCL on CUDA, gloo on the CPU). Without them,
everything here is a no-op, so the same training loop runs on one process. Each rank
draws its own patches; DDP averages the gradients, so the weights stay identical and
only rank 0 writes checkpoints and reports progress.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Context:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we joined the group, so we leave it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def env_rank() -> int:
    """This process's rank as launched (0 when not under torchrun); usable before :func:`setup`."""
    return int(os.environ.get("RANK", 0))


def setup(device: torch.device) -> Context:
    """Join the process group torchrun describes, if any; on CUDA each rank takes GPU LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1 and not dist.is_initialized():
        return Context(device)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
        owns = True
    return Context(device, dist.get_rank(), dist.get_world_size(), local, owns)


def teardown(ctx: Context) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(net: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    """The network as DDP when several ranks train (gradients averaged in backward)."""
    if not ctx.active:
        return net
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids)


def all_sum(values: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Sum a small tensor over ranks (in place); a no-op on one process."""
    if ctx.active:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(flags, ctx: Context) -> list:
    """Each flag True on every rank when it is True on any: stop decisions must be collective or DDP hangs."""
    flags = [bool(f) for f in flags]
    if not ctx.active:
        return flags
    t = torch.tensor([float(f) for f in flags], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def barrier(ctx: Context) -> None:
    if ctx.active:
        dist.barrier()


def weights_agree(net: torch.nn.Module, ctx: Context) -> bool:
    """Whether every rank holds the same weights (a cheap checksum compared across ranks)."""
    if not ctx.active:
        return True
    with torch.no_grad():
        s = torch.stack([p.detach().double().sum() for p in net.parameters()]).sum()
        both = torch.stack([s, -s]).to(ctx.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        return bool(torch.isclose(both[0], -both[1], rtol=0, atol=1e-9 * max(1.0, abs(s.item()))))
