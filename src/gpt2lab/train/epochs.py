"""Training by epochs: `train.max_epochs` passes over the train split in a shuffled order.

The loader's sequential mode (data.sampling = sequential) deals each epoch's non-overlapping
windows in a seeded permutation; a step takes `windows_per_step` of them (all ranks, all
micro-batches), so the epoch of a step and the steps of N epochs follow from two numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpt2lab.config import Config, merge
from gpt2lab.errors import ConfigError, mark_key


@dataclass(frozen=True)
class EpochPlan:
    """Where the epochs fall among the steps of a run."""

    max_epochs: int
    windows_per_epoch: int  # block_size windows of the train split
    windows_per_step: int  # ranks x micro-batches x batch

    @property
    def max_steps(self) -> int:
        """Steps that cover every window of `max_epochs` passes (the last may run a little on)."""
        return -(-self.max_epochs * self.windows_per_epoch // self.windows_per_step)

    def epoch_of(self, step: int) -> int:
        """The epoch (1-based) in which step `step` (1-based) starts."""
        return (step - 1) * self.windows_per_step // self.windows_per_epoch + 1

    def ends_epoch(self, step: int) -> bool:
        """Whether an epoch is completed during step `step` (1-based)."""
        done = step * self.windows_per_step // self.windows_per_epoch
        return done > (step - 1) * self.windows_per_step // self.windows_per_epoch


def plan_epochs(cfg: Config, windows_per_epoch: int, world_size: int) -> EpochPlan:
    """The plan of `cfg`'s train.max_epochs over a train split of `windows_per_epoch` windows."""
    tc = cfg.train
    if tc.max_epochs < 0:
        raise ConfigError(
            mark_key("train.max_epochs", tc.max_epochs), "N >= 0", "e.g. --train.max_epochs=5"
        )
    per_step = world_size * tc.grad_accum_steps * tc.micro_batch_size
    return EpochPlan(tc.max_epochs, windows_per_epoch, per_step)


def epochs_config(cfg: Config, plan: EpochPlan) -> Config:
    """`cfg` trained by epochs: shuffled sequential windows, and the steps the epochs take (the LR
    schedule decays over them)."""
    return merge(
        cfg,
        {"data": {"sampling": "sequential"}, "train": {"max_steps": plan.max_steps}},
        source="train.max_epochs",
    )
