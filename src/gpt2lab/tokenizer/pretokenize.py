"""Pre-tokenization: regexes that cut text into pieces; GPT-2's byte-to-unicode map."""

from __future__ import annotations

import functools

import regex

from gpt2lab.errors import TokenizerError

# GPT-2's pattern as released in encoder.py was
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# This form (the one tiktoken pins for GPT-2) splits identically and runs faster: possessive
# quantifiers never backtrack, and `\s++$` takes trailing whitespace in one step.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
# GPT-4's (cl100k) pattern: case-insensitive contractions, digits in groups of at most three,
# and a letter run may take one leading non-letter (e.g. "(hello").
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}


def resolve_pattern(pattern: str) -> str:
    """`"gpt2"`, `"gpt4"` or a custom regex -> the regex string (checked to compile)."""
    pat = PATTERNS.get(pattern, pattern)
    compile_pattern(pat)
    return pat


@functools.lru_cache(maxsize=16)
def compile_pattern(pattern: str) -> regex.Pattern:
    """Compile a pre-tokenization regex with the `regex` module (it knows `\\p{L}`)."""
    try:
        return regex.compile(pattern)
    except regex.error as e:
        raise TokenizerError(
            f"pre-tokenization pattern {pattern!r} does not compile ({e})",
            "a regex the `regex` module accepts, or 'gpt2' / 'gpt4'",
        ) from None


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the other 68 (control, space, ...) map to
    U+0100 onwards in byte order, so every token is a visible, whitespace-free string in
    `encoder.json` and `vocab.bpe`.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


@functools.lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of `bytes_to_unicode`."""
    return {c: b for b, c in bytes_to_unicode().items()}


def token_to_str(token: bytes) -> str:
    """Token bytes -> their string in GPT-2's file format (e.g. b" the" -> "Ġthe")."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def str_to_token(s: str, where: str = "vocabulary") -> bytes:
    """A string in GPT-2's file format -> the token's bytes."""
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in s)
    except KeyError as e:
        raise TokenizerError(
            f"{where} holds token {s!r} with character {e.args[0]!r} outside GPT-2's byte map",
            "a byte-level BPE vocabulary (GPT-2 format)",
            "check that the file is a byte-level BPE encoder.json / vocab.bpe",
        ) from None
