"""Causal self-attention for training on a CPU, forward and backward in C (attention.c).

At the contexts CPU training uses (nanoGPT's CPU recipe trains at T=64), a block's attention is a
few small products wrapped in a dozen PyTorch operations: the q/k/v split and transposes, the
scores, the causal mask, softmax, the heads merged back, and as many again backwards. Their
dispatch cost more than the arithmetic. attention.c goes from the c_attn output (B, T, 3C) to
the heads' output (B, T, C) in one call per direction (docs/performance.md has the figures).

`use_fast_attention(model)` replaces every `CausalSelfAttention` with a `FastCausalSelfAttention`
holding the same projections (same parameters, same checkpoint keys). It takes the fused path
for plain causal attention of up to `MAX_T` positions on a CPU, float32 or bfloat16, without
dropout; everything else (a KV cache, a mask, returned probabilities, dropout while training,
longer contexts, where the library cannot be built) goes through the model's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from gpt2lab.kernels.native import DTYPES, load_library
from gpt2lab.model import CausalSelfAttention

# longer contexts keep model.attention: by then a head's ~9 T x hs float buffers have long
# outgrown the core's cache, and SDPA catches up (docs/performance.md)
MAX_T = 2048


def _work(T: int, hs: int) -> Tensor:
    """Each thread's float32 buffers for one (sequence, head) at a time."""
    per = load_library().gpt2lab_attention_work_floats(T, hs)
    return torch.empty(per * torch.get_num_threads(), dtype=torch.float32)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, qkv: Tensor, n_head: int) -> Tensor:
        B, T, C3 = qkv.shape
        hs = C3 // 3 // n_head
        y = qkv.new_empty(B, T, C3 // 3)
        lse = torch.empty(B, n_head, T, dtype=torch.float32)
        work = _work(T, hs)  # held here: a temporary's memory would be freed before the call
        load_library().gpt2lab_attention(
            qkv.data_ptr(), y.data_ptr(), lse.data_ptr(), work.data_ptr(),
            B, T, n_head, hs, DTYPES[qkv.dtype], torch.get_num_threads(),
        )  # fmt: skip
        ctx.save_for_backward(qkv, lse)
        ctx.n_head = n_head
        return y

    @staticmethod
    @once_differentiable  # attention.c has no second derivative: asking for one is an error
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, None]:
        qkv, lse = ctx.saved_tensors
        B, T, C3 = qkv.shape
        hs = C3 // 3 // ctx.n_head
        dy = dy.contiguous().to(qkv.dtype)
        dqkv = torch.empty_like(qkv)
        work = _work(T, hs)
        load_library().gpt2lab_attention_backward(
            qkv.data_ptr(), dy.data_ptr(), lse.data_ptr(), dqkv.data_ptr(),
            work.data_ptr(), B, T, ctx.n_head, hs, DTYPES[qkv.dtype],
            torch.get_num_threads(),
        )  # fmt: skip
        return dqkv, None


def fused_causal_attention(qkv: Tensor, n_head: int) -> Tensor:
    """Heads' output (B, T, C), side by side, of plain causal attention over the c_attn output
    `qkv` (B, T, 3C): `model.attention` after the split into heads, through attention.c."""
    if qkv.dtype not in DTYPES:  # float16 autocast: the sums are float32 anyway
        return _CausalAttention.apply(qkv.float().contiguous(), n_head).to(qkv.dtype)
    return _CausalAttention.apply(qkv.contiguous(), n_head)


def takes(x: Tensor) -> bool:
    """Whether attention.c takes the attention of this block input (B, T, C)."""
    return x.device.type == "cpu" and 0 < x.size(1) <= MAX_T and load_library() is not None


class FastCausalSelfAttention(CausalSelfAttention):
    """`CausalSelfAttention` whose plain causal case runs through attention.c (module docstring)."""

    @classmethod
    def taking_over(cls, old: CausalSelfAttention) -> FastCausalSelfAttention:
        """The same module (projections, settings, hooks, train/eval mode) as this class."""
        new = cls.__new__(cls)
        new.__dict__.update(old.__dict__)
        return new

    def forward(
        self,
        x: Tensor,
        kv: tuple[Tensor, Tensor, int] | None = None,
        mask: Tensor | None = None,
        probs_out: list[Tensor] | None = None,
    ) -> Tensor:
        plain = kv is None and mask is None and probs_out is None
        if plain and not (self.training and self.dropout) and takes(x):
            y = fused_causal_attention(self.c_attn(x), self.n_head)
            return self.resid_dropout(self.c_proj(y))
        return super().forward(x, kv, mask, probs_out)


def use_fast_attention(model: nn.Module) -> int:
    """Swap every `CausalSelfAttention` in `model` for a `FastCausalSelfAttention` with the same
    projections when the library loads; returns how many were swapped (0 where it cannot be)."""
    if load_library() is None:
        return 0
    names = [
        name
        for name, m in model.named_modules()
        if type(m) is CausalSelfAttention  # noqa: E721 (subclasses are already swapped)
    ]
    for name in names:
        model.set_submodule(name, FastCausalSelfAttention.taking_over(model.get_submodule(name)))
    return len(names)
