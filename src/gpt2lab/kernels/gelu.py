"""GPT-2's GELU for training on a CPU: gelu.c's one-pass forward and backward in place of PyTorch's.

PyTorch's CPU kernels for `gelu(x, approximate="tanh")` and its gradient evaluate tanh in full
precision and took ~15% of a small model's bfloat16 training step; gelu.c computes the same
function (as v * sigmoid(2z), which also avoids 1 + tanh(z) cancelling for v << 0): forward and
backward 2-3x faster together (docs/performance.md). `use_fast_gelu(model)` puts `FastGELU` in
every block's MLP in place of `nn.GELU(approximate="tanh")`; it holds no parameters, so
checkpoints are unchanged. Where the library cannot be built, or for a tensor it does not take
(another device or dtype, strided), `FastGELU` is PyTorch's GELU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from gpt2lab.kernels.native import DTYPES, load_library


def _takes(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in DTYPES and x.is_contiguous()


class _GELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        y = torch.empty_like(x)
        n, dtype, threads = x.numel(), DTYPES[x.dtype], torch.get_num_threads()
        load_library().gpt2lab_gelu(x.data_ptr(), y.data_ptr(), n, dtype, threads)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    @once_differentiable  # gelu.c has no second derivative: asking for one is an error
    def backward(ctx: Any, gy: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        gy = gy.contiguous().to(x.dtype)
        gx = torch.empty_like(x)
        n, dtype, threads = x.numel(), DTYPES[x.dtype], torch.get_num_threads()
        load_library().gpt2lab_gelu_backward(
            x.data_ptr(), gy.data_ptr(), gx.data_ptr(), n, dtype, threads
        )
        return gx


def fast_gelu(x: Tensor) -> Tensor:
    """`F.gelu(x, approximate="tanh")`, through gelu.c where it can."""
    if _takes(x) and load_library() is not None:
        return _GELU.apply(x)
    return F.gelu(x, approximate="tanh")


class FastGELU(nn.Module):
    """`nn.GELU(approximate="tanh")` through gelu.c (see the module's docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        return fast_gelu(x)


def use_fast_gelu(model: nn.Module) -> int:
    """Swap every `nn.GELU(approximate="tanh")` in `model` for `FastGELU` when the library loads;
    returns how many were swapped (0 where it cannot be built)."""
    if load_library() is None:
        return 0
    names = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.GELU) and m.approximate == "tanh"
    ]
    for name in names:
        model.set_submodule(name, FastGELU())
    return len(names)
