"""The GPT-2 decoder (Radford et al. 2019), top to bottom: attention, MLP, block, model, KV cache.

Parameter names are GPT-2's checkpoint keys, so Hugging Face weights load without renaming (the
Conv1D transpose happens in `gpt2lab.checkpoint.hf`). No I/O and no printing here.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2lab.config import GPTConfig
from gpt2lab.errors import ConfigError


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, one fused q/k/v projection, through SDPA kernels."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: Tensor, kv: tuple[Tensor, Tensor, int] | None, mask: Tensor | None
    ) -> Tensor:
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        packed = kv is not None and _packable(x)  # decoding on a CPU: oneDNN-packed weights
        q, k, v = (_packed_linear(self.c_attn, x, B) if packed else self.c_attn(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if kv is not None:  # write this step's keys/values into the preallocated cache, read all
            k_cache, v_cache, pos = kv
            k_cache[:, :, pos : pos + T] = k
            v_cache[:, :, pos : pos + T] = v
            k, v = k_cache[:, :, : pos + T], v_cache[:, :, : pos + T]
        # no mask: T > 1 tokens from position 0 (plain causal), or one new token (sees everything)
        causal = mask is None and T > 1
        dropout_p = self.dropout if self.training else 0.0
        if causal and kv is None and not dropout_p and _explicit_attention_is_faster(q):
            y = _causal_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(_packed_linear(self.c_proj, y, B) if packed else self.c_proj(y))


def _explicit_attention_is_faster(q: Tensor) -> bool:
    # Training on a CPU at short contexts: SDPA's flash kernel has a slow backward there; the
    # explicit softmax(QK^T)V ran 2.3x faster forward+backward (bf16, T=128, 2 cores, torch 2.13).
    return q.device.type == "cpu" and q.requires_grad and q.size(-2) <= 256


# packed weights by module, kept off the modules: oneDNN tensors can be neither copied nor pickled
_PACKED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Tensor]] = weakref.WeakKeyDictionary()
# cleared on the first oneDNN refusal (a CPU or build it does not support): F.linear from then on
_ONEDNN_LINEAR_WORKS = torch.backends.mkldnn.is_available()


def _packable(x: Tensor) -> bool:
    """Whether `_packed_linear` may run on `x`: no gradients, a oneDNN CPU, and a float32 or
    bfloat16 product (bfloat16 only where oneDNN has it; autocast's dtype where it is on)."""
    if x.device.type != "cpu" or not _ONEDNN_LINEAR_WORKS:
        return False
    dtype = _compute_dtype(x)
    bf16 = dtype == torch.bfloat16 and _onednn_has_bfloat16()
    return not torch.is_grad_enabled() and (dtype == torch.float32 or bf16)


@functools.cache
def _onednn_has_bfloat16() -> bool:  # asked once: `_packable` runs for every layer of every step
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _compute_dtype(x: Tensor) -> torch.dtype:
    # what `F.linear(x, ...)` would multiply in: autocast casts input and weight to its dtype
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def _packed_linear(lin: nn.Linear, x: Tensor, rows: int, weight: Tensor | None = None) -> Tensor:
    """`lin(x)` (or `x @ weight.T`) through a copy of the weight that oneDNN packed for `rows` rows.

    Decoding multiplies a few rows by each matrix, which `F.linear` does at a third of the memory
    bandwidth on this CPU; the packed copy runs 2-2.5x faster at 1 and 8 rows (bf16 bit-equal,
    float32 within 1e-6). It costs the weight's size in memory and is remade whenever the weight
    changes (in-place updates bump its version) or `rows` does. Under CPU autocast it computes in
    autocast's dtype, as `F.linear` would: oneDNN refuses operands of two dtypes.
    """
    w, b = (lin.weight, lin.bias) if weight is None else (weight, None)
    dtype = _compute_dtype(x)
    key = (w.data_ptr(), w._version, w.shape, w.dtype, dtype, rows)
    cached = _PACKED.get(lin)
    try:
        if cached is None or cached[0] != key:
            cached = _PACKED[lin] = (key, _onednn_pack(w.detach().to(dtype), rows))
        return _onednn_linear(x.to(dtype), cached[1], None if b is None else b.to(dtype))
    except RuntimeError:  # oneDNN has no kernel for this CPU or dtype: the plain path, for good
        global _ONEDNN_LINEAR_WORKS
        _ONEDNN_LINEAR_WORKS = False
        _PACKED.pop(lin, None)
        return F.linear(x, w, b)


def _onednn_pack(w: Tensor, rows: int) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, rows)


def _onednn_linear(x: Tensor, packed: Tensor, b: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


def _causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(hs) + causal mask) v written out: the function of SDPA's causal path."""
    T = q.size(-2)
    # scaling q (T x hs) and adding a -inf mask is cheaper than scaling and filling T x T scores
    future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    att = (q * (1.0 / math.sqrt(q.size(-1)))) @ k.transpose(-2, -1) + future  # (B, nh, T, T)
    return att.softmax(dim=-1) @ v


class MLP(nn.Module):
    """Position-wise 4x feed-forward with tanh-approximated GELU (GPT-2's `gelu_new`)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, packed: bool = False) -> Tensor:
        if packed:  # decoding on a CPU: see `_packed_linear`
            h = F.gelu(_packed_linear(self.c_fc, x, x.size(0)), approximate="tanh")
            return self.dropout(_packed_linear(self.c_proj, h, x.size(0)))
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2 moved the LayerNorms to each sub-block's input)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd, bias=cfg.bias), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.n_embd, bias=cfg.bias), MLP(cfg)

    def forward(
        self, x: Tensor, kv: tuple[Tensor, Tensor, int] | None = None, mask: Tensor | None = None
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv, mask)  # pre-norm residual, as in GPT-2
        return x + self.mlp(self.ln_2(x), packed=kv is not None and _packable(x))


class GPT(nn.Module):
    """GPT-2: token + position embeddings, n_layer blocks, final LayerNorm, head tied to `wte`."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying (Press & Wolf 2017)
        pad = torch.zeros(cfg.padded_vocab_size)
        pad[cfg.vocab_size :] = float("-inf")
        self.register_buffer("vocab_pad", pad, persistent=False)  # a bias masking the padding
        self.apply(self._init_weights)
        # residual projections get std 0.02/sqrt(2*n_layer): two residual adds per block (sec. 2.3)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        with torch.no_grad():  # padding rows are never looked up nor shown; keep them inert
            self.transformer.wte.weight[cfg.vocab_size :].zero_()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab_size) as float, and mean cross-entropy over targets != -1.

        With `cache`, `idx` holds the T tokens after the `cache.pos` already stored; their keys
        and values are written at [pos, pos+T) and `cache.pos` advances. `attention_mask`
        (B, pos+T) marks real tokens 1 and left padding 0; without `position_ids` each row's
        positions then count real tokens only, so a left-padded row matches its unpadded self.
        `last_only=True` (no targets) returns the last position's logits only, (B, 1, V).
        """
        B, T = idx.shape
        pos = cache.pos if cache is not None else 0
        if cache is not None and (B != cache.batch_size or pos + T > cache.max_len):
            raise ConfigError(
                f"KV cache holds batch {cache.batch_size} x {cache.max_len} tokens, "
                f"got batch {B} with {pos}+{T} tokens",
                "a cache as large as the batch and the whole sequence",
                "make a KVCache with a larger max_len (at most block_size)",
            )
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, pos + T):
                raise ConfigError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}",
                    f"(batch, cached + new tokens) = ({B}, {pos + T})",
                    "pass the mask of every token so far, cached ones included",
                )
            keep = attention_mask.to(device=idx.device, dtype=torch.bool)  # (B, pos+T)
            if position_ids is None:  # positions count real tokens, as if the padding weren't there
                position_ids = (keep.long().cumsum(-1) - 1).clamp_(min=0)[:, pos:]
            mask = keep[:, None, None, :]  # (B, 1, 1, pos+T): padded keys are never attended to
            if T > 1:
                mask = mask & _causal(T, pos, idx.device)
                # a padded query sees only itself, so no row is empty (that gives NaN in SDPA)
                own = (
                    torch.arange(pos + T, device=idx.device)
                    == pos + torch.arange(T, device=idx.device)[:, None]
                )
                mask = mask | own
        elif cache is not None and pos > 0 and T > 1:
            mask = _causal(T, pos, idx.device)
        if position_ids is None:
            if pos + T > self.config.block_size:
                raise ConfigError(
                    f"sequence of {pos + T} tokens is longer than block_size="
                    f"{self.config.block_size}",
                    "at most block_size tokens (the position table's size)",
                    "crop the input to its last block_size tokens",
                )
            pos_emb = self.transformer.wpe.weight[pos : pos + T]  # (T, C), broadcast over B
        else:
            pos_emb = self.transformer.wpe(position_ids)  # (B, T, C)
        x = self.transformer.drop(self.transformer.wte(idx) + pos_emb)
        for i, block in enumerate(self.transformer.h):
            x = block(x, (cache.k[i], cache.v[i], pos) if cache is not None else None, mask)
        if cache is not None:
            cache.pos = pos + T
        x = self.transformer.ln_f(x)
        if targets is None and last_only:
            x = x[:, -1:, :]
        if not torch.is_grad_enabled() and x.shape[0] * x.shape[1] <= 16:
            logits = self._decode_logits(x)
        elif self.config.padded_vocab_size > self.config.vocab_size:
            # padding columns come out -inf: softmax and loss give them nothing, and no slice
            # copies the logits (or, backwards, their gradient)
            logits = F.linear(x, self.lm_head.weight, self.vocab_pad).float()
        else:
            logits = self.lm_head(x).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
        return logits[..., : self.config.vocab_size], loss  # the padding is never visible

    def _decode_logits(self, x: Tensor) -> Tensor:
        """Logits of a few positions through a cached copy of the head's real rows: packed by
        oneDNN on a CPU (`_packed_linear`, 2-2.5x faster), else transposed to (C, vocab_size),
        which a matrix-vector product streams ~1.6x faster (issue 7). The copy is remade whenever
        the weight changes (in-place updates bump its version)."""
        w = self.lm_head.weight
        if _packable(x):
            rows = x.shape[0] * x.shape[1]
            head = w[: self.config.vocab_size]
            y = _packed_linear(self.lm_head, x.reshape(rows, -1), rows, head)
            return y.view(*x.shape[:2], -1).float()
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        cached = self.__dict__.get("_head_t")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_head_t"] = (key, w[: self.config.vocab_size].t().contiguous())
        return (x @ cached[1]).float()

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """The prompt followed by the new ids, KV-cached; temperature=0 is greedy.

        Other options (repetition_penalty, generator, attention_mask, eos_token_id) are those
        of `gpt2lab.generate.generate`.
        """
        from gpt2lab.generate import generate

        return generate(self, idx, max_new_tokens, temperature, top_k, top_p, **kwargs)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, tied head counted once, vocabulary padding left out (`gpt2`: 124,439,808)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields the tied weight once
        n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        if non_embedding:
            n -= self.config.vocab_size * self.config.n_embd + self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token: 6N + 12*L*C*T (PaLM paper, app. B)."""
        cfg = self.config
        T = seq_len or cfg.block_size
        n = self.num_params() - self.transformer.wpe.weight.numel()  # a lookup, not a matmul
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * T

    def estimate_memory(
        self,
        batch: int,
        seq: int | None = None,
        dtype: torch.dtype | str = torch.float32,
        optimizer: str = "adamw",
    ) -> MemoryEstimate:
        """Bytes one training step needs at its peak, by kind (`str()` gives GiB).

        Parameters, gradients and optimizer state are float32 (autocast keeps master weights);
        `dtype` is the compute dtype. Activations count what autograd saves, per layer, token
        and channel: the two LayerNorm inputs on the float32 residual stream plus 14 values in
        `dtype` (LN outputs, q/k/v, attention output, 4x MLP input and GELU output), as the
        fused SDPA kernels keep no T x T scores. With dropout, SDPA on the CPU uses its math
        kernel (float32 q/k/v, three T x T tensors per head) and each dropout keeps a mask;
        without, contexts up to 256 keep one T x T softmax per head (the CPU training path).
        Then the final LayerNorm, the float32 log-softmax and autocast's `dtype` weight copies.
        `logits`, a part of `activations`, is the float32 logits the caller holds and their
        gradient.
        """
        cfg = self.config
        T = seq or cfg.block_size
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        w = torch.empty((), dtype=dtype).element_size()
        n = sum(p.numel() for p in self.parameters())
        states = {"adamw": 2, "adam": 2, "muon": 2, "sgd": 1, "none": 0}  # muon: at most 2
        if optimizer not in states:
            raise ConfigError(
                f"unknown optimizer {optimizer!r}", f"one of {', '.join(states)}", "fix the name"
            )
        B, C, L, V = batch, cfg.n_embd, cfg.n_layer, cfg.padded_vocab_size
        if cfg.dropout > 0:
            per_layer = B * T * C * (20 + 13 * w) + B * cfg.n_head * T * T * 12
            acts = L * per_layer + B * T * C * 4  # plus the embedding dropout's mask
        else:
            acts = L * B * T * C * (8 + 14 * w)
            if T <= 256:  # the explicit CPU training attention keeps its softmax (T x T per head)
                acts += L * B * cfg.n_head * T * T * w
        acts += B * T * C * (4 + w) + B * T * V * 4  # final LayerNorm, log-softmax
        acts += n * w if w < 4 else 0  # autocast's low-precision weight copies
        logits = B * T * V * 8
        return MemoryEstimate(4 * n, 4 * n, 4 * n * states[optimizer], acts + logits, logits)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: Any = None, dtype: torch.dtype | None = None
    ) -> GPT:
        """A HF GPT-2 directory or hub name (local cache), a gpt2lab run or checkpoint directory."""
        from gpt2lab.checkpoint.load import load_model

        return load_model(path, device=device, dtype=dtype)[0]

    def save_pretrained(self, path: str | Path, tokenizer: Any = None) -> None:
        """Write a Hugging Face GPT-2 directory that `transformers` loads as it is.

        The tokenizer defaults to the one loaded with the model, else GPT-2's for 50257 tokens.
        """
        from gpt2lab.checkpoint.hf import save_hf

        save_hf(self, path, tokenizer=tokenizer)


def _causal(T: int, pos: int, device: torch.device) -> Tensor:
    """(T, pos+T) bool: query i (at position pos+i) may see keys 0..pos+i."""
    return torch.ones(T, pos + T, dtype=torch.bool, device=device).tril_(diagonal=pos)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per training step, by kind (see `GPT.estimate_memory`)."""

    params: int
    grads: int
    optimizer: int
    activations: int  # everything that grows with batch x seq, logits included
    logits: int  # of which: the float32 logits and their gradient

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    def __str__(self) -> str:
        parts = [f"{k} {getattr(self, k) / 2**30:.2f}" for k in self.__dataclass_fields__]
        return f"{self.total / 2**30:.2f} GiB (" + ", ".join(parts) + ")"


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    `k`, `v`: (n_layer, B, n_head, max_len, head_size). `pos` is the number of tokens stored;
    each cached forward writes at [pos, pos+T) and advances it. `reset()` starts over.
    """

    def __init__(
        self,
        cfg: GPTConfig,
        batch_size: int,
        max_len: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.batch_size, self.max_len = batch_size, max_len or cfg.block_size
        shape = (cfg.n_layer, batch_size, cfg.n_head, self.max_len, cfg.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype or torch.float32)
        self.v = torch.zeros_like(self.k)
        self.pos = 0

    def reset(self) -> None:
        """Forget the stored tokens (the memory is kept and overwritten)."""
        self.pos = 0
