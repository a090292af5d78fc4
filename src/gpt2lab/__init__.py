"""gpt2lab: GPT-2 built from scratch in PyTorch, from tokenizer to zero-shot evaluation."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public API, imported on first use so that `import gpt2lab` stays fast (torch loads lazily).
_EXPORTS = {
    "GPT": "gpt2lab.model",
    "GPTConfig": "gpt2lab.config",
    "Config": "gpt2lab.config",
    "get_tokenizer": "gpt2lab.tokenizer",
    "train_bpe": "gpt2lab.tokenizer",
    "generate": "gpt2lab.generate",
    "GPT2LabError": "gpt2lab.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gpt2lab' has no attribute {name!r}")
