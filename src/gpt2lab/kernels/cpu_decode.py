"""Faster decoding on a CPU: linear layers whose weights oneDNN reordered for a few rows.

Decoding multiplies a few rows (one per sequence) by every weight matrix, which `F.linear` does
at a fraction of the memory bandwidth on x86 CPUs; a weight that oneDNN reordered once for that row
count streams 2-2.5x faster (bfloat16 bit-equal to `F.linear`, float32 within 1e-6; figures in
docs/sample.md). `DecodeKernels` builds the packed copies for a model and swaps them in for the
length of one forward call (`with kernels.applied(): model(...)`), then puts the model's own modules
back, so the model is never left changed. `gpt2lab.generate` applies them; `model.py` does not know
they exist. Where oneDNN is missing or refuses, the head alone gets a transposed copy, which a
matrix-vector product streams faster than the (vocab, C) original. A float16 model, which oneDNN
does not multiply here, gets `WidenedLinear`s: float32 products of its widened weights.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2lab.kernels.gelu import fast_gelu
from gpt2lab.kernels.int8 import Int8Linear
from gpt2lab.kernels.native import MAX_ROWS, NativeStep, native_step
from gpt2lab.model import GPT, KVCache, LMHead


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype `F.linear(x, ...)` multiplies in: autocast's where it is on, else x's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


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


# Widening a matrix costs about as much as multiplying ~6 rows by it in float16 (768 x 3072:
# 0.56 ms; a float16 row 0.12 ms, a float32 one 0.03), so fewer rows (the head's last
# position) keep the float16 product
WIDEN_FROM_ROWS = 8


class WidenedLinear(nn.Module):
    """A float16 linear layer for CPUs where oneDNN has no float16 product (most: it needs
    AVX512-FP16 or AVX-NE-CONVERT), where PyTorch's own float16 product is ~4x slower than a
    float32 one: the weights widened to float32 for the call (exact), the product in float32,
    rounded to float16 once, as PyTorch's float16 product rounds its float32 sums. With
    gradients on, the plain layer."""

    def __init__(self, linear: nn.Linear, out_features: int | None = None) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.out_features = out_features or linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight[: self.out_features]
        b = None if self.bias is None else self.bias[: self.out_features]
        if torch.is_grad_enabled() or x.numel() < WIDEN_FROM_ROWS * x.size(-1):
            return F.linear(x, w, b)
        return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)


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
        # whether the stand-ins cost nothing to make (no packing to pay back over a generation)
        self.free = not onednn_can_multiply(dtype) and dtype == torch.float16
        if onednn_can_multiply(dtype):
            self._add_linears(model, functools.partial(PackedLinear, rows=rows))
        elif self.free:
            self._add_linears(model, WidenedLinear)
        else:
            self._add(model, "lm_head", TransposedHead(model.lm_head, vocab))

    def _add_linears(self, model: GPT, stand_in: Callable[..., nn.Module]) -> None:
        """`stand_in(linear)` for every block's linear layers, `stand_in(head, out_features=
        vocab_size)` for the head."""
        for block in model.transformer.h:
            for parent, name in _linears(block):
                self._add(parent, name, stand_in(getattr(parent, name)))
        head = stand_in(model.lm_head, out_features=model.config.vocab_size)
        self._add(model, "lm_head", head)

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


class RowsView(KVCache):
    """A KVCache over rows [start, stop) of a larger one, sharing its memory; `pos` is the
    cache's unless given."""

    def __init__(self, cache: KVCache, start: int, stop: int, pos: int | None = None) -> None:
        self.k, self.v = cache.k[:, start:stop], cache.v[:, start:stop]
        self.pos = cache.pos if pos is None else pos
        self.batch_size, self.max_len = self.k.size(1), self.k.size(3)


# From this many cached positions on, more rows than the C step takes go through it in chunks
# of its rows: each chunk reads the weights again, but SDPA's attention for one query a row is
# slow over a long cache (124M bf16, 32 rows at 512 positions: 201 ms a step through PyTorch,
# 2 x 47 ms in chunks of 16; at 128 positions 68.5 against 2 x 33; at 16, 42 against 2 x 29)
CHUNKS_FROM_POS = 128
MAX_CHUNKED_ROWS = 4 * MAX_ROWS


class DecodeStep:
    """One new token per row through a GPT on a CPU, the model's cached forward written flat.

    `step(ids, cache, position_ids, mask)` equals `model(ids, cache=cache, attention_mask=mask,
    position_ids=position_ids, last_only=True)[0][:, -1]` for ids (B, 1) (tested): the same
    KVCache, written in place at `cache.pos`, the same left-padding rules. What it saves, per
    token: the modules' calls and the views between them (about 30 operations a layer become
    10). A float model's products are oneDNN's, on weights packed once for `rows` rows, with the
    bias, the GELU and the residual add fused into them; an int8 model's (`gpt2lab.quantize`)
    are fbgemm's where its `Int8Linear`s are packed (`compact=False`, or no C step), else each
    layer's own product (`torch._int_mm`, one scale per input row). `versions` tells
    whether the packed weights still match the model's (in-place updates bump their versions).
    """

    def __init__(
        self, model: GPT, rows: int, dtype: torch.dtype, native: NativeStep | None = None
    ) -> None:
        self.rows, self.dtype = rows, dtype
        cfg = model.config
        self.n_head, self.head_size, self.vocab = cfg.n_head, cfg.head_size, cfg.vocab_size
        self.int8 = isinstance(model.lm_head, Int8Linear)

        self.wte, self.wpe = model.transformer.wte, model.transformer.wpe.weight
        # the same step in C, one call a token (kernels/native.py), for up to MAX_ROWS rows; the
        # packed weights below are then made only if a step needs them (more rows than it takes)
        # (`native`: another row count's C step on the same weights, shared, not built again)
        self.native = (native or native_step(model, dtype)) if rows <= MAX_ROWS else None
        # more rows, up to a few chunks' worth: the C step in chunks, where they are as large
        # as for int8 and half precision (not float32's 4 rows); not for scoring's row counts
        self.chunked = None
        if (
            self.native is None
            and rows <= MAX_CHUNKED_ROWS
            and (self.int8 or dtype != torch.float32)
        ):
            self.chunked = native or native_step(model, dtype)
        self.versions = _versions(model)  # after native_step, which may move the weights
        self.model = weakref.ref(model)
        self.layers: list[tuple] | None = None
        # float16: no oneDNN product on most CPUs, so the C step or else the model's own forward
        self.packs = self.int8 or onednn_can_multiply(dtype)
        if self.native is None and self.packs:
            self._pack(model)

    def _pack(self, model: GPT) -> None:
        """The products' weights: oneDNN-packed for `rows` rows (float), or fbgemm's (int8)."""
        dtype = self.dtype

        def mat(m: nn.Module, rows_out: int | None = None) -> tuple:
            if self.int8:  # fbgemm's packed weight (bias inside), and 7-bit inputs where needed
                return (m.packed, m.reduce_range) if m.packed is not None else (None, m)
            w = m.weight.detach()[:rows_out].to(dtype)
            b = None if m.bias is None else m.bias.detach().to(dtype)
            return (torch.ops.mkldnn._reorder_linear_weight(w, self.rows), b)

        def norm(ln: nn.LayerNorm) -> tuple:
            b = None if ln.bias is None else ln.bias.detach().to(dtype)
            return (ln.weight.detach().to(dtype), b, ln.eps)

        layers = []
        for block in model.transformer.h:
            attn, mlp = block.attn, block.mlp
            layers.append(
                (
                    norm(block.ln_1),
                    *(mat(m) for m in (attn.c_attn, attn.c_proj)),
                    norm(block.ln_2),
                    *(mat(m) for m in (mlp.c_fc, mlp.c_proj)),
                )
            )
        self.ln_f = norm(model.transformer.ln_f)
        self.head = mat(model.lm_head, self.vocab)
        self.layers = layers

    def _packed_layers(self) -> list[tuple]:
        if self.layers is None:
            self._pack(self.model())
        return self.layers

    def _mm(self, x: Tensor, w: tuple, gelu: bool = False) -> Tensor:
        if self.int8:  # fbgemm, or an unpacked layer's own product (torch._int_mm)
            y = torch.ops.quantized.linear_dynamic(x, *w) if w[0] is not None else w[1](x)
            return fast_gelu(y) if gelu else y
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, *w, "gelu", [], "tanh")
        return torch.ops.mkldnn._linear_pointwise(x, *w, "none", [], "")

    def _mm_add(self, x: Tensor, w: tuple, residual: Tensor) -> Tensor:
        if self.int8:
            return self._mm(x, w).add_(residual)
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, *w, "add")

    @torch.no_grad()
    def step(
        self,
        ids: Tensor,
        cache: KVCache,
        position_ids: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, vocab_size), float32, of one new token per row; advances `cache.pos`."""
        if self.native and self.native.fits(cache, mask):
            return self.native.step(ids, cache, position_ids, mask)
        # float16 has no packed product to fall back on: chunks whatever the cache's length
        if self.chunked and (cache.pos >= CHUNKS_FROM_POS or not self.packs):
            logits = self._in_chunks(self.chunked, ids, cache, position_ids, mask)
            if logits is not None:
                return logits
        if not self.packs:
            out = self.model()(
                ids, cache=cache, attention_mask=mask, position_ids=position_ids, last_only=True
            )
            return out[0][:, -1].float()
        B, pos = ids.size(0), cache.pos
        nh, hs = self.n_head, self.head_size
        C = nh * hs
        pos_emb = self.wpe[pos] if position_ids is None else self.wpe[position_ids[:, 0]]
        tok_emb = self.wte(ids[:, 0]) if self.int8 else self.wte.weight[ids[:, 0]]
        x = (tok_emb + pos_emb).to(self.dtype)  # (B, C)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, pos+1)
        for i, (ln1, qkv, proj, ln2, fc, fc_proj) in enumerate(self._packed_layers()):
            h = F.layer_norm(x, (C,), *ln1)
            q, k, v = self._mm(h, qkv).view(B, 3, nh, 1, hs).unbind(1)
            k_cache, v_cache = cache.k[i], cache.v[i]  # (B, nh, max_len, hs)
            k_cache[:, :, pos : pos + 1] = k
            v_cache[:, :, pos : pos + 1] = v
            y = F.scaled_dot_product_attention(
                q, k_cache[:, :, : pos + 1], v_cache[:, :, : pos + 1], attn_mask=attn_mask
            )
            x = self._mm_add(y.reshape(B, C), proj, x)
            u = self._mm(F.layer_norm(x, (C,), *ln2), fc, gelu=True)
            x = self._mm_add(u, fc_proj, x)
        cache.pos = pos + 1
        return self._mm(F.layer_norm(x, (C,), *self.ln_f), self.head).float()

    @staticmethod
    def _in_chunks(
        native: NativeStep,
        ids: Tensor,
        cache: KVCache,
        position_ids: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor | None:
        """`step` through the C step, `native.max_rows` rows at a time, or None where a chunk
        does not fit it."""
        n = native.max_rows
        chunks = [
            (
                ids[i : i + n],
                RowsView(cache, i, i + n),
                None if position_ids is None else position_ids[i : i + n],
                None if mask is None else mask[i : i + n],
            )
            for i in range(0, ids.size(0), n)
        ]
        if not all(native.fits(rows, m) for _, rows, _, m in chunks):
            return None
        logits = torch.cat([native.step(*chunk) for chunk in chunks])
        cache.pos += 1
        return logits

    @torch.no_grad()
    def score(
        self,
        ids: Tensor,
        keep: int | None = None,
        cache: KVCache | None = None,
        out_dtype: torch.dtype | None = torch.float32,
    ) -> Tensor:
        """Logits (B, keep, vocab_size), float32, of the last `keep` positions (default all) of
        `ids` (B, T), no padding: `model(ids, cache=cache, logits_to_keep=keep)[0]` (tested).
        `out_dtype=None` leaves them in the compute dtype: scoring converts a few rows at a time
        instead of writing a float32 copy of every window's (keep, vocab) logits.
        For scoring and evaluation (whole windows, no cache) and for a shared context followed
        by candidates (with a cache of this step's dtype, written in place at `cache.pos`). The
        same fused products: the GELU, the biases and the residual adds cost no pass of their
        own over memory, and the weights are converted to the compute dtype once, not per call.
        """
        B, T = ids.shape
        keep = keep or T
        if not self.packs:
            logits = self.model()(ids, cache=cache, logits_to_keep=keep)[0]
            return logits.to(out_dtype) if out_dtype is not None else logits
        nh, hs = self.n_head, self.head_size
        C = nh * hs
        pos = cache.pos if cache is not None else 0
        tok_emb = self.wte(ids) if self.int8 else self.wte.weight[ids]
        x = (tok_emb + self.wpe[pos : pos + T]).to(self.dtype).view(B * T, C)
        mask = None
        if pos > 0 and T > 1:  # new tokens after cached ones: causal, offset by pos
            mask = torch.ones(T, pos + T, dtype=torch.bool).tril_(diagonal=pos)
        for i, (ln1, qkv, proj, ln2, fc, fc_proj) in enumerate(self._packed_layers()):
            h = F.layer_norm(x, (C,), *ln1)
            q, k, v = self._mm(h, qkv).view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4).unbind(0)
            if cache is not None:
                cache.k[i][:, :, pos : pos + T] = k
                cache.v[i][:, :, pos : pos + T] = v
                k, v = cache.k[i][:, :, : pos + T], cache.v[i][:, :, : pos + T]
            if pos == 0 and T >= 256 and self.dtype == torch.bfloat16:
                y = causal_attention_in_blocks(q, k, v)
            else:
                causal = mask is None and pos == 0 and T > 1
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            x = self._mm_add(y.transpose(1, 2).reshape(B * T, C), proj, x)
            u = self._mm(F.layer_norm(x, (C,), *ln2), fc, gelu=True)
            x = self._mm_add(u, fc_proj, x)
        if cache is not None:
            cache.pos = pos + T
        x = x.view(B, T, C)[:, T - keep :].reshape(B * keep, C)
        logits = self._mm(F.layer_norm(x, (C,), *self.ln_f), self.head).view(B, keep, -1)
        return logits.to(out_dtype) if out_dtype is not None else logits


def causal_attention_in_blocks(q: Tensor, k: Tensor, v: Tensor, blocks: int = 4) -> Tensor:
    """Causal attention of (B, nh, T, hs) from position 0, written out a block of queries at a
    time: each block multiplies only the keys up to its own end, so the masked upper triangle is
    mostly never computed. For bfloat16 at long T on a CPU, where it beats SDPA's flash kernel
    (~30% on one thread at T=1024); equal to it within bfloat16 rounding (tested)."""
    T = q.size(-2)
    step = -(-T // blocks)
    q = q * (1.0 / math.sqrt(q.size(-1)))
    out = []
    for start in range(0, T, step):
        end = min(start + step, T)
        scores = q[:, :, start:end] @ k[:, :, :end].transpose(-2, -1)  # (B, nh, n, end)
        diagonal = torch.full((end - start, end - start), float("-inf"), dtype=q.dtype)
        scores[..., start:end] += diagonal.triu_(1)
        out.append(scores.softmax(-1) @ v[:, :, :end])
    return torch.cat(out, dim=2)


def decode_step(model: nn.Module, rows: int, dtype: torch.dtype | None = None) -> DecodeStep | None:
    """The flat decoding step of a GPT in eval mode on a CPU, else None: float models where
    oneDNN multiplies `dtype` (default: the weights'; another one computes in it, with weights
    converted once), float16 models up to MAX_CHUNKED_ROWS rows where the C step builds, and int8
    models (`gpt2lab.quantize`). Kept per
    model and row count while the weights stay as they were (the packing is not repeated for each
    generation). Not for use under autocast (`gpt2lab.generate` checks)."""
    if not isinstance(model, GPT) or model.training:
        return None
    if isinstance(model.lm_head, Int8Linear):
        if model.lm_head.scale.device.type != "cpu":
            return None
        dtype = torch.float32
    elif type(model.lm_head) is LMHead:
        dtype = dtype or model.lm_head.weight.dtype
        if model.lm_head.weight.device.type != "cpu":
            return None
    else:
        return None
    steps = _STEPS.setdefault(model, {})
    step = steps.get((rows, dtype))
    now = _versions(model)
    if step is None or step.versions != now:
        for key in [k for k, s in steps.items() if s.versions != now]:
            del steps[key]  # stale: built on weights the model no longer has
        # one C step per model and dtype serves every row count: each would hold the weights
        built = (s.native or s.chunked for (_, d), s in steps.items() if d == dtype)
        shared = next((n for n in built if n), None)
        try:
            step = DecodeStep(model, rows, dtype, shared)
        except RuntimeError:  # oneDNN has no kernel for this CPU after all
            return None
        if step.native is None and step.chunked is None and not step.packs:
            return None  # nothing to run but the model's own forward (float16 without the C step)
        steps[(rows, dtype)] = step
    return step


_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _versions(model: nn.Module) -> tuple:
    """What tells a kept DecodeStep that the weights changed: each tensor's storage and version
    counter, and a few of its values. The values are needed because fused optimizers (AdamW with
    fused=True, the trainer's default on a CPU) update parameters without bumping `_version`."""
    tensors = [*model.parameters(), *model.buffers()]
    return tuple((t.data_ptr(), t._version, _sample(t)) for t in tensors)


def _sample(t: Tensor) -> tuple:
    flat = t.detach().reshape(-1)
    return tuple(flat[:: max(1, flat.numel() // 8)].tolist()) if flat.numel() else ()
