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
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2lab.model import GPT, KVCache, LMHead


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


class DecodeStep:
    """One new token per row through a GPT on a CPU, the model's cached forward written flat.

    `step(ids, cache, position_ids, mask)` equals `model(ids, cache=cache, attention_mask=mask,
    position_ids=position_ids, last_only=True)[0][:, -1]` for ids (B, 1) (tested): the same
    KVCache, written in place at `cache.pos`, the same left-padding rules. What it saves, per
    token: the modules' calls and the views between them (about 30 operations a layer become
    10), since it calls oneDNN's packed products directly, with the bias, the GELU and the
    residual add fused into them. The weights are packed once for `rows` rows; `current(model)`
    says whether they still match the model's (in-place updates bump their versions).
    """

    def __init__(self, model: GPT, rows: int, dtype: torch.dtype) -> None:
        self.rows, self.dtype = rows, dtype
        cfg = model.config
        self.n_head, self.head_size, self.vocab = cfg.n_head, cfg.head_size, cfg.vocab_size
        self.versions = _versions(model)

        def pack(w: Tensor) -> Tensor:
            return torch.ops.mkldnn._reorder_linear_weight(w.detach().to(dtype), rows)

        def vec(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to(dtype)

        self.layers = []
        for block in model.transformer.h:
            attn, mlp = block.attn, block.mlp
            self.layers.append(
                (
                    (vec(block.ln_1.weight), vec(block.ln_1.bias), block.ln_1.eps),
                    (pack(attn.c_attn.weight), vec(attn.c_attn.bias)),
                    (pack(attn.c_proj.weight), vec(attn.c_proj.bias)),
                    (vec(block.ln_2.weight), vec(block.ln_2.bias), block.ln_2.eps),
                    (pack(mlp.c_fc.weight), vec(mlp.c_fc.bias)),
                    (pack(mlp.c_proj.weight), vec(mlp.c_proj.bias)),
                )
            )
        ln_f = model.transformer.ln_f
        self.ln_f = (vec(ln_f.weight), vec(ln_f.bias), ln_f.eps)
        self.head = pack(model.lm_head.weight[: self.vocab])
        self.wte, self.wpe = model.transformer.wte.weight, model.transformer.wpe.weight

    def current(self, model: GPT) -> bool:
        return self.versions == _versions(model)

    @torch.no_grad()
    def step(
        self,
        ids: Tensor,
        cache: KVCache,
        position_ids: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, vocab_size), float32, of one new token per row; advances `cache.pos`."""
        B, pos = ids.size(0), cache.pos
        nh, hs = self.n_head, self.head_size
        C = nh * hs
        linear = torch.ops.mkldnn._linear_pointwise
        pos_emb = self.wpe[pos] if position_ids is None else self.wpe[position_ids[:, 0]]
        x = (self.wte[ids[:, 0]] + pos_emb).to(self.dtype)  # (B, C)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, pos+1)
        for i, (ln1, qkv, proj, ln2, fc, fc_proj) in enumerate(self.layers):
            h = F.layer_norm(x, (C,), *ln1)
            q, k, v = linear(h, *qkv, "none", [], "").view(B, 3, nh, 1, hs).unbind(1)
            k_cache, v_cache = cache.k[i], cache.v[i]  # (B, nh, max_len, hs)
            k_cache[:, :, pos : pos + 1] = k
            v_cache[:, :, pos : pos + 1] = v
            y = F.scaled_dot_product_attention(
                q, k_cache[:, :, : pos + 1], v_cache[:, :, : pos + 1], attn_mask=attn_mask
            )
            x = torch.ops.mkldnn._linear_pointwise.binary(y.reshape(B, C), x, *proj, "add")
            h = F.layer_norm(x, (C,), *ln2)
            u = linear(h, *fc, "gelu", [], "tanh")
            x = torch.ops.mkldnn._linear_pointwise.binary(u, x, *fc_proj, "add")
        cache.pos = pos + 1
        h = F.layer_norm(x, (C,), *self.ln_f)
        return linear(h, self.head, None, "none", [], "").float()


def decode_step(model: nn.Module, rows: int) -> DecodeStep | None:
    """The flat decoding step of a GPT in eval mode on a CPU where oneDNN multiplies its dtype,
    else None. Kept per model and row count while the weights stay as they were (the packing is
    not repeated for each generation). Not for use under autocast (`gpt2lab.generate` checks)."""
    if not isinstance(model, GPT) or type(model.lm_head) is not LMHead:
        return None
    param = model.lm_head.weight
    if param.device.type != "cpu" or not onednn_can_multiply(param.dtype) or model.training:
        return None
    steps = _STEPS.setdefault(model, {})
    step = steps.get((rows, param.dtype))
    if step is None or not step.current(model):
        try:
            step = steps[(rows, param.dtype)] = DecodeStep(model, rows, param.dtype)
        except RuntimeError:  # oneDNN has no kernel for this CPU after all
            return None
    return step


_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _versions(model: nn.Module) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in model.parameters())
