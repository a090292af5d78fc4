"""Training: `train(cfg, run_dir)` (pretraining, fine-tuning, resuming; one CPU to torchrun GPUs).

Modules: loop (the step loop, `Trainer`, `TrainOptions`), events (what a run reports), state
(`TrainState`, what a checkpoint saves besides weights), recipe (LR schedule, optimizer groups,
freezing), build (resume config, data/model/tokenizer/memory checks), memory (FLOPs and memory
per step), validation (validation loss), dist (DDP/FSDP), metrics (metrics.jsonl, MFU), progress
(a bar, when asked for), muon (the Muon optimizer), epochs (train.max_epochs).
"""

from __future__ import annotations

from gpt2lab.train.events import (
    CheckpointEvent,
    DoneEvent,
    EpochEvent,
    EvalEvent,
    Event,
    SampleEvent,
    StartEvent,
    StepEvent,
    TrainSummary,
    WarningEvent,
)
from gpt2lab.train.loop import Trainer, TrainOptions, train
from gpt2lab.train.memory import MemoryEstimate, estimate_memory, flops_per_token
from gpt2lab.train.recipe import apply_freeze, configure_optimizer, lr_at
from gpt2lab.train.state import TrainState

__all__ = [
    "CheckpointEvent",
    "DoneEvent",
    "EpochEvent",
    "EvalEvent",
    "Event",
    "MemoryEstimate",
    "SampleEvent",
    "StartEvent",
    "StepEvent",
    "TrainOptions",
    "TrainState",
    "TrainSummary",
    "Trainer",
    "WarningEvent",
    "apply_freeze",
    "configure_optimizer",
    "estimate_memory",
    "flops_per_token",
    "lr_at",
    "train",
]
