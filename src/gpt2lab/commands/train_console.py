"""What `gpt2lab train` and `gpt2lab demo` show while training, and how they touch the process:
the metrics lines, the bar, the samples, the warnings, stop signals and the allocator.

The library reports through events (gpt2lab.train.events); this module prints them on stderr,
so stdout stays clean for pipes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gpt2lab.device import keep_freed_memory, pick_device
from gpt2lab.errors import ConfigError
from gpt2lab.outdir import INFRA, OutputDir, claim_output_dir, is_owned_dir
from gpt2lab.plot import plot_runs
from gpt2lab.train.build import claim_run_dir
from gpt2lab.train.events import (
    DoneEvent,
    EpochEvent,
    EvalEvent,
    Event,
    SampleEvent,
    StartEvent,
    StepEvent,
    WarningEvent,
    broadcast,
)
from gpt2lab.train.progress import ProgressBar, metrics_line


class StopSignal:
    """SIGINT/SIGTERM: the first asks the run to stop after this step; a second exits at once.

    The handlers are in place only while steps run: `follow(event)` installs them at the run's
    StartEvent and puts the old ones back at its DoneEvent (or when the `with` block ends). Before
    that, a Ctrl-C ends the command at once, and the data preparation's worker processes, forked
    earlier, keep SIGTERM's default action (their pool stops them with it).
    """

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def follow(self, event: Event) -> None:
        if isinstance(event, StartEvent):
            self._install()
        elif isinstance(event, DoneEvent):
            self._restore()

    def _install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            raise KeyboardInterrupt  # second signal: leave now (a half checkpoint is discarded)
        self.signum = signum

    def requested(self) -> bool:
        """Whether a signal arrived (what `train(should_stop=...)` polls once a step)."""
        return self.signum > 0


def run_in_console(runner: Any, cfg: Any, out: Path, args: Any) -> Any:
    """`runner(cfg, out, ...)` (train, sft, dpo, reward) with the console's progress, Ctrl-C as a
    clean stop, and the run's --resume/--overwrite/--no-progress flags; its summary."""
    tune_allocator(cfg.train.device)
    console = TrainConsole(progress=not args.no_progress and sys.stderr.isatty())
    with StopSignal() as stop:
        return runner(
            cfg,
            out,
            resume=args.resume,
            overwrite=args.overwrite,
            on_event=broadcast(stop.follow, console),
            should_stop=stop.requested,
        )


def tune_allocator(device_name: str) -> None:
    """On a CPU, keep glibc from returning each step's freed activations to the OS.

    A process-wide change, made here in the command and not by the library: every training step
    would otherwise page-fault its activations in anew.
    """
    if pick_device(device_name).type == "cpu":
        keep_freed_memory()


class TrainConsole:
    """Turns a run's events into lines on stderr, above a progress bar when there is one.

    `gpt2lab train`: a bar over steps with the metrics beside it, or without a bar a line per
    logged step. `gpt2lab demo` (`every_step=False`): a bar over the time budget, and only the
    evaluation lines. Both print the header, the samples, warnings and the stop-signal hint.
    """

    def __init__(self, progress: bool, over: str = "steps", every_step: bool = True) -> None:
        self.bar = ProgressBar(over) if progress else None
        self.every_step = every_step

    def __call__(self, event: Event) -> None:
        if isinstance(event, StartEvent):
            self.print(start_line(event))
        elif isinstance(event, StepEvent):
            row = event.metrics
            if self.bar is None and self.every_step and row is not None and "val_loss" not in row:
                self.print(metrics_line(row))
        elif isinstance(event, EvalEvent):
            self.print(metrics_line(event.metrics))
        elif isinstance(event, SampleEvent):
            self.print(f"--- sample at step {event.step} ---\n{event.prompt}{event.text}\n---")
        elif isinstance(event, EpochEvent):
            self.print(epoch_lines(event))
        elif isinstance(event, WarningEvent):
            self.print(event.message)
        if self.bar is not None:
            self.bar(event)  # after the header: the bar opens below it
        if isinstance(event, DoneEvent) and event.summary.stopped_by == "signal":
            s = event.summary
            self.print(
                f"stopped by a signal after step {s.step}; checkpoint {s.checkpoint}; "
                f"continue with `gpt2lab train --out {s.run_dir} --resume`"
            )

    def print(self, line: str) -> None:
        """A line on stderr, above the bar if one is open."""
        if self.bar is not None and self.bar.bar is not None:
            tqdm.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)


def epoch_lines(e: EpochEvent) -> str:
    """`epoch 2/5 done at step 84 | train loss 2.1034 | val loss 2.2001`, then the sample."""
    line = f"epoch {e.epoch}/{e.max_epochs} done at step {e.step} | train loss {e.train_loss:.4f}"
    if e.val_loss is not None:
        line += f" | val loss {e.val_loss:.4f}"
    if e.sample is not None:
        line += f"\n--- sample after epoch {e.epoch} ---\n{e.prompt}{e.sample}\n---"
    return line


def start_line(e: StartEvent) -> str:
    """`model: 10,745,088 parameters (0 tensors frozen) | tokens per step = ... | cpu bfloat16`."""
    return (
        f"model: {e.params:,} parameters ({e.frozen} tensors frozen) | tokens per step = "
        f"{e.micro_batch_size} x {e.block_size} x {e.grad_accum_steps} x {e.world_size} = "
        f"{e.tokens_per_step:,} | memory per step ~ {e.memory} | {e.device} {e.dtype}"
    )


def plot_run(run_dir: Path, command: str = "train") -> Path:
    """RUN_DIR/curves.png, written only if a curves.png there is gpt2lab's (or none is)."""
    with claim_run_dir(run_dir, command=command) as claim:
        claim.claim_file("curves.png")
        return plot_runs([run_dir])


def claim_demo_dir(
    out: str | Path, command: str, entries: tuple[str, ...], inputs: list[Any]
) -> OutputDir:
    """A demo's --out: new, empty or gpt2lab's (see gpt2lab.outdir), with `entries` (its runs and
    files) recorded as gpt2lab's - refused if one exists that gpt2lab did not write. An input that
    is one of those entries (an earlier demo's own run, reused) is not an overlap."""
    own = {os.path.realpath(os.path.join(out, e)) for e in entries}
    given = [i for i in inputs if i and os.path.realpath(i) not in own]
    claim = claim_output_dir(out, command, inputs=given, adopt=partial(_adopt_demo, entries))
    try:
        for name in entries:
            claim.claim_file(name)
    except BaseException:
        release_demo_dir(claim, (), failed=True)
        raise
    return claim


def _adopt_demo(entries: tuple[str, ...], out: Path) -> list[str] | None:
    """A demo directory an older gpt2lab (before markers) wrote: only its entries, each run
    directory in it marked as gpt2lab's."""
    found = [p for p in out.iterdir() if p.name not in INFRA]
    if any(p.name not in entries or (p.is_dir() and not is_owned_dir(p)) for p in found):
        return None
    return [p.name for p in found]


def release_demo_dir(claim: OutputDir, entries: tuple[str, ...], failed: bool) -> None:
    """Unlock; a demo that failed before writing anything leaves no trace (in a directory it
    created: an earlier demo's runs stay)."""
    if failed and claim.created and not any(os.path.lexists(claim.path / e) for e in entries):
        claim.discard()
    claim.release()


@contextlib.contextmanager
def demo_dir(out: str, command: str, entries: tuple[str, ...], inputs: list[Any]) -> Any:
    """`claim_demo_dir` for the body of a demo; released after it, discarded if it failed."""
    claim = claim_demo_dir(out, command, entries, inputs)
    failed = True
    try:
        yield claim
        failed = False
    finally:
        release_demo_dir(claim, entries, failed)


def require_positive(args: Any, names: tuple[str, ...]) -> None:
    """A one-line error for the first of these numeric flags that is not > 0."""
    for name in names:
        if not getattr(args, name) > 0:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {getattr(args, name)}", "a number > 0", f"raise {flag}")
