"""The CPU decoding kernels equal the plain model, follow weight updates, leave the model be."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt2lab.config import GPTConfig
from gpt2lab.generate import generate, iter_tokens
from gpt2lab.kernels import cpu_decode
from gpt2lab.kernels.cpu_decode import (
    DecodeKernels,
    PackedLinear,
    TransposedHead,
    decode_kernels,
    decode_step,
    onednn_can_multiply,
)
from gpt2lab.model import GPT, KVCache, LMHead

needs_onednn = pytest.mark.skipif(
    not onednn_can_multiply(torch.float32), reason="this torch build has no oneDNN"
)


def tiny_gpt(seed: int = 0, vocab: int = 97, pad: int = 1) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(
        block_size=32, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, pad_vocab_to=pad
    )
    model = GPT(cfg).eval()
    with torch.no_grad():  # spread-out logits, so greedy choices are not decided by rounding
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return model


def module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_packed_float32_linear_equals_f_linear(rows):
    lin = nn.Linear(48, 80)
    x = torch.randn(rows, 1, 48)
    with torch.no_grad():
        torch.testing.assert_close(PackedLinear(lin, rows)(x), F.linear(x, lin.weight, lin.bias))


@pytest.mark.skipif(not onednn_can_multiply(torch.bfloat16), reason="no oneDNN bfloat16 here")
def test_packed_bfloat16_linear_is_bit_equal_to_f_linear():
    lin = nn.Linear(48, 80).to(torch.bfloat16)
    x = torch.randn(3, 1, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(PackedLinear(lin, 3)(x), F.linear(x, lin.weight, lin.bias))


@needs_onednn
def test_packed_weights_follow_in_place_updates():
    lin = nn.Linear(16, 24)
    packed = PackedLinear(lin, 2)
    x = torch.randn(2, 1, 16)
    for scale in (1.0, -2.0, 0.5):
        with torch.no_grad():
            lin.weight.mul_(scale)  # as an optimizer step does: the packed copy must be remade
            torch.testing.assert_close(packed(x), F.linear(x, lin.weight, lin.bias))


def test_packed_linear_with_gradients_is_the_plain_layer():
    lin = nn.Linear(16, 24)
    x = torch.randn(2, 1, 16, requires_grad=True)
    PackedLinear(lin, 2)(x).sum().backward()
    assert lin.weight.grad is not None and x.grad is not None


def test_the_head_computes_only_the_real_vocabulary():
    model = tiny_gpt(vocab=97, pad=64)  # 128 rows in the table, 97 real
    x = torch.randn(2, 1, 32)
    expected = F.linear(x, model.lm_head.weight[:97])
    with torch.no_grad():
        for head in (PackedLinear(model.lm_head, 2, 97), TransposedHead(model.lm_head, 97)):
            if isinstance(head, PackedLinear) and not onednn_can_multiply(torch.float32):
                continue
            torch.testing.assert_close(head(x), expected)


@pytest.fixture(params=["c-step", "pytorch-step"])
def step_kind(request, monkeypatch) -> str:
    """Each test twice: with the C step where it builds, and with the PyTorch step alone."""
    if request.param == "pytorch-step":
        monkeypatch.setattr(cpu_decode, "native_step", lambda *a: None)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch", [1, 4])
def test_generation_with_kernels_equals_the_plain_model(dtype, batch, step_kind):
    model = tiny_gpt(pad=64).to(dtype)
    idx = torch.randint(0, 97, (batch, 5), generator=torch.Generator().manual_seed(1))
    fast = generate(model, idx, 20, temperature=0)
    plain = generate(model, idx, 20, temperature=0, kernels=False)
    assert fast.tolist() == plain.tolist()


@needs_onednn
def test_the_prompt_runs_unpacked_and_only_the_windows_slides_pack(monkeypatch):
    """Packing the weights for one forward costs more than it saves: a generation packs them
    only for a second forward of its own (the window sliding past the context)."""
    packs = []
    original = PackedLinear._packed_linear

    def counting(self, x, dtype):
        packs.append(self.packed is None or self.packed_for != (self.weight._version, dtype))
        return original(self, x, dtype)

    monkeypatch.setattr(PackedLinear, "_packed_linear", counting)
    model = tiny_gpt()
    idx = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    generate(model, idx, 20, temperature=0)
    assert packs == []
    with pytest.warns(UserWarning, match="sliding window"):
        slid = generate(model, idx, 40, temperature=0)  # 5 + 40 > 32: the window slides
    assert any(packs)
    with pytest.warns(UserWarning, match="sliding window"):
        assert slid.tolist() == generate(model, idx, 40, temperature=0, kernels=False).tolist()


@pytest.mark.parametrize("rows", [1, 3, 8, 40])  # under WIDEN_FROM_ROWS: float16's own product
def test_widened_float16_linear_rounds_as_pytorchs_float16_product(rows):
    """Against the float64 product of the same float16 values: no further off than PyTorch's
    float16 product (float32 sums, rounded once), and never by more than one float16 step."""
    lin = nn.Linear(200, 96).half()
    x = torch.randn(rows, 1, 200, generator=torch.Generator().manual_seed(rows)).half()
    with torch.no_grad():
        ours = cpu_decode.WidenedLinear(lin)(x)
        theirs = F.linear(x, lin.weight, lin.bias)
    exact = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert ours.dtype == torch.float16 and ours.shape == (rows, 1, 96)
    ulp = torch.finfo(torch.float16).eps * exact.abs().clamp_min(2**-14)
    assert ((ours.double() - exact).abs() <= ulp).all()
    assert (ours.double() - exact).abs().max() <= (theirs.double() - exact).abs().max() + 1e-12


def test_a_float16_prompt_multiplies_in_float32_from_the_first_forward(monkeypatch):
    """Widening costs no packing, so a float16 model's prompt takes it at once (PyTorch's
    float16 products are ~4x slower than float32 ones on CPUs without AVX512-FP16)."""
    widened = []
    original = cpu_decode.WidenedLinear.forward
    monkeypatch.setattr(
        cpu_decode.WidenedLinear,
        "forward",
        lambda self, x: widened.append(x.shape[:-1]) or original(self, x),
    )
    model = tiny_gpt().half()
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    fast = generate(model, idx, 6, temperature=0)
    assert widened and all(rows == (2, 9) for rows in widened[:8])  # the blocks' 4 x 2 layers
    assert fast.tolist() == generate(model, idx, 6, temperature=0, kernels=False).tolist()
    with torch.enable_grad():  # and with gradients on, the plain layer
        lin = nn.Linear(8, 4).half()
        x = torch.randn(16, 8).half()
        assert torch.equal(cpu_decode.WidenedLinear(lin)(x), F.linear(x, lin.weight, lin.bias))


def test_cached_logits_with_kernels_equal_the_plain_model():
    model = tiny_gpt()
    idx = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(2))
    kernels = decode_kernels(model, 3)
    assert kernels is not None
    out = {}
    for name, ctx in (("plain", None), ("fast", kernels)):
        cache = KVCache(model.config, 3, 8)
        with torch.no_grad():
            model(idx, cache=cache)
            if ctx is None:
                out[name] = model(idx[:, :1], cache=cache)[0]
            else:
                with ctx.applied():
                    out[name] = model(idx[:, :1], cache=cache)[0]
    torch.testing.assert_close(out["fast"], out["plain"], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not onednn_can_multiply(torch.bfloat16), reason="no oneDNN bfloat16 here")
def test_sampling_under_cpu_autocast_equals_the_plain_model():
    """A float32 model sampled under bfloat16 autocast (training-time samples): oneDNN refuses
    mixed operands, so the packed layers compute in autocast's dtype, as F.linear does."""
    model = tiny_gpt()
    idx = torch.tensor([[5, 17, 3]])
    lin = model.transformer.h[0].attn.c_proj
    x = torch.randn(1, 1, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = PackedLinear(lin, 1)(x), lin(x)
        assert y.dtype == ref.dtype == torch.bfloat16
        torch.testing.assert_close(y, ref)
        fast = generate(model, idx, 12, temperature=0)
        plain = generate(model, idx, 12, temperature=0, kernels=False)
    assert fast.tolist() == plain.tolist()


def test_the_model_is_its_own_between_and_after_steps():
    model = tiny_gpt()
    before = module_types(model)
    keys = list(model.state_dict())
    steps = iter_tokens(model, torch.tensor([[1, 2, 3]]), 5, temperature=0)
    next(steps)  # suspended mid-generation: the swap lasts one forward call only
    assert module_types(model) == before and isinstance(model.lm_head, LMHead)
    list(steps)
    assert module_types(model) == before and list(model.state_dict()) == keys
    twin = copy.deepcopy(model)  # nothing unpicklable was left behind
    assert pickle.loads(pickle.dumps(twin)).config == model.config


def test_stand_ins_share_the_models_parameters():
    model = tiny_gpt()
    kernels = DecodeKernels(model, 2, torch.float32)
    params = {id(p) for p in model.parameters()}
    with kernels.applied():
        assert {id(p) for p in model.parameters()} == params
        assert list(model.state_dict()) == list(tiny_gpt().state_dict())


@needs_onednn
def test_a_onednn_refusal_falls_back_to_the_plain_product(monkeypatch):
    """On a CPU or build whose oneDNN has no kernel after all, decoding still works."""
    model = tiny_gpt()
    idx = torch.tensor([[5, 17, 3]])
    ref = generate(model, idx, 8, temperature=0, kernels=False)

    def refuse(*args):
        raise RuntimeError("could not create a primitive descriptor")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    assert generate(model, idx, 8, temperature=0).tolist() == ref.tolist()


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("padded", [False, True])
def test_decode_step_equals_the_models_cached_forward(dtype, padded, step_kind):
    model = tiny_gpt(pad=64).to(dtype)
    if dtype == torch.bfloat16 and not onednn_can_multiply(dtype):
        pytest.skip("no oneDNN bfloat16 here")
    idx = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 7, dtype=torch.bool)
    if padded:
        mask[0, :2] = mask[2, :4] = False  # left padding
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    step = decode_step(model, 3)
    assert step is not None
    assert step_kind == "c-step" or step.native is None
    out, caches = {}, {}
    for name in ("plain", "step"):
        cache = caches[name] = KVCache(model.config, 3, 8, dtype=dtype)
        kw = dict(attention_mask=mask[:, :6], position_ids=pos[:, :6]) if padded else {}
        nxt = torch.tensor([[4], [50], [96]])
        kw1 = dict(attention_mask=mask, position_ids=pos[:, 6:]) if padded else {}
        with torch.no_grad():
            model(idx, cache=cache, **kw)
            if name == "plain":
                out[name] = model(nxt, cache=cache, **kw1)[0][:, -1]
            else:
                out[name] = step.step(
                    nxt, cache, kw1.get("position_ids"), kw1.get("attention_mask")
                )
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    torch.testing.assert_close(out["step"], out["plain"], **tol)
    assert caches["step"].pos == caches["plain"].pos == 7
    torch.testing.assert_close(caches["step"].k, caches["plain"].k, **tol)
    torch.testing.assert_close(caches["step"].v, caches["plain"].v, **tol)


@needs_onednn
def test_decode_step_is_kept_until_the_weights_change():
    model = tiny_gpt()
    step = decode_step(model, 2)
    assert decode_step(model, 2) is step and decode_step(model, 1) is not step
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(0.5)
    assert decode_step(model, 2) is not step
    idx = torch.tensor([[5, 17, 3], [1, 2, 3]])
    ref = generate(model, idx, 8, temperature=0, kernels=False)
    assert generate(model, idx, 8, temperature=0).tolist() == ref.tolist()
    assert decode_step(model.train(), 2) is None


def test_no_kernels_for_other_models():
    assert decode_kernels(nn.Linear(2, 2), 1) is None


@needs_onednn
@pytest.mark.parametrize("keep", [None, 3])
def test_flat_scoring_equals_the_models_forward(keep):
    model = tiny_gpt(pad=64)
    idx = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(idx, logits_to_keep=keep)[0]
        got = decode_step(model, 22).score(idx, keep)
    assert got.shape == want.shape == (2, keep or 11, 97)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@needs_onednn
def test_flat_scoring_after_a_cache_equals_the_models_cached_forward():
    model = tiny_gpt(pad=64)
    idx = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(5))
    step = decode_step(model, 1)
    caches = [KVCache(model.config, 3, 12), KVCache(model.config, 3, 12)]
    with torch.no_grad():
        want = [model(idx[:, :5], cache=caches[0])[0], model(idx[:, 5:], cache=caches[0])[0]]
        got = [step.score(idx[:, :5], None, caches[1]), step.score(idx[:, 5:], 2, caches[1])]
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1][:, -2:], atol=1e-4, rtol=1e-4)
    assert caches[1].pos == 9
    torch.testing.assert_close(caches[1].k, caches[0].k, atol=1e-5, rtol=1e-5)


def test_causal_attention_in_blocks_equals_sdpa():
    from gpt2lab.kernels.cpu_decode import causal_attention_in_blocks

    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 3, 37, 16, generator=g) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(causal_attention_in_blocks(q, k, v), want, atol=1e-5, rtol=1e-5)
    b = [t.bfloat16() for t in (q, k, v)]
    got = causal_attention_in_blocks(*b).float()
    assert (got - want).abs().max() < 0.05
