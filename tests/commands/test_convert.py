"""`gpt2lab convert` on the command line, both directions, checked with transformers' logits."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2lab import cli
from gpt2lab.checkpoint.load import load_model

transformers = pytest.importorskip("transformers")


def test_hf_to_gpt2lab_and_back(tmp_path, capsys):
    torch.manual_seed(0)
    hc = transformers.GPT2Config(vocab_size=300, n_positions=24, n_layer=2, n_head=2, n_embd=16)
    hf = transformers.GPT2LMHeadModel(hc).eval()
    hf.save_pretrained(tmp_path / "hf")
    idx = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        expected = hf(idx).logits

    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert "gpt2lab" in capsys.readouterr().out
    state = json.loads((tmp_path / "ours" / "state.json").read_text())
    assert state["config"]["model"]["vocab_size"] == 300
    model, _ = load_model(tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], expected, atol=1e-5, rtol=0)

    assert cli.main(["convert", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, expected, atol=1e-5, rtol=0)


def test_convert_of_nothing_exits_1_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert cli.main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpt2lab: error: ") and "config.json" in err[0]
    assert not (tmp_path / "out").exists()
