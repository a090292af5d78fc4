"""`gpt2lab tokenizer`: train, encode, decode, count, show; bad input gives one-line errors."""

from __future__ import annotations

import io
import json
import sys

import pytest

from gpt2lab import cli
from gpt2lab.tokenizer import get_tokenizer


def run(capsys, *args: str, stdin: bytes | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = cli.main(["tokenizer", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_then_encode_count_decode(capsys, shared_data, tmp_path):
    src = shared_data / "gutenberg_books/pg11.txt"
    code, out, _ = run(
        capsys,
        "train",
        str(src),
        "--vocab-size",
        "400",
        "--out",
        str(tmp_path / "tok"),
        "--special",
        "<|endoftext|>",
        "--special",
        "<|pad|>",
        "--no-progress",
    )
    assert code == 0 and "400 ids" in out
    tok = get_tokenizer(tmp_path / "tok")
    assert tok.n_vocab == 400 and tok.special_tokens == {"<|endoftext|>": 398, "<|pad|>": 399}
    text = src.read_text("utf-8")
    code, out, _ = run(capsys, "encode", str(src), "--tokenizer", str(tmp_path / "tok"), "--json")
    ids = json.loads(out)
    assert code == 0 and ids == tok.encode(text)
    (tmp_path / "ids.json").write_text(out)
    code, out, _ = run(
        capsys, "decode", str(tmp_path / "ids.json"), "--tokenizer", str(tmp_path / "tok")
    )
    assert code == 0 and out == text
    code, out, _ = run(capsys, "count", str(src), "--tokenizer", str(tmp_path / "tok"), "--json")
    assert json.loads(out)["tokens"] == len(ids)


def test_train_with_the_reference_algorithm_writes_the_same_vocabulary(capsys, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("the cat sat on the mat, the cat ate the rat\n" * 20, encoding="utf-8")
    for algorithm in ("incremental", "reference"):
        out = str(tmp_path / algorithm)
        args = ["train", str(src), "--vocab-size", "265", "--out", out, "--no-progress"]
        code, _, err = run(capsys, *args, "--algorithm", algorithm)
        assert code == 0 and err == ""
    fast, ref = (get_tokenizer(tmp_path / a) for a in ("incremental", "reference"))
    assert fast.spec() == ref.spec()  # the spec holds the digest of the vocabulary and merges
    with pytest.raises(SystemExit):
        cli.main(["tokenizer", "train", "--help"])
    assert "--algorithm {incremental,reference}" in capsys.readouterr().out


def test_encode_stdin_matches_tiktoken(capsys, monkeypatch, ref_tiktoken):
    text = "Hello world!\n  日本語 😀 gazed"
    code, out, _ = run(capsys, "encode", stdin=text.encode(), monkeypatch=monkeypatch)
    assert code == 0 and [int(x) for x in out.split()] == ref_tiktoken.encode(text)
    code, out, err = run(capsys, "encode", stdin=b"a<|endoftext|>", monkeypatch=monkeypatch)
    assert code == 1 and "--allow-special" in err
    code, out, _ = run(
        capsys, "encode", "--allow-special", stdin=b"a<|endoftext|>", monkeypatch=monkeypatch
    )
    assert out.split()[-1] == "50256"


def test_show_pieces(capsys, ref_tiktoken):
    text = "Hello world, gazed"
    code, out, _ = run(capsys, "show", text, "--color", "never")
    ids = ref_tiktoken.encode(text)
    assert out.splitlines()[0] == "|".join(ref_tiktoken.decode([i]) for i in ids)
    assert str(ids) in out
    code, out, _ = run(capsys, "show", text, "--color", "always")
    assert out.count("\x1b[48;5;") == len(ids)


def test_bad_input_is_one_line_errors(capsys, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"ok\n" + "caf\xe9".encode("latin-1"))
    code, _, err = run(capsys, "count", str(bad))
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert (
        "latin1.txt is not UTF-8: byte 0xe9 at offset 6 (line 2)" in err
        and "--errors replace" in err
    )
    code, out, _ = run(capsys, "count", str(bad), "--errors", "replace")
    assert code == 0
    code, _, err = run(
        capsys, "train", str(bad), "--vocab-size", "100", "--out", str(tmp_path / "t")
    )
    assert code == 1 and "vocab_size=100" in err
    code, _, err = run(capsys, "count", str(tmp_path / "missing.txt"))
    assert code == 1 and "cannot read" in err
    assert cli.main(["tokenizer", "frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_add_special_gives_gpt2_new_ids_after_its_vocabulary(capsys, monkeypatch, tmp_path):
    (tmp_path / "t.txt").write_text("<|startoftext|>Hi<|pad|>")
    flags = ["--add-special", "<|startoftext|>, <|pad|>,<|unk|>", "--allow-special", "--json"]
    code, out, _ = run(capsys, "encode", str(tmp_path / "t.txt"), *flags)
    assert code == 0 and json.loads(out) == [50257, 17250, 50258]
    code, out, _ = run(capsys, "decode", "--add-special", "<|startoftext|>,<|pad|>,<|unk|>",
                       stdin=b"50259 50257", monkeypatch=monkeypatch)  # fmt: skip
    assert code == 0 and out == "<|unk|><|startoftext|>"
    for bad, message in ((["--tokenizer", str(tmp_path)], "--tokenizer gpt2"), ([], "empty")):
        spec = "<|a|>" if bad else "<|a|>,,<|b|>"
        code, _, err = run(capsys, "count", str(tmp_path / "t.txt"), "--add-special", spec, *bad)
        assert code == 2 and message in err, err
