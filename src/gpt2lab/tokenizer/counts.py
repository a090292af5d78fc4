"""How often each pre-token occurs in a text or in files streamed block by block.

The counts are what BPE training starts from (trainer.py). Natural text repeats its words, so the
GPT-2 and GPT-4 patterns are run once per distinct space-separated word, not once per occurrence.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import regex
from tqdm.auto import tqdm

from gpt2lab.errors import DataError
from gpt2lab.io import UTF8Decoder
from gpt2lab.tokenizer.pretokenize import GPT2_PATTERN, GPT4_PATTERN, compile_pattern

TextSource = str | os.PathLike | Sequence[str | os.PathLike]
BLOCK_BYTES = 1 << 22  # bytes read from a file at a time


def count_pretokens(
    source: TextSource,
    pattern: str,
    special_tokens: Sequence[str] = (),
    errors: str = "strict",
    progress: bool | None = False,
    block_bytes: int = BLOCK_BYTES,
) -> Counter[bytes]:
    r"""How often each pre-token (as UTF-8 bytes) occurs; files are streamed, never loaded whole.

    Files are read `block_bytes` at a time; `errors` is "strict" (a byte that is not UTF-8 is a
    DataError naming the file and offset) or "replace"; `progress` shows a bar over the bytes
    read (None: when stderr is a terminal).

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

    for blocks in _texts(source, errors, progress, block_bytes):
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


def _texts(
    source: TextSource, errors: str, progress: bool | None, block_bytes: int
) -> Iterator[Iterator]:
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
    bar = progress_bar(sum(p.stat().st_size for p in paths), "reading", progress, unit="B")
    for path in paths:
        yield _file_blocks(path, errors, bar, block_bytes)
    bar.close()


def _file_blocks(path: Path, errors: str, bar, block_bytes: int) -> Iterator[tuple[str, bool]]:
    decoder = UTF8Decoder(path, errors)
    with open(path, "rb") as f:
        while True:
            block = f.read(block_bytes)
            text = decoder.decode(block, final=not block)
            bar.update(len(block))
            yield text, not block
            if not block:
                return


def progress_bar(total: int, desc: str, enabled: bool | None, unit: str = "it") -> tqdm:
    """A tqdm bar shown only when `enabled` (None: when stderr is a terminal)."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        disable=None if enabled is None else not enabled,
        leave=False,
    )
