"""Token-level examples and how they become batches: padding, packing, shuffled epochs.

An `Example` is one sequence of ids with `learn[i]` True where token i is one the model is
trained to write (completion / assistant tokens and their end-of-turn token). Its inputs are
ids[:-1]; its targets ids[1:], with -1 (the model's ignore index) wherever the target is not
learned. A micro-batch is either

- padded: one example per row, right-padded to the longest row of the micro-batch. Causal
  attention never lets a real token see the padding after it, and padded targets are -1, so a
  row's loss is exactly its unpadded loss; or
- packed (sft.packing): short examples laid end to end into rows of block_size positions. Each
  example keeps its own positions (0, 1, ...) and attends only to itself: the rows carry a
  block-diagonal causal `attention_mask` (B, T, T) and `position_ids`, so a packed example's
  loss equals its unpacked loss (tested), nothing leaks across example boundaries.

`ItemBatches` deals items (examples, packed rows or preference pairs) in shuffled epochs as a
function of (seed, step, micro-step, rank) alone, like the pretraining loader: its state is a
position, a resume continues with the same batches, and 2 ranks x 1 micro-step see what 1 rank x
2 micro-steps see.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gpt2lab.errors import DataError


@dataclass(frozen=True)
class Example:
    """One training sequence: its ids and which of them are learned."""

    ids: tuple[int, ...]
    learn: tuple[bool, ...]

    @property
    def n_learned(self) -> int:
        """Targets that count: learned tokens after the first position."""
        return sum(self.learn[1:])


def truncate(ids: Sequence[int], learn: Sequence[bool], max_len: int) -> Example | None:
    """Fit an example into `max_len` tokens: the prompt loses its start first, then the reply
    its end. None when no learned target would be left."""
    ids, learn = list(ids), list(learn)
    if len(ids) > max_len:
        first = next((i for i, f in enumerate(learn) if f), len(ids))
        cut = min(len(ids) - max_len, max(0, first - 1))  # keep one token before the reply
        ids, learn = ids[cut:], learn[cut:]
        ids, learn = ids[:max_len], learn[:max_len]
    example = Example(tuple(ids), tuple(learn))
    return example if example.n_learned > 0 else None


def inputs_targets(example: Example) -> tuple[list[int], list[int]]:
    """(inputs, targets) of an example: targets are -1 where nothing is learned."""
    x = list(example.ids[:-1])
    y = [t if f else -1 for t, f in zip(example.ids[1:], example.learn[1:])]
    return x, y


def pad_batch(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Right-padded rows: {"x", "y"} (B, T) int64 with T the longest example's positions."""
    pairs = [inputs_targets(e) for e in examples]
    T = max(len(x) for x, _ in pairs)
    x = torch.zeros(len(pairs), T, dtype=torch.long)
    y = torch.full((len(pairs), T), -1, dtype=torch.long)
    for i, (xi, yi) in enumerate(pairs):
        x[i, : len(xi)] = torch.tensor(xi)
        y[i, : len(yi)] = torch.tensor(yi)
    return {"x": x, "y": y}


def pack(examples: Sequence[Example], block_size: int, order: Sequence[int]) -> list[list[int]]:
    """Rows of example indices (taken in `order`) laid end to end, each row at most `block_size`
    positions (an example takes len(ids) - 1); next-fit, so a row never reorders examples."""
    rows: list[list[int]] = []
    used = block_size + 1
    for i in order:
        n = len(examples[i].ids) - 1
        if used + n > block_size:
            rows.append([])
            used = 0
        rows[-1].append(int(i))
        used += n
    return rows


def packed_batch(rows: Sequence[Sequence[Example]], block_size: int) -> dict[str, torch.Tensor]:
    """Packed rows of `block_size` positions with block-diagonal causal attention.

    {"x", "y", "position_ids"} (B, T) and "attention_mask" (B, T, T) bool: query i sees key j
    iff j <= i and both belong to the same example (padding at a row's end is its own segment).
    """
    B, T = len(rows), block_size
    x = torch.zeros(B, T, dtype=torch.long)
    y = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, example in enumerate(row):
            xi, yi = inputs_targets(example)
            n = len(xi)
            x[r, at : at + n], y[r, at : at + n] = torch.tensor(xi), torch.tensor(yi)
            pos[r, at : at + n] = torch.arange(n)
            seg[r, at : at + n] = s
            at += n
        pos[r, at:] = torch.arange(T - at)
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril_()
    return {"x": x, "y": y, "position_ids": pos, "attention_mask": same & causal}


class ItemBatches:
    """Micro-batches of `batch_size` items in shuffled epochs; `collate(indices)` builds one.

    Item k of the run (all ranks and micro-steps, in order) is item perm_e[k mod n] of epoch
    e = k // n, perm_e a permutation seeded by (seed, e). Rank r at micro-step m of a step takes
    slot m * W + r, as the pretraining loader does.
    """

    def __init__(
        self,
        n_items: int,
        collate: Callable[[list[int]], Any],
        batch_size: int,
        grad_accum_steps: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1337,
        device: torch.device | str = "cpu",
        what: str = "examples",
    ) -> None:
        if n_items < 1:
            raise DataError(f"no training {what} left", f"at least one of the {what}")
        self.n, self.collate = n_items, collate
        self.B, self.A, self.rank, self.W, self.seed = (
            batch_size,
            grad_accum_steps,
            rank,
            world_size,
            seed,
        )
        self.device, self.what = torch.device(device), what
        self.step, self.micro = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def indices(self, step: int, micro: int) -> list[int]:
        """The items this rank takes at (step, micro)."""
        slot = micro * self.W + self.rank
        first = (step * self.W * self.A + slot) * self.B
        out = []
        for k in range(first, first + self.B):
            epoch, i = divmod(k, self.n)
            out.append(int(self._epoch_perm(epoch)[i]))
        return out

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, 2 << 32, epoch]))
            self._perm, self._perm_epoch = rng.permutation(self.n), epoch
        return self._perm

    def next_batch(self) -> Any:
        batch = self.collate(self.indices(self.step, self.micro))
        self.micro += 1
        if self.micro == self.A:
            self.step, self.micro = self.step + 1, 0
        return to_device(batch, self.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "micro": self.micro,
            "seed": self.seed,
            "items": self.n,
            "what": self.what,
            "items_per_step": self.W * self.A * self.B,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("items") != self.n or state.get("what") != self.what:
            raise DataError(
                f"the run was saved with {state.get('items')} training {state.get('what')}, "
                f"the data now gives {self.n} {self.what}",
                "the data the run was started on",
                "resume with the original data, or start a new run",
            )
        per = state.get("items_per_step", self.W * self.A * self.B)
        if per == self.W * self.A * self.B:
            self.step, self.micro = int(state["step"]), int(state["micro"])
        else:  # other ranks/accumulation: continue at the same item
            self.step, self.micro = int(state["step"]) * per // (self.W * self.A * self.B), 0


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) dict moved to `device`."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return batch


def eval_indices(n: int, batch_size: int, max_batches: int) -> list[int]:
    """Items an evaluation covers: all n, or max_batches x batch_size of them spread evenly (the
    same at every call, so a curve compares like with like)."""
    items = np.arange(n)
    if max_batches > 0 and max_batches * batch_size < n:
        items = np.linspace(0, n - 1, max_batches * batch_size).round().astype(np.int64)
    return [int(i) for i in items]
