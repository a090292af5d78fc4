"""Data: text and datasets to token shards (`prepare`), and the batch loader that reads them."""

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
    # BatchLoader needs torch (about a second to import): `gpt2lab prepare` and its workers never
    # load it. The same lazy export as the package's own __init__.py.
    if name == "BatchLoader":
        return importlib.import_module("gpt2lab.data.loader").BatchLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
