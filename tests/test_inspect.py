"""gpt2lab.inspect against transformers (same weights): attention probabilities, log-probs; the
logit lens's last layer is the model's own logits; hooks are gone afterwards."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gpt2lab import inspect
from gpt2lab.checkpoint.hf import from_hf_state, save_hf
from gpt2lab.checkpoint.weights import assign_state
from gpt2lab.config import GPTConfig
from gpt2lab.errors import ConfigError, DataError
from gpt2lab.model import GPT
from gpt2lab.tokenizer import get_tokenizer
from gpt2lab.tokenizer.base import piece_label

transformers = pytest.importorskip("transformers")

ODD = GPTConfig(block_size=23, vocab_size=97, n_layer=3, n_head=3, n_embd=24)


@pytest.fixture(scope="module")
def pair():
    """A random transformers GPT-2 (eager attention) and our GPT with the same weights."""
    torch.manual_seed(0)
    hc = transformers.GPT2Config(
        vocab_size=ODD.vocab_size,
        n_positions=ODD.block_size,
        n_embd=ODD.n_embd,
        n_layer=ODD.n_layer,
        n_head=ODD.n_head,
        bos_token_id=0,
        eos_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(hc).eval()
    hf.config._attn_implementation = "eager"  # the path that returns attention probabilities
    with torch.no_grad():  # sharper than the zero/0.02 init, so the patterns differ per head
        for name, p in hf.named_parameters():
            p.normal_(0, 0.3 if name.endswith("bias") or ".ln_" in name else 0.15)
    ours = GPT(ODD).eval()
    assign_state(ours, from_hf_state(hf.state_dict(), ODD), source="hf")
    return hf, ours


IDS = [5, 17, 3, 96, 0, 42, 42, 8, 61, 12, 77, 1, 30]


def test_attention_equals_transformers(pair):
    hf, ours = pair
    att = inspect.attention(ours, IDS)
    assert att.dtype == torch.float32 and att.shape == (3, 3, len(IDS), len(IDS))
    with torch.no_grad():
        ref = hf(torch.tensor([IDS]), output_attentions=True).attentions
    expected = torch.stack([a[0] for a in ref])
    torch.testing.assert_close(att, expected, atol=1e-5, rtol=0)
    assert torch.equal(inspect.attention(ours, torch.tensor(IDS)), att)  # a tensor works too


def test_log_probs_equal_transformers_log_softmax(pair):
    hf, ours = pair
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0].log_softmax(-1)
    torch.testing.assert_close(inspect.log_probs(ours, IDS), ref, atol=1e-5, rtol=0)


def test_next_tokens_and_surprise_agree_with_log_probs(pair):
    _, ours = pair
    logp = inspect.log_probs(ours, IDS)
    nt = inspect.next_tokens(ours, IDS, k=4)
    assert nt.top_ids.shape == (len(IDS), 4)
    assert torch.equal(nt.top_ids[:, 0], logp.argmax(-1))
    assert (nt.top_probs[:, :-1] >= nt.top_probs[:, 1:]).all()
    for i, nxt in enumerate(IDS[1:]):
        assert nt.actual_rank[i] == 1 + int((logp[i] > logp[i, nxt]).sum())
        assert math.isclose(float(nt.actual_prob[i]), math.exp(logp[i, nxt]), rel_tol=1e-5)
    tok = get_tokenizer("char", text="".join(chr(65 + i) for i in range(97)))
    s = inspect.surprise(ours, IDS, tok)
    nats = torch.tensor([-float(logp[i, n]) for i, n in enumerate(IDS[1:])])
    torch.testing.assert_close(s.nats, nats)
    assert math.isclose(s.total_bits, float(nats.sum()) / math.log(2), rel_tol=1e-5)
    assert s.n_bytes == len(tok.decode(IDS[1:]).encode())  # chr(161) is two bytes
    assert math.isclose(s.bits_per_byte, s.total_bits / s.n_bytes)


def test_lens_last_layer_is_the_models_logits(pair):
    _, ours = pair
    ln = inspect.lens(ours, IDS, keep_logits=True)
    assert ln.top_ids.shape == ln.final_rank.shape == (ODD.n_layer + 1, len(IDS))
    with torch.no_grad():
        logits, _ = ours(torch.tensor([IDS]))
    torch.testing.assert_close(ln.logits[-1], logits[0], atol=1e-6, rtol=0)
    assert torch.equal(ln.top_ids[-1], logits[0].argmax(-1))
    assert (ln.final_rank[-1] == 1).all() and (ln.final_rank >= 1).all()


def test_norms_match_the_residual_stream_and_leave_no_hooks(pair):
    _, ours = pair
    nm = inspect.norms(ours, IDS)
    assert nm.residual.shape == (ODD.n_layer + 1, len(IDS))
    assert nm.attn.shape == nm.mlp.shape == (ODD.n_layer, len(IDS))
    with torch.no_grad():  # the first residual is the embeddings
        x0 = ours.transformer.wte.weight[IDS] + ours.transformer.wpe.weight[: len(IDS)]
    torch.testing.assert_close(nm.residual[0], x0.norm(dim=-1))
    for m in ours.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_head_summary_finds_a_previous_token_head():
    T = 6
    att = torch.zeros(1, 2, T, T)
    att[0, 0, 0, 0] = 1
    att[0, 0, torch.arange(1, T), torch.arange(T - 1)] = 1  # head 0: looks one token back
    att[0, 1, :, 0] = 1  # head 1: always the first token
    s = inspect.summarize_heads(att)
    assert s.previous_token[0].tolist() == [1.0, pytest.approx(1 / (T - 1))]
    assert s.first_token[0].tolist() == [pytest.approx(1 / (T - 1)), 1.0]
    assert s.entropy.abs().max() < 1e-6  # one key each: no uncertainty
    assert s.mean.shape == (1, T, T)


def test_bad_inputs_are_one_line_errors(pair):
    _, ours = pair
    with pytest.raises(DataError, match="empty"):
        inspect.attention(ours, [])
    with pytest.raises(DataError, match="block_size=23"):
        inspect.attention(ours, list(range(24)))
    with pytest.raises(ConfigError, match="`layer=3` is out of range"):
        inspect.check_head(ours, 3, 0)
    with pytest.raises(ConfigError, match="`head=-1` is out of range"):
        inspect.check_head(ours, 0, -1)
    with pytest.raises(ConfigError, match="needs a layer"):
        inspect.check_head(ours, None, 1)
    with pytest.raises(DataError) as raised:
        inspect.attention(ours, list(range(99)))
    assert "\n" not in str(raised.value)


def test_labels_show_spaces_and_byte_pieces():
    tok = get_tokenizer("gpt2")
    ids = tok.encode_ordinary(" the\n日")
    assert [piece_label(tok, i) for i in ids][:2] == ["\u2423the", "\u21b5"]
    assert inspect.labels(tok, ids)[2:] == ["<e6 97>", "<a5>"]


def test_bertviz_head_view_shows_our_attention(tmp_path):
    """docs/inspect.md's recipe: a gpt2lab model, saved as `gpt2lab convert` does, in bertviz's
    head view exported as HTML; the numbers it embeds are `inspect.attention`'s."""
    bertviz = pytest.importorskip("bertviz")
    torch.manual_seed(3)
    tok = get_tokenizer("gpt2")
    model = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=16)).eval()
    save_hf(model, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    ids = tok.encode_ordinary("The cat sat on the mat.")
    with torch.no_grad():
        attentions = hf(torch.tensor([ids]), output_attentions=True).attentions
    page = bertviz.head_view(attentions, inspect.labels(tok, ids), html_action="return").data
    (tmp_path / "head_view.html").write_text(page, encoding="utf-8")
    params = page.split("const params = ")[1].split("; // HACK")[0]
    shown = torch.tensor(json.loads(params)["attention"][0]["attn"])
    torch.testing.assert_close(shown, inspect.attention(model, ids), atol=1e-5, rtol=0)
