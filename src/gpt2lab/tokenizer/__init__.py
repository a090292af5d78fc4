"""gpt2lab's tokenizers: GPT-2's byte-level BPE (two backends), a trainer, and a char tokenizer.

tok = get_tokenizer("gpt2")                       # GPT-2's own vocabulary, tiktoken backend
tok = get_tokenizer("gpt2", backend="python")     # the from-scratch reference, same ids
tok = get_tokenizer("char", text=open("input.txt").read())
tok = get_tokenizer("runs/sc/tokenizer")          # whatever tok.save(dir) wrote
"""

from __future__ import annotations

from gpt2lab.tokenizer.base import EOT, Tokenizer
from gpt2lab.tokenizer.bpe import BACKENDS, BPETokenizer
from gpt2lab.tokenizer.char import UNK, CharTokenizer
from gpt2lab.tokenizer.loader import get_tokenizer
from gpt2lab.tokenizer.pretokenize import GPT2_PATTERN, GPT4_PATTERN
from gpt2lab.tokenizer.trainer import train_bpe

__all__ = [
    "BACKENDS",
    "BPETokenizer",
    "CharTokenizer",
    "EOT",
    "GPT2_PATTERN",
    "GPT4_PATTERN",
    "UNK",
    "Tokenizer",
    "get_tokenizer",
    "train_bpe",
]
