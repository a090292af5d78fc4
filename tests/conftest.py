"""Shared fixtures: paths to the real corpora in ../shared/data and a tiny model config."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, the real text corpora (skips when a checkout has none beside it)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is missing")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_shakespeare(shared_data: Path) -> Path:
    return shared_data / "tinyshakespeare.txt"


@pytest.fixture
def tiny_cfg():
    """2 layers, 2 heads, 32 dims: fast enough for any test."""
    from gpt2lab.config import GPTConfig

    return GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=32)
