"""The head and the loss of a training step in one pass over a few rows at a time.

`GPT.logits_and_loss` computes every position's logits (B*T x vocab), converts them to float32,
takes the log-softmax and the loss, and backwards builds as large a gradient, converts it back and
multiplies it. With GPT-2's 50,257 ids and a small model that is most of a CPU training step: at
the BPE demo's shape (4 x 128, 36 x 128 tokens) 60% of it went to the conversions, the
log-softmax, its gradient and zero-filling, not to the products (docs/performance.md).

`fused_linear_cross_entropy` goes through the rows in chunks: each chunk's logits (float32, ~8M
of them at a time), their log-sum-exp and loss, and at once their gradient (softmax minus the
target's one-hot), multiplied into the gradients of the hidden states and of the head's matrix.
Backwards only scales those by the loss's gradient. The full logits never exist. The products run
in the dtype autocast gives the head (bfloat16 under the CPU default), as the model's head does.

`use_fused_loss(model)` makes a GPT take this path for a training step's loss (training mode,
gradients on, targets given); it then returns None for the logits, which a training step does not
read. Every other call is the model's own `logits_and_loss`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gpt2lab.kernels.cpu_decode import compute_dtype
from gpt2lab.model import GPT

# float32 logits per chunk (32 MiB): large enough for efficient products, a small part of the
# whole (the BPE demo's step holds 231M); the demo's step with chunks of 2M / 4M / 8M / 16M:
# 1.36x / 1.65x / 1.88x / 1.48x
CHUNK_FLOATS = 1 << 23
MAX_WIDTH = 256  # the widest hidden state the fused loss is faster for (see `pays`)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, targets: Tensor, vocab: int, dtype: torch.dtype
    ) -> Tensor:
        n, padded = x.size(0), weight.size(0)
        w = weight.detach().to(dtype)
        total = (targets != -1).sum()
        count = total.clamp(min=1)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(padded, x.size(1), dtype=torch.float32, device=x.device)
        rows = max(1, CHUNK_FLOATS // padded)
        for i in range(0, n, rows):
            xc, tc = x[i : i + rows].detach().to(dtype), targets[i : i + rows]
            logits = (xc @ w.t()).float()  # as the model's head: products in dtype, then float
            if padded > vocab:
                logits[:, vocab:] = float("-inf")
            lse = torch.logsumexp(logits, dim=1)
            keep = tc != -1
            safe = tc.clamp(min=0)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            loss += torch.where(keep, lse - picked, 0.0).sum()
            # d loss / d logits = (softmax - one-hot) / count, zero for ignored rows
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(len(tc), device=x.device), safe] -= 1.0
            grad.mul_((keep / count).to(grad.dtype)[:, None])
            g = grad.to(dtype)
            grad_x[i : i + rows] = (g @ w).to(x.dtype)
            grad_w += (g.t() @ xc).float()
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        return loss / total  # no targets at all: 0 / 0, NaN, as F.cross_entropy gives

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple:
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None, None


def fused_linear_cross_entropy(
    x: Tensor, weight: Tensor, targets: Tensor, vocab: int, dtype: torch.dtype
) -> Tensor:
    """Mean cross-entropy of `x @ weight.T` (rows past `vocab` masked out) against `targets`
    (-1 ignored), the products in `dtype`: `F.cross_entropy` of the model's head, without the
    logits ever held whole."""
    return _LinearCrossEntropy.apply(x, weight, targets, vocab, dtype)


class FusedLossGPT(GPT):
    """A GPT whose training loss goes through `fused_linear_cross_entropy` (see the module doc);
    made by `use_fused_loss`, never constructed."""

    def logits_and_loss(
        self, x: Tensor, targets: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        plain = targets is None or not self.training or not torch.is_grad_enabled()
        if plain or not pays(x, self) or not valid(targets, self.config.vocab_size):
            return super().logits_and_loss(x, targets)  # (which reports bad targets, as ever)
        loss = fused_linear_cross_entropy(
            x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
            self.config.vocab_size, compute_dtype(x),
        )  # fmt: skip
        return None, loss


def valid(targets: Tensor, vocab: int) -> bool:
    """Whether every target is an id or -1 (ignored); others go to `F.cross_entropy`'s error."""
    return bool(((targets >= -1) & (targets < vocab)).all())


def pays(x: Tensor, model: GPT) -> bool:
    """Whether the fused loss is faster than the model's at this shape: where the logits are
    more than one chunk (fewer gain nothing) and the head is narrow, so that the logits'
    elementwise passes outweigh the products. Where the hidden states are wide, each chunk's
    addition to the head's gradient (a whole matrix in float32) costs more than it saves. The
    BPE demo's step (36 x 128 tokens), n_embd 128 / 256 / 512 / 768: 1.8x / 1.35x / 0.96x /
    ~0.8x (docs/performance.md)."""
    rows = x.numel() // x.size(-1)
    return rows * model.lm_head.weight.size(0) > CHUNK_FLOATS and x.size(-1) <= MAX_WIDTH


def use_fused_loss(model: torch.nn.Module) -> bool:
    """Make `model` (a plain GPT) compute its training loss with `fused_linear_cross_entropy`;
    its parameters, checkpoint keys and every other output are unchanged."""
    if type(model) is not GPT:
        return False
    model.__class__ = FusedLossGPT
    return True
