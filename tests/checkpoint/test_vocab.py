"""Growing the vocabulary: new rows at the mean, and the round trip through transformers."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2lab import cli
from gpt2lab.checkpoint.hf import save_hf
from gpt2lab.checkpoint.load import load_model
from gpt2lab.checkpoint.vocab import add_special_tokens, grow_vocab, tokenizer_extends
from gpt2lab.config import GPTConfig, resolve
from gpt2lab.errors import ConfigError
from gpt2lab.model import GPT
from gpt2lab.tokenizer import get_tokenizer
from gpt2lab.tokenizer.chat import CHAT, CHAT_TOKENS
from gpt2lab.train import build

transformers = pytest.importorskip("transformers")


def tiny(vocab: int, pad: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(
        block_size=48, vocab_size=vocab, n_layer=2, n_head=2, n_embd=16, pad_vocab_to=pad
    )
    return GPT(cfg).eval()


@pytest.mark.parametrize(("old", "new", "pad"), [(100, 103, 64), (100, 130, 64), (97, 98, 1)])
def test_new_rows_are_the_mean_and_old_rows_are_unchanged(old, new, pad):
    model = tiny(old, pad)
    before = model.transformer.wte.weight.detach().clone()
    x = torch.randint(0, old, (2, 20))
    logits_before = model(x)[0]
    assert grow_vocab(model, new) is model
    w = model.transformer.wte.weight
    assert model.config.vocab_size == new and w.shape[0] == model.config.padded_vocab_size
    assert w.shape[0] % pad == 0 and w.shape[0] >= new
    assert torch.equal(w[:old], before[:old])
    mean = before[:old].double().mean(0).float()  # independent of the code path: float64 mean
    assert torch.equal(w[old:new], mean.expand(new - old, -1))
    assert not w[new:].any()  # padding rows stay zero
    assert model.lm_head.weight is w  # still tied
    logits = model(x)[0]
    assert logits.shape[-1] == new
    assert torch.allclose(logits[..., :old], logits_before, atol=1e-6)
    assert torch.allclose(logits[..., old], logits[..., new - 1])  # the new rows are equal
    padded = model.lm_head(torch.randn(1, 16))  # the head still masks the padding columns
    assert torch.isinf(padded[..., new:]).all() and torch.isfinite(padded[..., :new]).all()
    with pytest.raises(ConfigError, match="cannot shrink"):
        grow_vocab(model, old - 1)


def test_grown_model_trains_its_new_rows():
    model = tiny(100).train()
    grow_vocab(model, 103)
    x = torch.tensor([[1, 101, 102, 5]])
    _, loss = model(x, targets=torch.tensor([[101, 102, 5, 100]]))
    loss.backward()
    assert model.transformer.wte.weight.grad[100:103].abs().sum() > 0


def test_tokenizer_extends():
    gpt2 = get_tokenizer("gpt2")
    chat = gpt2.with_special_tokens(CHAT_TOKENS)
    assert tokenizer_extends(gpt2, chat) and not tokenizer_extends(chat, gpt2)
    assert not tokenizer_extends(gpt2, get_tokenizer("char", text="abc"))


@pytest.fixture(scope="module")
def chat_model():
    """A tiny GPT-2-vocabulary model with the chat tokens added and the chat template."""
    model = tiny(50257, seed=1)
    tok = add_special_tokens(model, get_tokenizer("gpt2"), CHAT_TOKENS)
    tok.chat_template = CHAT
    return model, tok


CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where is Verona? ünï"},
    {"role": "assistant", "content": "In Italy."},
    {"role": "user", "content": "  And Padua?\n"},
]


def test_round_trip_through_transformers(chat_model, tmp_path):
    model, tok = chat_model
    assert model.config.vocab_size == tok.n_vocab == 50261
    assert [tok.special_tokens[s] for s in CHAT_TOKENS] == [50257, 50258, 50259, 50260]
    save_hf(model, tmp_path / "hf", tokenizer=tok)
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT.to_jinja()
    assert {config["added_tokens_decoder"][str(i)]["content"] for i in range(50257, 50261)} == set(
        CHAT_TOKENS
    )
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = CHAT.encode(tok, CONV)
    got = hf_tok.apply_chat_template(CONV, add_generation_prompt=True)
    assert list(got["input_ids"] if hasattr(got, "keys") else got) == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(x)[0], hf_model(x).logits
    assert theirs.shape[-1] == 50261
    assert torch.allclose(ours, theirs, atol=1e-4)
    # and back: the tokenizer, its specials, the template and the grown rows come home
    back, back_tok = load_model(tmp_path / "hf")
    assert back.config.vocab_size == 50261
    assert back_tok.special_tokens == tok.special_tokens and back_tok.chat_template == CHAT
    assert torch.equal(back.transformer.wte.weight[:50261], model.transformer.wte.weight[:50261])
    # a transformers save of that directory (its own tokenizer files, no gpt2lab_tokenizer/)
    hf_model.save_pretrained(tmp_path / "resaved")
    hf_tok.save_pretrained(tmp_path / "resaved")
    again, again_tok = load_model(tmp_path / "resaved")
    assert again_tok.special_tokens == tok.special_tokens
    assert again_tok.chat_template is not None  # transformers' copy of our Jinja, sandboxed
    assert again_tok.chat_template.encode(again_tok, CONV) == ids
    with torch.no_grad():
        assert torch.allclose(again(x)[0], ours, atol=1e-4)


def test_convert_cli_round_trip_keeps_template_and_rows(chat_model, tmp_path, capsys):
    model, tok = chat_model
    save_hf(model, tmp_path / "hf", tokenizer=tok)
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    assert cli.main(["convert", str(tmp_path / "run"), str(tmp_path / "hf2")]) == 0
    capsys.readouterr()
    for where in ("run", "hf2"):
        m, t = load_model(tmp_path / where)
        assert t.chat_template == CHAT and t.n_vocab == 50261
        assert torch.equal(m.transformer.wte.weight[:50261], model.transformer.wte.weight[:50261])


def test_train_init_from_grows_for_the_data_tokens(tmp_path, tiny_shakespeare, capsys):
    """`prepare --add-special` then `train --init-from`: the model grows instead of failing."""
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=50257
    )
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(tmp_path / "base")
    text = tmp_path / "t.txt"
    text.write_text(tiny_shakespeare.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    specials = "<|startoftext|>,<|pad|>,<|unk|>"
    argv = ["prepare", "--input", str(text), "--tokenizer", "gpt2", "--add-special", specials]
    argv += ["--val-tail", "0.2"]
    assert cli.main([*argv, "--out", str(tmp_path / "data")]) == 0, capsys.readouterr().err
    data = tmp_path / "data"
    meta, data_tok = build.check_data(str(data))
    assert meta["vocab_size"] == data_tok.n_vocab == 50260
    cfg = resolve(None, None, [f"data.dir={data}", f"train.init_from={tmp_path / 'base'}"])
    cfg, state = build.pretrained(cfg, data_tok, meta)
    assert cfg.model.vocab_size == 50260
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base").transformer.wte.weight
    wte = state["transformer.wte.weight"]
    assert torch.equal(wte[:50257], base.detach())
    mean = base.detach().double().mean(0).float()
    assert torch.equal(wte[50257:50260], mean.expand(3, -1))
    run = tmp_path / "run"
    train_argv = ["train", "--init-from", str(tmp_path / "base"), "--data", str(data)]
    train_argv += ["--out", str(run), "--train.max_steps=2", "--train.device=cpu", "--no-plot"]
    train_argv += ["--train.micro_batch_size=2", "--model.block_size=32", "--train.eval_steps=1"]
    assert cli.main(train_argv) == 0, capsys.readouterr().err
    model, tok = load_model(run)
    assert model.config.vocab_size == 50260 and tok.special_tokens["<|unk|>"] == 50259
    assert tok.encode("<|pad|>", allowed_special="all") == [50258]
