"""What a run trains on and what it minimises: the Trainer's pluggable `Task`.

The Trainer (train/loop.py) owns everything around a step: the model and its DDP/FSDP wrapper,
the optimizer (AdamW/Muon), the LR schedule, gradient accumulation and clipping, the NaN guard,
checkpoints and exact resume, metrics.jsonl, events, epochs, the memory check. A `Task` owns the
rest, in four parts, so that post-training (SFT, DPO, reward models, PPO) runs on the same loop:

- `setup(cfg, ckpt, run_dir) -> TaskSetup`: read-only checks and loading before RUN_DIR is
  touched. Returns the final config (its `model` section decides the weights' shapes), the
  tokenizer saved into RUN_DIR/tokenizer, and the initial weights (None: fresh, or `ckpt`'s);
  its `notes` (e.g. records skipped) reach the caller as WarningEvents.
  `ckpt` is the checkpoint a resumed run continues from (None for a new run).
- `batches(cfg, world, device) -> BatchSource`: this rank's micro-batches. A BatchSource has
  `next_batch()` (anything the objective understands), `state_dict()` (JSON-ready) and
  `load_state_dict(state)`; the Trainer saves every rank's state in each checkpoint (state.json's
  `data_per_rank`) and restores it on resume, with the RNGs, so a resumed run is bit-identical.
  A source should make its batches a function of (seed, step, micro-step): then its state is a
  position and the same data reaches 1 rank x 2 micro-steps as 2 ranks x 1.
- `objective(cfg, world, device, dtype) -> Objective`: `loss(model, batch) -> (loss, metrics)`
  is called under autocast for each micro-batch (the Trainer scales the loss by 1/A and calls
  backward; an objective with `weight(batch)`, the count its loss is a mean over, has each
  micro-batch's loss scaled by its count over the step's, all ranks', instead: SFT's learned
  tokens); `metrics` are scalar tensors averaged over micro-batches and ranks into the
  metrics.jsonl row (same keys every call). `count_tokens(batch)` is summed into `tokens` and
  tokens/s. `evaluate(model, max_batches) -> dict` runs on every rank at each evaluation (FSDP
  needs them all) and must hold "val_loss" (best checkpoint, `on_eval`, epochs); its other keys
  join the row.
- `epoch_size(cfg, world, device)`: items (windows, examples, pairs) in one pass, for
  train.max_epochs: a step takes ranks x grad_accum_steps x micro_batch_size of them.
  `rows_per_item` says how many sequences one item puts through the model (DPO: 2), for the
  memory estimate.
- Hooks: `write_run_dir(run_dir)` adds the task's files (e.g. a chat template) to a new run
  directory (rank 0); `begin(model, run_dir, world, resumed)` runs on every rank once the model
  holds its starting weights (the initial ones, or the checkpoint's on resume) and before
  `batches` and `objective`: DPO computes or loads its cached reference log-probabilities there;
  `prompt_ids(tokenizer, text)` turns train.sample_prompt into the ids a training preview
  continues (a chat task renders it as a user turn).
- `perplexity`: whether val_loss is a per-token negative log-likelihood, so that rows carry
  `val_ppl` = exp(val_loss) (pretraining, SFT); False for losses of another kind (DPO).

`PretrainTask` is next-token prediction on `gpt2lab prepare`'s token shards: what `gpt2lab
train` does, and what `train()` uses when given no task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from gpt2lab.config import Config, merge
from gpt2lab.data import load_tokens
from gpt2lab.generate import prompt_ids
from gpt2lab.model import GPT
from gpt2lab.train import build
from gpt2lab.train.dist import Dist
from gpt2lab.train.validation import val_loss


class BatchSource(Protocol):
    """This rank's micro-batches, resumable exactly."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Objective(Protocol):
    """What a step minimises and what an evaluation measures."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]: ...

    def count_tokens(self, batch: Any) -> int: ...

    def evaluate(self, model: nn.Module, max_batches: int) -> dict[str, float]: ...


@dataclass
class TaskSetup:
    """What `Task.setup` decided: the config, the tokenizer and the starting weights."""

    cfg: Config
    tokenizer: Any
    init_weights: dict[str, Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # whatever the task keeps for itself
    notes: list[str] = field(default_factory=list)  # told to the caller as WarningEvents


class Task:
    """Base class of tasks: pretraining's choices, which subclasses override in part."""

    name = "pretrain"
    rows_per_item = 1
    # val_loss is a mean negative log-likelihood per token, so exp(val_loss) is a perplexity
    # (metrics' val_ppl); a task whose loss is not one (DPO, a reward model) sets False
    perplexity = True

    def setup(self, cfg: Config, ckpt: Path | None, run_dir: Path) -> TaskSetup:
        raise NotImplementedError

    def batches(self, cfg: Config, world: Dist, device: torch.device) -> BatchSource:
        raise NotImplementedError

    def objective(
        self, cfg: Config, world: Dist, device: torch.device, dtype: torch.dtype
    ) -> Objective:
        raise NotImplementedError

    def epoch_size(self, cfg: Config, world: Dist, device: torch.device) -> int:
        raise NotImplementedError

    def new_model(self, cfg: Config) -> nn.Module:
        """The module a run trains: GPT-2 (a reward model adds a head to it)."""
        return GPT(cfg.model)

    def inputs(self, cfg: Config) -> list[str | None]:
        """What the run reads besides train.init_from: an --out equal to, inside or holding one
        of them is refused before anything is written (gpt2lab.outdir.check_not_overlapping)."""
        return [cfg.data.dir]

    def write_run_dir(self, run_dir: Path) -> None:
        """Files of the task's own in a new run directory (config and tokenizer are written)."""

    def begin(self, model: nn.Module, run_dir: Path, world: Dist, resumed: bool) -> None:
        """Every rank, once `model` holds its starting weights, before batches and objective."""

    def prompt_ids(self, tokenizer: Any, text: str) -> list[int]:
        """The ids a training preview continues, given train.sample_prompt."""
        return prompt_ids(tokenizer, text)


class PretrainTask(Task):
    """Next-token prediction over the windows of a prepared data directory (data.dir)."""

    def setup(self, cfg: Config, ckpt: Path | None, run_dir: Path) -> TaskSetup:
        meta, tok = build.check_data(cfg.data.dir)
        init_weights = None
        if ckpt is not None:
            build.check_resumed_vocab(cfg, meta, run_dir)
        elif cfg.train.init_from:
            cfg, init_weights = build.pretrained(cfg, tok, meta)
        else:  # from scratch: the data decides the vocabulary
            cfg = merge(cfg, {"model": {"vocab_size": int(meta["vocab_size"])}})
        return TaskSetup(cfg, tok, init_weights, {"meta": meta})

    def batches(self, cfg: Config, world: Dist, device: torch.device) -> BatchSource:
        return build.train_loader(cfg, world.rank, world.world_size, device)

    def epoch_size(self, cfg: Config, world: Dist, device: torch.device) -> int:
        return build.train_loader(cfg, world.rank, world.world_size, device).n_windows

    def objective(
        self, cfg: Config, world: Dist, device: torch.device, dtype: torch.dtype
    ) -> Objective:
        return LMObjective(cfg, load_tokens(cfg.data.dir, "val"), world, device, dtype)


class LMObjective:
    """Mean next-token cross-entropy of (x, y) windows; validation over the val split."""

    def __init__(
        self,
        cfg: Config,
        val_tokens: np.ndarray,
        world: Dist,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.cfg, self.val_tokens = cfg, val_tokens
        self.world, self.device, self.dtype = world, device, dtype

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch
        _, loss = model(x, y)
        return loss, {}

    def count_tokens(self, batch: Any) -> int:
        return batch[0].numel()

    def evaluate(self, model: nn.Module, max_batches: int) -> dict[str, float]:
        val = val_loss(
            model,
            self.val_tokens,
            self.cfg.model.block_size,
            self.cfg.train.micro_batch_size,
            max_batches,
            self.device,
            self.dtype,
            self.world,
            source=self.cfg.data.dir,
        )
        return {"val_loss": val}
