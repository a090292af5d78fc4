"""A tiny character-level policy directory and prompts for RL tests."""

from __future__ import annotations

import string
from pathlib import Path

import torch

from gpt2lab.commands.convert import save_native
from gpt2lab.config import GPTConfig
from gpt2lab.model import GPT
from gpt2lab.tokenizer.char import CharTokenizer

CHARS = string.ascii_letters + string.digits + " .,:;!?'\n"


def tiny_policy(path: Path, seed: int = 0, block_size: int = 64) -> Path:
    """A random 2-layer character GPT with its tokenizer, saved as a checkpoint directory."""
    tok = CharTokenizer.from_text(CHARS)
    torch.manual_seed(seed)
    cfg = GPTConfig(
        block_size=block_size,
        vocab_size=tok.n_vocab,
        n_layer=2,
        n_head=2,
        n_embd=32,
        pad_vocab_to=1,
    )
    save_native(GPT(cfg).eval(), tok, path)
    return path


def prompts_file(path: Path) -> Path:
    path.write_text("hello there\nhow are you\nsay a word\nwhat now\n", encoding="utf-8")
    return path


def count_fn(path: Path, chars: str = "aeiou") -> Path:
    """A reward-function file: how many of the completion's characters are in `chars`."""
    path.write_text(
        "def score(prompt, completion):\n"
        f"    return float(sum(c in {chars!r} for c in completion))\n",
        encoding="utf-8",
    )
    return path
