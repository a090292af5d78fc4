"""`gpt2lab rlhf`: PPO (Ziegler et al. 2019) or GRPO of a policy against a reward model or a
reward function, with a KL penalty to the frozen starting policy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt2lab.commands.train_console import StopSignal, plot_run
from gpt2lab.config import PRESETS, resolve
from gpt2lab.errors import UsageError
from gpt2lab.posttrain.rlhf import rlhf
from gpt2lab.train import build
from gpt2lab.train.events import (
    CheckpointEvent,
    DoneEvent,
    Event,
    StartEvent,
    StepEvent,
    WarningEvent,
    broadcast,
)

ACCEPTS_OVERRIDES = True
EXAMPLES = """
gpt2lab rlhf --policy runs/sft --reward runs/rm --prompts prompts.txt --out runs/ppo
gpt2lab rlhf --policy runs/sft --reward runs/rm --prompts p.jsonl --out runs/ppo \\
    --train.max_steps=300 --train.lr=5e-6 --rl.target_kl=4 --rl.batch_size=32
gpt2lab rlhf --policy runs/sft --reward runs/rm --prompts p.txt --out runs/fixed \\
    --rl.target_kl=0 --rl.kl_coef=0.05                     # a fixed beta
gpt2lab rlhf --policy runs/sft --reward-fn my_rewards.py:score --prompts p.txt --out runs/grpo \\
    --rl.algorithm=grpo --rl.group_size=8                  # GRPO against your own function
gpt2lab rlhf --out runs/ppo --resume --train.max_steps=500   # continue exactly
torchrun --standalone --nproc_per_node=2 -m gpt2lab rlhf --policy runs/sft --reward runs/rm \
    --prompts p.txt --out runs/ppo2     # DDP: each rank samples its share (batch sizes: multiples)
gpt2lab plot runs/ppo                                   # reward and KL against steps, reward vs KL

--reward-fn FILE.py:NAME runs NAME(prompt: str, completion: str) -> float from FILE, as Python.
Only a file you name with this flag is ever run: never code found in a model, reward-model or
data directory, nor one named in a saved config (a --resume must name it again).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--policy",
        metavar="SFT_RUN",
        help="the policy to start from and the frozen reference: a run directory (e.g. from "
        "`gpt2lab sft`), a Hugging Face GPT-2 directory or gpt2 (sets train.init_from)",
    )
    p.add_argument(
        "--reward",
        metavar="RM_DIR",
        help="a reward model from `gpt2lab reward` (sets rl.reward_model)",
    )
    p.add_argument(
        "--reward-fn",
        metavar="FILE.py:NAME",
        help="instead of a reward model: the function NAME(prompt, completion) -> float of the "
        "Python file FILE. This RUNS FILE: only the file you name here is ever run, never code "
        "found in a model or data directory; --resume needs it named again",
    )
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompts: JSON Lines with a `prompt` field (text or messages), or plain text with "
        "one prompt per line (sets rl.prompts)",
    )
    p.add_argument("--out", metavar="RUN_DIR", required=True, help="the run directory")
    p.add_argument(
        "--template",
        metavar="NAME|FILE",
        help="chat template for the prompts: auto (the policy's own, else plain text), chat, plain",
    )
    p.add_argument("--preset", help=f"start from a preset (default ppo): {', '.join(PRESETS)}")
    p.add_argument("--config", metavar="FILE", help="a TOML file with [train] and [rl] tables")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR exactly")
    p.add_argument("--overwrite", action="store_true", help="start RUN_DIR over if it exists")
    p.add_argument("--no-plot", action="store_true", help="skip writing RUN_DIR/curves.png")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    flags = {
        "train.init_from": args.policy,
        "rl.reward_model": args.reward,
        "rl.prompts": args.prompts,
        "rl.template": args.template,
    }
    overrides = list(args.overrides)
    if args.resume:
        if args.preset or args.config or args.policy or args.overwrite or args.template:
            raise UsageError(
                "--resume continues with the saved config",
                "only --out, --reward-fn, --prompts and overrides such as --train.max_steps",
                "drop --preset/--config/--policy/--overwrite/--template",
            )
        given = [f"{k}={v}" for k, v in flags.items() if v is not None]
        cfg, _ = build.resume_config(out, [*given, *overrides])
    else:
        if not args.policy:
            raise UsageError(
                "`gpt2lab rlhf` needs --policy SFT_RUN",
                "a run directory to start from",
                f"e.g. gpt2lab rlhf --policy runs/sft --reward runs/rm --prompts FILE --out {out}",
            )
        cfg = resolve(args.preset or "ppo", args.config, overrides, flags=flags)
    if bool(cfg.rl.reward_model) == bool(args.reward_fn) and not args.resume:
        raise UsageError(
            "name one reward: --reward RM_DIR or --reward-fn FILE.py:NAME",
            "exactly one of them",
            "e.g. --reward runs/rm",
        )
    with StopSignal() as stop:
        summary = rlhf(
            cfg,
            out,
            reward_fn=args.reward_fn or "",
            resume=args.resume,
            overwrite=args.overwrite,
            on_event=broadcast(stop.follow, print_event),
            should_stop=stop.requested,
        )
    if summary.rank == 0:  # under torchrun, rank 0 alone writes and reports
        if not args.no_plot and summary.step > 0:
            print(f"plot: {plot_run(out, 'rlhf')}", file=sys.stderr)
        print(
            f"done: step {summary.step}, mean reward {summary.loss:.4f}, "
            f"{summary.tokens_per_s:,.0f} tokens/s, checkpoint {summary.checkpoint}"
        )
    return 130 if summary.stopped_by == "signal" else 0


def print_event(event: Event) -> None:
    """One line per step on stderr: the metrics that say whether RL is working."""
    if isinstance(event, StartEvent):
        what = f"resuming at step {event.step}" if event.step else "starting"
        print(
            f"rlhf: {what}, {event.params:,} parameters, {event.device} {event.dtype}, "
            f"up to {event.max_steps} steps",
            file=sys.stderr,
        )
    elif isinstance(event, StepEvent) and event.metrics:
        m = event.metrics
        vl = m["value_loss"]
        print(
            f"step {m['step']}: reward {m['reward']:.4f}  kl {m['kl']:.3f}  beta {m['beta']:.4f}  "
            f"entropy {m['entropy']:.3f}  clip {m['clip_frac']:.3f}  "
            f"value loss {'-' if vl is None else f'{vl:.4f}'}  approx kl {m['approx_kl']:.4f}  "
            f"{m['tokens_per_s']:,.0f} tokens/s",
            file=sys.stderr,
        )
    elif isinstance(event, CheckpointEvent):
        print(f"checkpoint: {event.path}", file=sys.stderr)
    elif isinstance(event, WarningEvent):
        print(f"warning: {event.message}", file=sys.stderr)
    elif isinstance(event, DoneEvent) and event.summary.stopped_by == "signal":
        print("stopped by a signal; continue with --resume", file=sys.stderr)
