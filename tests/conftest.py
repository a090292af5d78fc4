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


@pytest.fixture(scope="session")
def write_run():
    """`write_run(root, model, tokenizer)`: a run directory as training leaves it (tokenizer/,
    ckpt/step_00000001/ with model.safetensors, optimizer.pt and state.json, latest)."""
    import json

    import torch

    from gpt2lab.checkpoint.weights import save_model_safetensors
    from gpt2lab.config import Config, to_dict

    def write(root: Path, model, tokenizer) -> Path:
        tokenizer.save(root / "tokenizer")
        ckpt = root / "ckpt" / "step_00000001"
        ckpt.mkdir(parents=True)
        save_model_safetensors(model, ckpt / "model.safetensors")
        torch.save({}, ckpt / "optimizer.pt")
        state = {"step": 1, "config": to_dict(Config(model=model.config)), "tokenizer": "tokenizer"}
        (ckpt / "state.json").write_text(json.dumps(state))
        (root / "latest").write_text("ckpt/step_00000001\n")
        return root

    return write
