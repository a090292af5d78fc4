"""Data: text and datasets to token shards (`prepare`), and the batch loader that reads them.

`BatchLoader` builds torch tensors; it is exported on first use, so that `prepare` and the worker
processes it forks never load torch (a parent holding torch makes forking workers much slower).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gpt2lab.data import events
from gpt2lab.data.pipeline import prepare
from gpt2lab.data.shards import load_data_tokenizer, load_meta, load_tokens, read_header
from gpt2lab.data.sources import SourceSpec

if TYPE_CHECKING:
    from gpt2lab.data.loader import BatchLoader

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


def __getattr__(name: str) -> Any:
    if name == "BatchLoader":
        return importlib.import_module("gpt2lab.data.loader").BatchLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
