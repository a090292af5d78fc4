"""Continuous batching: one KV cache whose rows are separate sequences that join and leave at
any step, so that a server decodes every running request in one forward per token.

`Prefill` runs a group of new prompts (left-padded, in chunks so that running sequences are not
held up for long) into a cache of their own. `SlotCache.join` copies a prompt's keys and values
into a free row of the shared cache, right-aligned to the shared write column: each row's tokens
are one contiguous run of columns ending at `pos`, with masked columns before it, and its own
positions (as the left-padded batches of `gpt2lab.generate`). `SlotCache.step` feeds one token
per row; `remove` frees a row by moving the last row into it, so the live rows are always the
first `rows` ones and a step computes nothing for empty slots. When the write column reaches the
end, the columns before the oldest row's first one are dropped (`compact`).

The forward pass is the model's own, through `gpt2lab.generate.cached_forward` (and the packed
CPU kernels of `gpt2lab.kernels`; a decoding step on a CPU through its flat `DecodeStep`, which
is tested equal to the model); nothing here prints or samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gpt2lab.generate import cached_forward, left_pad
from gpt2lab.kernels.cpu_decode import DecodeKernels, RowsView, decode_kernels, decode_step
from gpt2lab.model import KVCache


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


def cache_bytes(cfg, rows: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of the keys and values of `rows` sequences of `max_len` tokens."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.n_layer * rows * cfg.n_head * max_len * cfg.head_size * itemsize


def default_max_len(block_size: int) -> int:
    """Columns of a `SlotCache`: a context plus a quarter, so that a compaction (a copy of the
    live columns) is needed at most once every block_size / 4 steps."""
    return block_size + max(block_size // 4, 1)


class Prefill:
    """New prompts run into a cache of their own, `chunk` columns per `run()` call.

    The prompts are left-padded to one length T; `lengths[i]` is prompt i's. After the last chunk
    `done` is True and `last_logits` (k, V) holds each prompt's next-token logits.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        kernels: DecodeKernels | None = None,
        pad_id: int = 0,
    ) -> None:
        device = next(model.parameters()).device
        self.model, self.kernels = model, kernels
        ids, mask = left_pad(prompts, pad_id)
        self.ids, self.lengths = ids.to(device), [len(p) for p in prompts]
        self.mask = None if bool(mask.all()) else mask.to(device)
        self.cache = KVCache(model.config, len(prompts), ids.size(1), device, model_dtype(model))
        self.last_logits: Tensor | None = None

    @property
    def width(self) -> int:
        return self.ids.size(1)

    @property
    def done(self) -> bool:
        return self.cache.pos >= self.width

    def run(self, chunk: int, all_logits: bool = False) -> tuple[int, Tensor]:
        """Feed the next `chunk` columns; returns (first column, logits). The logits are of the
        chunk's last column (k, 1, V), or of every column (k, t, V) with `all_logits`."""
        start = self.cache.pos
        end = min(start + chunk, self.width)
        mask = None if self.mask is None else self.mask[:, :end]
        logits = cached_forward(
            self.model,
            self.ids[:, start:end],
            self.cache,
            mask,
            None,
            self.kernels,
            keep=end - start if all_logits else 1,
        )
        if end == self.width:
            self.last_logits = logits[:, -1, :]
        return start, logits


class SlotCache:
    """A KV cache of `slots` rows for sequences that come and go; see the module's docstring.

    `rows` rows are live (0..rows-1); `pos` columns are written. Each live row's tokens fill the
    columns [start, pos); `lengths[r]` is its token count (its next position).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        slots: int,
        max_len: int | None = None,
        kernels: bool = True,
    ) -> None:
        cfg = model.config
        device = next(model.parameters()).device
        self.model, self.slots = model, slots
        self.max_len = max_len or default_max_len(cfg.block_size)
        self.store = KVCache(cfg, slots, self.max_len, device, model_dtype(model))
        self.mask = torch.zeros((slots, self.max_len), dtype=torch.bool, device=device)
        self.lengths = torch.zeros((slots, 1), dtype=torch.long, device=device)
        self.starts = [0] * slots
        self.rows = 0
        self.pos = 0
        self.kernels = decode_kernels(model, slots) if kernels else None
        self.fast_step = decode_step(model, slots) if kernels else None  # a flat CPU step

    @property
    def free(self) -> int:
        return self.slots - self.rows

    def join(self, prefill: Prefill, index: int, copies: int = 1) -> list[int]:
        """Copy prompt `index` of a finished prefill into `copies` new rows; returns them."""
        if copies > self.free:
            raise ValueError(f"{copies} rows asked for, {self.free} free")
        L, width = prefill.lengths[index], prefill.width
        if L > self.max_len:
            raise ValueError(f"a prompt of {L} tokens does not fit {self.max_len} columns")
        if self.rows == 0:
            self.pos = 0
        if self.pos == self.max_len:
            self.compact()
        if self.pos < L:
            self._move(0, L - self.pos)
        first, last = self.pos - L, self.pos
        new = list(range(self.rows, self.rows + copies))
        for r in new:
            self.store.k[:, r, :, first:last] = prefill.cache.k[:, index, :, width - L :]
            self.store.v[:, r, :, first:last] = prefill.cache.v[:, index, :, width - L :]
            self.mask[r] = False
            self.mask[r, first:last] = True
            self.lengths[r] = L
            self.starts[r] = first
        self.rows += copies
        return new

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per live row, (rows,); returns their next-token logits (rows, V)."""
        n = self.rows
        if tokens.shape != (n,):
            raise ValueError(f"{n} live rows, got tokens of shape {tuple(tokens.shape)}")
        if self.pos == self.max_len:
            self.compact()
        if self.pos == self.max_len:
            raise ValueError(f"a sequence is longer than the cache's {self.max_len} columns")
        p = self.pos
        self.mask[:n, p] = True
        view = RowsView(self.store, 0, n, p)
        ids = tokens.to(self.mask.device)[:, None]
        mask, positions = self.mask[:n, : p + 1], self.lengths[:n]
        if self.fast_step is not None and not torch.is_autocast_enabled("cpu"):
            logits = self.fast_step.step(ids, view, positions, mask)
        else:
            logits = cached_forward(self.model, ids, view, mask, positions, self.kernels)[:, -1]
        self.lengths[:n] += 1
        self.pos = p + 1
        return logits

    def remove(self, row: int) -> int | None:
        """Free a live row; the last live row moves into it. Returns the row that moved (its
        old index) or None."""
        if not 0 <= row < self.rows:
            raise ValueError(f"row {row} is not live ({self.rows} live rows)")
        last = self.rows - 1
        moved = None
        if row != last:
            s = self.starts[last]
            self.store.k[:, row, :, s : self.pos] = self.store.k[:, last, :, s : self.pos]
            self.store.v[:, row, :, s : self.pos] = self.store.v[:, last, :, s : self.pos]
            self.mask[row] = self.mask[last]
            self.lengths[row] = self.lengths[last]
            self.starts[row] = s
            moved = last
        self.mask[last] = False
        self.rows = last
        if self.rows == 0:
            self.pos = 0
        return moved

    def compact(self) -> None:
        """Drop the columns before the oldest live row's first token."""
        if self.rows == 0:
            self.pos = 0
            return
        s = min(self.starts[: self.rows])
        if s > 0:
            self._move(s, -s)

    def _move(self, first: int, shift: int) -> None:
        """Move the live rows' columns [first, pos) by `shift` (either way)."""
        n, p = self.rows, self.pos
        if n:
            src = slice(first, p)
            dst = slice(first + shift, p + shift)
            for t in (self.store.k, self.store.v):
                t[:, :n, :, dst] = t[:, :n, :, src].clone()
            mask = self.mask[:n, src].clone()
            self.mask[:n] = False
            self.mask[:n, dst] = mask
            self.starts[:n] = [s + shift for s in self.starts[:n]]
        self.pos = p + shift
