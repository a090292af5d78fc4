"""`sft()` and `dpo()`: a post-training run into RUN_DIR, as `gpt2lab sft` / `gpt2lab dpo` do it.

Both are `gpt2lab.train.train` with a task: the same run directory layout (checkpoints,
metrics.jsonl, config.toml, tokenizer/ with chat_template.json), exact resume, DDP/FSDP, events.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt2lab.config import Config
from gpt2lab.posttrain.dpo import DPOTask
from gpt2lab.posttrain.sft import SFTTask
from gpt2lab.train import train
from gpt2lab.train.events import TrainSummary


def sft(
    cfg: Config,
    run_dir: str | Path,
    *,
    records: Sequence[dict] | None = None,
    val: Sequence[dict] | None = None,
    **options: Any,
) -> TrainSummary:
    """Fine-tune cfg.train.init_from on cfg.sft.data (or `records`, held out: `val`); `options`
    are `gpt2lab.train.train`'s (resume, overwrite, on_event, progress, should_stop, log, ...)."""
    return train(cfg, run_dir, task=SFTTask(records, val), **options)


def dpo(
    cfg: Config,
    run_dir: str | Path,
    *,
    records: Sequence[dict] | None = None,
    val: Sequence[dict] | None = None,
    **options: Any,
) -> TrainSummary:
    """Preference-tune cfg.train.init_from on the pairs of cfg.dpo.data (or `records`);
    `options` as for `sft`."""
    return train(cfg, run_dir, task=DPOTask(records, val), **options)
