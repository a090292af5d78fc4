"""gpt2lab: GPT-2 built from scratch in PyTorch, from tokenizer to zero-shot evaluation.

The public API. `model.py` is the model alone; its conveniences live in the stages that implement
them and are bound here, so the model imports nothing above it:
`GPT.from_pretrained` (gpt2lab.checkpoint.load), `GPT.save_pretrained` (gpt2lab.checkpoint.hf) and
`GPT.generate` (gpt2lab.generate).
"""

from __future__ import annotations

from gpt2lab.checkpoint.hf import save_hf
from gpt2lab.checkpoint.load import from_pretrained, load_model
from gpt2lab.config import Config, GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.generate import generate
from gpt2lab.model import GPT
from gpt2lab.tokenizer import get_tokenizer, train_bpe

__version__ = "0.1.0"
__all__ = [
    "GPT",
    "GPTConfig",
    "Config",
    "GPT2LabError",
    "generate",
    "get_tokenizer",
    "load_model",
    "train_bpe",
]

GPT.from_pretrained = classmethod(from_pretrained)  # type: ignore[attr-defined]
GPT.save_pretrained = save_hf  # type: ignore[attr-defined]
GPT.generate = generate  # type: ignore[attr-defined]
