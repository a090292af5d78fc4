"""Training a byte-level BPE vocabulary: pre-token counts (counts.py), then merges.

The rule (deterministic): the base ids are the byte values 0..255; each step merges the most
frequent adjacent pair, counting every adjacent position ("aaa" holds (a, a) twice), ties going
to the smallest (left id, right id); merge k gets id 256 + k and replaces the pair's occurrences
left to right. Two trainers follow the rule and give identical merges: `learn_merges_reference`,
the plain loop to read first (recount every pair after every merge, as minbpe does), and
`learn_merges`, the incremental one used by default (a merge touches only the pre-tokens that hold
the pair, and a heap finds the next best pair), tens of times faster.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable

import numpy as np

from gpt2lab.errors import DataError, TokenizerError, mark_key
from gpt2lab.tokenizer.base import EOT
from gpt2lab.tokenizer.bpe import BPETokenizer
from gpt2lab.tokenizer.counts import TextSource, count_pretokens, progress_bar
from gpt2lab.tokenizer.pretokenize import resolve_pattern

_MAX_ID = 0x10FFFF  # ids are held as characters (see learn_merges)


def train_bpe(
    text_or_files: TextSource,
    vocab_size: int,
    pattern: str = "gpt2",
    special_tokens: Iterable[str] = (EOT,),
    errors: str = "strict",
    progress: bool | None = False,
    backend: str = "tiktoken",
    algorithm: str = "incremental",
) -> BPETokenizer:
    """Train byte-level BPE to `vocab_size` ids (256 bytes + merges + special tokens).

    Args:
        text_or_files: a text (`str`), or a path / list of paths (`Path` or `str` in a list),
            streamed block by block.
        pattern: "gpt2", "gpt4" or a custom regex that cuts text into pre-tokens.
        special_tokens: their ids follow the merges; their text in the training data is not
            learned from.
        errors: "strict" (a non-UTF-8 file is an error naming the byte offset) or "replace".
        progress: show progress bars (None: when stderr is a terminal; default: no).
        backend: the returned tokenizer's backend, "tiktoken" or "python".
        algorithm: "incremental" (fast, the default) or "reference" (the plain minbpe-style
            loop, to read or to check against); both give the same merges.
    """
    learn = ALGORITHMS.get(algorithm)
    if learn is None:
        raise TokenizerError(f"unknown algorithm {algorithm!r}", f"one of {', '.join(ALGORITHMS)}")
    pat = resolve_pattern(pattern)
    specials = list(dict.fromkeys(special_tokens))
    n_merges = vocab_size - 256 - len(specials)
    if n_merges < 0:
        raise TokenizerError(
            f"vocab_size={vocab_size} is below 256 bytes + {len(specials)} special tokens",
            f"vocab_size >= {256 + len(specials)}",
        )
    counts = count_pretokens(text_or_files, pat, specials, errors, progress)
    if not counts:
        raise DataError(
            "the training text is empty", "some text to learn merges from", "check the input"
        )
    merges = learn(counts, n_merges, progress)
    ranks = {bytes([b]): b for b in range(256)}
    vocab = [bytes([b]) for b in range(256)]
    pairs = []
    for a, b in merges:
        token = vocab[a] + vocab[b]
        # Two merges can spell the same bytes (rare); like HF's trainer, the later one reuses
        # the earlier token's id, as a vocabulary maps each byte string to one id.
        ranks.setdefault(token, len(vocab))
        vocab.append(token)
        pairs.append((vocab[a], vocab[b]))
    n = max(ranks.values()) + 1
    return BPETokenizer(
        ranks, pairs, pat, {s: n + i for i, s in enumerate(specials)}, backend, kind="bpe"
    )


# --- the reference: read this first --------------------------------------------------------------


def learn_merges_reference(
    counts: dict[bytes, int], n_merges: int, progress: bool | None = False
) -> list[tuple[int, int]]:
    """The first `n_merges` merges (as id pairs; merge k makes id 256 + k) of pre-token counts.

    Each step counts every adjacent pair of every pre-token (times the pre-token's count), merges
    the most frequent one everywhere, and starts again. Simple, and slow: every step reads all
    the text's pre-tokens.
    """
    words = [(list(word), n) for word, n in counts.items()]  # each pre-token as a list of ids
    merges: list[tuple[int, int]] = []
    with progress_bar(n_merges, "merges", progress) as bar:
        for new_id in range(256, 256 + n_merges):
            pair_counts: Counter[tuple[int, int]] = Counter()
            for ids, n in words:
                for pair in zip(ids, ids[1:]):
                    pair_counts[pair] += n
            if not pair_counts:
                raise _no_pairs_left(len(merges), n_merges)
            # the most frequent pair; among equals, the smallest (left id, right id)
            best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
            words = [(_merge(ids, best, new_id), n) for ids, n in words]
            merges.append(best)
            bar.update()
    return merges


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """`ids` with each occurrence of `pair`, left to right, replaced by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _no_pairs_left(n_done: int, n_merges: int) -> TokenizerError:
    return TokenizerError(
        f"the text supports only {256 + n_done} ids before specials: after "
        f"{n_done} merges no adjacent pair is left, but {n_merges} were asked for",
        f"vocab_size <= {256 + n_done} + the number of special tokens",
        f"use a smaller {mark_key('vocab_size')} or more text",
    )


# --- the incremental trainer: the same merges, fast ---------------------------------------------


def learn_merges(
    counts: dict[bytes, int], n_merges: int, progress: bool | None = False
) -> list[tuple[int, int]]:
    """The merges of `learn_merges_reference`, each step touching only what the merge changes.

    A pre-token is held as a `str` whose characters are its ids (`chr(id)`), and a pair as the
    2-character string of its ids: finding a pair (`str.find`) and merging it (`str.replace`, left
    to right, without overlaps: "aaa" -> [aa, a]) run in C, and comparing two pairs compares
    (left id, right id), the tie-break of the rule.
    """
    if n_merges > _MAX_ID - 256:
        raise TokenizerError(f"{n_merges} merges is too many", f"at most {_MAX_ID - 256}")
    words = [w.decode("latin-1") for w in counts]  # byte b -> chr(b)
    freq = list(counts.values())
    # pair -> its count, and the pre-tokens that hold it (or held it: entries go stale, and may
    # repeat)
    pair_count, where = _pair_index(list(counts), freq)
    # Max-heap of (count, pair) by pushing (-count, pair): ties pop the smallest pair.
    # Entries may be stale (counts only fall between pushes), so a popped entry is re-checked.
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    bar = progress_bar(n_merges, "merges", progress)
    while len(merges) < n_merges:
        best = _pop_best(heap, pair_count)
        if best is None:
            bar.close()
            raise _no_pairs_left(len(merges), n_merges)
        new = chr(256 + len(merges))
        merges.append((ord(best[0]), ord(best[1])))
        left, right = best
        # The one-occurrence words are summed by the id beside the pair: x before it turns
        # (x, left) into (x, new), and y after it (right, y) into (new, y), at the word's count.
        before: defaultdict[str, int] = defaultdict(int)
        after: defaultdict[str, int] = defaultdict(int)
        before_w: defaultdict[str, list[int]] = defaultdict(list)
        after_w: defaultdict[str, list[int]] = defaultdict(list)
        grown: defaultdict[str, int] = defaultdict(int)  # new pairs of the other words
        grown_w: defaultdict[str, list[int]] = defaultdict(list)
        for w in where.pop(best):
            s = words[w]
            i = s.find(best)
            if i < 0:
                continue  # stale or repeated entry: the word no longer holds the pair
            c = freq[w]
            out = s.replace(best, new)
            if len(out) == len(s) - 1:  # one occurrence, the common case, written out
                if i:
                    x = s[i - 1]
                    before[x] += c
                    before_w[x].append(w)
                if i + 2 < len(s):
                    y = s[i + 2]
                    after[y] += c
                    after_w[y].append(w)
                words[w] = out
                continue
            # Several occurrences (rare): the old word's pairs go, the new word's come; the
            # pairs away from the merged positions cancel out, and the ones holding the new id
            # are the only ones new to this word.
            for k in range(len(s) - 1):
                pair_count[s[k : k + 2]] -= c
            for k in range(len(out) - 1):
                p = out[k : k + 2]
                if new in p:
                    grown[p] += c
                    grown_w[p].append(w)
                else:
                    pair_count[p] += c
            words[w] = out
        for x, c in before.items():
            pair_count[x + left] -= c
            grown[x + new] += c
            grown_w[x + new] += before_w[x]
        for y, c in after.items():
            pair_count[right + y] -= c
            grown[new + y] += c
            grown_w[new + y] += after_w[y]
        for p, c in grown.items():  # pairs holding the new id are new: no count or list yet
            pair_count[p] = c
            where[p] = grown_w[p]
            heapq.heappush(heap, (-c, p))
        pair_count.pop(best, None)
        bar.update()
    bar.close()
    return merges


def _pair_index(
    words: list[bytes], freq: list[int]
) -> tuple[defaultdict[str, int], defaultdict[str, list[int]]]:
    """Each adjacent byte pair's count (pre-token counts summed) and the pre-tokens holding it.

    Built with numpy: one array of every pre-token's bytes, the pairs that do not straddle two
    pre-tokens sorted by pair, then summed and cut per pair.
    """
    lens = np.fromiter(map(len, words), np.int64, len(words))
    flat = np.frombuffer(b"".join(words), np.uint8).astype(np.uint16)
    codes = (flat[:-1] << 8) | flat[1:]  # the pair starting at each position...
    word = np.repeat(np.arange(len(words)), lens)
    inside = word[:-1] == word[1:]  # ...that ends in the same pre-token
    codes, word = codes[inside], word[:-1][inside]
    order = np.argsort(codes, kind="stable")  # a radix sort, for 16-bit keys
    codes, word = codes[order], word[order]
    starts = np.flatnonzero(np.diff(codes.astype(np.int32), prepend=-1))
    totals = np.add.reduceat(np.asarray(freq, np.int64)[word], starts) if len(codes) else []
    keys = [chr(k >> 8) + chr(k & 255) for k in codes[starts].tolist()]
    pair_count = defaultdict(int, zip(keys, totals.tolist() if len(codes) else []))
    where = defaultdict(list, zip(keys, (w.tolist() for w in np.split(word, starts[1:]))))
    return pair_count, where


def _pop_best(heap: list, pair_count: dict[str, int]) -> str | None:
    get = pair_count.get
    while heap:
        negc, p = heapq.heappop(heap)
        c = get(p, 0)
        if c <= 0:
            continue
        if c == -negc:
            return p
        heapq.heappush(heap, (-c, p))
    return None


# train_bpe(algorithm=...): the name -> the function that learns the merges
ALGORITHMS: dict[str, Callable[..., list[tuple[int, int]]]] = {
    "incremental": learn_merges,
    "reference": learn_merges_reference,
}
