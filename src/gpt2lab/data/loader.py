"""BatchLoader: (x, y) windows from memory-mapped shards; the same data for any ranks x accum.

Every optimizer step draws one fixed list of W*A*B windows from (seed, step) alone; rank r at
micro-step m takes the B windows of slot g = m*W + r. So 2 ranks x 1 micro-step see exactly what
1 rank x 2 micro-steps sees, and the position to resume from is just (step, micro-step).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from gpt2lab.data.shards import SCAN_LIMIT, check_token_ids, load_meta, split_shards
from gpt2lab.errors import DataError, mark_key


class BatchLoader:
    """Batches of `block_size` windows from a prepared split: random windows or shuffled epochs."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        block_size: int = 1024,
        batch_size: int = 8,
        grad_accum_steps: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1337,
        sampling: str = "random",
        device: str | torch.device = "cpu",
        vocab_size: int | None = None,
    ) -> None:
        if sampling not in ("random", "sequential"):
            raise DataError(
                f"sampling={sampling!r}", "random or sequential", f"set {mark_key('data.sampling')}"
            )
        if not 0 <= rank < world_size:
            raise DataError(
                f"rank {rank} is outside world size {world_size}", None, "check torchrun"
            )
        for name, v in (("block_size", block_size), ("batch_size", batch_size)):
            if v < 1:
                raise DataError(f"{name}={v} is not positive", "an integer >= 1", f"fix {name}")
        if grad_accum_steps < 1:
            raise DataError(f"grad_accum_steps={grad_accum_steps}", ">= 1", "fix grad_accum_steps")
        self.data_dir, self.split = str(data_dir), split
        self.T, self.B, self.A = block_size, batch_size, grad_accum_steps
        self.rank, self.W, self.seed, self.sampling = rank, world_size, seed, sampling
        self.device = torch.device(device)
        self.meta = load_meta(data_dir)
        self.vocab_size = self.meta["vocab_size"]
        self._model_v = vocab_size
        self._id_limit = min(self.vocab_size, vocab_size) if vocab_size else self.vocab_size
        self._shards = [s for s in split_shards(data_dir, split, vocab_size) if len(s)]
        sizes = np.array([len(s) for s in self._shards], dtype=np.int64)
        self._starts = np.concatenate(
            [[0], np.cumsum(sizes)]
        )  # shard i covers [starts[i], starts[i+1])
        self.n_tokens = int(self._starts[-1])
        if self.n_tokens < block_size + 1:
            raise DataError(
                f"the {split} split of {data_dir} has {self.n_tokens} tokens, fewer than "
                f"block_size+1 = {block_size + 1}",
                "more tokens than one window",
                f"lower {mark_key('model.block_size')} or prepare more text (or a larger "
                f"{mark_key('val_fraction')})",
            )
        # sequential mode: non-overlapping windows; window i reads tokens [i*T, i*T + T + 1)
        self.n_windows = (self.n_tokens - 1) // block_size
        self.step, self.micro = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)
        self._pin = self.device.type == "cuda"

    @property
    def tokens_per_step(self) -> int:
        """Tokens (x positions) consumed by all ranks in one optimizer step."""
        return self.W * self.A * self.B * self.T

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch of this rank: x and y = x shifted by one, int64 (B, T) on device."""
        slot = self.micro * self.W + self.rank
        starts = self._window_starts(self.step, slot)
        buf = np.stack([self._read(int(s), self.T + 1) for s in starts]).astype(np.int64)
        if self.n_tokens > SCAN_LIMIT and int(buf.max()) >= self._id_limit:  # not scanned at open
            check_token_ids(buf, self.vocab_size, f"{self.data_dir} ({self.split})", self._model_v)
        self.micro += 1
        if self.micro == self.A:
            self.step, self.micro = self.step + 1, 0
        # separate contiguous tensors: callers may .view(-1) them
        x, y = torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())
        if self._pin:  # pinned host memory lets the copy overlap with compute
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=self._pin), y.to(self.device, non_blocking=self._pin)

    def _window_starts(self, step: int, slot: int) -> np.ndarray:
        """Start positions of the B windows in `slot` of `step` (a function of seed, step, slot)."""
        per_step = self.W * self.A * self.B
        if self.sampling == "random":
            rng = np.random.Generator(np.random.PCG64([self.seed, step]))
            starts = rng.integers(0, self.n_tokens - self.T, size=per_step)
            return starts[slot * self.B : (slot + 1) * self.B]
        k = step * per_step + slot * self.B + np.arange(self.B, dtype=np.int64)
        out = np.empty(self.B, dtype=np.int64)
        for j, kk in enumerate(k):
            epoch, i = divmod(int(kk), self.n_windows)
            out[j] = self._epoch_perm(epoch)[i] * self.T
        return out

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, 1 << 32, epoch]))
            self._perm, self._perm_epoch = rng.permutation(self.n_windows), epoch
        return self._perm

    @property
    def epoch(self) -> float:
        """Passes over the split so far (fractional), counting every rank's windows."""
        seen = (self.step * self.W * self.A + self.micro * self.W) * self.B
        return seen * self.T / max(1, self.n_tokens)

    def _read(self, pos: int, n: int) -> np.ndarray:
        """Tokens [pos, pos+n) of the split, as if its shards were one array."""
        i = int(np.searchsorted(self._starts, pos, side="right")) - 1
        off = pos - int(self._starts[i])
        chunk = self._shards[i][off : off + n]
        if len(chunk) == n:
            return np.asarray(chunk)
        parts, got = [np.asarray(chunk)], len(chunk)
        while got < n:  # the window runs on into the next shard(s)
            i += 1
            part = np.asarray(self._shards[i][: n - got])
            parts.append(part)
            got += len(part)
        return np.concatenate(parts)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: restoring it continues with exactly the same batches."""
        return {
            "step": self.step,
            "micro": self.micro,
            "seed": self.seed,
            "sampling": self.sampling,
            "split": self.split,
            "block_size": self.T,
            "tokens_per_step": self.tokens_per_step,
            "n_tokens": self.n_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`; fails if taken on different data or batch shape."""
        for key in ("seed", "sampling", "block_size", "tokens_per_step", "n_tokens"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise DataError(
                    f"loader state has {key}={state[key]!r} but this loader has {mine!r}",
                    "the same data, seed, sampling and tokens per step (W x A x B x T) as the run "
                    "being resumed",
                    f"resume with the original settings or start a fresh run on {self.data_dir}",
                )
        self.step, self.micro = int(state["step"]), int(state.get("micro", 0))
        if not 0 <= self.micro < self.A:
            raise DataError(
                f"loader state has micro-step {self.micro}", f"0..{self.A - 1}", "resume at a step"
            )
