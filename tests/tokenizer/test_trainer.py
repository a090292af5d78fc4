"""train_bpe: merges identical to a brute-force trainer and to the reference, files HF loads."""

from __future__ import annotations

import inspect
from collections import Counter

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2lab.errors import DataError, TokenizerError
from gpt2lab.tokenizer import GPT2_PATTERN, GPT4_PATTERN, get_tokenizer, train_bpe


def brute_force_merges(text: str, pattern: str, n_merges: int) -> list[tuple[int, int]]:
    """The rule, written as plainly as possible: recount every pair after every merge."""
    words = Counter(tuple(p.encode("utf-8")) for p in regex.findall(pattern, text))
    merges = []
    for k in range(n_merges):
        pairs: Counter = Counter()
        for w, c in words.items():
            for i in range(len(w) - 1):
                pairs[w[i], w[i + 1]] += c
        if not pairs:
            break
        top = max(pairs.values())
        best = min(p for p, c in pairs.items() if c == top)
        merges.append(best)
        merged: Counter = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(256 + k)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    return merges


def merge_ids(tok) -> list[tuple[int, int]]:
    return [(tok.ranks[a], tok.ranks[b]) for a, b in tok.merges]


@pytest.mark.parametrize(
    ("source", "name", "pattern", "size", "n_merges"),
    [
        ("gutenberg_books/pg11.txt", "gpt2", GPT2_PATTERN, 40_000, 200),
        ("gutenberg_books/pg11.txt", "gpt4", GPT4_PATTERN, 25_000, 120),
        # ASCII art: long runs of one character ("_____"), where pairs overlap
        ("fortunes/art", "gpt2", GPT2_PATTERN, 30_000, 150),
    ],
)
def test_merges_equal_brute_force_on_real_text(shared_data, source, name, pattern, size, n_merges):
    text = (shared_data / source).read_text("utf-8", errors="replace")[:size]
    tok = train_bpe(text, 256 + n_merges + 1, pattern=name, progress=False)
    assert merge_ids(tok) == brute_force_merges(text, pattern, n_merges)
    assert tok.n_vocab == 256 + n_merges + 1 and tok.eot_token == 256 + n_merges


def test_hand_computed_rules():
    # (a, a) occurs twice in "aaa"; merging goes left to right: "aaa" -> [aa, a]
    tok = train_bpe("aaa", 257, special_tokens=[], progress=False)
    assert merge_ids(tok) == [(97, 97)] and tok.encode("aaa") == [256, 97]
    # all pairs occur once: the smallest (left, right) wins; " c" = (32, 99)
    tok = train_bpe("ab cd", 257, special_tokens=[], progress=False)
    assert merge_ids(tok) == [(32, 99)]


def test_special_token_text_is_not_learned():
    tok = train_bpe("<|endoftext|>" * 50 + "ab", 257 + 1, progress=False)
    assert merge_ids(tok) == [(97, 98)]
    assert tok.encode("ab<|endoftext|>", allowed_special="all") == [256, 257]


def test_trained_vocab_saves_and_loads_in_hf_and_gpt2lab(shared_data, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    text = (shared_data / "tinyshakespeare.txt").read_text("utf-8")
    specials = ["<|endoftext|>", "<|pad|>"]
    tok = train_bpe(text[:300_000], 1000, special_tokens=specials, progress=False)
    tok.save(tmp_path)
    files = (str(tmp_path / "encoder.json"), str(tmp_path / "vocab.bpe"))
    hf = Tokenizer(models.BPE.from_file(*files))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    sample = text[300_000:400_000] + " ünïcode 😀 日本語"
    want = hf.encode(sample).ids
    assert tok.encode(sample) == want
    for backend in ("python", "tiktoken"):
        back = get_tokenizer(tmp_path, backend=backend)
        assert back.encode(sample) == want and back.special_tokens == tok.special_tokens
        assert back.spec() == tok.spec() and back.spec()["kind"] == "bpe"
    assert hf.decode(want) == sample


def test_transformers_loads_what_we_save(shared_data, tmp_path):
    from transformers import GPT2TokenizerFast

    text = (shared_data / "tinyshakespeare.txt").read_text("utf-8")[:100_000]
    tok = train_bpe(text, 600, progress=False)
    tok.save(tmp_path)
    files = (str(tmp_path / "encoder.json"), str(tmp_path / "vocab.bpe"))
    if "vocab_file" in inspect.signature(GPT2TokenizerFast.__init__).parameters:  # transformers 4
        hf = GPT2TokenizerFast(vocab_file=files[0], merges_file=files[1])
    else:  # transformers 5 takes the paths as vocab= / merges=
        hf = GPT2TokenizerFast(vocab=files[0], merges=files[1])
    sample = "ROMEO: What light through yonder window breaks?\n\n  It is the east."
    assert hf(sample)["input_ids"] == tok.encode(sample)


@pytest.fixture(scope="module")
def small_trained(shared_data):
    text = (shared_data / "gutenberg_books/pg1342.txt").read_text("utf-8")[:100_000]
    return train_bpe(text, 700, pattern="gpt4", progress=False)


@settings(max_examples=80, deadline=None)
@given(st.text(max_size=120))
def test_trained_round_trip_and_backends_agree(small_trained, s):
    py = small_trained.with_backend("python")
    ids = small_trained.encode_ordinary(s)
    assert py.encode_ordinary(s) == ids and py.decode(ids) == s


def test_bad_input(tmp_path):
    with pytest.raises(TokenizerError, match="below 256 bytes"):
        train_bpe("hello", 256)
    with pytest.raises(TokenizerError, match="supports only"):
        train_bpe("ab ab", 400, progress=False)
    with pytest.raises(DataError, match="empty"):
        train_bpe("", 300, progress=False)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"fine text\n" * 10 + "caf\xe9".encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8: byte 0xe9 at offset 103"):
        train_bpe([bad], 260, progress=False)
    tok = train_bpe([bad], 258, errors="replace", progress=False)
    assert tok.n_vocab == 258
    with pytest.raises(DataError, match="does not exist"):
        train_bpe([tmp_path / "missing.txt"], 300)


@pytest.mark.parametrize("source", ["gpt2", "trained"])
def test_save_hf_loads_with_autotokenizer(source, shared_data, tmp_path):
    from transformers import AutoTokenizer

    text = (shared_data / "tinyshakespeare.txt").read_text("utf-8")
    if source == "gpt2":
        tok = get_tokenizer("gpt2", special_tokens=["<|pad|>"])
    else:
        tok = train_bpe(text[:100_000], 500, special_tokens=["<|endoftext|>", "<|pad|>"])
    tok.save_hf(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    sample = text[200_000:210_000] + " ünïcode 😀<|endoftext|>x<|pad|>"
    assert hf(sample)["input_ids"] == tok.encode(sample, allowed_special="all")
    assert hf.eos_token_id == tok.eot_token and len(hf) == tok.n_vocab
    assert get_tokenizer(tmp_path).encode(sample, allowed_special="all") == tok.encode(
        sample, allowed_special="all"
    )
    with pytest.raises(TokenizerError, match="not GPT-2's"):
        train_bpe(text[:20_000], 300, pattern="gpt4").save_hf(tmp_path / "x")


def test_loads_a_vocabulary_trained_by_hf(shared_data, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<pad token>"],  # a space: outside GPT-2's byte map
        show_progress=False,
    )
    text = (shared_data / "gutenberg_books/pg1661.txt").read_text("utf-8")
    hf.train_from_iterator([text[:200_000]], trainer)
    hf.model.save(str(tmp_path))  # vocab.json + merges.txt
    sample = text[200_000:260_000] + " ünïcode 😀"
    for backend in ("python", "tiktoken"):
        tok = get_tokenizer(tmp_path, backend=backend)
        assert tok.special_tokens == {"<|endoftext|>": 0, "<pad token>": 1}
        assert tok.encode(sample) == hf.encode(sample).ids
        assert tok.decode(tok.encode(sample)) == sample


def test_several_occurrences_in_a_word_match_brute_force():
    # "abab", "aaaa" and "abcabc" hold the merged pair twice or overlapping
    text = " ".join(["abab", "aaaa", "abcabc", "aaab", "baaa", "abababa", "xaaay"] * 7) + " ab"
    tok = train_bpe(text, 257 + 12, progress=False)
    assert merge_ids(tok) == brute_force_merges(text, GPT2_PATTERN, 12)


# --- the reference trainer and the incremental one give the same merges ----------------------


def both_algorithms(text_or_files, vocab_size, **kw) -> tuple[list, list]:
    fast = train_bpe(text_or_files, vocab_size, **kw)
    ref = train_bpe(text_or_files, vocab_size, algorithm="reference", **kw)
    assert ref.ranks == fast.ranks and ref.special_tokens == fast.special_tokens
    return merge_ids(fast), merge_ids(ref)


@pytest.mark.parametrize(
    ("source", "pattern", "size", "n_merges"),
    [
        ("tinyshakespeare.txt", "gpt2", 60_000, 300),
        ("gutenberg_books/pg11.txt", "gpt4", 40_000, 200),
        ("fortunes/art", "gpt2", 30_000, 200),  # long runs of one character: overlapping pairs
    ],
)
def test_reference_and_incremental_agree_on_real_text(shared_data, source, pattern, size, n_merges):
    text = (shared_data / source).read_text("utf-8", errors="replace")[:size]
    fast, ref = both_algorithms(text, 256 + n_merges + 1, pattern=pattern)
    assert fast == ref and len(fast) == n_merges


@pytest.mark.parametrize(
    ("text", "specials"),
    [
        ("aaaa aaaaa aaa a aaaaaaaa", []),  # one pair overlapping itself
        ("abababa abab bababab", ["<|endoftext|>"]),
        (
            "<|endoftext|>hello<|pad|>world hello world<|endoftext|>" * 5,
            ["<|endoftext|>", "<|pad|>"],
        ),
        ("héllo wörld 日本語 日本 😀😀 😀 ünïcode " * 3, ["<|endoftext|>"]),
    ],
)
def test_reference_and_incremental_agree_on_edge_cases(text, specials):
    fast, ref = both_algorithms(text, 256 + 6 + len(specials), special_tokens=specials)
    assert fast == ref
    if not any(s in text for s in specials):
        assert fast == brute_force_merges(text, GPT2_PATTERN, 6)


def test_reference_runs_out_of_pairs_as_the_incremental_one_does():
    for algorithm in ("incremental", "reference"):
        with pytest.raises(TokenizerError, match="supports only 258 ids"):
            train_bpe("ab ab", 300, special_tokens=[], algorithm=algorithm)
    with pytest.raises(TokenizerError, match="unknown algorithm 'fast'"):
        train_bpe("ab", 300, algorithm="fast")
