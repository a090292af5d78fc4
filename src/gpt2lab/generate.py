"""Sampling from a GPT: next-token choice (greedy, temperature, top-k, top-p, repetition penalty),
a KV-cached generation loop with left-padded batches, and streaming decode with stop strings.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gpt2lab.config import SampleConfig
from gpt2lab.kernels.cpu_decode import DecodeKernels, decode_kernels, decode_step
from gpt2lab.model import KVCache

# The settings of the short previews shown while training and after the demo.
PREVIEW_SAMPLING = SampleConfig(temperature=0.8, top_k=200)


class ContextWarning(UserWarning):
    """A prompt or a generation ran past the model's context and was cropped from the left."""


def prompt_ids(tokenizer, text: str, allow_special: bool = False) -> list[int]:
    """A prompt's ids; an empty prompt is `<|endoftext|>`, as GPT-2 starts unconditional samples.

    `allow_special=True` encodes special-token text (`<|endoftext|>`) as the special id; otherwise
    it is plain text.
    """
    if not text:
        return [tokenizer.eot_token]
    if allow_special:
        return tokenizer.encode(text, allowed_special="all")
    return tokenizer.encode_ordinary(text)


def check_sampling(
    max_new_tokens: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
) -> None:
    """Raise ConfigError (naming the flag) for settings outside their range."""
    SampleConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
    )


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Make tokens already in the context less likely (CTRL, Keskar et al. 2019, sec. 4.1).

    A seen token's logit is divided by `penalty` when positive and multiplied by it when negative,
    so penalty > 1 always lowers it. `seen` is a (B, V) bool mask.
    """
    if penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def top_k_mask(logits: Tensor, k: int) -> Tensor:
    """Logits with all but the k largest per row set to -inf (exactly k survive, ties by index)."""
    k = min(k, logits.size(-1))
    values, indices = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)


def top_p_mask(logits: Tensor, p: float) -> Tensor:
    """Logits outside the nucleus set to -inf (Holtzman et al. 2019): the fewest most likely
    tokens whose probabilities sum to at least p; the most likely token always stays."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    seen: Tensor | None = None,
) -> Tensor:
    """Choose one token per row from (B, V) logits; temperature 0 is greedy (argmax).

    The order is the usual one (and transformers'): repetition penalty, temperature, top-k, top-p.
    `generator` may be one per row (a server's requests each with its own seed).
    """
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_mask(logits, top_k)
    if top_p is not None:
        logits = top_p_mask(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return draw(probs, generator)


def draw(
    probs: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None
) -> Tensor:
    """One token per row of (B, V) probabilities, by inverting each row's cumulative distribution
    at a uniform draw (from the row's own generator when given one per row): the same
    distribution as `torch.multinomial(probs, 1)` (which takes one generator, and a few ms per
    row of a 50k-token vocabulary on a CPU, where this takes a few ms for a batch)."""
    B = probs.size(0)
    if generator is None or isinstance(generator, torch.Generator):
        u = torch.rand(B, 1, generator=generator, device=probs.device)
    else:
        if len(generator) != B:
            raise ValueError(f"{len(generator)} generators for {B} rows")
        u = torch.cat([torch.rand(1, 1, generator=g, device=probs.device) for g in generator])
    cdf = probs.float().cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.size(-1) - 1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Stack prompts of different lengths, padded on the left; returns (ids, attention_mask)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start from <|endoftext|>)")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, T - len(p) :] = True
    return ids, mask


def iter_tokens(
    model: torch.nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    attention_mask: Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    vocab_size: int | None = None,
    kernels: bool = True,
) -> Iterator[Tensor]:
    """Yield the next token of every row, (B,), for up to `max_new_tokens` steps.

    `idx` (B, T) may be left-padded, with `attention_mask` (B, T) marking real tokens. The prompt is
    run once into a preallocated KV cache, then one token per step. With `eos_token_id` (one id or
    several, e.g. `<|endoftext|>` and an end-of-turn token), a row that produced one yields the
    first of them from then on, and the loop ends once every row has. `vocab_size`
    keeps ids below it (a model's table may be larger than its tokenizer's vocabulary). A prompt
    longer than the context is cropped from the left with a ContextWarning; past the context the
    window slides (the last 3/4 of it is re-run). On a CPU a GPT decodes through the packed
    weights of `gpt2lab.kernels.cpu_decode`; `kernels=False` runs the plain model.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    if max_new_tokens == 0:
        return
    cfg = model.config
    device = next(model.parameters()).device
    idx = idx.to(device)
    B, T = idx.shape
    mask = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool)
    if mask is not None and bool(mask.all()):
        mask = None  # nothing padded: take the model's plain causal path
    if T > cfg.block_size:
        warnings.warn(
            f"the prompt has {T} tokens but the model's context is {cfg.block_size}; "
            f"only its last {cfg.block_size} tokens are used",
            ContextWarning,
            stacklevel=2,
        )
    # the latest tokens (for the sliding window) and the mask of real tokens: a buffer of at
    # most two blocks whatever max_new_tokens is; when full its last block moves to the front
    kept = min(T, cfg.block_size)
    cap = kept + min(max_new_tokens, cfg.block_size)
    seq = torch.empty((B, cap), dtype=torch.long, device=device)
    seq[:, :kept] = idx[:, T - kept :]
    full_mask = None
    if mask is not None:
        full_mask = torch.ones((B, cap), dtype=torch.bool, device=device)
        full_mask[:, :kept] = mask[:, T - kept :]
    seen = None
    if repetition_penalty != 1.0:
        real = torch.ones_like(idx, dtype=torch.float) if mask is None else mask.float()
        counts = torch.zeros((B, cfg.vocab_size), device=device).scatter_add_(1, idx, real)
        seen = counts > 0  # padding ids count only where they are real tokens too
    vocab_limit = min(vocab_size or cfg.vocab_size, cfg.vocab_size)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stops = None
    if eos_token_id is not None:
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        stops = torch.tensor(ids, dtype=torch.long, device=device)
    runner = _CachedRunner(model, B, min(cfg.block_size, T + max_new_tokens), device, kernels)

    length = kept  # tokens in the buffer
    total = T  # tokens in the whole sequence
    window = kept
    logits = runner.prefill(seq[:, length - window : length], _cols(full_mask, length, window))
    for step in range(max_new_tokens):
        if vocab_limit < logits.size(-1):
            logits = logits[:, :vocab_limit]
        tok = sample_next(logits, temperature, top_k, top_p, repetition_penalty, generator, seen)
        if stops is not None:
            tok = torch.where(done, stops[0], tok)
            done |= torch.isin(tok, stops)
        if length == cap:  # keep the last block: all that any window reads
            seq[:, : cfg.block_size] = seq[:, length - cfg.block_size : length].clone()
            if full_mask is not None:
                full_mask[:, : cfg.block_size] = full_mask[:, length - cfg.block_size :].clone()
            length = cfg.block_size
        seq[:, length] = tok
        length += 1
        total += 1
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        yield tok
        if step == max_new_tokens - 1 or (stops is not None and bool(done.all())):
            return
        if runner.full():
            if T <= cfg.block_size and total == cfg.block_size + 1:  # the first slide only
                warnings.warn(
                    f"the sample filled the model's context of {cfg.block_size} tokens; it goes "
                    "on seeing only the latest ones (a sliding window)",
                    ContextWarning,
                    stacklevel=2,
                )
            window = cfg.block_size - cfg.block_size // 4
            logits = runner.prefill(
                seq[:, length - window : length], _cols(full_mask, length, window)
            )
        else:
            logits = runner.step(seq[:, length - 1 : length])


def generate(
    model: torch.nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    **kwargs,
) -> Tensor:
    """Continue each row of `idx` (B, T); returns (B, T + new) ids. Options as in `iter_tokens`."""
    steps = list(
        iter_tokens(
            model,
            idx,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            generator,
            **kwargs,
        )
    )
    new = [t.to(idx.device)[:, None] for t in steps]
    return torch.cat([idx, *new], dim=1)


@dataclass
class Completion:
    """One sample: what was generated after a prompt, and why it ended."""

    prompt_ids: list[int]
    ids: list[int]  # generated ids, up to the one that ended the sample (eos / stop included)
    text: str  # generated text without the stop string and without <|endoftext|>
    finish_reason: str  # "eos" (<|endoftext|>), "stop" (a stop string) or "length"


def complete(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    stop: Sequence[str] = (),
    stop_at_eos: bool = True,
    on_text: Callable[[int, str], None] | None = None,
) -> list[Completion]:
    """Continue token-id prompts as one left-padded batch, decoding text as it comes.

    Each sample ends at <|endoftext|> (if the tokenizer has it, unless `stop_at_eos=False`),
    before its first stop string, or after `max_new_tokens`. `on_text(row, text)` receives each
    row's text as soon as it is whole characters and cannot start a stop string (for streaming).
    """
    eos = tokenizer.special_tokens.get("<|endoftext|>") if stop_at_eos else None
    pad = eos if eos is not None else 0
    idx, mask = left_pad(prompts, pad)
    streams = [TextStream(tokenizer.decode_bytes, stop) for _ in prompts]
    ids: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * len(prompts)

    def emit(row: int, piece: str) -> None:
        if piece and on_text is not None:
            on_text(row, piece)

    steps = iter_tokens(
        model,
        idx,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        generator,
        attention_mask=mask,
        eos_token_id=eos,
        vocab_size=tokenizer.n_vocab,
    )
    for tokens in steps:
        for row, t in enumerate(tokens.tolist()):
            if reasons[row] is not None:
                continue
            ids[row].append(t)
            if t == eos:
                reasons[row] = "eos"
                continue
            emit(row, streams[row].push(t))
            if streams[row].stopped:
                reasons[row] = "stop"
        if all(r is not None for r in reasons):
            steps.close()  # rows that hit a stop string: nothing left to compute
            break
    out = []
    for row, s in enumerate(streams):
        emit(row, s.close())
        out.append(Completion(list(prompts[row]), ids[row], s.text, reasons[row] or "length"))
    return out


def _cols(full_mask: Tensor | None, length: int, window: int) -> Tensor | None:
    """The real-token mask of the `window` columns before `length`."""
    return None if full_mask is None else full_mask[:, length - window : length]


class _CachedRunner:
    """Runs the model over a preallocated KV cache, keeping per-row positions for left padding.

    A gpt2lab GPT on a CPU decodes through `gpt2lab.kernels.cpu_decode` unless `kernels=False`
    (the plain model, which the kernels are tested equal to): each new token through the flat
    `DecodeStep`. The prompt runs through the plain model: packing the weights for one forward
    costs more than it saves (124M bf16: 96 ms against 29 for 16 tokens, 446 against 354 for
    512). Later forwards of the same generation (the window's slides) reuse packed weights. A
    float16 model's stand-ins cost nothing to make (`WidenedLinear`), so its prompt takes them. A
    prompt of one or two tokens (`<|endoftext|>` alone, for one) takes the C step token by token
    where it runs (`_steps_prompt`).
    """

    def __init__(
        self, model: torch.nn.Module, batch: int, max_len: int, device, kernels: bool = True
    ) -> None:
        self.model, self.batch, self.max_len, self.device = model, batch, max_len, device
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.cache: KVCache | None = None
        self.mask: Tensor | None = None  # (B, max_len) real-token mask of what the cache holds
        self.next_pos: Tensor | None = None  # (B, 1) position of each row's next token
        self.kernels = decode_kernels(model, batch) if kernels else None  # packed on first use
        self.fast_step = decode_step(model, batch) if kernels else None

    def full(self) -> bool:
        return self.cache is not None and self.cache.pos >= self.max_len

    def prefill(self, ids: Tensor, mask: Tensor | None) -> Tensor:
        """Start a fresh cache with `ids` (B, T); returns the last position's logits (B, V)."""
        packed = self.cache is not None  # the first prefill runs plain (see the class docstring)
        self.cache = KVCache(self.model.config, self.batch, self.max_len, self.device, self.dtype)
        if mask is None:
            self.mask = self.next_pos = None
            if self._steps_prompt(ids):
                for t in range(ids.size(1)):
                    logits = self.step(ids[:, t : t + 1])
                return logits
            return self._forward(ids, None, None, packed)
        self.mask = torch.zeros((self.batch, self.max_len), dtype=torch.bool, device=self.device)
        self.mask[:, : ids.size(1)] = mask
        pos = (mask.long().cumsum(-1) - 1).clamp_(min=0)
        self.next_pos = pos[:, -1:] + 1
        return self._forward(ids, self.mask[:, : ids.size(1)], pos, packed)

    def _steps_prompt(self, ids: Tensor) -> bool:
        """Whether a prompt of one or two tokens goes through the C step, token by token: one
        call of the plain model costs more (124M, measured per dtype: 1 token 38.6 / 19.9 / 9.9
        ms in float32 / bf16 / int8 against a C step's 18.0 / 8.0 / 4.2; 2 tokens 57.4 / 23.2 /
        9.8 against 34.0 / 16.8 / 8.5; at 3 the plain model wins in int8)."""
        native = self.fast_step.native if self.fast_step is not None else None
        return (
            native is not None
            and 0 < ids.size(1) <= 2
            and native.fits(self.cache)
            and not torch.is_autocast_enabled("cpu")
        )

    def step(self, ids: Tensor) -> Tensor:
        """Feed one new token per row (B, 1); returns its logits (B, V)."""
        assert self.cache is not None
        if self.mask is None or self.next_pos is None:
            mask = pos = None
        else:
            p = self.cache.pos
            self.mask[:, p] = True
            mask, pos = self.mask[:, : p + 1], self.next_pos
            self.next_pos = pos + 1
        if self.fast_step is not None and not torch.is_autocast_enabled("cpu"):
            return self.fast_step.step(ids, self.cache, pos, mask)
        return self._forward(ids, mask, pos)

    def _forward(
        self, ids: Tensor, mask: Tensor | None, pos: Tensor | None, packed: bool = True
    ) -> Tensor:
        kernels = self.kernels if packed or (self.kernels and self.kernels.free) else None
        return cached_forward(self.model, ids, self.cache, mask, pos, kernels)[:, -1, :]


def cached_forward(
    model: torch.nn.Module,
    ids: Tensor,
    cache: KVCache,
    mask: Tensor | None = None,
    positions: Tensor | None = None,
    kernels: DecodeKernels | None = None,
    keep: int = 1,
) -> Tensor:
    """Feed `ids` (B, T) after what `cache` holds; the logits of the last `keep` positions
    (B, keep, V). `mask` (B, cached + T) marks real tokens, `positions` (B, T) their positions;
    `kernels` (from `decode_kernels`) run the linear layers packed for a CPU."""
    params = _forward_parameters(type(model))
    kw = {"logits_to_keep": keep} if "logits_to_keep" in params else {}
    if keep == 1 and "last_only" in params:
        kw = {"last_only": True}
    applied = kernels.applied() if kernels else contextlib.nullcontext()
    # no_grad here, not around a loop: a generator must not leak grad mode
    with torch.no_grad(), applied:
        logits, _ = model(ids, cache=cache, attention_mask=mask, position_ids=positions, **kw)
    return logits[:, -keep:, :]


@functools.cache
def _forward_parameters(model_type: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_type.forward).parameters)


@dataclass
class TextStream:
    """Decodes one sample token by token: whole UTF-8 characters only, and stop strings that may
    span tokens are cut off before they are ever released.

    `push(token)` returns the text that is now safe to show; `close()` returns the rest.
    """

    decode_bytes: Callable[[list[int]], bytes]  # the tokenizer's decode_bytes
    stop: Sequence[str] = ()
    text: str = ""  # everything decoded so far, up to (not including) a stop string
    stopped: bool = False
    _released: int = 0
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    def push(self, token: int) -> str:
        """Add one token; return the newly safe text ('' while a stop string may be forming)."""
        if self.stopped:
            return ""
        self.text += self._decoder.decode(self.decode_bytes([token]))
        return self._release(final=False)

    def close(self) -> str:
        """End the sample: flush a trailing partial character and any held-back text."""
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [(i, s) for s in self.stop if s and (i := self.text.find(s, self._released)) >= 0]
        if hits:
            self.text = self.text[: min(hits)[0]]
            self.stopped = True
            final = True
        keep = len(self.text) if final else len(self.text) - self._held_back()
        out = self.text[self._released : keep]
        self._released = max(self._released, keep)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the unreleased text that could start a stop string."""
        tail = self.text[self._released :]
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:n]):
                    best = n
                    break
        return best
