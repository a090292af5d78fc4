"""load_model: run, checkpoint and HF directories and hub names, each with its tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2lab.checkpoint.load import load_model
from gpt2lab.checkpoint.weights import save_model_safetensors
from gpt2lab.config import Config, to_dict
from gpt2lab.errors import CheckpointError
from gpt2lab.model import GPT
from gpt2lab.tokenizer import get_tokenizer

transformers = pytest.importorskip("transformers")


def make_run(run, cfg, tok, steps=(5, 10)):
    """A run directory laid out as training writes it (the contract of issue 6)."""
    tok.save(run / "tokenizer")
    models = {}
    for step in steps:
        ckpt = run / "ckpt" / f"step_{step:08d}"
        torch.manual_seed(step)
        models[step] = GPT(cfg).eval()
        save_model_safetensors(models[step], ckpt / "model.safetensors")
        torch.save({"state": {}, "param_groups": []}, ckpt / "optimizer.pt")
        state = {"step": step, "config": to_dict(Config(model=cfg)), "tokenizer": "tokenizer"}
        (ckpt / "state.json").write_text(json.dumps(state))
    (run / "latest").write_text(f"ckpt/step_{steps[-1]:08d}\n")
    return models


def same_logits(a, b, cfg):
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(a(idx)[0], b(idx)[0], atol=1e-6, rtol=0)


def test_run_and_checkpoint_directories_load_with_their_tokenizer(tmp_path, tiny_cfg):
    from gpt2lab.config import GPTConfig

    tok = get_tokenizer("char", text="First Citizen: Before we proceed any further, hear me speak.")
    cfg = GPTConfig(**{**tiny_cfg.__dict__, "vocab_size": tok.n_vocab})
    models = make_run(tmp_path / "run", cfg, tok)
    model, loaded_tok = load_model(tmp_path / "run")
    assert not model.training and model.config == cfg
    same_logits(model, models[10], cfg)  # `latest`, not the first checkpoint
    assert loaded_tok.decode(loaded_tok.encode("hear me")) == "hear me"
    assert loaded_tok.n_vocab == tok.n_vocab
    GPT.from_pretrained(tmp_path / "run").save_pretrained(tmp_path / "hf")  # keeps the tokenizer
    assert load_model(tmp_path / "hf")[1].encode("hear me") == tok.encode("hear me")
    older = tmp_path / "run" / "ckpt" / "step_00000005"
    for path in (older, older / "model.safetensors"):
        model, loaded_tok = load_model(path)
        assert loaded_tok is not None
        same_logits(model, models[5], cfg)
    model, _ = load_model(older, dtype="bfloat16")
    w, ref = model.transformer.h[1].mlp.c_fc.weight, models[5].transformer.h[1].mlp.c_fc.weight
    assert w.dtype == torch.bfloat16 and torch.equal(w, ref.bfloat16())


def test_hf_directory_without_tokenizer_files_gets_gpt2s_when_vocab_matches(tmp_path):
    hc = transformers.GPT2Config(n_positions=16, n_layer=1, n_head=2, n_embd=16)
    transformers.GPT2LMHeadModel(hc).save_pretrained(tmp_path / "hf")
    model, tok = load_model(tmp_path / "hf")
    assert tok is not None and tok.n_vocab == 50257 and tok.eot_token == 50256
    assert model.config.padded_vocab_size == 50304  # padded for speed, logits still 50257 wide
    hc.vocab_size = 300
    transformers.GPT2LMHeadModel(hc).save_pretrained(tmp_path / "small")
    assert load_model(tmp_path / "small")[1] is None


def test_hub_name_resolves_through_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "hub" / "models--someone--tiny-gpt2"
    hc = transformers.GPT2Config(vocab_size=99, n_positions=16, n_layer=1, n_head=2, n_embd=16)
    hf = transformers.GPT2LMHeadModel(hc).eval()
    hf.save_pretrained(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    model, _ = load_model("someone/tiny-gpt2")
    idx = torch.randint(0, 99, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)
    with pytest.raises(CheckpointError) as e:
        load_model("gpt2")
    msg = str(e.value)
    assert "config.json" in msg and "model.safetensors" in msg and "models--gpt2" in msg
    assert "HF_HUB_OFFLINE" in msg


def test_directories_that_are_not_models_say_what_was_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors, config.json or latest"):
        load_model(tmp_path / "empty")
    (tmp_path / "run" / "ckpt" / "step_00000001").mkdir(parents=True)  # interrupted, incomplete
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_model(tmp_path / "run")
