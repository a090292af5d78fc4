"""GGUF files read back with llama.cpp's own Python reader (`gguf.GGUFReader`), tensor by tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpt2lab.checkpoint.gguf import save_gguf
from gpt2lab.config import GPTConfig
from gpt2lab.errors import CheckpointError
from gpt2lab.model import GPT
from gpt2lab.tokenizer import EOT, train_bpe
from gpt2lab.tokenizer.char import CharTokenizer

gguf = pytest.importorskip("gguf")

TEXT = "the cat sat on the mat. the dog sat on the log. " * 20

# llama.cpp's gpt2 names (gguf-py constants.py, MODEL_ARCH.GPT2) -> our parameter, (out, in)
BLOCK = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
# largest error of each stored type relative to the tensor's largest value
TOLERANCE = {"f32": 0.0, "f16": 1e-3, "bf16": 8e-3, "q8_0": 1 / 127}


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(TEXT, vocab_size=270, special_tokens=(EOT,))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    # 3 ids past the tokenizer's: padding slots; pad_vocab_to pads the table further (cut on write)
    cfg = GPTConfig(block_size=32, vocab_size=tokenizer.n_vocab + 3, n_layer=2, n_head=2, n_embd=32)
    return GPT(cfg).eval()


def expected_tensors(model) -> dict[str, np.ndarray]:
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    wte = sd["transformer.wte.weight"][: cfg.vocab_size]
    out = {
        "token_embd.weight": wte,
        "output.weight": wte,
        "position_embd.weight": sd["transformer.wpe.weight"],
        "output_norm.weight": sd["transformer.ln_f.weight"],
        "output_norm.bias": sd["transformer.ln_f.bias"],
    }
    for i in range(cfg.n_layer):
        for ours, theirs in BLOCK.items():
            for kind in ("weight", "bias"):
                out[f"blk.{i}.{ours}.{kind}"] = sd[f"transformer.h.{i}.{theirs}.{kind}"]
    return out


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_every_tensor_and_key_reads_back(model, tokenizer, tmp_path, outtype):
    path = tmp_path / "m.gguf"
    save_gguf(model, path, tokenizer=tokenizer, outtype=outtype, name="tiny")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temp file left behind
    reader = gguf.GGUFReader(path)
    cfg = model.config

    assert field(reader, "general.architecture") == "gpt2"
    assert field(reader, "general.name") == "tiny"
    assert field(reader, "gpt2.context_length") == 32
    assert field(reader, "gpt2.embedding_length") == 32
    assert field(reader, "gpt2.block_count") == 2
    assert field(reader, "gpt2.feed_forward_length") == 128
    assert field(reader, "gpt2.attention.head_count") == 2
    assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == cfg.vocab_size
    eot = tokenizer.special_tokens[EOT]
    assert tokens[eot] == EOT and types[eot] == gguf.TokenType.CONTROL
    assert field(reader, "tokenizer.ggml.bos_token_id") == eot
    assert field(reader, "tokenizer.ggml.eos_token_id") == eot
    # GPT-2's file spelling: bytes_to_unicode maps the space to "Ġ"
    assert tokens[tokenizer.encode(" ")[0]] == "Ġ"
    assert tokens[-1] == f"[PAD{cfg.vocab_size - 1}]" and types[-1] == gguf.TokenType.UNUSED
    merges = field(reader, "tokenizer.ggml.merges")
    assert len(merges) == len(tokenizer.merges) and all(m.count(" ") == 1 for m in merges)

    expected = expected_tensors(model)
    assert sorted(t.name for t in reader.tensors) == sorted(expected)
    for t in reader.tensors:
        want = expected[t.name]
        # GGUF lists dimensions innermost first: ne = (in, out) for an (out, in) weight
        assert list(t.shape) == list(reversed(want.shape)), t.name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        vector = want.ndim == 1 or t.name.startswith("position_embd")
        assert (t.tensor_type == gguf.GGMLQuantizationType.F32) == (vector or outtype == "f32")
        tol = 0.0 if vector else TOLERANCE[outtype] * float(np.abs(want).max())
        np.testing.assert_allclose(got, want, atol=tol, rtol=0, err_msg=t.name)


def test_char_tokenizer_is_a_one_line_error(tmp_path):
    tok = CharTokenizer("abc ")
    model = GPT(GPTConfig(block_size=8, vocab_size=tok.n_vocab, n_layer=1, n_head=1, n_embd=32))
    with pytest.raises(CheckpointError, match="byte-level BPE") as err:
        save_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_a_tokenizer_larger_than_the_model_is_an_error(tokenizer, tmp_path):
    model = GPT(GPTConfig(block_size=8, vocab_size=100, n_layer=1, n_head=1, n_embd=32))
    with pytest.raises(CheckpointError, match="fits the model"):
        save_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer)


def test_added_special_tokens_are_control_tokens(tmp_path):
    tok = train_bpe(TEXT, vocab_size=270, special_tokens=(EOT,)).with_special_tokens(
        ["<|im_start|>", "<|im_end|>"]
    )
    model = GPT(GPTConfig(block_size=8, vocab_size=tok.n_vocab, n_layer=1, n_head=1, n_embd=32))
    save_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    for name, i in tok.special_tokens.items():
        assert tokens[i] == name and types[i] == gguf.TokenType.CONTROL
    assert sum(t == gguf.TokenType.CONTROL for t in types) == 3


def test_an_interrupted_write_leaves_the_old_file_and_no_partial_one(
    model, tokenizer, tmp_path, monkeypatch
):
    """Ctrl-C after the header and metadata are on disk: the destination still holds the
    previous complete file, and nothing else is left in the directory."""
    path = tmp_path / "m.gguf"
    save_gguf(model, path, tokenizer=tokenizer, outtype="f16")
    before = path.read_bytes()

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_gguf(model, path, tokenizer=tokenizer, outtype="f32")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
