"""Distributed training through PyTorch's own engines: DDP (NCCL/gloo) and FSDP2, under torchrun.

Only this module reads the environment that torchrun sets (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from gpt2lab.device import pick_device
from gpt2lab.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """How many processes torchrun started for this job (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank in the torchrun job (0 without torchrun): only rank 0 takes the run
    directory's lock and writes its files."""
    return int(os.environ.get("RANK", "0"))


def setup_ddp(device_name: str = "auto") -> tuple[Dist, torch.device]:
    """Join the torchrun job if any (NCCL on GPUs, gloo on CPUs); pick this rank's device."""
    world = launched_world_size()
    if world <= 1:
        return Dist(), pick_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} GPU(s)",
                "--nproc_per_node at most the number of GPUs",
                "lower torchrun's --nproc_per_node",
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    return Dist(rank, local, world), device


def teardown(finished: bool = False) -> None:
    """Leave the process group (a no-op for a single process). After a run that `finished` on
    every rank, first collect what a reference cycle kept of it (wrapped models, their
    communication state) and wait for all ranks, so no rank tears gloo down under another's last
    operation (a rank then aborted now and then in `terminate`). After a failure, leave at once:
    the other ranks may never arrive, and torchrun stops them."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            gc.collect()
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, world: Dist) -> torch.Tensor:
    """Sum a tensor over ranks in place (identity for one process)."""
    if world.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather(obj: Any, world: Dist) -> list[Any]:
    """Every rank's `obj`, in rank order (a list of one for one process)."""
    if not world.enabled:
        return [obj]
    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: Dist) -> None:
    if world.enabled:
        dist.barrier()


def wrap(model: nn.Module, strategy: str, world: Dist, device: torch.device) -> nn.Module:
    """DDP (a full copy per rank) or FSDP2 (each block's parameters sharded over ranks)."""
    if not world.enabled:
        return model
    if strategy == "fsdp":
        for block in model.transformer.h:  # type: ignore[union-attr]
            fully_shard(block)
        fully_shard(model)
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def model_state(model: nn.Module, strategy: str, world: Dist) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict; under FSDP every rank must call this, rank 0 gets it."""
    if world.enabled and strategy == "fsdp":
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts)
    return unwrap(model).state_dict()


def optimizer_state(
    model: nn.Module, opt: torch.optim.Optimizer, strategy: str, world: Dist
) -> dict[str, Any]:
    """The optimizer state to save (FSDP: gathered, keyed by parameter name; else the plain one)."""
    if world.enabled and strategy == "fsdp":
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, opt, options=opts)
    return opt.state_dict()


def load_optimizer_state(
    model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any], strategy: str, world: Dist
) -> None:
    """Undo optimizer_state."""
    if world.enabled and strategy == "fsdp":
        opts = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, opt, optim_state_dict=state, options=opts)
    else:
        opt.load_state_dict(state)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain GPT inside DDP and/or torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner
