"""Validation loss over non-overlapping windows of a token array, shared by the ranks."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from gpt2lab.device import autocast
from gpt2lab.errors import TrainingError, mark_key
from gpt2lab.train.dist import Dist, all_reduce_sum


@torch.no_grad()
def val_loss(
    model: nn.Module,
    tokens: np.ndarray,
    block_size: int,
    batch_size: int,
    max_batches: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    world: Dist | None = None,
    source: str = "the validation split",
) -> float:
    """Mean next-token loss over the (len-1)//block_size non-overlapping windows of `tokens`.

    `max_batches` > 0 takes that many batches per rank of windows spread evenly over the
    split, the same ones at every call, so a loss curve compares like with like; 0 takes them
    all. Ranks take every W-th window and their sums are reduced. Returns nats per token.
    """
    world = world or Dist()
    device = torch.device(device)
    T, B = block_size, batch_size
    n = (len(tokens) - 1) // T
    if n < 1:
        raise TrainingError(
            f"the validation split of {source} has {len(tokens)} tokens, fewer than "
            f"block_size+1 = {T + 1}",
            "a longer validation split",
            "prepare the data with a larger validation share or lower "
            f"{mark_key('model.block_size')}",
        )
    windows = np.arange(n)
    if max_batches > 0 and max_batches * B * world.world_size < n:
        windows = np.linspace(0, n - 1, max_batches * B * world.world_size).round().astype(np.int64)
    mine = windows[world.rank :: world.world_size]
    per_rank = math.ceil(len(windows) / world.world_size)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for i in range(0, per_rank, B):
        chunk = mine[i : i + B]
        # every rank runs the same number of forwards (FSDP needs all ranks in each one)
        weight = 1.0 if len(chunk) else 0.0
        chunk = chunk if len(chunk) else windows[:1]
        buf = np.stack([np.asarray(tokens[w * T : w * T + T + 1]) for w in chunk])
        t = torch.from_numpy(buf.astype(np.int64)).to(device)
        with autocast(device, dtype):
            _, loss = model(t[:, :-1], t[:, 1:])
        total[0] += weight * loss.double() * t[:, 1:].numel()
        total[1] += weight * t[:, 1:].numel()
    all_reduce_sum(total, world)
    model.train(was_training)
    return (total[0] / total[1]).item()
