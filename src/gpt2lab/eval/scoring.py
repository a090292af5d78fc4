"""Scoring token ids with any causal LM: sliding-window text loss, continuation log-probabilities.

The model is seen only as a callable from token ids (B, T) to logits (B, T, V): see `as_logits_fn`.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from gpt2lab.device import autocast
from gpt2lab.errors import ConfigError, DataError, mark_key
from gpt2lab.kernels.cpu_decode import DecodeStep, decode_step
from gpt2lab.model import GPT, KVCache

LogitsFn = Callable[[Tensor, int], Tensor]  # (B, T) ids, keep -> (B, keep, V) float logits


def as_logits_fn(model, dtype: torch.dtype = torch.float32, kernels: bool = True) -> LogitsFn:
    """Wrap our GPT (returns `(logits, loss)`), a transformers LM (`.logits`) or a callable.

    `fn(idx, keep)` gives the logits of the last `keep` positions, in float32 or the compute
    dtype (callers convert the rows they read). A model whose forward takes
    `logits_to_keep` (ours, and transformers' GPT-2) computes only those, which saves the head's
    matmul and the memory of a (B, T, V) tensor where most predictions would go unscored.
    On a CPU our GPT runs through the fused products of `gpt2lab.kernels.cpu_decode`
    (`DecodeStep.score`, computing in `dtype`) unless `kernels=False`. Our GPT's `fn` also has
    `fn.after_prefix(prefix, continuations)`, which runs a shared context once (KV cache).
    """
    params = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    device = params.device if params is not None else torch.device("cpu")
    if hasattr(model, "eval"):
        model.eval()
    forward = getattr(model, "forward", model)
    trims = "logits_to_keep" in inspect.signature(forward).parameters

    flat = decode_step(model, 1024, dtype) if kernels and device.type == "cpu" else None

    def fn(idx: Tensor, keep: int) -> Tensor:
        if flat is not None and idx.size(1) <= model.config.block_size:
            with torch.inference_mode():
                return flat.score(idx.to(device), keep, out_dtype=None)
        kw = {"logits_to_keep": keep} if trims else {}
        with torch.inference_mode(), autocast(device, dtype):
            out = model(idx.to(device), **kw)
        if isinstance(out, tuple):
            out = out[0]
        elif hasattr(out, "logits"):
            out = out.logits
        return out[:, -keep:]

    if isinstance(model, GPT):
        fn.after_prefix = functools.partial(_after_prefix, model, device, dtype, flat)  # type: ignore
    return fn


def _after_prefix(
    model: GPT,
    device: torch.device,
    dtype: torch.dtype,
    flat: DecodeStep | None,
    prefix: list[int],
    conts: list[list[int]],
) -> list[Tensor]:
    """For each continuation, the logits (len(cont), V) that predict its tokens after `prefix`
    (at least 2 tokens).

    All but the prefix's last token run once into a KV cache; then one batch, a row per
    continuation, feeds that last token and the continuation (but its last token) after it.
    Through the fused CPU path (`flat`) where there is one, else the model under autocast."""
    n, longest, p = len(conts), max(len(c) for c in conts), len(prefix) - 1
    x = torch.full((n, longest), prefix[-1], dtype=torch.long)
    for b, c in enumerate(conts):  # right padding: causal attention never sees it
        x[b, 1 : len(c)] = torch.as_tensor(c[:-1])
    head = torch.tensor([prefix[:-1]], device=device)
    kv_dtype = flat.dtype if flat is not None else model.lm_head.weight.dtype
    with torch.inference_mode(), autocast(device, dtype):
        cache = KVCache(model.config, 1, p, device, kv_dtype)
        if flat is not None:
            flat.score(head, 1, cache)
        else:
            model(head, cache=cache, last_only=True)
        shared = KVCache(model.config, n, p + longest, device, kv_dtype)
        shared.k[:, :, :, :p] = cache.k  # the same prefix for every row
        shared.v[:, :, :, :p] = cache.v
        shared.pos = p
        if flat is not None:
            logits = flat.score(x.to(device), None, shared, out_dtype=None)
        else:
            logits, _ = model(x.to(device), cache=shared)
    return [logits[b, : len(c)] for b, c in enumerate(conts)]


@dataclass(frozen=True)
class Window:
    """One forward pass over `ids[start:end]`; its last `scored` predictions are counted."""

    start: int
    end: int
    scored: int


def sliding_windows(n: int, context: int, stride: int) -> list[Window]:
    """Windows over n ids that predict each of ids[1:] exactly once.

    The first window is ids[0:context] and scores all its predictions. Each later window ends
    `stride` ids further on (the last one at the end of the text), is `context` ids long, and
    scores only the predictions the previous window did not make, so every scored token after
    the first window sees at least `context - stride` tokens before it.

    >>> sliding_windows(10, context=4, stride=2)  # targets 1..9
    [Window(start=0, end=4, scored=4), Window(start=2, end=6, scored=2), \
Window(start=4, end=8, scored=2), Window(start=5, end=9, scored=1)]
    """
    if context < 1 or not 1 <= stride <= context:
        raise ConfigError(
            f"context={context}, stride={stride} cannot slide",
            "context >= 1 and 1 <= stride <= context",
            f"set {mark_key('stride')} to at most {mark_key('context')} "
            "(stride = context scores disjoint windows)",
        )
    if n < 2:
        return []
    end = min(context, n - 1)
    windows = [Window(0, end, end)]
    while end < n - 1:
        new_end = min(end + stride, n - 1)
        windows.append(Window(max(0, new_end - context), new_end, new_end - end))
        end = new_end
    return windows


@dataclass(frozen=True)
class TextScore:
    """Summed negative log-likelihood (nats) over `tokens` scored tokens."""

    nll: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)


# A perplexity forward's rows: on a CPU 4 windows of 1024 tokens score 8% faster per window
# than 8 (the products' operands stay in the caches), and 1 or 2 no faster than 4.
TOKENS_PER_FORWARD = 4096


def score_ids(
    fn: LogitsFn,
    ids: Sequence[int],
    context: int,
    stride: int,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "windows",
) -> TextScore:
    """Sum of -log p(ids[i] | ids[:i]) for i >= 1 over the `sliding_windows`, batched:
    `batch_size` windows a forward, and at most TOKENS_PER_FORWARD tokens."""
    data = torch.as_tensor(ids, dtype=torch.long)
    windows = sliding_windows(len(data), context, stride)
    batch_size = max(1, min(batch_size, TOKENS_PER_FORWARD // context))
    nll, tokens = 0.0, 0
    with _bar(len(windows), progress, desc) as bar:
        for group in _alike(windows, batch_size):
            width = max(w.end - w.start for w in group)
            x = torch.zeros(len(group), width, dtype=torch.long)
            for b, w in enumerate(group):  # right padding: causal attention never sees it
                x[b, : w.end - w.start] = data[w.start : w.end]
            # logits only from the earliest scored position on (padded coordinates)
            keep = max(width - (w.end - w.start) + w.scored for w in group)
            logits = fn(x, keep)
            for b, w in enumerate(group):
                stop = w.end - w.start - width + keep
                pred = logits[b, stop - w.scored : stop]
                target = data[w.end - w.scored + 1 : w.end + 1].to(pred.device)
                nll += nll_sum(pred, target)
                tokens += w.scored
            bar.update(len(group))
    return TextScore(nll, tokens)


def _alike(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows in batches of up to `batch_size` with the same length and number of
    scored positions: the first window (which scores all its positions) and a short last one
    go alone, so their neighbours' head products and logits are not widened to theirs."""

    def shape(w: Window) -> tuple[int, int]:
        return w.end - w.start, w.scored

    groups: list[list[Window]] = []
    for w in windows:
        if groups and shape(groups[-1][-1]) == shape(w) and len(groups[-1]) < batch_size:
            groups[-1].append(w)
        else:
            groups.append([w])
    return groups


def nll_sum(logits: Tensor, targets: Tensor, rows: int = 64) -> float:
    """F.cross_entropy(logits, targets, reduction="sum") for (N, V) logits, computed in float32
    `rows` at a time: each block's log-sum-exp stays in the cache instead of a (N, V)
    log-softmax (or a float32 copy of bfloat16 logits) going through memory (2.4x faster at
    N=512, V=50257)."""
    total = 0.0
    for i in range(0, logits.size(0), rows):
        block, target = logits[i : i + rows].float(), targets[i : i + rows, None]
        total += (torch.logsumexp(block, -1) - block.gather(1, target).squeeze(1)).sum().item()
    return total


@dataclass(frozen=True)
class ContinuationScore:
    """log p(continuation | context) summed over its `tokens`; `greedy`: every token is argmax."""

    logprob: float
    tokens: int
    greedy: bool


def score_continuations(
    fn: LogitsFn,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    context: int,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "examples",
) -> list[ContinuationScore]:
    """Score each (context ids, continuation ids) pair; contexts longer than fits lose their start.

    Requests are run longest first, right-padded, `batch_size` at a time; results keep input order.
    """
    seqs = []
    for context_ids, cont in requests:
        if not context_ids or not cont:
            raise DataError(
                "a request has an empty context or continuation",
                "at least one token in each",
                "start contexts with the end-of-text token",
            )
        if len(cont) > context:
            raise DataError(
                f"a continuation of {len(cont)} tokens is longer than the context ({context})",
                "continuations that fit in the model's context",
                "use a model with a longer context or drop the example",
            )
        seqs.append((list(context_ids) + list(cont))[-(context + 1) :])
    results: list[ContinuationScore | None] = [None] * len(seqs)
    rest = list(range(len(seqs)))
    after_prefix = getattr(fn, "after_prefix", None)
    with _bar(len(seqs), progress, desc) as bar:
        if after_prefix is not None:
            rest = _score_shared_contexts(after_prefix, requests, context, results, bar)
        order = sorted(rest, key=lambda i: -len(seqs[i]))
        for i in range(0, len(order), batch_size):
            group = order[i : i + batch_size]
            width = max(len(seqs[j]) for j in group) - 1
            x = torch.zeros(len(group), width, dtype=torch.long)
            for b, j in enumerate(group):
                x[b, : len(seqs[j]) - 1] = torch.as_tensor(seqs[j][:-1])
            # only the span from the earliest continuation start to the end needs logits
            keep = width - min(len(seqs[j]) - 1 - len(requests[j][1]) for j in group)
            logits = fn(x, keep)
            for b, j in enumerate(group):
                k, stop = len(requests[j][1]), len(seqs[j]) - 1 - width + keep
                results[j] = _continuation_score(logits[b, stop - k : stop], requests[j][1])
            bar.update(len(group))
    return results  # type: ignore[return-value]


def _continuation_score(logits: Tensor, cont: Sequence[int]) -> ContinuationScore:
    """The score of `cont` from the (len(cont), V) logits that predict its tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = torch.as_tensor(list(cont), device=logp.device)
    picked = logp.gather(1, target[:, None]).squeeze(1)
    greedy = bool((logp.argmax(-1) == target).all())
    return ContinuationScore(picked.double().sum().item(), len(cont), greedy)


def _score_shared_contexts(
    after_prefix: Callable, requests: Sequence, context: int, results: list, bar: tqdm
) -> list[int]:
    """Score runs of consecutive requests with the same context (a task's candidates) through
    `after_prefix`: the context runs once and its KV cache serves every candidate. Fills
    `results`; returns the requests left for the plain path (a lone request, or a run whose
    longest sequence would not fit in `context` + 1 tokens and so would lose its start)."""
    left, i = [], 0
    while i < len(requests):
        j = i + 1
        while j < len(requests) and list(requests[j][0]) == list(requests[i][0]):
            j += 1
        prefix = list(requests[i][0])
        conts = [list(requests[r][1]) for r in range(i, j)]
        if j - i < 2 or len(prefix) < 2 or len(prefix) + max(map(len, conts)) > context + 1:
            left += range(i, j)
        else:
            for r, logits in zip(range(i, j), after_prefix(prefix, conts)):
                results[r] = _continuation_score(logits, conts[r - i])
            bar.update(j - i)
        i = j
    return left


def bits(nll: float, units: int) -> float:
    """Nats summed over a text -> bits per unit (byte, character)."""
    return nll / math.log(2) / max(units, 1)


def _bar(total: int, enabled: bool, desc: str) -> tqdm:
    """A progress bar (on stderr, tqdm's default) only when the caller asked for one."""
    return tqdm(total=total, disable=not enabled, desc=desc, leave=False)
