"""int8 weights: `quantize(model, "int8")`, a GPT whose every matrix is stored in 8 bits.

Each weight matrix W (out, in), the head included, becomes int8 values q and one float32 scale
per output channel (row): W ~ q * scale[:, None], symmetric (no zero point), with
scale = max|row| / 127, so every row uses the full range [-127, 127]. The LayerNorms, the biases
and the position embedding stay float (float32). The token embedding is the head's matrix (GPT-2
ties them): a lookup returns its float rows, q[id] * scale[id], read from the same int8 table the
head multiplies, so the tied table is stored once, in 8 bits. That is what brings a loaded model
to ~0.26x of its float32 bytes (`model_bytes`); a float copy of the 38.6M-entry table alone would
be 0.31x.

On a CPU the products run through fbgemm's int8 kernels (`quantized::linear_dynamic`): the
activations of each product are quantized to 8 bits on the fly (one scale per call, like
llama.cpp's q8_0 quantizes them per block), the weight stays packed in fbgemm's layout, and the
int32 result is rescaled to float32. Elsewhere (GPUs, builds without fbgemm) the int8 matrix is
converted to the activations' dtype inside each product (weight-only). The quantized model
computes in float32 and is for inference: `generate`, `gpt2lab sample --quantize int8`, serving.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
import types
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2lab.errors import ConfigError
from gpt2lab.model import GPT

METHODS = ("int8",)
QMAX = 127


def quantize(model: GPT, method: str = "int8", compact: bool = False) -> GPT:
    """A copy of `model` with int8 weights (see the module doc); `model` is left as it is.

    The copy is in eval mode, computes in float32 and has no gradients. The tied embedding/head
    table is stored twice by default, as the int8 rows the lookup gathers and in fbgemm's packed
    layout for the head's product (~0.33x of float32 for GPT-2). `compact=True` stores it once
    (~0.26x) and multiplies the head from the plain int8 rows, which is slower (`torch._int_mm`).
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
    head_weight, wte = model.lm_head.weight, model.transformer.wte.weight
    # copy everything but the matrices, which are replaced below (no float copy of them is made)
    memo = {id(lin.weight): None for lin in _matrices(model)}
    memo.update({id(head_weight): None, id(wte): None})
    q = copy.deepcopy(model, memo)
    vocab = model.config.vocab_size
    with torch.no_grad():
        for (parent, name), own in zip(_linear_slots(q), _matrices(model)):
            setattr(parent, name, Int8Linear.from_float(own.weight, own.bias))
        values, scale = quantize_rows(head_weight[:vocab])
        q.lm_head = Int8Linear(values, scale, None, pack=not compact)
        if head_weight is not wte:  # an untied model: its own table
            values, scale = quantize_rows(wte)
        q.transformer.wte = Int8Embedding(values, scale)
    q.float().eval().requires_grad_(False)
    q.quantization = method
    return q


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 values, float32 scale per row) with w ~ values * scale[:, None], symmetric.

    The scales round-trip exactly: quantizing the dequantized matrix again gives the same values
    and bit-identical scales (`scale_of(max|row|)` picks, among the float32 neighbours of
    max|row| / 127, one for which that holds).
    """
    w = w.detach().float()
    scale = scale_of(w.abs().amax(dim=1))
    values = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return values, scale


def dequantize_rows(values: Tensor, scale: Tensor) -> Tensor:
    """The float32 matrix values * scale[:, None]."""
    return values.float() * scale[:, None]


def scale_of(amax: Tensor) -> Tensor:
    """float32 scales ~ amax / 127 that survive a round trip: 127 * scale, divided by 127 again,
    is scale itself. All-zero rows get scale 1 (their values are 0)."""
    amax = amax.float()
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    for _ in range(8):  # each step moves the rows that do not round-trip by one float32 ulp
        bad = (scale * QMAX) / QMAX != scale
        if not bool(bad.any()):
            break
        up = torch.nextafter(scale, torch.full_like(scale, float("inf")))
        scale = torch.where(bad, up, scale)
    return scale


@functools.cache
def fbgemm_available() -> bool:
    """Whether this build has fbgemm's int8 kernels (x86 CPUs)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


class Int8Linear(nn.Module):
    """`F.linear` with an int8 weight and one float32 scale per output row; output float32.

    `scale` (out,) and `bias` are buffers. With `pack` (a CPU with fbgemm), the int8 values live
    only in fbgemm's packed layout and each product quantizes its input on the fly
    (`quantized::linear_dynamic`). Otherwise they are the int8 buffer `values`: on a CPU the
    input's rows are quantized to int8 (one scale each) and multiplied by `torch._int_mm`;
    elsewhere the weight is converted to the input's dtype (weight-only). `int8_weight()` returns
    the values (out, in) either way.
    """

    def __init__(
        self, values: Tensor, scale: Tensor, bias: Tensor | None, pack: bool = True
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = values.shape
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("values", values.contiguous())
        self.packed = None  # fbgemm's packed weight
        self.reduce_range = False
        if pack and values.device.type == "cpu" and fbgemm_available():
            self.pack()

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None, pack: bool = True) -> Int8Linear:
        return cls(*quantize_rows(weight), bias, pack=pack)

    def pack(self) -> None:
        """Move the int8 values into fbgemm's layout (and drop the plain copy)."""
        zero = torch.zeros(self.out_features, dtype=torch.long)
        with _quiet_deprecation():
            qw = torch._make_per_channel_quantized_tensor(self.values, self.scale.double(), zero, 0)
            self.packed = torch.ops.quantized.linear_prepack(qw, None)
        self.reduce_range = fbgemm_saturates()
        self.values = None

    def int8_weight(self) -> Tensor:
        """The int8 values (out, in)."""
        if self.values is not None:
            return self.values
        qw, _ = torch.ops.quantized.linear_unpack(self.packed)
        return qw.int_repr()

    def dequantized(self) -> Tensor:
        """The float32 weight the int8 values and scales stand for."""
        return dequantize_rows(self.int8_weight(), self.scale)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if self.packed is not None:
            y = torch.ops.quantized.linear_dynamic(x2, self.packed, self.reduce_range)
        elif x.device.type == "cpu":
            xs = x2.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30) / QMAX
            qx = torch.round(x2 / xs).to(torch.int8)
            y = torch._int_mm(qx, self.values.t()) * (xs * self.scale)
        else:
            w = self.values.to(x.dtype) * self.scale.to(x.dtype)[:, None]
            y = F.linear(x.reshape(-1, shape[-1]), w).float()
        y = y.view(*shape[:-1], self.out_features)
        return y if self.bias is None else y.add_(self.bias)

    def extra_repr(self) -> str:
        kind = "fbgemm-packed" if self.packed is not None else "plain"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 {kind}"


class Int8Embedding(nn.Module):
    """Token embeddings from int8 rows and one scale per row: float32 values[id] * scale[id]."""

    def __init__(self, values: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("values", values)
        self.register_buffer("scale", scale)

    @property
    def weight(self) -> Tensor:
        """The dequantized table (float32), for code that reads `wte.weight`."""
        return dequantize_rows(self.values, self.scale)

    def forward(self, idx: Tensor) -> Tensor:
        return self.values[idx].float() * self.scale[idx].unsqueeze(-1)


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


@functools.cache
def fbgemm_saturates() -> bool:
    """Whether fbgemm's int8 products saturate at full-range activations on this CPU.

    Without VNNI, x86 multiplies 8-bit pairs into 16-bit sums that can overflow at full-range
    (uint8) activations; fbgemm's `reduce_range` (7-bit activations) avoids it. Probe once with
    the worst case and compare to the exact result.
    """
    k = 64
    w = torch.full((8, k), 1.0)
    zero = torch.zeros(8, dtype=torch.long)
    with _quiet_deprecation():
        qw = torch.quantize_per_channel(w, torch.full((8,), 1 / QMAX), zero, 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, None)
    x = torch.full((1, k), 1.0)
    x[0, ::2] = -1.0  # the other half of the range too
    y = torch.ops.quantized.linear_dynamic(torch.ones(1, k), packed, False)
    y2 = torch.ops.quantized.linear_dynamic(x, packed, False)
    return not (torch.allclose(y, torch.full_like(y, k), rtol=1e-2) and y2.abs().max() < 1)


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    """torch 2.13 warns that its quantized tensor types are deprecated; fbgemm's packing takes
    one, which is dropped at once."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated", category=UserWarning)
        yield


def _matrices(model: GPT) -> list[nn.Linear]:
    return [getattr(parent, name) for parent, name in _linear_slots(model)]


def _linear_slots(model: GPT) -> list[tuple[nn.Module, str]]:
    slots = []
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        slots += [(attn, "c_attn"), (attn, "c_proj"), (mlp, "c_fc"), (mlp, "c_proj")]
    return slots


class _CallableModule(types.ModuleType):
    """`gpt2lab.quantize` names both this module and its function, and importing the module binds
    the module to that name on the package: calling the module calls the function."""

    def __call__(self, *args, **kwargs) -> GPT:
        return quantize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
