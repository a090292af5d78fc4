"""Training: `train(cfg, run_dir)` (pretraining, fine-tuning, resuming; one CPU to torchrun GPUs).

Modules: loop (the loop, evaluation, checkpoints), recipe (LR schedule, AdamW groups, freezing),
build (resume config, data/model/tokenizer/memory checks), dist (DDP/FSDP), metrics (logs, MFU).
"""

from __future__ import annotations

from gpt2lab.train.loop import TrainSummary, train
from gpt2lab.train.recipe import apply_freeze, configure_optimizer, lr_at

__all__ = ["TrainSummary", "apply_freeze", "configure_optimizer", "lr_at", "train"]
