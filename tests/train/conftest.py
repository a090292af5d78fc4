"""Fixtures for the training tests: a small data directory of real text, one thread per test."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainutil import write_char_data


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, tiny_shakespeare: Path) -> Path:
    """The first 60,000 characters of Tiny Shakespeare, char-level, 10% held out."""
    text = tiny_shakespeare.read_text(encoding="utf-8")[:60_000]
    return write_char_data(tmp_path_factory.mktemp("data") / "sc", text)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and a busy 2-core CI box makes 2 threads crawl)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
