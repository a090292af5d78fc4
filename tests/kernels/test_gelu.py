"""gelu.c's GELU and its gradient against the exact function (float64) and PyTorch's kernels."""

from __future__ import annotations

import math
import platform

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt2lab.config import GPTConfig
from gpt2lab.kernels import native
from gpt2lab.kernels.gelu import FastGELU, fast_gelu, use_fast_gelu
from gpt2lab.model import GPT

needs_cc = pytest.mark.skipif(
    native.load_library() is None, reason="no C compiler here (or GPT2LAB_NATIVE=0)"
)
pytestmark = needs_cc


def inputs(dtype: torch.dtype, n: int = 70_001) -> torch.Tensor:
    """Values across GELU's range, several chunks and a ragged tail (n % 16 != 0)."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, generator=g) * 4).to(dtype)


def exact(x: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU(x) and gy * GELU'(x) in float64 by autograd, rounded to x's dtype. Written as
    x sigmoid(2z): 0.5 x (1 + tanh z) itself cancels to nothing below x ~ -7 even in float64."""
    x64 = x.double().requires_grad_()
    z = math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)
    y = x64 * torch.sigmoid(2 * z)
    y.backward(gy.double())
    return y.detach().to(x.dtype), x64.grad.to(x.dtype)


def test_the_reference_is_gpt2s_gelu() -> None:
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    y, g = exact(x, torch.ones_like(x))
    x.requires_grad_()
    want = F.gelu(x, approximate="tanh")
    want.backward(torch.ones_like(x))
    torch.testing.assert_close(y, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, x.grad, rtol=1e-12, atol=1e-12)


def ours(x: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = fast_gelu(x)
    y.backward(gy)
    return y.detach(), x.grad


def theirs(x: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = F.gelu(x, approximate="tanh")
    y.backward(gy)
    return y.detach(), x.grad


def test_float32_is_the_exact_function_to_rounding() -> None:
    x, gy = inputs(torch.float32), inputs(torch.float32).flip(0)
    want_y, want_g = exact(x, gy)
    got_y, got_g = ours(x, gy)
    torch.testing.assert_close(got_y, want_y, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(got_g, want_g, rtol=2e-6, atol=1e-6)
    ref_y, ref_g = theirs(x, gy)  # and PyTorch's own kernel, within its cancellation error
    torch.testing.assert_close(got_y, ref_y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_g, ref_g, rtol=1e-5, atol=1e-5)


def test_bfloat16_rounds_the_float32_result_once() -> None:
    """Computed in float32 and rounded to bfloat16 once: at most one bfloat16 step from the
    exact value, equal to it nearly always, and never further from it than PyTorch's kernel."""
    x, gy = inputs(torch.bfloat16), inputs(torch.bfloat16).flip(0)
    want_y, want_g = exact(x, gy)
    got_y, got_g = ours(x, gy)
    ref_y, ref_g = theirs(x, gy)
    for got, want, ref in ((got_y, want_y, ref_y), (got_g, want_g, ref_g)):
        step = want.float().abs().clamp_min(1e-30) * 2**-7
        assert ((got.float() - want.float()).abs() <= step).all()
        assert (got != want).float().mean() < 0.02
        assert (got != want).sum() <= (ref != want).sum()


def test_special_values_match_pytorch() -> None:
    special = [float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-40, -1e-40]
    special += [-1e4, -30.0, 30.0, 1e4, 3e38, -3e38, 1.0, -1.0, 0.5]
    x = torch.tensor(special * 3)  # the 16-wide loop and the scalar tail both see each
    for dtype in (torch.float32, torch.bfloat16):
        got_y, got_g = ours(x.to(dtype), torch.ones(x.numel(), dtype=dtype))
        ref_y, ref_g = theirs(x.to(dtype), torch.ones(x.numel(), dtype=dtype))
        torch.testing.assert_close(got_y, ref_y, equal_nan=True, rtol=1e-2, atol=1e-6)
        torch.testing.assert_close(got_g, ref_g, equal_nan=True, rtol=1e-2, atol=1e-5)


def test_a_second_derivative_is_refused_not_wrong() -> None:
    x, v = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    (g,) = torch.autograd.grad(fast_gelu(x), x, grad_outputs=v, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        g.sum().backward()


def test_tensors_it_does_not_take_go_to_pytorch() -> None:
    x = torch.randn(64, 48, dtype=torch.float64)
    assert torch.equal(fast_gelu(x), F.gelu(x, approximate="tanh"))
    strided = torch.randn(48, 64).t()
    assert torch.equal(fast_gelu(strided), F.gelu(strided, approximate="tanh"))
    assert fast_gelu(torch.empty(0)).shape == (0,)


def test_swapped_model_trains_as_the_readable_one() -> None:
    """Loss and every gradient of a GPT with FastGELU equal the plain model's (float32), and
    bfloat16 autocast runs through it; no state_dict key changes."""
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=61, bias=True)
    torch.manual_seed(0)
    plain = GPT(cfg)
    fast = GPT(cfg)
    fast.load_state_dict(plain.state_dict())
    assert use_fast_gelu(fast) == cfg.n_layer
    assert all(isinstance(b.mlp.gelu, FastGELU) for b in fast.transformer.h)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(0, 61, (3, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (plain, fast):
        _, loss = m(ids, targets=ids)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.autocast("cpu", torch.bfloat16):
        _, loss = fast(ids, targets=ids)
    loss.backward()
    assert torch.isfinite(loss)


def test_no_library_means_no_swap(monkeypatch: pytest.MonkeyPatch) -> None:
    native.load_library.cache_clear()
    try:
        monkeypatch.setenv("GPT2LAB_NATIVE", "0")
        model = nn.Sequential(nn.Linear(4, 4), nn.GELU(approximate="tanh"))
        assert use_fast_gelu(model) == 0
        assert isinstance(model[1], nn.GELU)
        x = torch.randn(8, 4)
        assert torch.equal(fast_gelu(x), F.gelu(x, approximate="tanh"))
    finally:
        native.load_library.cache_clear()


def test_only_the_tanh_gelu_is_swapped() -> None:
    model = nn.Sequential(nn.GELU(), nn.GELU(approximate="tanh"))
    assert use_fast_gelu(model) == 1
    assert isinstance(model[0], nn.GELU) and isinstance(model[1], FastGELU)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flags")
def test_portable_c_loop_gives_the_vector_loops_values(tmp_path, monkeypatch) -> None:
    x, gy = inputs(torch.float32, 4_099), inputs(torch.float32, 4_099).flip(0)
    vector = ours(x, gy)
    native.load_library.cache_clear()
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        monkeypatch.setattr(native, "FLAGS", [*native.FLAGS, "-mno-avx512f"])
        plain = ours(x, gy)
    finally:
        native.load_library.cache_clear()
    for a, b in zip(plain, vector):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
