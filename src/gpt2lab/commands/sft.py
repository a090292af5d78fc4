"""`gpt2lab sft`: supervised fine-tuning on prompt/completion or chat records (masked loss)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from gpt2lab.commands.train_console import plot_run, run_in_console
from gpt2lab.config import PRESETS, Config, resolve
from gpt2lab.errors import UsageError
from gpt2lab.posttrain.run import sft
from gpt2lab.train import build
from gpt2lab.train.events import TrainSummary

ACCEPTS_OVERRIDES = True
EXAMPLES = """
gpt2lab sft --init-from runs/demo --data chats.jsonl --out runs/sft
gpt2lab sft --init-from gpt2 --data pc.jsonl --out runs/sft --template chat --train.max_steps=2000
gpt2lab sft --init-from gpt2 --data HuggingFaceH4/no_robots:train --out runs/nr --packing
gpt2lab sft --init-from runs/demo --data chats.jsonl --out runs/sft --errors skip --train.lr=1e-4
gpt2lab sft --out runs/sft --resume --train.max_steps=3000      # continue, with more steps
"""


def add_common(p: argparse.ArgumentParser, what: str) -> None:
    """The options `gpt2lab sft` and `gpt2lab dpo` share."""
    p.add_argument(
        "--init-from",
        metavar="MODEL",
        help="the model to start from: a gpt2lab run directory, a Hugging Face GPT-2 directory "
        "or gpt2 (sets train.init_from)",
    )
    p.add_argument(
        "--data",
        metavar="FILE",
        help=f"{what}: JSON Lines, Parquet, or a Hugging Face dataset NAME[:SPLIT]",
    )
    p.add_argument("--out", metavar="RUN_DIR", required=True, help="the run directory")
    p.add_argument(
        "--val-data", metavar="FILE", help="held-out records (default: a share of --data)"
    )
    p.add_argument(
        "--template",
        metavar="NAME|FILE",
        help="chat template: auto (the model's own, else plain), chat (adds <|user|>, "
        "<|assistant|>, <|end|>, ... to the vocabulary), plain, or a chat_template.json",
    )
    p.add_argument(
        "--errors",
        choices=["raise", "skip"],
        help="a bad record stops with a one-line error (raise, default) or is counted (skip)",
    )
    p.add_argument("--preset", help=f"start from a preset: {', '.join(PRESETS)}")
    p.add_argument("--config", metavar="FILE", help="a TOML file with [train], [sft], [dpo]")
    p.add_argument(
        "--resume", action="store_true", help="continue RUN_DIR from its latest checkpoint"
    )
    p.add_argument("--overwrite", action="store_true", help="start RUN_DIR over if it exists")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a bar")
    p.add_argument("--no-plot", action="store_true", help="skip writing RUN_DIR/curves.png")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, "prompt/completion or messages records")
    p.add_argument(
        "--packing",
        action="store_true",
        help="pack short examples into full blocks (each still attends only to itself)",
    )


def config_of(args: argparse.Namespace, section: str) -> Config:
    """The run's config: saved (--resume) or preset < --config < overrides < these flags."""
    out = Path(args.out)
    flags = {
        f"{section}.data": args.data,
        f"{section}.val_data": args.val_data,
        f"{section}.template": args.template,
        f"{section}.errors": args.errors,
    }
    if getattr(args, "packing", False):
        flags[f"{section}.packing"] = "true"
    overrides = list(args.overrides)
    if args.resume:
        if args.preset or args.config or args.init_from or args.overwrite or args.template:
            raise UsageError(
                "--resume continues with the saved config",
                "only --out, --data, --val-data, --errors and overrides such as --train.max_steps",
                "drop --preset/--config/--init-from/--overwrite/--template",
            )
        given = [f"{k}={v}" for k, v in flags.items() if v is not None]
        cfg, _ = build.resume_config(out, [*given, *overrides])
        return cfg
    if not args.init_from:
        raise UsageError(
            f"`gpt2lab {section}` needs --init-from MODEL",
            "a run directory, a Hugging Face GPT-2 directory or gpt2",
            f"e.g. gpt2lab {section} --init-from runs/demo --data FILE --out {args.out}",
        )
    flags["train.init_from"] = args.init_from
    return resolve(args.preset or section, args.config, overrides, flags=flags)


def run_command(args: argparse.Namespace, section: str, runner: Callable[..., TrainSummary]) -> int:
    cfg = config_of(args, section)
    out = Path(args.out)
    summary = run_in_console(runner, cfg, out, args)
    if summary.rank == 0:
        if not args.no_plot and summary.step > 0:
            print(f"plot: {plot_run(out)}", file=sys.stderr)
        val = f"{summary.val_loss:.4f}" if summary.val_loss is not None else "-"
        what = "completion loss" if section == "sft" else "preference loss"
        print(
            f"done: step {summary.step}, train {what} {summary.loss:.4f}, held-out {val}, "
            f"{summary.tokens_per_s:,.0f} tokens/s, checkpoint {summary.checkpoint}"
        )
    return 130 if summary.stopped_by == "signal" else 0


def run(args: argparse.Namespace) -> int:
    return run_command(args, "sft", sft)
