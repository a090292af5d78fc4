"""Data: text and datasets to token shards (`prepare`), and the batch loader that reads them."""

from __future__ import annotations

from typing import Any

from gpt2lab.data.loader import BatchLoader
from gpt2lab.data.shards import load_data_tokenizer, load_meta, load_tokens, read_header

__all__ = [
    "BatchLoader",
    "load_data_tokenizer",
    "load_meta",
    "load_tokens",
    "prepare",
    "read_header",
]


def prepare(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Tokenize sources into DATA_DIR shards + meta.json; see `gpt2lab.data.prepare.prepare`."""
    from gpt2lab.data.prepare import prepare as _prepare

    return _prepare(*args, **kwargs)
