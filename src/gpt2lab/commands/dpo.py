"""`gpt2lab dpo`: preference tuning (DPO, IPO or hinge) against a frozen reference model."""

from __future__ import annotations

import argparse

from gpt2lab.commands.sft import add_common, run_command
from gpt2lab.posttrain.run import dpo

ACCEPTS_OVERRIDES = True
EXAMPLES = """
gpt2lab dpo --init-from runs/sft --data pairs.jsonl --out runs/dpo
gpt2lab dpo --init-from runs/sft --data pairs.jsonl --out runs/dpo --dpo.beta=0.2 --train.lr=5e-6
gpt2lab dpo --init-from runs/sft --data hh.jsonl --out runs/ipo --dpo.loss=ipo --errors skip
gpt2lab dpo --init-from runs/sft --data pairs.jsonl --out runs/dpo --dpo.cache_reference=false
gpt2lab dpo --out runs/dpo --resume --train.max_steps=1000
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, "preference pairs: {prompt, chosen, rejected} (text or messages) or HH-RLHF's")


def run(args: argparse.Namespace) -> int:
    return run_command(args, "dpo", dpo)
