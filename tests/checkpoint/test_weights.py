"""safetensors weights: round trip, the tied head stored once, one clear error per bad file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from gpt2lab.checkpoint.weights import load_model_safetensors, save_model_safetensors
from gpt2lab.config import GPTConfig
from gpt2lab.errors import CheckpointError
from gpt2lab.model import GPT


def test_round_trip_drops_the_tied_head(tmp_path, tiny_cfg):
    torch.manual_seed(0)
    a = GPT(tiny_cfg)
    save_model_safetensors(a, tmp_path / "m.safetensors")
    stored = load_file(tmp_path / "m.safetensors")
    assert "lm_head.weight" not in stored and "transformer.wte.weight" in stored
    assert not [p.name for p in tmp_path.iterdir() if p.name != "m.safetensors"]  # no temp left
    torch.manual_seed(1)
    b = GPT(tiny_cfg)
    load_model_safetensors(b, tmp_path / "m.safetensors")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert b.lm_head.weight is b.transformer.wte.weight  # still tied after loading


def test_other_config_is_one_error_naming_fields(tmp_path, tiny_cfg):
    save_model_safetensors(GPT(tiny_cfg), tmp_path / "m.safetensors")
    other = GPTConfig(**{**tiny_cfg.__dict__, "n_layer": 3, "n_embd": 48, "bias": False})
    with pytest.raises(CheckpointError) as e:
        load_model_safetensors(GPT(other), tmp_path / "m.safetensors")
    msg = str(e.value)
    assert "missing keys transformer.h.2." in msg
    assert "unexpected keys" in msg and ".bias" in msg
    assert "shape mismatches" in msg and "transformer.wte.weight (128, 32) vs (128, 48)" in msg
    assert "model.n_layer: file 2, config 3" in msg and "model.n_embd: file 32, config 48" in msg
    assert "model.bias: file True, config False" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_truncated_corrupt_or_missing_file_names_itself(tmp_path, tiny_cfg, damage):
    path = tmp_path / "m.safetensors"
    save_model_safetensors(GPT(tiny_cfg), path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 8 + data[8:])
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match="m.safetensors"):
        load_model_safetensors(GPT(tiny_cfg), path)
