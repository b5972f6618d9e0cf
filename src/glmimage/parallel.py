"""Scale-out, applied from outside the models: torchrun process groups, DDP or FSDP2, activation checkpointing.

    torchrun --nproc_per_node N -m glmimage finetune ...   # one process per device; gloo / NCCL / HCCL by device

`init()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); without it the run is one plain process and
every helper here is a no-op. Models never import this module: the trainer wraps them.
"""
from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}
MODES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def init(device: str | torch.device = "cpu") -> Dist:
    """Join the torchrun process group (backend by device type) or describe the single process."""
    device = torch.device(device)
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist(device=device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.type in ("cuda", "npu"):
        device = torch.device(device.type, local)
        getattr(torch, device.type).set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(BACKENDS.get(device.type, "gloo"), timeout=datetime.timedelta(minutes=30))
    return Dist(rank=rank, world=world, local_rank=local, device=device)


def shutdown(d: Dist) -> None:
    if d.on and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.on:
        dist.barrier()


def mean(d: Dist, x: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over processes (for logging)."""
    if not d.on:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / d.world


def checkpoint_blocks(blocks: nn.ModuleList) -> None:
    """Activation checkpointing per block: each block's forward recomputes in backward instead of keeping its
    activations (memory ~ one block instead of all of them, for ~1/3 more compute). State-dict keys are unchanged."""
    for block in blocks:
        if not getattr(block, "_glmimage_ckpt", False):
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
            block._glmimage_ckpt = True


def resolve_mode(mode: str, d: Dist) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown parallel mode {mode!r}; valid: {', '.join(MODES)}")
    if mode == "auto":
        return "ddp" if d.on else "none"
    return mode if d.on else "none"


def wrap(model: nn.Module, mode: str, d: Dist, units: list[nn.Module]) -> nn.Module:
    """DDP (every process holds the model, gradients all-reduced) or FSDP2 (`fully_shard` on each unit, innermost
    first: parameters, gradients and optimizer state sharded across processes). `units`: the blocks, then the
    models that hold them, each its own FSDP root, so that a model called on its own (to draw samples) gathers its
    own weights; `model` itself (a holder without parameters of its own) is not sharded."""
    if mode == "none" or not d.on:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for unit in units:
        fully_shard(unit)
    return model


def no_sync(model: nn.Module, mode: str, sync: bool):
    """Skip the gradient all-reduce on the micro-steps of gradient accumulation that are not the last."""
    import contextlib

    if mode == "ddp" and not sync:
        return model.no_sync()
    if mode == "fsdp":
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_requires_gradient_sync(sync, recurse=False)
    return contextlib.nullcontext()
