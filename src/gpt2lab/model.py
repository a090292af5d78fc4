"""The GPT-2 decoder (Radford et al. 2019), top to bottom: attention, MLP, block, model, KV cache.

Parameter names are GPT-2's checkpoint keys, so Hugging Face weights load without renaming (the
Conv1D transpose happens in `gpt2lab.checkpoint.hf`). No I/O, no printing and no hardware-specific
kernels here: loading and saving live in `gpt2lab.checkpoint`, sampling in `gpt2lab.generate` (which
also applies the CPU decoding kernels of `gpt2lab.kernels`), and `gpt2lab/__init__.py` attaches them
as `GPT.from_pretrained`, `GPT.save_pretrained` and `GPT.generate`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2lab.config import GPTConfig
from gpt2lab.errors import ConfigError


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    explicit: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """softmax(q k^T / sqrt(hs) + mask) v for (B, nh, T, hs) queries over (B, nh, S, hs) keys.

    `mask` (bool, True = may attend) broadcasts to (B, nh, T, S); without one, T > 1 queries are
    plain causal from position 0 and a single query sees every key. SDPA's fused kernels never
    materialise the T x S probabilities; `explicit=True` writes the same function out and also
    returns them, (B, nh, T, S).
    """
    causal = mask is None and q.size(-2) > 1
    if not explicit:
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal
        )
        return y, None
    # scaling q (T x hs) is cheaper than scaling the T x S scores
    scores = (q * (1.0 / math.sqrt(q.size(-1)))) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif causal:  # adding a -inf upper triangle is cheaper than filling the scores
        T = q.size(-2)
        scores = scores + torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    probs = scores.softmax(dim=-1)
    return (F.dropout(probs, dropout_p) if dropout_p else probs) @ v, probs


def explicit_attention_is_faster(q: Tensor) -> bool:
    """Training in bfloat16 on a CPU at short contexts: SDPA's CPU flash kernel has a slow
    bfloat16 backward there, and the explicit path (whose T x T probabilities fit in cache) is
    faster; in float32 SDPA is the faster one (see docs/model.md)."""
    short = q.size(-2) <= 256
    return q.device.type == "cpu" and q.requires_grad and q.dtype != torch.float32 and short


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        kv: tuple[Tensor, Tensor, int] | None = None,
        mask: Tensor | None = None,
        probs_out: list[Tensor] | None = None,
    ) -> Tensor:
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if kv is not None:  # write this step's keys/values into the preallocated cache, read all
            k_cache, v_cache, pos = kv
            k_cache[:, :, pos : pos + T] = k
            v_cache[:, :, pos : pos + T] = v
            k, v = k_cache[:, :, : pos + T], v_cache[:, :, : pos + T]
        dropout_p = self.dropout if self.training else 0.0
        explicit = probs_out is not None or (
            kv is None and mask is None and not dropout_p and explicit_attention_is_faster(q)
        )
        y, probs = attention(q, k, v, mask, dropout_p, explicit)
        if probs_out is not None:
            probs_out.append(probs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise 4x feed-forward with tanh-approximated GELU (GPT-2's `gelu_new`)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")  # a module, so a faster kernel can stand in
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2 moved the LayerNorms to each sub-block's input)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd, bias=cfg.bias), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.n_embd, bias=cfg.bias), MLP(cfg)

    def forward(
        self,
        x: Tensor,
        kv: tuple[Tensor, Tensor, int] | None = None,
        mask: Tensor | None = None,
        probs_out: list[Tensor] | None = None,
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv, mask, probs_out)  # pre-norm residual, as in GPT-2
        return x + self.mlp(self.ln_2(x))


class LMHead(nn.Linear):
    """The output projection (tied to `wte` by GPT). Columns past `vocab_size` (a vocabulary padded
    to a multiple for faster matmuls) get a -inf bias: softmax and loss give them nothing, and
    no slice copies the logits (or, backwards, their gradient)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        pad = torch.zeros(cfg.padded_vocab_size)
        pad[cfg.vocab_size :] = float("-inf")
        self.register_buffer("vocab_pad", pad, persistent=False)
        self.padded = cfg.padded_vocab_size > cfg.vocab_size

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.vocab_pad if self.padded else None)


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
        self.lm_head = LMHead(cfg)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying (Press & Wolf 2017)
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
        logits_to_keep: int | None = None,
        attentions: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab_size) as float, and mean cross-entropy over targets != -1.

        With `cache`, `idx` holds the T tokens after the `cache.pos` already stored; their keys
        and values are written at [pos, pos+T) and `cache.pos` advances. `attention_mask`
        (B, pos+T) marks real tokens 1 and left padding 0; without `position_ids` each row's
        positions then count real tokens only, so a left-padded row matches its unpadded self.
        A 3-D bool `attention_mask` (B, T, pos+T) says which keys each query sees (e.g. block-
        diagonal for packed sequences; pass their `position_ids` too).
        Without targets, `logits_to_keep=n` computes the logits of the last n positions only,
        (B, n, V), and `last_only=True` is `logits_to_keep=1`. A list passed as `attentions`
        receives each layer's attention probabilities, (B, n_head, T, pos+T), in layer order.
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
        if attention_mask is not None and attention_mask.dim() == 3:  # packed rows (see docstring)
            mask = attention_mask.to(device=idx.device, dtype=torch.bool)[:, None]
        elif attention_mask is not None:
            if tuple(attention_mask.shape) != (B, pos + T):
                raise ConfigError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}",
                    f"(batch, cached + new tokens) = ({B}, {pos + T})",
                    "pass the mask of every token so far, cached ones included",
                )
            keep = attention_mask.to(device=idx.device, dtype=torch.bool)  # (B, pos+T)
            if position_ids is None:  # positions count real tokens, as if the padding weren't there
                position_ids = (keep.long().cumsum(-1) - 1).clamp_(min=0)[:, pos:]
            mask = padding_mask(keep, T, pos)
        elif pos > 0 and T > 1:  # new tokens after cached ones: causal, offset by pos
            mask = causal_mask(T, pos, idx.device)
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
            kv = (cache.k[i], cache.v[i], pos) if cache is not None else None
            x = block(x, kv, mask, attentions)
        if cache is not None:
            cache.pos = pos + T
        x = self.transformer.ln_f(x)
        if targets is None and (last_only or logits_to_keep):
            # contiguous, or matmul copies the head per row for weights that need no grad
            x = x[:, -(logits_to_keep or 1) :, :].contiguous()
        return self.logits_and_loss(x, targets)

    def logits_and_loss(self, x: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Float logits of the final hidden states `x`; with targets, their mean cross-entropy."""
        logits = self.lm_head(x).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
        return logits[..., : self.config.vocab_size], loss  # the padding is never visible

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, tied head counted once, vocabulary padding left out (`gpt2`: 124,439,808)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields the tied weight once
        n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        if non_embedding:
            n -= self.config.vocab_size * self.config.n_embd + self.transformer.wpe.weight.numel()
        return n


def causal_mask(T: int, pos: int, device: torch.device) -> Tensor:
    """(T, pos+T) bool: query i (at position pos+i) may see keys 0..pos+i."""
    return torch.ones(T, pos + T, dtype=torch.bool, device=device).tril_(diagonal=pos)


def padding_mask(keep: Tensor, T: int, pos: int) -> Tensor:
    """(B, 1, T, pos+T) bool for T queries after `pos` cached tokens; `keep` (B, pos+T) marks
    real tokens. Padded keys are never attended to; a padded query sees only itself, so no row
    is empty (an empty row gives NaN)."""
    mask = keep[:, None, None, :]
    if T == 1:  # one new token sees everything real before it
        return mask
    keys, queries = torch.arange(pos + T, device=keep.device), torch.arange(T, device=keep.device)
    own = keys == pos + queries[:, None]
    return (mask & causal_mask(T, pos, keep.device)) | own


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
        device: torch.device | str | None = None,
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
