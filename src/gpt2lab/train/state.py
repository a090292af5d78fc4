"""Where a run stands: `TrainState`, what a checkpoint's state.json saves and a resume restores.

The weights and the optimizer state are saved beside it (gpt2lab.checkpoint.native); this is the
rest: the step, the clock, the best validation loss, and every rank's RNGs and data position, so
that a resumed run continues bit for bit where an uninterrupted one would be.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """The progress of a run that its weights and optimizer state do not hold."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens seen (all ranks)
    skipped_steps: int = 0  # non-finite steps skipped (train.skip_nonfinite)
    elapsed_s: float = 0.0  # training time of the run so far, over all its sessions
    warmup_end_s: float | None = None  # elapsed_s when warmup ended: a time budget decays from it
    val_loss: float | None = None  # of this step, if it was evaluated
    best_val_loss: float | None = None
    rng_per_rank: list[dict[str, Any]] = field(default_factory=list)  # Python, NumPy, torch
    data_per_rank: list[dict[str, Any]] = field(default_factory=list)  # each loader's position
    scaler: dict[str, Any] | None = None  # the float16 gradient scaler's state
    epoch_loss_sum: float = 0.0  # train losses of the current epoch's steps so far (max_epochs)
    epoch_steps: int = 0

    def to_json(self, config: dict[str, Any]) -> dict[str, Any]:
        """state.json's fields (checkpoint.native adds `step`); `config` is the resolved config."""
        return {
            "config": config,
            "tokenizer": "tokenizer",  # RUN_DIR/tokenizer, relative to the run directory
            "val_loss": self.val_loss,
            "best_val_loss": self.best_val_loss,
            "rng_per_rank": self.rng_per_rank,
            "data": self.data_per_rank[0],  # rank 0's, for readers that predate data_per_rank
            "data_per_rank": self.data_per_rank,
            "world_size": len(self.data_per_rank),
            "skipped_steps": self.skipped_steps,
            "elapsed_s": self.elapsed_s,
            "warmup_end_s": self.warmup_end_s,
            "tokens": self.tokens,
            "scaler": self.scaler,
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_steps": self.epoch_steps,
        }

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> TrainState:
        """The state a checkpoint's state.json describes (older checkpoints lack some fields)."""
        return cls(
            step=int(saved.get("step", 0)),
            tokens=int(saved.get("tokens", 0)),
            skipped_steps=int(saved.get("skipped_steps", 0)),
            elapsed_s=float(saved.get("elapsed_s", 0.0)),
            warmup_end_s=saved.get("warmup_end_s"),
            val_loss=saved.get("val_loss"),
            best_val_loss=saved.get("best_val_loss"),
            rng_per_rank=saved.get("rng_per_rank") or [],
            data_per_rank=saved.get("data_per_rank") or [saved["data"]],
            scaler=saved.get("scaler"),
            epoch_loss_sum=float(saved.get("epoch_loss_sum", 0.0)),
            epoch_steps=int(saved.get("epoch_steps", 0)),
        )
