"""Data: text and datasets to token shards (`prepare`), and the batch loader that reads them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gpt2lab.data.pipeline import prepare
from gpt2lab.data.shards import load_data_tokenizer, load_meta, load_tokens, read_header
from gpt2lab.data.sources import SourceSpec

if TYPE_CHECKING:
    from gpt2lab.data.loader import BatchLoader

__all__ = [
    "BatchLoader",
    "SourceSpec",
    "load_data_tokenizer",
    "load_meta",
    "load_tokens",
    "prepare",
    "read_header",
]


def __getattr__(name: str) -> Any:
    # BatchLoader pulls in torch: imported on first use, so prepare's workers start fast
    if name == "BatchLoader":
        from gpt2lab.data.loader import BatchLoader

        return BatchLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
