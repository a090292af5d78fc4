"""The fused head and loss against PyTorch's own: `F.cross_entropy` of `x @ W.T`, and a whole GPT's
training loss and gradients against the readable model's."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gpt2lab.config import GPTConfig
from gpt2lab.kernels import cross_entropy as ce
from gpt2lab.kernels import has_cpu_training_kernels, use_cpu_training_kernels
from gpt2lab.kernels.cross_entropy import (
    FusedLossGPT,
    fused_linear_cross_entropy,
    use_fused_loss,
)
from gpt2lab.model import GPT


def reference(x, w, targets, vocab, dtype):
    """The model's head and loss, written plainly: products in `dtype`, then float."""
    logits = (x.to(dtype) @ w.to(dtype).t()).float()
    logits[:, vocab:] = float("-inf")
    return F.cross_entropy(logits, targets, ignore_index=-1)


def both(n, c, padded, vocab, dtype, ignore=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g)
    w = torch.randn(padded, c, generator=g) * 0.3
    t = torch.randint(0, vocab, (n,), generator=g)
    t[list(ignore)] = -1
    got, want = {}, {}
    for out, fn in ((got, fused_linear_cross_entropy), (want, reference)):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xx, ww, t, vocab, dtype)
        (loss * 0.5).backward()  # a loss gradient other than 1 reaches both
        out.update(loss=loss.detach(), dx=xx.grad, dw=ww.grad)
    return got, want


@pytest.mark.parametrize("chunk", [1 << 23, 64 * 7, 1], ids=["one chunk", "several", "rows"])
@pytest.mark.parametrize("padded", [97, 128], ids=["exact", "padded vocabulary"])
def test_float32_equals_cross_entropy_of_the_products(monkeypatch, chunk, padded):
    monkeypatch.setattr(ce, "CHUNK_FLOATS", chunk)
    got, want = both(37, 16, padded, 97, torch.float32, ignore=(0, 5, 36))
    for key in ("loss", "dx", "dw"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
    assert (got["dw"][97:] == 0).all()  # the padding's rows get nothing


def test_bfloat16_products_match_the_models_rounding(monkeypatch):
    monkeypatch.setattr(ce, "CHUNK_FLOATS", 50 * 64)
    got, want = both(200, 64, 256, 250, torch.bfloat16, ignore=(3,))
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-5, atol=1e-5)
    for key in ("dx", "dw"):  # both round the same products to bfloat16; sums in another order
        scale = want[key].abs().max()
        assert (got[key] - want[key]).abs().max() < 2e-2 * scale


def test_every_target_ignored_is_nan_like_cross_entropy():
    got, want = both(8, 16, 32, 32, torch.float32, ignore=range(8))
    assert math.isnan(got["loss"]) and math.isnan(want["loss"])


def tiny_gpt(vocab=301, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=16, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    return GPT(cfg)


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16 autocast"])
def test_gpt_training_loss_and_every_gradient_equal_the_readable_models(monkeypatch, autocast):
    monkeypatch.setattr(ce, "CHUNK_FLOATS", 300)  # several chunks even at this size
    plain, fused = tiny_gpt(), tiny_gpt()
    assert use_fused_loss(fused) and isinstance(fused, FusedLossGPT)
    x = torch.randint(0, 301, (3, 16))
    y = torch.randint(0, 301, (3, 16))
    y[0, :5] = -1
    losses = []
    for m in (plain, fused):
        m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, loss = m(x, y)
        loss.backward()
        losses.append((logits, loss))
    (plain_logits, plain_loss), (fused_logits, fused_loss) = losses
    assert plain_logits is not None and fused_logits is None  # a training step reads no logits
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_loss, plain_loss, **tol)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, **tol, msg=name)


def test_everything_but_a_training_loss_is_the_models_own(monkeypatch):
    monkeypatch.setattr(ce, "CHUNK_FLOATS", 300)
    plain, fused = tiny_gpt(), tiny_gpt()
    use_fused_loss(fused)
    x, y = torch.randint(0, 301, (2, 16)), torch.randint(0, 301, (2, 16))
    plain.eval(), fused.eval()
    with torch.no_grad():  # evaluation: logits and loss as the model gives them
        for args in ((x,), (x, y)):
            a, b = plain(*args), fused(*args)
            torch.testing.assert_close(b[0], a[0])
    fused.train()
    with torch.no_grad():
        assert fused(x, y)[0] is not None
    # the parameters and the checkpoint keys do not change
    assert fused.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize("bad", [-100, 301, 400])
def test_bad_targets_do_what_the_models_own_loss_does(monkeypatch, bad):
    """-100 (another library's ignore index) or an id past the padded vocabulary: the readable
    model's error, not a silent class 0; a padding id (301 of 320): its infinite loss."""
    monkeypatch.setattr(ce, "CHUNK_FLOATS", 300)
    plain, fused = tiny_gpt(), tiny_gpt()
    use_fused_loss(fused)
    x, y = torch.randint(0, 301, (2, 16)), torch.randint(0, 301, (2, 16))
    y[1, 3] = bad
    outcomes = []
    for m in (plain, fused):
        m.train()
        try:
            outcomes.append(m(x, y)[1].item())
        except (RuntimeError, IndexError) as e:
            outcomes.append(type(e))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0] == math.inf if bad == 301 else isinstance(outcomes[0], type)


def test_only_where_it_pays(monkeypatch):
    """One chunk of logits, or a wide model: the readable loss (faster there, measured)."""
    small = tiny_gpt(vocab=50)
    use_fused_loss(small)
    x = torch.randint(0, 50, (2, 16))
    small.train()
    assert small(x, x)[0] is not None  # 32 x 64 logits: one chunk
    monkeypatch.setattr(ce, "CHUNK_FLOATS", 300)
    assert small(x, x)[0] is None
    monkeypatch.setattr(ce, "MAX_WIDTH", 16)  # the model is 32 wide
    assert small(x, x)[0] is not None


def test_swapped_in_by_the_cpu_training_kernels_and_not_twice():
    model = tiny_gpt()
    use_cpu_training_kernels(model)
    assert isinstance(model, FusedLossGPT) and has_cpu_training_kernels(model)
    assert not use_fused_loss(model)  # already swapped; and a subclass or wrapper is left alone
