"""Data: text and datasets to token shards (`prepare`), and the batch loader that reads them."""

from __future__ import annotations

from gpt2lab.data import events
from gpt2lab.data.loader import BatchLoader
from gpt2lab.data.pipeline import prepare
from gpt2lab.data.shards import load_data_tokenizer, load_meta, load_tokens, read_header
from gpt2lab.data.sources import SourceSpec

__all__ = [
    "BatchLoader",
    "SourceSpec",
    "events",
    "load_data_tokenizer",
    "load_meta",
    "load_tokens",
    "prepare",
    "read_header",
]
