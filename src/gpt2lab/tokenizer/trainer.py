"""Training a byte-level BPE vocabulary: pre-token counts streamed from text or files, then merges.

The rule (deterministic, and what the brute-force trainer in the tests does): the base ids are the
byte values 0..255; each step merges the most frequent adjacent pair, counting every adjacent
position ("aaa" holds (a, a) twice), ties going to the smallest (left id, right id); merge k gets id
256 + k and replaces the pair's occurrences left to right. The trainer below is incremental: a
merge touches only the pre-tokens that hold the pair, and a heap finds the next best pair.
"""

from __future__ import annotations

import heapq
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import regex

from gpt2lab.errors import DataError, TokenizerError
from gpt2lab.tokenizer.base import EOT
from gpt2lab.tokenizer.bpe import BPETokenizer
from gpt2lab.tokenizer.pretokenize import (
    GPT2_PATTERN,
    GPT4_PATTERN,
    compile_pattern,
    resolve_pattern,
)

TextSource = str | os.PathLike | Sequence[str | os.PathLike]
_BLOCK = 1 << 22  # bytes read from a file at a time
_MAX_ID = 0x10FFFF  # ids are held as characters (see learn_merges)


def train_bpe(
    text_or_files: TextSource,
    vocab_size: int,
    pattern: str = "gpt2",
    special_tokens: Iterable[str] = (EOT,),
    errors: str = "strict",
    progress: bool | None = None,
    backend: str = "tiktoken",
) -> BPETokenizer:
    """Train byte-level BPE to `vocab_size` ids (256 bytes + merges + special tokens).

    Args:
        text_or_files: a text (`str`), or a path / list of paths (`Path` or `str` in a list),
            streamed block by block.
        pattern: "gpt2", "gpt4" or a custom regex that cuts text into pre-tokens.
        special_tokens: their ids follow the merges; their text in the training data is not
            learned from.
        errors: "strict" (a non-UTF-8 file is an error naming the byte offset) or "replace".
        progress: show a progress bar (default: when stderr is a terminal).
    """
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
    merges = learn_merges(counts, n_merges, progress)
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


def learn_merges(
    counts: dict[bytes, int], n_merges: int, progress: bool | None = None
) -> list[tuple[int, int]]:
    """The first `n_merges` merges (as id pairs; merge k makes id 256 + k) of pre-token counts.

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
    bar = _progress(n_merges, "merges", progress)
    while len(merges) < n_merges:
        best = _pop_best(heap, pair_count)
        if best is None:
            bar.close()
            raise TokenizerError(
                f"the text supports only {256 + len(merges)} ids before specials: after "
                f"{len(merges)} merges no adjacent pair is left, but {n_merges} were asked for",
                f"vocab_size <= {256 + len(merges)} + the number of special tokens",
                "use a smaller --vocab-size or more text",
            )
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
    import numpy as np

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


def count_pretokens(
    source: TextSource,
    pattern: str,
    special_tokens: Sequence[str] = (),
    errors: str = "strict",
    progress: bool | None = None,
) -> Counter[bytes]:
    r"""How often each pre-token (as UTF-8 bytes) occurs; files are streamed, never loaded whole.

    A block's last pre-tokens may change once the next block's text follows them (a whitespace
    run at the very end is one piece, `\s++$`), so the pieces ending in its last few characters
    are carried over and counted with the next block.
    """
    pat = compile_pattern(pattern)
    splitter = (
        compile_pattern("|".join(regex.escape(s) for s in special_tokens))
        if special_tokens
        else None
    )
    tail = max([16, *(len(s) for s in special_tokens)])
    counts: Counter[str] = Counter()
    dedup = pattern in (GPT2_PATTERN, GPT4_PATTERN)  # the patterns _count_words holds for

    def count(counts: Counter[str], text: str) -> None:
        if dedup:
            _count_words(counts, pat, text)
        else:
            counts.update(pat.findall(text))

    for blocks in _texts(source, errors, progress):
        carry = ""
        for block, last in blocks:
            text = carry + block
            # split only where a special token's text occurs: splitting copies the whole block
            has_special = splitter is not None and any(s in text for s in special_tokens)
            parts = splitter.split(text) if has_special else [text]
            for part in parts[:-1]:
                count(counts, part)
            end = parts[-1]
            if dedup:  # count the block but its last few hundred characters by distinct words
                cut = _last_cut(end, len(end) - 2 * tail - 256) if not last else len(end)
                count(counts, end[:cut])
                end = end[cut:]
            pieces = pat.findall(end)
            k, carried = len(pieces), 0
            if not last and sum(map(len, pieces)) == len(end):
                while k > 0 and carried < tail:
                    k -= 1
                    carried += len(pieces[k])
            counts.update(pieces[:k] if k < len(pieces) else pieces)
            carry = "".join(pieces[k:]) if k < len(pieces) else ""
    return Counter({piece.encode("utf-8"): c for piece, c in counts.items() if piece})


# What `\s` matches in the `regex` module (a test checks it against every code point)
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
_WHITESPACE += "\u2028\u2029\u202f\u205f\u3000"
_PLACEHOLDERS = "\x00\x01\x02\x03\ue000\ue001\ue002\ue003"


def _last_cut(text: str, stop: int) -> int:
    """The last position <= `stop` (or 0) of a space after a non-space: see `_count_words`."""
    i = text.rfind(" ", 0, max(stop, 0) + 1)
    while i > 0 and text[i - 1] in _WHITESPACE:
        i = text.rfind(" ", 0, i)
    return max(i, 0)


def _count_words(counts: Counter[str], pat: regex.Pattern, text: str) -> None:
    r"""Add the pre-tokens of `text` (GPT-2's or GPT-4's pattern) to `counts`, as findall would.

    Each distinct space-separated word is cut into pre-tokens once, not once per occurrence. For
    both patterns a space that follows a non-space starts a pre-token (no pre-token holds a
    non-space and then a space), and no match before it looks past it (the only lookahead, `$`
    and `(?!\S)`, follows whitespace); so the text cut before such spaces gives the same
    pre-tokens piece by piece, and joined pieces ending in a non-space can be matched together.
    Spaces that follow whitespace are hidden first behind a placeholder, so `split(" ")` cuts
    only before the others.
    """
    ph = next((c for c in _PLACEHOLDERS if c not in text), None)
    if ph is None or len(text) < 1024:
        counts.update(pat.findall(text))
        return
    for w in _WHITESPACE:
        if w != " " and w in text:  # (a search for one character is the fast one)
            text = text.replace(w + " ", w + ph)
    # "  " -> " ph" leaves no two spaces side by side; then each space after ph is hidden too
    text = text.replace("  ", " " + ph).replace(ph + " ", ph + ph)
    words = text.split(" ")
    counts.update(pat.findall(words[0].replace(ph, " ")))
    # the last word may end in whitespace (followed by the end of the text): on its own
    counts.update(pat.findall((" " + words.pop()).replace(ph, " ")) if len(words) > 1 else ())
    by_count: dict[int, list[str]] = defaultdict(list)
    for word, n in Counter(words[1:]).items():
        by_count[n].append(word)
    for n, same in by_count.items():  # one findall for all the words seen n times
        pieces = pat.findall((" " + " ".join(same)).replace(ph, " "))
        if n == 1:
            counts.update(pieces)
        else:
            for piece, k in Counter(pieces).items():
                counts[piece] += k * n


def _texts(source: TextSource, errors: str, progress: bool | None) -> Iterator[Iterator]:
    """One iterator of (text block, is_last) per text or file."""
    if isinstance(source, str):
        yield iter([(source, True)])
        return
    paths = [Path(source)] if isinstance(source, os.PathLike) else [Path(p) for p in source]
    if not paths:
        raise DataError("no training files were given", "at least one file")
    for p in paths:
        if not p.is_file():
            raise DataError(f"training file {p} does not exist", "a readable text file")
    bar = _progress(sum(p.stat().st_size for p in paths), "reading", progress, unit="B")
    for path in paths:
        yield _file_blocks(path, errors, bar)
    bar.close()


def _utf8_cut(data: bytes) -> int:
    """The length of `data` without an incomplete UTF-8 character at its end."""
    for k in range(1, min(4, len(data)) + 1):
        byte = data[-k]
        if byte & 0xC0 != 0x80:  # a lead byte or ASCII: does its character fit in k bytes?
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 6 else 3 if byte >> 4 == 14 else 4
            return len(data) - k if need > k else len(data)
    return len(data)


def decode_utf8(
    data: bytes, where: str | os.PathLike, errors: str = "strict", offset: int = 0
) -> str:
    """Decode UTF-8; invalid bytes are an error naming `where` and the byte offset, or U+FFFD."""
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where} is not UTF-8: byte offset {offset + e.start} holds "
            f"{data[e.start : e.start + 4]!r}",
            "UTF-8 text",
            "convert the file (e.g. `iconv -f latin1 -t utf-8`) or pass errors='replace' "
            "(--errors replace)",
        ) from None
    except LookupError:
        raise DataError(f"unknown errors={errors!r}", "'strict' or 'replace'") from None


def _file_blocks(path: Path, errors: str, bar) -> Iterator[tuple[str, bool]]:
    offset, pending = 0, b""
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            data = pending + block
            cut = _utf8_cut(data) if block else len(data)
            data, pending = data[:cut], data[cut:]
            text = decode_utf8(data, path, errors, offset)
            offset += len(data)
            bar.update(len(block))
            yield text, not block
            if not block:
                return


def _progress(total: int, desc: str, enabled: bool | None, unit: str = "it"):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        disable=None if enabled is None else not enabled,
        leave=False,
    )
