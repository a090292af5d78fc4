"""count_pretokens: the pre-tokens of a text or of streamed files, exactly as findall finds them."""

from __future__ import annotations

from collections import Counter

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2lab.tokenizer import GPT2_PATTERN, GPT4_PATTERN, counts
from gpt2lab.tokenizer.counts import count_pretokens


def test_streaming_files_counts_like_the_whole_text(shared_data, tmp_path):
    text = (shared_data / "gutenberg_books/pg84.txt").read_text("utf-8")[:80_000] + "é😀\n\n  x"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "b.txt").write_text(text[:5000], encoding="utf-8")
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    got = count_pretokens(files, GPT2_PATTERN, block_bytes=1001)  # cuts lines and characters
    want = Counter(p.encode() for p in regex.findall(GPT2_PATTERN, text))
    want.update(p.encode() for p in regex.findall(GPT2_PATTERN, text[:5000]))
    assert got == want


def test_whitespace_table_is_regex_s():
    every = "".join(map(chr, range(0x110000)))
    assert sorted(counts._WHITESPACE) == regex.findall(r"\s", every)


# Text where whitespace runs, letters, digits, punctuation, contractions and the placeholder
# characters of the word-by-word counting meet in every order.
_ALPHABET = list(" \n\t\r\x0b\xa0\u3000\x1c" + "ab'sé1,!😀" + "\x00\x01\ue000")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([*_ALPHABET, " ", " ", "  ", " ll", "\n "]), max_size=1600))
def test_counting_by_words_equals_findall(chars):
    # long enough (>= 1024 characters) to be counted by words; the odd text at both ends
    text = "".join(chars) + " the cat's mat, 12 \n" * 60 + "".join(reversed(chars))
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        got = count_pretokens(text, pattern)
        assert got == Counter(p.encode() for p in regex.findall(pattern, text))


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN])
def test_counting_by_words_on_real_text_and_blocks(shared_data, tmp_path, pattern):
    text = (shared_data / "wikitext2/wiki.valid.tokens").read_text("utf-8")[:300_000]
    text += (shared_data / "gutenberg_books/pg11.txt").read_text("utf-8")[:100_000] + "  \n "
    want = Counter(p.encode() for p in regex.findall(pattern, text))
    assert count_pretokens(text, pattern) == want
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    assert count_pretokens([tmp_path / "a.txt"], pattern, block_bytes=50_000) == want
