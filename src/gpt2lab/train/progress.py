"""A progress bar fed by training events, drawn only when a caller asks for one (`progress=True`).

It counts optimizer steps (with the epoch before it and the latest metrics beside it) or, for a
run with a wall-clock budget, the budget's minutes. tqdm draws it on stderr, so stdout stays clean
for pipes; a caller prints lines above it with `tqdm.write(line, file=sys.stderr)`.
"""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from gpt2lab.train.events import DoneEvent, EvalEvent, Event, StartEvent, StepEvent


def metrics_line(row: dict[str, Any]) -> str:
    """`step 120 | loss 3.41 | lr 6.00e-04 | 27,000 tok/s | mfu 1.2%[ | val 3.50 (ppl 33.1)]`."""
    line = (
        f"step {row['step']} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
        f"{row['tokens_per_s']:,.0f} tok/s | mfu {100 * row['mfu']:.1f}%"
    )
    if "val_loss" in row:
        line += f" | val {row['val_loss']:.4f}"
        if "val_ppl" in row:
            line += f" (ppl {row['val_ppl']:.2f})"
    return line


class ProgressBar:
    """Call it with each event: a tqdm bar opens at the start, moves with the steps, closes at the
    end. `over="steps"` counts steps; `over="time"` fills with the wall-clock budget (a run with
    train.max_minutes), showing step, loss, validation loss and speed."""

    def __init__(self, over: str = "steps") -> None:
        self.over, self.bar, self.budget_s, self.val = over, None, 0.0, ""
        self.max_epochs = 0

    def __call__(self, event: Event) -> None:
        if isinstance(event, StartEvent):
            self._open(event)
        elif isinstance(event, StepEvent) and self.bar is not None:
            self._advance(event)
        elif isinstance(event, EvalEvent):
            self.val = f" | val {event.metrics['val_loss']:.3f}"
        elif isinstance(event, DoneEvent):
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _open(self, start: StartEvent) -> None:
        self.max_epochs = start.max_epochs
        if self.over == "time":
            self.budget_s = start.max_minutes * 60
            self.bar = tqdm(
                total=round(self.budget_s),
                desc=f"training 0:00/{_clock(self.budget_s)}",
                bar_format="{desc} |{bar}|",
                dynamic_ncols=True,
            )
        else:
            self.bar = tqdm(
                total=start.max_steps,
                initial=start.step,
                unit="step",
                dynamic_ncols=True,
                leave=True,
            )

    def _advance(self, event: StepEvent) -> None:
        assert self.bar is not None
        row = event.metrics
        if self.over == "steps":
            if row is not None and "epoch" in row:
                self.bar.set_description_str(f"epoch {row['epoch']}/{self.max_epochs}", False)
            if row is not None:
                self.bar.set_postfix_str(metrics_line(row).split(" | ", 1)[1], refresh=False)
            self.bar.update(1)
        elif row is not None:
            t = row["elapsed_s"]
            self.bar.n = min(round(t), self.bar.total)
            self.bar.set_description_str(
                f"training {_clock(t)}/{_clock(self.budget_s)} | step {row['step']:,} | "
                f"loss {row['loss']:.3f}{self.val} | {row['tokens_per_s']:,.0f} tok/s",
                refresh=True,
            )


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"
