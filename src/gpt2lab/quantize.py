"""int8 weights: `quantize(model, "int8")`, a GPT whose every matrix is stored in 8 bits.

Each weight matrix W (out, in), the head included, becomes int8 values q and one float32 scale
per output channel (row): W ~ q * scale[:, None], symmetric (no zero point), with
scale = max|row| / 127, so every row uses the full range [-127, 127]. The LayerNorms, the biases
and the position embedding stay float32. The token embedding is the head's matrix (GPT-2 ties
them): a lookup returns float32 rows q[id] * scale[id] of the head's int8 table.

On a CPU each product quantizes its input to 8 bits on the fly, multiplies int8 by int8 into
int32 sums and rescales them to float32 (`gpt2lab.kernels.int8`). Decoding runs through the C
step (decode.c), which reads the plain int8 values in place; batches of many rows go through
`torch._int_mm`, one scale per input row, as the C step rounds them. Without the C step the
blocks' weights are packed for fbgemm's kernels instead (one scale per call). The head
multiplies the int8 table the embedding reads. On a GPU the int8 matrix is
converted to the input's dtype inside each product (weight-only). The quantized model computes
in float32 and is for inference: `generate`, `gpt2lab sample --quantize int8`, `gpt2lab serve
--quantize int8`.
Figures and the memory trade-off of the tied table: docs/quantize.md.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from gpt2lab.errors import CheckpointError, ConfigError
from gpt2lab.kernels.int8 import (  # noqa: F401 - part of this module's API
    Int8Embedding,
    Int8Linear,
    dequantize_rows,
    quantize_rows,
    scale_of,
)
from gpt2lab.kernels.native import load_library
from gpt2lab.model import GPT

METHODS = ("int8",)


def quantize(model: GPT, method: str = "int8", compact: bool = True) -> GPT:
    """A copy of `model` with int8 weights (see the module doc); `model` is left as it is.

    The copy is in eval mode, computes in float32 and has no gradients. By default every matrix
    is held once: ~0.26x of the float32 model's bytes for GPT-2, decoding included. The tied
    embedding/head table is int8 rows that the lookup gathers and the head multiplies
    (`torch._int_mm`, each input row quantized on the fly). Where the C step (decode.c) builds,
    the blocks' matrices stay plain int8 too: the C step reads them in place, and batches of
    many rows multiply them through `torch._int_mm` with each row's own input scale, the C
    step's arithmetic. Without it they go into fbgemm's packed layout. `compact=False` packs
    every matrix for fbgemm (~0.33x), for faster prompts and scoring, and the C step then keeps
    a plain copy of the blocks' values while it decodes (docs/quantize.md).
    """
    if method not in METHODS:
        raise ConfigError(
            f"quantization method {method!r} is not known",
            " or ".join(METHODS),
            "use quantize(model, 'int8') (or --quantize int8)",
        )
    if not isinstance(model, GPT):
        raise ConfigError(
            f"quantize() got a {type(model).__name__}",
            "a gpt2lab GPT",
            "load the model with gpt2lab.load_model (or GPT.from_pretrained) first",
        )
    if getattr(model, "quantization", None):
        raise ConfigError(
            f"quantize() got a model that already has {model.quantization} weights",
            "a float model",
            "quantize the float model once and keep the result",
        )
    _require_finite(model)
    head_weight, wte = model.lm_head.weight, model.transformer.wte.weight
    # copy everything but the matrices, which are replaced below (no float copy of them is made)
    memo = {id(lin.weight): None for lin in _matrices(model)}
    memo.update({id(head_weight): None, id(wte): None})
    q = copy.deepcopy(model, memo)
    vocab = model.config.vocab_size
    # one copy: the C step reads plain values in place, while fbgemm's packing would need its own
    pack_blocks = not compact or load_library() is None
    with torch.no_grad():
        for (parent, name), own in zip(_linear_slots(q), _matrices(model)):
            setattr(parent, name, Int8Linear.from_float(own.weight, own.bias, pack=pack_blocks))
        values, scale = quantize_rows(head_weight[:vocab])
        q.lm_head = Int8Linear(values, scale, None, pack=not compact)
        if head_weight is not wte:  # an untied model: its own table
            values, scale = quantize_rows(wte)
        q.transformer.wte = Int8Embedding(values, scale)
    q.float().eval().requires_grad_(False)
    q.quantization = method
    return q


def _require_finite(model: GPT) -> None:
    """A NaN or infinity would make a row's scale meaningless and its values made up, hiding a
    broken model that computes NaN in float: refuse instead."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise CheckpointError(
                f"quantize(): {name} holds NaN or infinite values",
                "a model with finite weights",
                "load an earlier checkpoint (training diverged, or the file is damaged)",
            )


def model_bytes(model: nn.Module) -> int:
    """Bytes the model holds: parameters and buffers (each tensor once) and fbgemm's packed int8
    weights (out x in bytes each, plus their scales)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, Int8Linear) and m.packed is not None:
            total += m.out_features * m.in_features
    return total


def _matrices(model: GPT) -> list[nn.Linear]:
    return [getattr(parent, name) for parent, name in _linear_slots(model)]


def _linear_slots(model: GPT) -> list[tuple[nn.Module, str]]:
    slots = []
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        slots += [(attn, "c_attn"), (attn, "c_proj"), (mlp, "c_fc"), (mlp, "c_proj")]
    return slots
