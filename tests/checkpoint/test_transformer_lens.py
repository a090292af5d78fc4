"""Our Hugging Face export loads into TransformerLens (its TransformerBridge) with our logits."""

from __future__ import annotations

import pytest
import torch

from gpt2lab.checkpoint.hf import save_hf
from gpt2lab.config import GPTConfig
from gpt2lab.model import GPT

pytestmark = pytest.mark.interop  # TransformerLens is a heavy peer: `make test-interop`
model_bridge = pytest.importorskip("transformer_lens.model_bridge")


def test_hf_export_boots_in_transformer_lens(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)).eval()
    save_hf(model, tmp_path / "hf")
    bridge = model_bridge.TransformerBridge.boot_transformers(str(tmp_path / "hf"), device="cpu")
    ids = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids)
        torch.testing.assert_close(logits, model(ids)[0], atol=1e-5, rtol=0)
    assert "hook_embed" in cache  # activations are there to inspect
