"""int8 products on a CPU (fbgemm) and elsewhere: the modules `gpt2lab.quantize` puts in a GPT.

`Int8Linear` holds a weight as int8 values with one float32 scale per output row;
`Int8Embedding` looks rows up in such a table. `quantize_rows` makes the values and scales
(symmetric, per row, scales that round-trip exactly). See docs/quantize.md.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QMAX = 127


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
    is scale itself. All-zero rows get scale 1 (their values are 0), as do rows so tiny that
    amax / 127 is 0 in float32 (below 1.8e-43: zeros too)."""
    scale = amax.float() / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    for _ in range(8):  # each step moves the rows that do not round-trip by one float32 ulp
        top = scale * QMAX
        bad = top / QMAX != scale
        if not bool(bad.any()):
            break
        # up, except where 127 * scale overflows (rows near float32's largest value): down
        toward = torch.where(top.isinf(), 0.0, float("inf"))
        scale = torch.where(bad, torch.nextafter(scale, toward), scale)
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
            self.packed = torch.ops.quantized.linear_prepack(qw, self.bias)  # bias added inside
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
            return y.view(*shape[:-1], self.out_features)
        if x.device.type == "cpu":
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
