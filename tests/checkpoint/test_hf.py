"""Hugging Face GPT-2 directories in and out, checked against transformers (random weights)."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2lab.checkpoint.hf import load_hf
from gpt2lab.errors import CheckpointError
from gpt2lab.model import GPT

transformers = pytest.importorskip("transformers")

SHAPES = [  # (vocab, block, layers, heads, embd): odd vocabularies and block sizes, one layer
    (97, 33, 1, 2, 16),
    (50257, 20, 2, 2, 16),
    (1000, 100, 3, 3, 24),
]


def random_hf(vocab, block, layers, heads, embd, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_positions=block, n_layer=layers, n_head=heads, n_embd=embd
    )
    cfg.bos_token_id = cfg.eos_token_id = vocab - 1
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases and LayerNorms: randomise them so they count
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_hf_directory_round_trip_keeps_logits(tmp_path, shape):
    hf = random_hf(*shape)
    hf.save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(tmp_path / "hf")
    assert ours.config.vocab_size == shape[0] and ours.config.block_size == shape[1]
    idx = torch.randint(0, shape[0], (2, shape[1]))
    with torch.no_grad():
        expected = hf(idx).logits
        torch.testing.assert_close(ours(idx)[0], expected, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "out")
    back, info = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(idx).logits, expected, atol=1e-5, rtol=0)


def test_biasless_model_exports_with_zero_biases(tmp_path, tiny_cfg):
    from gpt2lab.config import GPTConfig

    cfg = GPTConfig(**{**tiny_cfg.__dict__, "bias": False, "pad_vocab_to": 64})
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    ours.save_pretrained(tmp_path / "out")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, ours(idx)[0], atol=1e-5, rtol=0)


def test_pytorch_model_bin_and_sharded_safetensors_load(tmp_path):
    hf = random_hf(97, 33, 2, 2, 16)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(
        (tmp_path / "sharded" / "config.json").read_text()
    )
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state = {k.removeprefix("transformer."): v for k, v in state.items()}  # GPT2Model-style keys
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    idx = torch.randint(0, 97, (1, 33))
    with torch.no_grad():
        expected = hf(idx).logits
        for d in ("sharded", "bin"):
            torch.testing.assert_close(load_hf(tmp_path / d)(idx)[0], expected, atol=1e-5, rtol=0)


def test_pickle_that_runs_code_is_refused(tmp_path):
    hf = random_hf(97, 33, 1, 2, 16)
    hf.config.save_pretrained(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin") as caught:
        load_hf(tmp_path)
    assert not marker.exists()
    message = str(caught.value)  # one line in our words, not torch's advice to unpickle anyway
    assert "\n" not in message and "could run code" in message
    assert "weights_only" not in message and "\x1b" not in message


@pytest.mark.parametrize(
    "field, value",
    [
        ("activation_function", "relu"),
        ("n_inner", 100),
        ("layer_norm_epsilon", 1e-6),
        ("scale_attn_by_inverse_layer_idx", True),
        ("model_type", "gpt_neo"),
    ],
)
def test_configs_we_cannot_reproduce_are_refused_by_name(tmp_path, field, value):
    hf = random_hf(97, 33, 1, 2, 16)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=field):
        load_hf(tmp_path)


def test_wrong_shapes_in_hf_weights_name_the_config_field(tmp_path):
    hf = random_hf(97, 33, 2, 2, 16)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_layer"], cfg["n_positions"] = 3, 40
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_hf(tmp_path)
    msg = str(e.value)
    assert "missing keys transformer.h.2." in msg
    assert (
        "model.n_layer: file 2, config 3" in msg and "model.block_size: file 33, config 40" in msg
    )


def test_exported_tokenizer_loads_in_transformers(tmp_path, tiny_cfg):
    from gpt2lab.config import GPTConfig
    from gpt2lab.tokenizer import get_tokenizer

    tok = get_tokenizer("gpt2")
    cfg = GPTConfig(**{**tiny_cfg.__dict__, "vocab_size": tok.n_vocab})
    GPT(cfg).save_pretrained(tmp_path / "out")  # 50257 tokens and no tokenizer: GPT-2's
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "Hello world, it's 2019!<|endoftext|> Ünïcode  spaces\n"
    assert hf_tok(text)["input_ids"] == tok.encode(text, allowed_special="all")
    assert hf_tok.eos_token_id == tok.eot_token == 50256
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == 50256


def test_char_tokenizer_travels_without_hf_files(tmp_path, tiny_cfg):
    from gpt2lab.checkpoint.load import load_model
    from gpt2lab.config import GPTConfig
    from gpt2lab.tokenizer import get_tokenizer

    tok = get_tokenizer("char", text="hello world, to be or not to be")
    cfg = GPTConfig(**{**tiny_cfg.__dict__, "vocab_size": tok.n_vocab, "pad_vocab_to": 1})
    GPT(cfg).save_pretrained(tmp_path / "out", tokenizer=tok)
    assert not (tmp_path / "out" / "vocab.json").exists()
    _, loaded = load_model(tmp_path / "out")
    assert loaded.encode("to be") == tok.encode("to be")
