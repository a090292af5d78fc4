"""GPT against transformers' GPT2LMHeadModel (random weights): logits, KV cache, padding, sizes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from gpt2lab.checkpoint.hf import from_hf_state
from gpt2lab.checkpoint.weights import assign_state
from gpt2lab.config import MODEL_PRESETS, GPTConfig
from gpt2lab.model import (
    GPT,
    KVCache,
    attention,
    causal_mask,
    explicit_attention_is_faster,
    padding_mask,
)

transformers = pytest.importorskip("transformers")


def hf_pair(cfg: GPTConfig, seed: int = 0):
    """A random transformers GPT-2 and our GPT holding the same weights (in memory, no files)."""
    torch.manual_seed(seed)
    hc = transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=0,
        eos_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(hc).eval()
    with torch.no_grad():  # HF zero-inits biases and LayerNorms: randomise them so they count
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0, 0.1)
    ours = GPT(cfg).eval()
    assign_state(ours, from_hf_state(hf.state_dict(), cfg), source="hf")
    return hf, ours


CONFIGS = [
    GPTConfig(block_size=37, vocab_size=101, n_layer=1, n_head=2, n_embd=32),  # one layer, odd T
    GPTConfig(block_size=48, vocab_size=65, n_layer=2, n_head=3, n_embd=48, pad_vocab_to=64),
    GPTConfig(block_size=24, vocab_size=50257, n_layer=2, n_head=2, n_embd=16),  # GPT-2's vocab
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["1layer", "pad64", "bigvocab"])
def test_logits_equal_transformers(cfg):
    hf, ours = hf_pair(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, loss = ours(idx)
    assert loss is None and logits.dtype == torch.float32
    assert logits.shape == (2, cfg.block_size, cfg.vocab_size)  # padding rows never visible
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    targets = torch.randint(0, cfg.vocab_size, idx.shape)
    targets[:, -1] = -1  # HF predicts labels[t+1] from position t, so it has no last target
    labels = torch.cat([idx[:, :1], targets[:, :-1]], 1)
    with torch.no_grad():
        _, loss = ours(idx, targets)
        ref = hf(idx, labels=labels).loss
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)


def test_cached_decoding_equals_full_forward(tiny_cfg):
    _, model = hf_pair(tiny_cfg)
    idx = torch.randint(0, tiny_cfg.vocab_size, (3, tiny_cfg.block_size))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(tiny_cfg, 3, tiny_cfg.block_size)
        parts = [model(idx[:, :11], cache=cache)[0]]  # prefill
        parts.append(model(idx[:, 11:16], cache=cache)[0])  # a chunk at pos > 0
        for t in range(16, tiny_cfg.block_size):  # then one token at a time
            parts.append(model(idx[:, t : t + 1], cache=cache)[0])
    assert cache.pos == tiny_cfg.block_size
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
    cache.reset()
    with torch.no_grad():
        again, _ = model(idx[:, :5], cache=cache)
    torch.testing.assert_close(again, full[:, :5], atol=1e-5, rtol=0)


def test_left_padded_cached_decoding_matches_each_row_alone(tiny_cfg):
    hf, model = hf_pair(tiny_cfg, seed=1)
    lengths, T, steps = [9, 4, 1], 9, 6
    seqs = [torch.randint(0, tiny_cfg.vocab_size, (n + steps,)) for n in lengths]
    idx = torch.zeros(3, T + steps, dtype=torch.long)
    mask = torch.zeros(3, T + steps, dtype=torch.bool)
    for i, (n, s) in enumerate(zip(lengths, seqs)):
        idx[i, T - n :], mask[i, T - n :] = s, True
    with torch.no_grad():
        cache = KVCache(tiny_cfg, 3, T + steps)
        out = [model(idx[:, :T], cache=cache, attention_mask=mask[:, :T])[0]]
        for t in range(T, T + steps):
            out.append(model(idx[:, t : t + 1], cache=cache, attention_mask=mask[:, : t + 1])[0])
        got = torch.cat(out, 1)
        assert torch.isfinite(got).all()  # padded rows attend to themselves, never to nothing
        for i, (n, s) in enumerate(zip(lengths, seqs)):
            alone, _ = model(s[None])
            torch.testing.assert_close(got[i, T - n :], alone[0], atol=1e-5, rtol=0)
        # the same batch through transformers with its own padding handling
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        ref = hf(idx, attention_mask=mask.long(), position_ids=pos).logits
        ours, _ = model(idx, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(ours[mask], ref[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-5, rtol=0)


def test_changing_a_future_token_leaves_earlier_logits_alone(tiny_cfg):
    model = GPT(tiny_cfg).eval()
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % tiny_cfg.vocab_size
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_fresh_model_loss_is_near_uniform():
    cfg = GPTConfig(block_size=64, vocab_size=1000, n_layer=2, n_head=2, n_embd=64)
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (4, 64))
    targets = torch.randint(0, cfg.vocab_size, (4, 64))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.05
    targets[:, :32] = -1  # ignored positions do not count
    logits, loss = model(idx, targets)
    ref = torch.nn.functional.cross_entropy(logits[:, 32:].flatten(0, 1), targets[:, 32:].flatten())
    torch.testing.assert_close(loss, ref)


def test_padding_rows_get_no_gradient_and_last_only(tiny_cfg):
    cfg = GPTConfig(**{**tiny_cfg.__dict__, "pad_vocab_to": 64})
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    grad = model.transformer.wte.weight.grad
    assert grad[cfg.vocab_size :].abs().sum() == 0 and grad[: cfg.vocab_size].abs().sum() > 0
    with torch.no_grad():
        full, _ = model(idx)
        last, _ = model(idx, last_only=True)
    assert last.shape == (2, 1, cfg.vocab_size)
    torch.testing.assert_close(last, full[:, -1:])


def test_init_follows_the_paper(tiny_cfg):
    cfg = GPTConfig(block_size=64, vocab_size=500, n_layer=8, n_head=4, n_embd=128)
    torch.manual_seed(0)
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    c_proj = model.transformer.h[3].mlp.c_proj.weight
    assert abs(c_proj.std().item() - 0.02 / math.sqrt(2 * cfg.n_layer)) < 5e-4
    assert abs(model.transformer.h[3].mlp.c_fc.weight.std().item() - 0.02) < 5e-4
    assert model.transformer.h[0].attn.c_attn.bias.abs().sum() == 0


def test_dropout_is_configurable(tiny_cfg):
    cfg = GPTConfig(**{**tiny_cfg.__dict__, "dropout": 0.5})
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_too_long_input_is_a_clear_error(tiny_cfg):
    from gpt2lab.errors import ConfigError

    model = GPT(tiny_cfg)
    with pytest.raises(ConfigError, match="block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = KVCache(tiny_cfg, 1, 8)
    model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ConfigError, match=r"attention_mask has shape \(1, 1\).*\(1, 5\)"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache, attention_mask=torch.ones(1, 1))
    with pytest.raises(ConfigError, match="KV cache holds batch 1 x 8"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_preset_parameter_counts_match_transformers(name):
    cfg = MODEL_PRESETS[name]
    hc = transformers.GPT2Config(
        n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head
    )
    with torch.device("meta"):  # shapes only: no memory, no init time
        ours = GPT(cfg)
        ref = transformers.GPT2LMHeadModel(hc)
    assert ours.num_params() == ref.num_parameters()
    if name == "gpt2":
        assert ours.num_params() == 124_439_808  # the released model's count
        assert cfg.padded_vocab_size == 50304


def test_small_presets_have_the_sizes_their_names_say():
    with torch.device("meta"):
        assert 9.5e6 < GPT(MODEL_PRESETS["gpt2-10m"]).num_params() < 10.5e6
        assert 10e6 < GPT(MODEL_PRESETS["shakespeare-char"]).num_params() < 11e6  # nanoGPT's
        assert 17.8e6 < GPT(MODEL_PRESETS["pile-10k"]).num_params() < 18e6  # PRESET_SOURCES says


def _generate_available() -> bool:
    try:
        from gpt2lab.generate import generate  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _generate_available(), reason="gpt2lab.generate (issue 7) not built yet")
def test_greedy_generate_equals_transformers(tiny_cfg):
    hf, model = hf_pair(tiny_cfg, seed=3)
    idx = torch.randint(1, tiny_cfg.vocab_size, (2, 5))
    with torch.no_grad():
        ours = model.generate(idx, 20, temperature=0)
        ref = hf.generate(
            idx,
            attention_mask=torch.ones_like(idx),
            max_new_tokens=20,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    assert torch.equal(ours, ref)


def test_explicit_attention_equals_sdpa_with_the_same_gradients():
    """The explicit softmax(QK^T)V path (CPU training, attention maps) is SDPA's function."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 17, 16, requires_grad=True) for _ in range(3))
    ours, probs = attention(q, k, v, explicit=True)
    ref, none = attention(q, k, v)
    assert none is None and probs.shape == (2, 2, 17, 17)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    g_ours = torch.autograd.grad(ours.square().sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not explicit_attention_is_faster(q)  # float32: SDPA is the faster one
    low = q.detach().bfloat16().requires_grad_()
    assert explicit_attention_is_faster(low) and not explicit_attention_is_faster(low.detach())


@pytest.mark.parametrize("T, pos", [(5, 0), (3, 4), (1, 6)])
def test_explicit_attention_equals_sdpa_under_masks(T, pos):
    torch.manual_seed(1)
    q = torch.randn(2, 3, T, 8)
    k, v = torch.randn(2, 3, pos + T, 8), torch.randn(2, 3, pos + T, 8)
    keep = torch.ones(2, pos + T, dtype=torch.bool)
    keep[1, :2] = False  # a left-padded row
    for mask in (padding_mask(keep, T, pos), causal_mask(T, pos, q.device) if pos else None):
        ours, probs = attention(q, k, v, mask, explicit=True)
        ref, _ = attention(q, k, v, mask)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=["1layer", "pad64"])
def test_attention_probabilities_equal_transformers(cfg):
    """`attentions=` gives each layer's probabilities, as transformers' output_attentions does
    (eager attention), on odd configs and on a left-padded batch."""
    hf, ours = hf_pair(cfg, seed=4)
    hf.config._attn_implementation = "eager"  # its SDPA path returns no probabilities
    idx = torch.randint(0, cfg.vocab_size, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0  # the second row is left-padded
    for attention_mask in (None, mask):
        kw = {} if attention_mask is None else {"attention_mask": attention_mask}
        position_ids = None if attention_mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            ref = hf(idx, output_attentions=True, position_ids=position_ids, **kw).attentions
            got: list[Tensor] = []
            logits, _ = ours(idx, attention_mask=attention_mask, attentions=got)
        assert len(got) == cfg.n_layer
        for layer, (a, b) in enumerate(zip(got, ref)):
            assert a.shape == (2, cfg.n_head, 11, 11)
            real = slice(None) if attention_mask is None else mask.bool()[:, None, :, None]
            a, b = (a * real, b * real) if attention_mask is not None else (a, b)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"layer {layer}")


def test_logits_to_keep_computes_only_the_last_positions(tiny_cfg):
    model = GPT(tiny_cfg).eval()
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 9))
    with torch.no_grad():
        full, _ = model(idx)
        last3, _ = model(idx, logits_to_keep=3)
        last1, _ = model(idx, last_only=True)
    assert last3.shape == (2, 3, tiny_cfg.vocab_size)
    torch.testing.assert_close(last3, full[:, -3:])
    torch.testing.assert_close(last1, full[:, -1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_last_positions_multiply_the_head_once_for_a_frozen_model(tiny_cfg, dtype):
    """A model whose weights need no gradient (frozen, or moved by the C step) must multiply the
    kept positions by the head in one product. torch's matmul on a strided (B, n, C) input
    broadcasts the head's matrix to B copies instead: 15x slower at B=32 in bfloat16."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    model = GPT(tiny_cfg).eval().to(dtype).requires_grad_(False)
    idx = torch.randint(0, tiny_cfg.vocab_size, (4, 9))
    with torch.no_grad():
        full, _ = model(idx)
        with Ops() as ops:
            last, _ = model(idx, logits_to_keep=2)
    assert not [n for n in ops.names if n.startswith(("bmm", "expand"))], ops.names
    torch.testing.assert_close(last, full[:, -2:])
