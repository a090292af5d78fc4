"""Look inside a GPT on one prompt: attention maps, next-token choices, per-token surprise, the
logit lens and residual-stream norms. Each function returns tensors (float32, on the CPU) or
plain numbers; nothing prints and nothing is drawn (`gpt2lab inspect` draws them).

Attention comes from the model's own explicit attention path (`GPT.forward(attentions=[...])`),
not from a copy of it; the other views read the blocks' outputs through forward hooks, which are
removed before the function returns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from gpt2lab.errors import ConfigError, DataError, mark_key
from gpt2lab.model import GPT
from gpt2lab.tokenizer.base import piece_label

LN2 = math.log(2.0)


def as_ids(model: GPT, ids: Sequence[int] | Tensor) -> Tensor:
    """One prompt's ids as a (1, T) tensor on the model's device; one-line errors for an empty
    prompt or one longer than the model's context."""
    idx = torch.as_tensor(ids, dtype=torch.long).flatten()
    if idx.numel() == 0:
        raise DataError("the prompt is empty", "at least one token", "pass some text with -p")
    block = model.config.block_size
    if idx.numel() > block:
        raise DataError(
            f"the prompt has {idx.numel()} tokens, more than the model's context "
            f"(block_size={block})",
            f"at most {block} tokens",
            "shorten the prompt",
        )
    return idx[None].to(model.transformer.wte.weight.device)


def labels(tokenizer, ids: Sequence[int] | Tensor) -> list[str]:
    """Each token as the tokenizer shows it (visible spaces, byte pieces as `<e6 97>`)."""
    return [piece_label(tokenizer, int(i)) for i in torch.as_tensor(ids).flatten()]


@torch.no_grad()
def attention(model: GPT, ids: Sequence[int] | Tensor) -> Tensor:
    """Attention probabilities of every layer and head, float32 (n_layer, n_head, T, T):
    [layer, head, query, key], each query's row summing to 1 over keys 0..query."""
    probs: list[Tensor] = []
    model(as_ids(model, ids), attentions=probs)
    return torch.stack([p[0] for p in probs]).float().cpu()


def check_head(model: GPT, layer: int | None, head: int | None) -> None:
    """One-line errors for a layer or head the model does not have (or a head without a layer)."""
    cfg = model.config
    if head is not None and layer is None:
        raise ConfigError(
            f"{mark_key('head')} needs a layer", fix=f"add {mark_key('layer', 0)} as well"
        )
    if layer is not None and not 0 <= layer < cfg.n_layer:
        raise ConfigError(
            f"{mark_key('layer', layer)} is out of range",
            f"0 to {cfg.n_layer - 1} (the model has {cfg.n_layer} layers)",
        )
    if head is not None and not 0 <= head < cfg.n_head:
        raise ConfigError(
            f"{mark_key('head', head)} is out of range",
            f"0 to {cfg.n_head - 1} (each layer has {cfg.n_head} heads)",
        )


@dataclass
class HeadSummary:
    """What each head does, averaged over the queries that have a choice (position >= 1).

    mean: (n_layer, T, T) the heads' mean pattern; entropy: (n_layer, n_head) nats (0: one key);
    previous_token / first_token: (n_layer, n_head) mean probability on key i-1 / key 0.
    """

    mean: Tensor
    entropy: Tensor
    previous_token: Tensor
    first_token: Tensor


def summarize_heads(att: Tensor) -> HeadSummary:
    """Summaries of `attention()`'s (n_layer, n_head, T, T) probabilities."""
    T = att.size(-1)
    entropy = -(att * att.clamp_min(1e-30).log()).sum(-1)  # (L, H, T)
    if T == 1:  # one token has nowhere else to look
        zeros = att.new_zeros(att.shape[:2])
        return HeadSummary(att.mean(1), zeros, zeros, att[..., 0, 0])
    rows = torch.arange(1, T)
    return HeadSummary(
        mean=att.mean(1),
        entropy=entropy[..., 1:].mean(-1),
        previous_token=att[..., rows, rows - 1].mean(-1),
        first_token=att[..., 1:, 0].mean(-1),
    )


@torch.no_grad()
def log_probs(model: GPT, ids: Sequence[int] | Tensor) -> Tensor:
    """(T, vocab_size) float32 log-probabilities of the token after each position."""
    logits, _ = model(as_ids(model, ids))
    return logits[0].float().log_softmax(-1).cpu()


@dataclass
class NextTokens:
    """top_ids, top_probs: (T, k) the k likeliest next tokens at each position, likeliest first.
    actual_rank, actual_prob: (T-1,) the token that came next: its rank (1 = the model's first
    choice) and probability."""

    top_ids: Tensor
    top_probs: Tensor
    actual_rank: Tensor
    actual_prob: Tensor


def next_tokens(model: GPT, ids: Sequence[int] | Tensor, k: int = 5) -> NextTokens:
    """The top-k next tokens at every position, and how the actual next token ranked."""
    if k < 1:
        raise ConfigError(f"{mark_key('top_k', k)} is not positive", "k >= 1")
    idx = as_ids(model, ids)[0].cpu()
    logp = log_probs(model, idx)
    top = logp.topk(min(k, logp.size(-1)), dim=-1)
    actual = logp[:-1].gather(-1, idx[1:, None])  # (T-1, 1)
    return NextTokens(
        top_ids=top.indices,
        top_probs=top.values.exp(),
        actual_rank=(logp[:-1] > actual).sum(-1) + 1,
        actual_prob=actual[:, 0].exp(),
    )


@dataclass
class Surprise:
    """nats, bits: (T-1,) the loss of tokens 1..T-1 (the first token has nothing before it);
    total_bits over them; n_bytes: their UTF-8 bytes; bits_per_byte = total_bits / n_bytes."""

    nats: Tensor
    bits: Tensor
    total_bits: float
    n_bytes: int
    bits_per_byte: float


def surprise(model: GPT, ids: Sequence[int] | Tensor, tokenizer) -> Surprise:
    """Each token's loss given the ones before it, in nats and bits, and bits per byte."""
    idx = as_ids(model, ids)[0].cpu()
    logp = log_probs(model, idx)
    nats = -logp[:-1].gather(-1, idx[1:, None])[:, 0]
    bits = nats / LN2
    n_bytes = len(tokenizer.decode_bytes(idx[1:].tolist()))
    total = float(bits.sum())
    return Surprise(nats, bits, total, n_bytes, total / n_bytes if n_bytes else float("nan"))


@contextmanager
def _outputs(modules: dict[str, torch.nn.Module]):
    """Record each module's output under its name while the block runs; hooks removed after."""
    seen: dict[str, Tensor] = {}
    handles = [
        m.register_forward_hook(lambda _m, _in, out, name=name: seen.__setitem__(name, out))
        for name, m in modules.items()
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _hooked(model: GPT) -> dict[str, torch.nn.Module]:
    mods: dict[str, torch.nn.Module] = {"embed": model.transformer.drop}
    for i, block in enumerate(model.transformer.h):
        mods[f"block{i}"], mods[f"attn{i}"], mods[f"mlp{i}"] = block, block.attn, block.mlp
    return mods


@torch.no_grad()
def _trace(model: GPT, ids: Sequence[int] | Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """The embeddings, each block's output, attention and MLP outputs (each (T, C)); the logits."""
    with _outputs(_hooked(model)) as seen:
        logits, _ = model(as_ids(model, ids))
    return {name: out[0] for name, out in seen.items()}, logits[0]


def residuals(seen: dict[str, Tensor], n_layer: int) -> list[Tensor]:
    """The residual stream after the embeddings and after each block: n_layer + 1 of (T, C)."""
    return [seen["embed"]] + [seen[f"block{i}"] for i in range(n_layer)]


@dataclass
class Lens:
    """The logit lens: the residual after the embeddings (row 0) and after each block (row i),
    decoded through `ln_f` and the head. top_ids, top_probs: (n_layer + 1, T); final_rank:
    (n_layer + 1, T) the rank at each layer of the model's final top token (1 = on top);
    logits: (n_layer + 1, T, vocab_size) when asked for (`keep_logits=True`), else None."""

    top_ids: Tensor
    top_probs: Tensor
    final_rank: Tensor
    logits: Tensor | None = None


@torch.no_grad()
def lens(model: GPT, ids: Sequence[int] | Tensor, keep_logits: bool = False) -> Lens:
    """Decode every layer's residual as if it were the last; the last row is the model's own."""
    seen, _ = _trace(model, ids)
    rows = [
        model.lm_head(model.transformer.ln_f(x)).float()[..., : model.config.vocab_size].cpu()
        for x in residuals(seen, model.config.n_layer)
    ]
    final = rows[-1].argmax(-1)  # (T,)
    top_ids, top_probs, final_rank = [], [], []
    for logits in rows:
        probs = logits.softmax(-1)
        p, i = probs.max(-1)
        top_ids.append(i)
        top_probs.append(p)
        final_rank.append((logits > logits.gather(-1, final[:, None])).sum(-1) + 1)
    return Lens(
        torch.stack(top_ids),
        torch.stack(top_probs),
        torch.stack(final_rank),
        torch.stack(rows) if keep_logits else None,
    )


@dataclass
class Norms:
    """L2 norms per position: residual (n_layer + 1, T) after the embeddings and each block;
    attn, mlp (n_layer, T) what each block's attention and MLP add to the residual."""

    residual: Tensor
    attn: Tensor
    mlp: Tensor


def norms(model: GPT, ids: Sequence[int] | Tensor) -> Norms:
    """How large the residual stream is, layer by layer, and what each sub-block writes into it."""
    seen, _ = _trace(model, ids)
    L = model.config.n_layer

    def stack(xs: list[Tensor]) -> Tensor:
        return torch.stack([x.float().norm(dim=-1) for x in xs]).cpu()

    return Norms(
        stack(residuals(seen, L)),
        stack([seen[f"attn{i}"] for i in range(L)]),
        stack([seen[f"mlp{i}"] for i in range(L)]),
    )
