"""attention.c's causal attention and its gradient against float64 attention (PyTorch's SDPA, an
implementation independent of ours) and against the readable model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2lab.config import GPTConfig
from gpt2lab.kernels import attention as fast
from gpt2lab.kernels import has_cpu_training_kernels, native, use_cpu_training_kernels
from gpt2lab.kernels.attention import (
    FastCausalSelfAttention,
    fused_causal_attention,
    use_fast_attention,
)
from gpt2lab.model import GPT, CausalSelfAttention, KVCache

pytestmark = pytest.mark.skipif(
    native.load_library() is None, reason="no C compiler here (or GPT2LAB_NATIVE=0)"
)


def exact(qkv: torch.Tensor, n_head: int, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of (B, T, 3C) and its gradient for `dy`, in float64 through SDPA."""
    x = qkv.double().requires_grad_()
    B, T, C3 = x.shape
    C = C3 // 3
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in x.split(C, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
    y.backward(dy.double())
    return y.detach(), x.grad


# (B, T, n_head, head size): ragged T and head sizes (not multiples of 8 or 16), one position,
# the shapes nanoGPT's CPU recipe and GPT-2 use, and GPT-2's context
SHAPES = [
    (2, 7, 3, 5),
    (3, 64, 4, 32),
    (1, 1, 2, 16),
    (2, 37, 2, 20),
    (1, 256, 2, 64),
    (1, 1024, 1, 64),
    (2, 9, 1, 48),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_float64_attention(shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    B, T, nh, hs = shape
    g = torch.Generator().manual_seed(T * 100 + hs)
    qkv = (torch.randn(B, T, 3 * nh * hs, generator=g) * 2).to(dtype)
    dy = torch.randn(B, T, nh * hs, generator=g).to(dtype)
    y_ref, dx_ref = exact(qkv, nh, dy)
    x = qkv.clone().requires_grad_()
    y = fused_causal_attention(x, nh)
    y.backward(dy)
    assert y.dtype == dtype and x.grad.dtype == dtype
    # float32 sums either way; bfloat16 differs by its rounding of y and of the gradient
    tol = dict(rtol=1e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.double(), y_ref.to(dtype).double(), **tol)
    torch.testing.assert_close(x.grad.double(), dx_ref.to(dtype).double(), **tol)


def test_large_scores_stay_finite_and_as_exact_as_float32_allows() -> None:
    """Scores in the thousands: the softmax subtracts each row's maximum before e^x, and the
    error is that of float32 scores, as for PyTorch's own float32 attention."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 40, 3 * 64, generator=g) * 30
    dy = torch.randn(2, 40, 64, generator=g)
    y_ref, dx_ref = exact(qkv, 2, dy)
    x = qkv.clone().requires_grad_()
    y = fused_causal_attention(x, 2)
    y.backward(dy)
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    q, k, v = (t.view(2, 40, 2, 32).transpose(1, 2) for t in qkv.split(64, dim=2))
    torch_f32 = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    torch_err = (torch_f32.reshape(2, 40, 64).double() - y_ref).abs().max()
    assert (y.double() - y_ref).abs().max() <= 2 * torch_err + 1e-5
    assert (x.grad.double() - dx_ref).abs().max() / dx_ref.abs().max() < 1e-3


def test_nan_and_infinity_spread_as_in_pytorch() -> None:
    """A NaN in a query, key or value, or an infinite score, makes the outputs that depend on it
    NaN, as PyTorch's attention does (the training loop's NaN guard relies on them reaching the
    loss)."""
    g = torch.Generator().manual_seed(6)
    for col, value in ((3, float("nan")), (64 + 5, float("nan")), (128 + 2, float("nan")),
                       (64 + 1, float("inf"))):  # fmt: skip
        qkv = torch.randn(1, 24, 3 * 64, generator=g)
        qkv[0, 10, col] = value
        y_ref, _ = exact(qkv, 2, torch.ones(1, 24, 64))
        x = qkv.clone().requires_grad_()
        y = fused_causal_attention(x, 2)
        y.backward(torch.ones_like(y))
        # from the poisoned position on, the same NaNs; before it PyTorch's full P @ V also
        # spreads a value's NaN through the zero probabilities (0 x NaN), which the causal tiles
        # mostly skip: never a NaN where PyTorch has none
        ours, ref = torch.isnan(y), torch.isnan(y_ref)
        assert ours[:, 10:].any() and torch.equal(ours[:, 10:], ref[:, 10:]), (col, value)
        assert not (ours & ~ref).any()
        assert torch.isnan(x.grad).any()


def test_threads_strides_and_other_dtypes() -> None:
    """One thread gives the same bits as several; a strided input is read as its values; float16
    (autocast's other dtype) runs in float32 and comes back float16."""
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(3, 20, 96, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused_causal_attention(qkv, 4)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(fused_causal_attention(qkv, 4), one)
    strided = qkv.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    assert torch.equal(fused_causal_attention(strided, 4), one)
    half = fused_causal_attention(qkv.half(), 4)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), one, rtol=2e-3, atol=2e-3)


def tiny(bias: bool = True, dropout: float = 0.0, block_size: int = 32) -> GPTConfig:
    return GPTConfig(
        n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=61, bias=bias,
        dropout=dropout,
    )  # fmt: skip


def twins(cfg: GPTConfig) -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    plain = GPT(cfg)
    fast_model = GPT(cfg)
    fast_model.load_state_dict(plain.state_dict())
    assert use_fast_attention(fast_model) == cfg.n_layer
    return plain, fast_model


def test_swapped_model_trains_as_the_readable_one() -> None:
    """Loss, logits and every gradient of a GPT with FastCausalSelfAttention equal the plain
    model's (float32); the same parameters, no state_dict key changes; bfloat16 autocast runs."""
    plain, fast_model = twins(tiny())
    assert all(isinstance(b.attn, FastCausalSelfAttention) for b in fast_model.transformer.h)
    assert fast_model.state_dict().keys() == plain.state_dict().keys()
    assert use_fast_attention(fast_model) == 0  # already swapped
    ids = torch.randint(0, 61, (3, 32), generator=torch.Generator().manual_seed(1))
    out = []
    for m in (plain, fast_model):
        logits, loss = m(ids, targets=ids)
        loss.backward()
        out.append((logits, loss))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fast_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.autocast("cpu", torch.bfloat16):
        _, loss = fast_model(ids, targets=ids)
    loss.backward()
    assert torch.isfinite(loss)


def test_other_cases_go_through_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A KV cache, returned probabilities, dropout while training and contexts past MAX_T take
    the readable path (the fused one would raise here), and give the plain model's results."""
    plain, fast_model = twins(tiny(dropout=0.1, block_size=fast.MAX_T + 8))

    def refuse(*args: object) -> None:
        raise AssertionError("the fused path was taken")

    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(fast, "fused_causal_attention", refuse)
    fast_model.train()
    torch.manual_seed(7)
    train_fast, _ = fast_model(ids, targets=ids)
    plain.train()
    torch.manual_seed(7)
    train_plain, _ = plain(ids, targets=ids)
    torch.testing.assert_close(train_fast, train_plain)  # the same dropout masks
    for m in (plain, fast_model):
        m.eval()
    long_ids = torch.randint(0, 61, (1, fast.MAX_T + 8), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(fast_model(long_ids)[0], plain(long_ids)[0])
    cache = KVCache(fast_model.config, 2, 12)
    torch.testing.assert_close(fast_model(ids, cache=cache)[0], plain(ids)[0])
    probs: list[torch.Tensor] = []
    torch.testing.assert_close(fast_model(ids, attentions=probs)[0], plain(ids)[0])
    assert len(probs) == 2
    monkeypatch.undo()
    torch.testing.assert_close(fast_model(ids)[0], plain(ids)[0], rtol=1e-5, atol=1e-5)


def test_no_library_means_no_swap(monkeypatch: pytest.MonkeyPatch) -> None:
    native.load_library.cache_clear()
    try:
        monkeypatch.setenv("GPT2LAB_NATIVE", "0")
        model = GPT(tiny())
        assert use_fast_attention(model) == 0
        use_cpu_training_kernels(model)  # (the fused loss is PyTorch alone: it still swaps)
        assert all(type(b.attn) is CausalSelfAttention for b in model.transformer.h)
        assert not any(isinstance(m, FastCausalSelfAttention) for m in model.modules())
    finally:
        native.load_library.cache_clear()


def test_training_kernels_swap_both() -> None:
    model = GPT(tiny())
    assert use_cpu_training_kernels(model) and has_cpu_training_kernels(model)
    assert all(isinstance(b.attn, FastCausalSelfAttention) for b in model.transformer.h)
