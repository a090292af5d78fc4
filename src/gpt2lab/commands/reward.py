"""`gpt2lab reward`: train a reward model on preference pairs; `reward score` scores texts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpt2lab.commands.sample import PROMPT_LIMIT
from gpt2lab.commands.sft import add_common, run_command
from gpt2lab.errors import DataError, UsageError
from gpt2lab.io import read_text_bounded
from gpt2lab.posttrain.reward import load_reward_model, require_reward_dir
from gpt2lab.posttrain.reward_task import reward_model

ACCEPTS_OVERRIDES = True
EXAMPLES = """
gpt2lab reward --init-from runs/sft --data pairs.jsonl --out runs/rm
gpt2lab reward --init-from runs/sft --data hh.jsonl --out runs/rm --errors skip \\
    --train.max_steps=1000 --reward.val_fraction=0.05
gpt2lab reward --out runs/rm --resume --train.max_steps=2000
gpt2lab reward score --model runs/rm texts.txt           # one score per line
gpt2lab reward score --model runs/rm texts.txt --json    # {"score": ..., "text": ...} per line
echo 'What a joyful day!' | gpt2lab reward score --model runs/rm --json   # {"score": ...}
gpt2lab convert runs/rm hf/rm           # -> transformers GPT2ForSequenceClassification
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, "preference pairs: {prompt, chosen, rejected} (text or messages) or HH-RLHF's")
    for action in p._actions:  # --out is required to train, not to score
        if action.dest == "out":
            action.required = False
    sub = p.add_subparsers(dest="action", metavar="score", required=False)
    s = sub.add_parser(
        "score",
        help="score texts with a reward model (without `score`: train one)",
        description="Score texts, one per line, with a reward model.",
    )
    s.add_argument(
        "texts",
        nargs="?",
        metavar="FILE",
        help="a file with one text per line (default: standard input); `\\n` inside a line "
        "stands for a newline",
    )
    s.add_argument("--input", metavar="FILE", help="the texts file (as FILE)")
    s.add_argument("--model", metavar="RM_DIR", required=True, help="the reward-model directory")
    s.add_argument("--json", action="store_true", help='one {"score": ..., "text": ...} per line')
    s.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (16)")
    s.add_argument("--debug", action="store_true", help="show a traceback on errors")


def run(args: argparse.Namespace) -> int:
    if args.action == "score":
        return score(args)
    if not args.out:
        raise UsageError(
            "`gpt2lab reward` needs --out RM_DIR", fix="add --out runs/rm (or use `reward score`)"
        )
    return run_command(args, "reward", reward_model)


def score(args: argparse.Namespace) -> int:
    if args.overrides:
        raise UsageError("`gpt2lab reward score` takes no config overrides", fix="drop them")
    if args.texts and args.input:
        raise UsageError("two texts files given", fix="give FILE or --input FILE, not both")
    path = args.texts or args.input
    require_reward_dir(args.model)  # a wrong --model first, before the texts are read
    if path and not Path(path).exists():
        raise DataError(f"{path} does not exist", "a text file, one text per line", "check it")
    # bounded, before the model: a FIFO or /dev/zero that never ends is refused, not read
    raw = read_text_bounded(path or "-", PROMPT_LIMIT, "texts file", "input")
    rm = load_reward_model(args.model)
    texts = [ln.replace("\\n", "\n") for ln in raw.splitlines()]
    for text, value in zip(texts, rm.score_texts(texts, max(1, args.batch_size))):
        print(json.dumps({"score": value, "text": text}) if args.json else f"{value:.6f}")
    return 0
