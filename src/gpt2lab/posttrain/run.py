"""`sft()` and `dpo()`: a post-training run into RUN_DIR, as `gpt2lab sft` / `gpt2lab dpo` do it.

Both are `gpt2lab.train.train` with a task: the same run directory layout (checkpoints,
metrics.jsonl, config.toml, tokenizer/ with chat_template.json), exact resume, DDP/FSDP, events.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gpt2lab.config import Config
from gpt2lab.posttrain.dpo import DPOTask
from gpt2lab.posttrain.sft import SFTTask
from gpt2lab.train import train
from gpt2lab.train.events import EventHandler, TrainSummary


def sft(
    cfg: Config,
    run_dir: str | Path,
    *,
    records: Sequence[dict] | None = None,
    val: Sequence[dict] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_event: EventHandler | None = None,
    progress: bool = False,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
    **hooks: Any,
) -> TrainSummary:
    """Fine-tune cfg.train.init_from on cfg.sft.data (or `records`, held out: `val`)."""
    return train(
        cfg,
        run_dir,
        resume=resume,
        overwrite=overwrite,
        on_event=on_event,
        progress=progress,
        should_stop=should_stop,
        log=log,
        task=SFTTask(records, val),
        **hooks,
    )


def dpo(
    cfg: Config,
    run_dir: str | Path,
    *,
    records: Sequence[dict] | None = None,
    val: Sequence[dict] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_event: EventHandler | None = None,
    progress: bool = False,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
    **hooks: Any,
) -> TrainSummary:
    """Preference-tune cfg.train.init_from on the pairs of cfg.dpo.data (or `records`)."""
    return train(
        cfg,
        run_dir,
        resume=resume,
        overwrite=overwrite,
        on_event=on_event,
        progress=progress,
        should_stop=should_stop,
        log=log,
        task=DPOTask(records, val),
        **hooks,
    )
