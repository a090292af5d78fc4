"""The evaluation tasks: read a dataset file, score it with a model, return the figures.

Every task takes a `LogitsFn`, a tokenizer (`encode_ordinary`, `eot_token`), the path of the
dataset's public file and `Settings`, and returns a dict of metrics (see docs/eval.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2lab.eval import datasets
from gpt2lab.eval.detok import cbt_detokenize, ptb_detokenize, wikitext_detokenize
from gpt2lab.eval.scoring import LogitsFn, bits, score_continuations, score_ids


@dataclass(frozen=True)
class Settings:
    """How to batch and window: `context` ids per forward pass, `stride` new ids per window."""

    context: int
    stride: int
    batch_size: int = 8
    progress: bool = False
    limit: int | None = None  # score only the first N examples (lambada, cbt, hellaswag)


def text_metrics(fn: LogitsFn, tok, text: str, s: Settings, n_bytes: int | None = None) -> dict:
    """Loss, perplexity, bits per byte and per character of `text`, every token scored once.

    The ids are `<|endoftext|>` followed by the text's tokens, so the first token is scored too.
    """
    ids = [tok.eot_token, *tok.encode_ordinary(text)]
    score = score_ids(fn, ids, s.context, s.stride, s.batch_size, s.progress)
    n_bytes = len(text.encode("utf-8")) if n_bytes is None else n_bytes
    return {
        "loss": score.loss,
        "perplexity": math.exp(score.loss),
        "bits_per_byte": bits(score.nll, n_bytes),
        "bits_per_char": bits(score.nll, len(text)),
        "tokens": score.tokens,
        "bytes": n_bytes,
        "chars": len(text),
        "nll": score.nll,
    }


def perplexity(fn: LogitsFn, tok, path: str | Path, s: Settings) -> dict:
    """Any UTF-8 text file."""
    return text_metrics(fn, tok, datasets.read_text(path), s)


def _word_level(fn: LogitsFn, tok, path: str | Path, s: Settings, name: str, detok) -> dict:
    """De-tokenize, score, and normalise the total loss by the benchmark's own token count."""
    lines = datasets.read_tokenized(path, name)
    text = "\n".join(detok(line) for line in lines) + "\n"
    metrics = text_metrics(fn, tok, text, s)
    words = datasets.word_count(lines)
    return {**metrics, "words": words, "word_perplexity": math.exp(metrics["nll"] / words)}


def wikitext(fn: LogitsFn, tok, path: str | Path, s: Settings) -> dict:
    """wiki.test.tokens of WikiText-2 or WikiText-103 (the two share a test set format)."""
    return _word_level(fn, tok, path, s, "WikiText wiki.test.tokens", wikitext_detokenize)


def ptb(fn: LogitsFn, tok, path: str | Path, s: Settings) -> dict:
    """ptb.test.txt (Mikolov's PTB: lower case, <unk>, N for numbers)."""
    return _word_level(fn, tok, path, s, "PTB ptb.test.txt", ptb_detokenize)


def enwik8(fn: LogitsFn, tok, path: str | Path, s: Settings) -> dict:
    """Bits per byte of enwik8's last 5M bytes (decoded as UTF-8; a broken edge becomes U+FFFD)."""
    data = datasets.read_enwik8(path)
    return text_metrics(fn, tok, data.decode("utf-8", errors="replace"), s, n_bytes=len(data))


def text8(fn: LogitsFn, tok, path: str | Path, s: Settings) -> dict:
    """Bits per character of text8's last 5M characters."""
    return text_metrics(fn, tok, datasets.read_text8(path), s)


def lambada(fn: LogitsFn, tok, path: str | Path, s: Settings) -> dict:
    """Predict each passage's last word: accuracy of greedy decoding and its perplexity."""
    passages = datasets.read_lambada(path)[: s.limit]
    requests = []
    for text in passages:
        context, word = text.rsplit(" ", 1)
        requests.append(
            ([tok.eot_token, *tok.encode_ordinary(context)], tok.encode_ordinary(" " + word))
        )
    scores = score_continuations(fn, requests, s.context, s.batch_size, s.progress)
    nll = -sum(sc.logprob for sc in scores)
    return {
        "accuracy": sum(sc.greedy for sc in scores) / len(scores),
        "perplexity": math.exp(nll / len(scores)),
        "examples": len(scores),
    }


def cbt(fn: LogitsFn, tok, path: str | Path, s: Settings) -> dict:
    """Pick the candidate whose sentence (candidate + rest of the query) is most probable."""
    examples = datasets.read_cbt(path)[: s.limit]
    requests, spans = [], []
    for ex in examples:
        story = " ".join(cbt_detokenize(line) for line in ex.context)
        before, after = ex.query.split("XXXXX", 1)
        prefix = cbt_detokenize(before)
        # an opening quote stays attached to the word it opens
        glue = "" if prefix.endswith('"') and prefix.count('"') % 2 else " "
        context_ids = [tok.eot_token, *tok.encode_ordinary((story + " " + prefix).rstrip())]
        start = len(requests)
        for cand in ex.candidates:
            rest = cbt_detokenize(cand + after.replace("XXXXX", cand))
            requests.append((context_ids, tok.encode_ordinary(glue + rest)))
        spans.append((start, ex.candidates.index(ex.answer)))
    scores = score_continuations(fn, requests, s.context, s.batch_size, s.progress)
    correct = 0
    for (start, answer), ex in zip(spans, examples):
        logps = [sc.logprob for sc in scores[start : start + len(ex.candidates)]]
        correct += max(range(len(logps)), key=logps.__getitem__) == answer
    return {"accuracy": correct / len(examples), "examples": len(examples)}


def hellaswag(fn: LogitsFn, tok, path: str | Path, s: Settings) -> dict:
    """Score the endings: `acc` by total log-probability, `acc_norm` by it per token."""
    examples = datasets.read_hellaswag(path)[: s.limit]
    requests = []
    for ex in examples:
        context_ids = [tok.eot_token, *tok.encode_ordinary(ex.ctx)]
        requests += [(context_ids, tok.encode_ordinary(" " + ending)) for ending in ex.endings]
    scores = iter(score_continuations(fn, requests, s.context, s.batch_size, s.progress))
    acc = acc_norm = 0
    for ex in examples:
        got = [next(scores) for _ in ex.endings]
        total = [sc.logprob for sc in got]
        mean = [sc.logprob / sc.tokens for sc in got]
        acc += max(range(len(got)), key=total.__getitem__) == ex.label
        acc_norm += max(range(len(got)), key=mean.__getitem__) == ex.label
    n = len(examples)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "examples": n}


TASKS: dict[str, Callable[[LogitsFn, Any, Any, Settings], dict]] = {
    "perplexity": perplexity,
    "wikitext2": wikitext,
    "wikitext103": wikitext,
    "ptb": ptb,
    "lambada": lambada,
    "cbt-cn": cbt,
    "cbt-ne": cbt,
    "enwik8": enwik8,
    "text8": text8,
    "hellaswag": hellaswag,
}
