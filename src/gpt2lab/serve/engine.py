"""The serving scheduler: one decode loop, in a thread of its own, over the rows of a shared
KV cache (`gpt2lab.batching.SlotCache`).

A request is one prompt with n choices. It waits in a queue until n rows are free, then its
prompt is prefilled (short prompts together in one left-padded forward, a long one in chunks of
`prefill_chunk` tokens, one chunk per step, so the running streams go on between chunks), and
each choice joins the running batch at the next step. Every step feeds one token per running
row and samples each row with its own settings and its own torch.Generator. A choice leaves the
batch when it ends (stop token, stop string or max_tokens) or its request is cancelled (a client
that went away), and its row is free for the next request at once.

Results go back as events through each request's `emit` callback, called from the engine thread.
Other work on the model (the playground's inspect views) runs between steps through `call()`, so
only one thread ever runs the model.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from gpt2lab.batching import Prefill, SlotCache
from gpt2lab.generate import TextStream, sample_next


@dataclass(frozen=True)
class SamplingParams:
    """One request's settings. `logprobs`: the number of alternatives per token to return with
    its log-probability (0: the chosen token's only; None: none). `stop_ids`: tokens that end a
    choice (<|endoftext|>, a chat template's end token)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: bool = False


@dataclass
class TokenEvent:
    """A choice produced `token`; `text` is what became safe to show (may be '')."""

    choice: int
    token: int
    text: str
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class FinishEvent:
    """A choice ended: reason "stop" (stop token or string) or "length"; `text` is the rest of
    its text; `tokens` how many it generated (the stop token included)."""

    choice: int
    reason: str
    text: str
    tokens: int


@dataclass
class PromptEvent:
    """The prompt's own log-probabilities (echo + logprobs): one per token, None for the first."""

    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@dataclass
class ErrorEvent:
    message: str


Event = TokenEvent | FinishEvent | PromptEvent | ErrorEvent


@dataclass(eq=False)
class Request:
    """One prompt and its settings; `emit(event)` is called from the engine thread."""

    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: bool = False
    finished: int = 0  # choices that ended
    prompt_top: list = field(default_factory=list)
    prompt_lps: list = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.cancelled or self.finished >= self.params.n


@dataclass(eq=False)
class _Choice:
    request: Request
    index: int
    stream: TextStream
    generator: torch.Generator | None
    last: int = 0
    generated: int = 0


class Engine:
    """The scheduler; `start()` its thread, `submit()` requests, `close()` at the end."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        slots: int = 8,
        prefill_chunk: int = 128,
        max_len: int | None = None,
        kernels: bool = True,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.cache = SlotCache(model, slots, max_len, kernels)
        self.prefill_chunk = prefill_chunk
        self.vocab = min(tokenizer.n_vocab, model.config.vocab_size)
        self.device = next(model.parameters()).device
        self.pad = tokenizer.special_tokens.get("<|endoftext|>", 0)
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[Request] = deque()
        self._rows: list[_Choice] = []  # the choice in each live row of the cache
        self._prefill: tuple[Prefill, list[Request]] | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="gpt2lab-engine", daemon=True)
        self.steps = 0  # decode steps run
        self.tokens = 0  # tokens generated

    # ---- the caller's side (any thread) ----

    def start(self) -> Engine:
        self._thread.start()
        return self

    def submit(self, request: Request) -> None:
        cfg = self.model.config
        p = request.params
        if not request.prompt or len(request.prompt) + p.max_tokens > cfg.block_size:
            raise ValueError(
                f"prompt of {len(request.prompt)} tokens + {p.max_tokens} new ones do not fit "
                f"the context of {cfg.block_size}"
            )
        if p.n > self.cache.slots:
            raise ValueError(f"n={p.n} is more than the {self.cache.slots} slots")
        if self._closing:
            raise RuntimeError("the engine is shutting down")
        self._inbox.put(request)

    def cancel(self, request: Request) -> None:
        """Stop a request; its rows are freed before the next step."""
        request.cancelled = True
        self._inbox.put(None)  # wake the loop

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn()` on the engine thread between steps; a Future of its result."""
        future: Future = Future()
        self._inbox.put((fn, future))
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still running get an ErrorEvent."""
        self._closing = True
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        """Counts for /health: slots, busy slots, requests running and waiting."""
        running = {id(c.request) for c in list(self._rows)}
        prefill = self._prefill
        return {
            "slots": self.cache.slots,
            "busy_slots": len(self._rows),
            "running": len(running),
            "waiting": len(self._waiting) + (len(prefill[1]) if prefill else 0),
            "queued": self._inbox.qsize(),
        }

    # ---- the engine thread ----

    def _loop(self) -> None:
        while True:
            idle = not (self._rows or self._waiting or self._prefill)
            if not self._take_inbox(block=idle):
                break
            try:
                self._drop_cancelled()
                self._admit()
                if self._prefill is not None:
                    self._prefill_chunk()
                if self._rows:
                    self._decode_step()
            except Exception as e:  # noqa: BLE001 - a bad step must not kill the server
                self._fail_all(f"{type(e).__name__}: {e}")
        self._fail_all("the server is shutting down")

    def _take_inbox(self, block: bool) -> bool:
        """Move new requests and calls in; False once closing with nothing left to run."""
        while True:
            try:
                item = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                if self._closing and block:
                    return False
                if block:
                    continue
                return True
            block = False
            if item is None:
                if self._closing and not (self._rows or self._waiting or self._prefill):
                    return False
            elif isinstance(item, Request):
                if self._closing:
                    item.emit(ErrorEvent("the server is shutting down"))
                else:
                    self._waiting.append(item)
            else:
                fn, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as e:  # noqa: BLE001 - handed to the caller
                        future.set_exception(e)

    def _drop_cancelled(self) -> None:
        self._waiting = deque(r for r in self._waiting if not r.cancelled)
        if self._prefill is not None and all(r.cancelled for r in self._prefill[1]):
            self._prefill = None
        gone = [i for i, c in enumerate(self._rows) if c.request.cancelled]
        self._remove_rows(gone)

    def _admit(self) -> None:
        """Start prefilling the next requests if none is being prefilled and rows are free."""
        if self._prefill is not None or not self._waiting:
            return
        free = self.cache.free
        group: list[Request] = []
        width = 0
        while self._waiting:
            r = self._waiting[0]
            need = sum(x.params.n for x in group) + r.params.n
            wider = max(width, len(r.prompt))
            if need > free or (group and wider * (len(group) + 1) > self.prefill_chunk):
                break
            group.append(self._waiting.popleft())
            width = wider
        if group:
            pf = Prefill(self.model, [r.prompt for r in group], self.cache.kernels, self.pad)
            self._prefill = (pf, group)

    def _prefill_chunk(self) -> None:
        assert self._prefill is not None
        pf, group = self._prefill
        want = [r.params.prompt_logprobs and not r.cancelled for r in group]
        start, logits = pf.run(self.prefill_chunk, all_logits=any(want))
        if any(want):
            self._prompt_logprobs(pf, group, want, start, logits)
        if not pf.done:
            return
        self._prefill = None
        assert pf.last_logits is not None
        for i, r in enumerate(group):
            if r.cancelled:
                continue
            if r.params.prompt_logprobs:
                r.emit(PromptEvent([None, *r.prompt_lps], [None, *r.prompt_top]))
            self._start(pf, i, r, pf.last_logits[i])

    def _prompt_logprobs(self, pf: Prefill, group, want, start: int, logits) -> None:
        """Log-probabilities of the prompt tokens after the columns of this chunk."""
        logp = logits[..., : self.vocab].float().log_softmax(-1)
        for i, r in enumerate(group):
            if not want[i]:
                continue
            first = pf.width - pf.lengths[i]  # the prompt's first column
            k = r.params.logprobs or 0
            for j in range(logp.size(1)):
                col = start + j
                q = col + 1 - first  # the prompt token this column predicts
                if col < first or q >= pf.lengths[i]:
                    continue
                row = logp[i, j]
                r.prompt_lps.append(float(row[r.prompt[q]]))
                r.prompt_top.append(_top(row, k))

    def _start(self, pf: Prefill, index: int, r: Request, logits: torch.Tensor) -> None:
        """A prefilled request: its choices' first tokens; those that go on join the batch."""
        p = r.params
        if p.max_tokens == 0:
            for i in range(p.n):
                self._finish_choice(r, i, "length", "", 0)
            return
        choices = []
        for i in range(p.n):
            generator = None
            if p.temperature > 0:
                seed = p.seed + i if p.seed is not None else int.from_bytes(os.urandom(8), "little")
                generator = torch.Generator(device=self.device).manual_seed(seed % 2**63)
            choices.append(
                _Choice(r, i, TextStream(self.tokenizer.decode_bytes, p.stop), generator)
            )
        logits = logits[: self.vocab]
        first = self._sample(choices, logits.expand(len(choices), -1))
        live = [c for c, t in zip(choices, first) if not self._advance(c, t, logits)]
        if live:
            rows = self.cache.join(pf, index, copies=len(live))
            assert rows == list(range(len(self._rows), len(self._rows) + len(live)))
            self._rows.extend(live)

    def _decode_step(self) -> None:
        tokens = torch.tensor([c.last for c in self._rows], dtype=torch.long)
        logits = self.cache.step(tokens)[:, : self.vocab]
        self.steps += 1
        chosen = self._sample(self._rows, logits)
        done = [
            r for r, (c, t) in enumerate(zip(self._rows, chosen)) if self._advance(c, t, logits[r])
        ]
        self._remove_rows(done)

    def _sample(self, choices: Sequence[_Choice], logits: torch.Tensor) -> list[int]:
        """Each choice's next token from its row of logits (k, V): rows with the same settings
        are sampled together, each from its own generator."""
        groups: dict[tuple, list[int]] = {}
        for r, c in enumerate(choices):
            p = c.request.params
            groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(r)
        tokens = [0] * len(choices)
        for (temperature, top_k, top_p), rows in groups.items():
            gens = [choices[r].generator for r in rows]
            picked = sample_next(
                logits[rows], temperature, top_k, top_p, 1.0, gens if temperature else None
            )
            for r, t in zip(rows, picked.tolist()):
                tokens[r] = t
        return tokens

    def _advance(self, c: _Choice, token: int, logits: torch.Tensor) -> bool:
        """Emit a choice's next token (sampled from its logits, (V,)); True when it ended."""
        p = c.request.params
        c.last, c.generated = token, c.generated + 1
        self.tokens += 1
        if token in p.stop_ids:
            self._finish_choice(c.request, c.index, "stop", c.stream.close(), c.generated)
            return True
        logprob = top = None
        if p.logprobs is not None:
            row = logits.float().log_softmax(-1)
            logprob, top = float(row[token]), _top(row, p.logprobs)
        c.request.emit(TokenEvent(c.index, token, c.stream.push(token), logprob, top))
        if c.stream.stopped or c.generated >= p.max_tokens:
            reason = "stop" if c.stream.stopped else "length"
            self._finish_choice(c.request, c.index, reason, c.stream.close(), c.generated)
            return True
        return False

    def _finish_choice(self, r: Request, index: int, reason: str, text: str, tokens: int) -> None:
        r.finished += 1
        r.emit(FinishEvent(index, reason, text, tokens))

    def _remove_rows(self, rows: Sequence[int]) -> None:
        for r in sorted(rows, reverse=True):
            moved = self.cache.remove(r)
            if moved is not None:
                self._rows[r] = self._rows[moved]
            self._rows.pop()

    def _fail_all(self, message: str) -> None:
        """A failed step: every request in flight gets an error and the batch starts over."""
        requests = {id(c.request): c.request for c in self._rows}
        if self._prefill is not None:
            requests.update((id(r), r) for r in self._prefill[1])
        requests.update((id(r), r) for r in self._waiting)
        self._remove_rows(range(len(self._rows)))
        self._prefill, self._waiting = None, deque()
        for r in requests.values():
            if not r.done:
                r.emit(ErrorEvent(message))


def _top(logp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    values, ids = logp.topk(min(k, logp.size(-1)))
    return list(zip(ids.tolist(), values.tolist()))
