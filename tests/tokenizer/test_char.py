"""The character-level tokenizer: vocabulary, round trip, <|endoftext|>, <|unk|>, save/load."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2lab.errors import TokenizerError
from gpt2lab.tokenizer import get_tokenizer


def test_vocabulary_is_sorted_characters_then_specials(tiny_shakespeare):
    text = tiny_shakespeare.read_text("utf-8")
    tok = get_tokenizer("char", text=text)
    chars = sorted(set(text))
    assert len(chars) == 65  # as the data README states
    assert tok.encode(text[:1000]) == [chars.index(c) for c in text[:1000]]
    assert tok.eot_token == 65 and tok.n_vocab == 66
    assert tok.special_tokens == {"<|endoftext|>": 65}
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=100))
def test_round_trip_any_text(s):
    tok = get_tokenizer("char", text=s)
    assert tok.decode(tok.encode_ordinary(s)) == s
    assert tok.decode_bytes(tok.encode_ordinary(s)) == s.encode("utf-8")
    assert all(0 <= i < tok.n_vocab for i in tok.encode_ordinary(s))


def test_unknown_character_is_a_clear_error_or_unk():
    tok = get_tokenizer("char", text="abc")
    with pytest.raises(TokenizerError, match=r"'z' \(U\+007A\) at position 2"):
        tok.encode("abz")
    tok = get_tokenizer("char", text="abc", unk=True)
    unk = tok.special_tokens["<|unk|>"]
    assert tok.encode("abz") == [0, 1, unk] and unk == 4 and tok.n_vocab == 5
    assert tok.decode([0, unk]) == "a<|unk|>"


def test_special_tokens_follow_tiktoken_rules():
    tok = get_tokenizer("char", text="abc<|>endoftx")
    with pytest.raises(TokenizerError, match="special token"):
        tok.encode("a<|endoftext|>")
    assert tok.encode("a<|endoftext|>b", allowed_special="all") == [
        tok.encode("a")[0],
        tok.eot_token,
        tok.encode("b")[0],
    ]
    assert len(tok.encode_ordinary("<|endoftext|>")) == len("<|endoftext|>")


def test_save_load_and_spec(tmp_path):
    tok = get_tokenizer("char", text="hello world\n", unk=True)
    tok.save(tmp_path)
    back = get_tokenizer(tmp_path)
    assert back.spec() == tok.spec() and back.special_tokens == tok.special_tokens
    assert get_tokenizer(tok.spec()).encode("hello") == tok.encode("hello")
    assert back.decode(np.array(tok.encode("hello"))) == "hello"  # numpy ids decode too


def test_bad_input():
    with pytest.raises(TokenizerError, match="empty training text"):
        get_tokenizer("char", text="")
    with pytest.raises(TokenizerError, match="needs the training text"):
        get_tokenizer("char")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        get_tokenizer("char", text="ab").decode([0, 3])


def test_tokenizers_pickle(tmp_path):
    import pickle

    from gpt2lab.tokenizer import train_bpe

    toks = [
        get_tokenizer("char", text="hello"),
        get_tokenizer("gpt2", backend="python", special_tokens=["<|pad|>"]),
        train_bpe("hello world, hello there " * 20, 270, progress=False),
    ]
    for tok in toks:
        back = pickle.loads(pickle.dumps(tok))
        assert back.spec() == tok.spec() and back.encode("hello") == tok.encode("hello")
    assert len(pickle.dumps(toks[1])) < 1000  # GPT-2 travels by name
