"""Hardware-specific fast paths that sit beside the readable model and are tested equal to it.

`cpu_decode`: oneDNN-packed weights for decoding a few rows at a time on a CPU.
`native`: the decoding step in C (`decode.c`, up to 16 rows a step), compiled on first use.
`gelu`: GPT-2's GELU and its gradient in C (`gelu.c`) for training on a CPU.
`attention`: causal attention and its gradient in C (`attention.c`) for training on a CPU.
`cross_entropy`: the head and the loss of a training step a few rows at a time (large
vocabularies, narrow models).
`int8`: per-channel int8 linear layers (`gpt2lab.quantize`).
"""

from __future__ import annotations

from torch import nn

from gpt2lab.kernels.attention import FastCausalSelfAttention, use_fast_attention
from gpt2lab.kernels.cross_entropy import FusedLossGPT, use_fused_loss
from gpt2lab.kernels.gelu import FastGELU, use_fast_gelu


def use_cpu_training_kernels(model: nn.Module) -> bool:
    """GELU and attention through gelu.c and attention.c, and the loss through the fused head
    (where it pays), as training on a CPU runs them (same parameters, same checkpoint keys);
    False where nothing was swapped."""
    return bool(use_fast_gelu(model) + use_fast_attention(model) + use_fused_loss(model))


def has_cpu_training_kernels(model: nn.Module) -> bool:
    """Whether `use_cpu_training_kernels` swapped anything in `model`."""
    kinds = (FastGELU, FastCausalSelfAttention, FusedLossGPT)
    return any(isinstance(m, kinds) for m in model.modules())
