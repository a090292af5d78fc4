"""Faster decoding on a CPU: linear layers whose weights oneDNN reordered for a few rows.

Decoding multiplies a few rows (one per sequence) by every weight matrix, which `F.linear` does
at a fraction of the memory bandwidth on x86 CPUs; a weight that oneDNN reordered once for that row
count streams 2-2.5x faster (bfloat16 bit-equal to `F.linear`, float32 within 1e-6; figures in
docs/sample.md). `DecodeKernels` builds the packed copies for a model and swaps them in for the
length of one forward call (`with kernels.applied(): model(...)`), then puts the model's own modules
back, so the model is never left changed. `gpt2lab.generate` applies them; `model.py` does not know
they exist. Where oneDNN is missing or refuses, the head alone gets a transposed copy, which a
matrix-vector product streams faster than the (vocab, C) original.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2lab.model import GPT, LMHead


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype `F.linear(x, ...)` multiplies in: autocast's where it is on, else x's."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


@functools.cache
def onednn_has_bfloat16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def onednn_can_multiply(dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed linear has a kernel for `dtype` on this CPU and build."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and onednn_has_bfloat16())


class PackedLinear(nn.Module):
    """`linear(x)` through a copy of the weight that oneDNN reordered for `rows` rows.

    It holds the same Parameters as the layer it stands in for (names and state_dict unchanged)
    and repacks when the weight changes (in-place updates bump its version) or the compute dtype
    does. With gradients on, or for a dtype oneDNN cannot multiply, it is the plain layer.
    `out_features` < the weight's rows computes only the first ones (the head's real vocabulary).
    Under CPU autocast it computes in autocast's dtype, as `F.linear` would: oneDNN refuses
    operands of two dtypes.
    """

    def __init__(self, linear: nn.Linear, rows: int, out_features: int | None = None) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.rows, self.out_features = rows, out_features or linear.out_features
        self.packed: Tensor | None = None
        self.packed_for: tuple | None = (
            None  # (weight version, dtype) the packed copy was made from
        )
        self.works = True  # False after oneDNN refused once: the plain product from then on

    def forward(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        if self.works and not torch.is_grad_enabled() and onednn_can_multiply(dtype):
            try:
                return self._packed_linear(x, dtype)
            except RuntimeError:  # no kernel for this CPU after all: plain from now on
                self.works, self.packed = False, None
        return F.linear(x, self.weight[: self.out_features], self._bias())

    def _packed_linear(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        key = (self.weight._version, dtype)
        if self.packed is None or self.packed_for != key:
            w = self.weight.detach()[: self.out_features].to(dtype)
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, self.rows)
            self.packed_for = key
        b = self._bias()
        b = None if b is None else b.to(dtype)
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), self.packed, b, "none", [], "")

    def _bias(self) -> Tensor | None:
        return None if self.bias is None else self.bias[: self.out_features]


class TransposedHead(nn.Module):
    """The head's real rows as a (C, vocab_size) copy: a few rows times it streams faster than
    `F.linear` over the (vocab, C) weight. Remade when the weight changes."""

    def __init__(self, head: nn.Linear, vocab_size: int) -> None:
        super().__init__()
        self.weight, self.vocab_size = head.weight, vocab_size
        self.copy: Tensor | None = None
        self.copy_of: tuple | None = None

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return F.linear(x, self.weight[: self.vocab_size])
        key = (self.weight._version, self.weight.dtype)
        if self.copy is None or self.copy_of != key:
            self.copy, self.copy_of = self.weight.detach()[: self.vocab_size].t().contiguous(), key
        return x @ self.copy


class DecodeKernels:
    """The packed stand-ins of one model's linear layers, for decoding `rows` rows at a time."""

    def __init__(self, model: GPT, rows: int, dtype: torch.dtype) -> None:
        vocab = model.config.vocab_size
        self.swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []
        if onednn_can_multiply(dtype):
            for block in model.transformer.h:
                for parent, name in _linears(block):
                    self._add(parent, name, PackedLinear(getattr(parent, name), rows))
            self._add(model, "lm_head", PackedLinear(model.lm_head, rows, vocab))
        else:
            self._add(model, "lm_head", TransposedHead(model.lm_head, vocab))

    def _add(self, parent: nn.Module, name: str, fast: nn.Module) -> None:
        self.swaps.append((parent, name, getattr(parent, name), fast))

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the model runs through the stand-ins; its own modules return after."""
        for parent, name, _, fast in self.swaps:
            setattr(parent, name, fast)
        try:
            yield
        finally:
            for parent, name, own, _ in self.swaps:
                setattr(parent, name, own)


def decode_kernels(model: nn.Module, rows: int) -> DecodeKernels | None:
    """Kernels for decoding `rows` rows of a GPT on a CPU, or None where none apply (GPU, other
    models, models whose layers are not `nn.Linear` (int8, `gpt2lab.quantize`), or layers already
    swapped by an enclosing generation)."""
    if not isinstance(model, GPT) or type(model.lm_head) is not LMHead:
        return None
    param = next(model.parameters())
    return DecodeKernels(model, rows, param.dtype) if param.device.type == "cpu" else None


def _linears(block: nn.Module) -> list[tuple[nn.Module, str]]:
    attn, mlp = block.attn, block.mlp
    return [(attn, "c_attn"), (attn, "c_proj"), (mlp, "c_fc"), (mlp, "c_proj")]
