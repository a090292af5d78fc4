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
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import regex

from gpt2lab.errors import DataError, TokenizerError
from gpt2lab.tokenizer.base import EOT
from gpt2lab.tokenizer.bpe import BPETokenizer
from gpt2lab.tokenizer.pretokenize import compile_pattern, resolve_pattern

TextSource = str | os.PathLike | Sequence[str | os.PathLike]
_BLOCK = 1 << 22  # bytes read from a file at a time


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
    """The first `n_merges` merges (as id pairs; merge k makes id 256 + k) of pre-token counts."""
    words = [list(w) for w in counts]
    freq = list(counts.values())
    pair_count: dict[tuple[int, int], int] = {}
    # pair -> the pre-tokens that hold it (or held it: entries go stale, and may repeat)
    where: dict[tuple[int, int], list[int]] = {}
    for w, (ids, c) in enumerate(zip(words, freq)):
        for p in zip(ids, ids[1:]):
            pair_count[p] = pair_count.get(p, 0) + c
            s = where.get(p)
            if s is None:
                where[p] = [w]
            else:
                s.append(w)
    # Max-heap of (count, pair) by pushing (-count, left, right): ties pop the smallest pair.
    # Entries may be stale (counts only fall between pushes), so a popped entry is re-checked.
    heap = [(-c, a, b) for (a, b), c in pair_count.items()]
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
        a, b = best
        new = 256 + len(merges)
        merges.append(best)
        grown: set[tuple[int, int]] = set()  # pairs holding the new id: they need heap entries
        get = pair_count.get
        for w in where.pop(best):
            ids = words[w]
            n = len(ids)
            pos = []  # where the pair starts, found left to right: (a, a) in "aaa" only at 0
            if ids.count(a) == 1:  # most words: one search, no exception
                i = ids.index(a)
                if i + 1 < n and ids[i + 1] == b:
                    pos.append(i)
            else:
                i = 0
                try:
                    while True:
                        i = ids.index(a, i)
                        if i + 1 < n and ids[i + 1] == b:
                            pos.append(i)
                            i += 2
                        else:
                            i += 1
                except ValueError:
                    pass
            if not pos:
                continue  # stale or repeated entry: the word no longer holds the pair
            c = freq[w]
            if len(pos) == 1:  # the common case, written out
                i = pos[0]
                out = ids[:i]
                out.append(new)
                out += ids[i + 2 :]
                pair_count[best] -= c
                if i > 0:
                    p = (ids[i - 1], a)
                    pair_count[p] -= c
                    p = (ids[i - 1], new)
                    pair_count[p] = get(p, 0) + c
                    grown.add(p)
                    if p in where:
                        where[p].append(w)
                    else:
                        where[p] = [w]
                if i + 2 < n:
                    p = (b, ids[i + 2])
                    pair_count[p] -= c
                    p = (new, ids[i + 2])
                    pair_count[p] = get(p, 0) + c
                    grown.add(p)
                    if p in where:
                        where[p].append(w)
                    else:
                        where[p] = [w]
                words[w] = out
                continue
            out = []
            prev = 0
            for i in pos:
                out += ids[prev:i]
                out.append(new)
                prev = i + 2
            out += ids[prev:]
            # Only the pairs that touch a merged position change: the old ones go...
            last = -1
            for i in pos:
                for k in (i - 1, i, i + 1):
                    if last < k < n - 1 and k >= 0:
                        p = (ids[k], ids[k + 1])
                        pair_count[p] -= c
                        last = k
            # ...and the pairs holding the new id come, the only ones new to this word.
            m, last = len(out), -1
            for t, i in enumerate(pos):
                for k in (i - t - 1, i - t):  # the new token sits at i - t in `out`
                    if last < k < m - 1 and k >= 0:
                        p = (out[k], out[k + 1])
                        pair_count[p] = get(p, 0) + c
                        grown.add(p)
                        last = k
                        _add(where, p, w)
            words[w] = out
        for p in grown:
            heapq.heappush(heap, (-pair_count[p], p[0], p[1]))
        pair_count.pop(best, None)
        bar.update()
    bar.close()
    return merges


def _add(where: dict[tuple[int, int], list[int]], p: tuple[int, int], w: int) -> None:
    s = where.get(p)
    if s is None:
        where[p] = [w]
    else:
        s.append(w)


def _pop_best(heap: list, pair_count: dict[tuple[int, int], int]) -> tuple[int, int] | None:
    while heap:
        negc, a, b = heapq.heappop(heap)
        c = pair_count.get((a, b), 0)
        if c <= 0:
            continue
        if c == -negc:
            return a, b
        heapq.heappush(heap, (-c, a, b))
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
    for blocks in _texts(source, errors, progress):
        carry = ""
        for block, last in blocks:
            text = carry + block
            # split only where a special token's text occurs: splitting copies the whole block
            has_special = splitter is not None and any(s in text for s in special_tokens)
            parts = splitter.split(text) if has_special else [text]
            for part in parts[:-1]:
                counts.update(pat.findall(part))
            pieces = pat.findall(parts[-1])
            k, carried = len(pieces), 0
            if not last and sum(map(len, pieces)) == len(parts[-1]):
                while k > 0 and carried < tail:
                    k -= 1
                    carried += len(pieces[k])
            counts.update(pieces[:k] if k < len(pieces) else pieces)
            carry = "".join(pieces[k:]) if k < len(pieces) else ""
    return Counter({piece.encode("utf-8"): c for piece, c in counts.items() if piece})


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
