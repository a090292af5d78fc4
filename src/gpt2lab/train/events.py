"""What a training run reports while it runs: typed events, handed to the caller's `on_event`.

The library prints nothing; `gpt2lab train` and `gpt2lab demo` turn these events into their
lines and bars (gpt2lab.commands.train_console). Events go out on rank 0 only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Union


@dataclass(frozen=True)
class StartEvent:
    """The run is built and about to take its first step (`step` > 0 when resumed)."""

    run_dir: str
    step: int
    max_steps: int
    max_minutes: float  # the wall-clock budget (0 = none)
    params: int
    frozen: int  # parameter tensors kept fixed
    micro_batch_size: int
    block_size: int
    grad_accum_steps: int
    world_size: int
    tokens_per_step: int
    memory: str  # the estimate of one step's memory (`MemoryEstimate.__str__`)
    device: str
    dtype: str
    max_epochs: int = 0  # train.max_epochs (0: the run counts steps only)


@dataclass(frozen=True)
class StepEvent:
    """An optimizer step is done; `metrics` is its metrics.jsonl row when the step was logged."""

    step: int
    metrics: dict[str, Any] | None


@dataclass(frozen=True)
class EvalEvent:
    """The model was evaluated after `step`; `metrics` is the row, with val_loss (and val_ppl
    where the task's loss is a per-token negative log-likelihood)."""

    step: int
    metrics: dict[str, Any]


@dataclass(frozen=True)
class SampleEvent:
    """A short sample from the model being trained (train.sample_interval)."""

    step: int
    prompt: str
    text: str  # the continuation, prompt excluded


@dataclass(frozen=True)
class EpochEvent:
    """Epoch `epoch` (1-based) of `max_epochs` ended during `step`: its mean train loss; with
    train.sample_every_epoch also the validation loss and a sample (None otherwise)."""

    epoch: int
    max_epochs: int
    step: int
    train_loss: float
    val_loss: float | None
    prompt: str
    sample: str | None


@dataclass(frozen=True)
class CheckpointEvent:
    """A complete checkpoint of `step` was written."""

    step: int
    path: str


@dataclass(frozen=True)
class WarningEvent:
    """Something the user should know that does not stop the run (a skipped step, a resume note)."""

    message: str


@dataclass
class TrainSummary:
    """What a finished (or stopped) run reports."""

    run_dir: str
    step: int
    tokens: int
    loss: float  # train loss of the last step
    val_loss: float | None
    val_ppl: float | None
    best_val_loss: float | None
    tokens_per_s: float  # mean over the steps this process ran
    mfu: float
    elapsed_s: float
    checkpoint: str | None
    stopped_by: str  # "max_steps", "max_minutes", "signal", "hook"
    skipped_steps: int = 0
    rank: int = 0  # this process's rank under torchrun (only rank 0 logs and writes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DoneEvent:
    """The run ended; `summary` is what `train()` returns."""

    summary: TrainSummary


Event = Union[  # noqa: UP007 - a runtime alias for isinstance-free matching and docs
    StartEvent,
    StepEvent,
    EvalEvent,
    SampleEvent,
    EpochEvent,
    CheckpointEvent,
    WarningEvent,
    DoneEvent,
]
EventHandler = Callable[[Event], None]


def broadcast(*handlers: EventHandler | None) -> EventHandler | None:
    """One handler that passes each event to every given handler in turn (None if none)."""
    live = [h for h in handlers if h is not None]
    if len(live) <= 1:
        return live[0] if live else None

    def handle_all(event: Event) -> None:
        for handle in live:
            handle(event)

    return handle_all
