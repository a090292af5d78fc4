"""Sources: document boundaries, exact piece cuts, tables and `datasets`, one-line errors."""

from __future__ import annotations

import json

import pytest

from gpt2lab.data import sources
from gpt2lab.data.sources import SourceSpec, iter_pieces
from gpt2lab.errors import DataError


def _docs(spec: SourceSpec) -> list[str]:
    return _docs_of(iter_pieces(spec))


def test_long_documents_are_cut_where_gpt2_tokens_do_not_change(
    tiny_shakespeare, gpt2_ref, monkeypatch
):
    monkeypatch.setattr(sources, "PIECE_CHARS", 3000)
    monkeypatch.setattr(sources, "READ_BYTES", 4096)
    pieces = list(iter_pieces(SourceSpec([str(tiny_shakespeare)])))
    text = tiny_shakespeare.read_text(encoding="utf-8")
    assert len(pieces) > 200 and [f for _, f in pieces] == [True] + [False] * (len(pieces) - 1)
    assert "".join(p for p, _ in pieces) == text
    enc = gpt2_ref
    assert sum((enc.encode_ordinary(p) for p, _ in pieces), []) == enc.encode_ordinary(text)


def test_separator_and_blank_lines_split_like_str_split(shared_data, monkeypatch):
    monkeypatch.setattr(sources, "READ_BYTES", 1000)  # separators straddle read chunks
    path = shared_data / "fortunes" / "wisdom"
    text = path.read_text(encoding="utf-8")
    want = [d for d in text.split("\n%\n") if d.strip()]
    assert _docs(SourceSpec([str(path)], separator="\n%\n")) == want
    import re

    want = [d for d in re.split(r"\n[ \t\r]*\n\s*", text) if d.strip()]
    assert _docs(SourceSpec([str(path)], split_on_blank_lines=True)) == want


def test_directories_and_globs_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    for name, body in [("b/2.txt", "two"), ("b/1.txt", "one"), ("c.md", "three"), (".hid", "x")]:
        (tmp_path / name).write_text(body)
    assert _docs(SourceSpec([str(tmp_path)])) == ["one", "two", "three"]
    assert _docs(SourceSpec([str(tmp_path / "b" / "*.txt")])) == ["one", "two"]
    with pytest.raises(DataError, match="matches no files"):
        _docs(SourceSpec([str(tmp_path / "*.nope")]))


def _tables(tmp_path, texts):
    import pandas as pd

    df = pd.DataFrame({"id": range(len(texts)), "body": texts})
    df.to_json(tmp_path / "t.jsonl", orient="records", lines=True, force_ascii=False)
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_parquet(tmp_path / "t.parquet")
    return tmp_path


TEXTS = ["first, with a comma", 'quote " and\nnewline', "ünïcödé ✓", "x" * 5000]


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_tables_read_the_named_field(tmp_path, suffix):
    d = _tables(tmp_path, TEXTS)
    assert _docs(SourceSpec([str(d / f"t.{suffix}")], field="body")) == TEXTS
    with pytest.raises(DataError) as e:
        _docs(SourceSpec([str(d / f"t.{suffix}")], field="text"))
    msg = str(e.value)
    assert f"t.{suffix}" in msg and "'text'" in msg and "`field`" in msg and "\n" not in msg


def test_hf_datasets_reads_local_files_like_the_native_reader(tmp_path):
    d = _tables(tmp_path, TEXTS)
    spec = SourceSpec(dataset="json", data_files=[str(d / "t.jsonl")], field="body")
    assert _docs(spec) == TEXTS


def test_bad_files_are_one_line_errors(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    cases = [
        ("bin.txt", {}, "looks binary (a NUL byte at offset 4)"),
        ("latin.txt", {}, "is not UTF-8: byte 0xe9 at offset 3"),
        ("bad.jsonl", {}, "bad.jsonl line 2: not JSON"),
    ]
    for name, kw, message in cases:
        with pytest.raises(DataError) as e:
            _docs(SourceSpec([str(tmp_path / name)], **kw))
        assert message in str(e.value) and "\n" not in str(e.value)
    assert _docs(SourceSpec([str(tmp_path / "latin.txt")], errors="replace")) == [
        "caf\ufffd au lait"
    ]


def test_records_with_other_types_fail(tmp_path):
    (tmp_path / "n.jsonl").write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match="line 1: field 'text' is a int, not text"):
        _docs(SourceSpec([str(tmp_path / "n.jsonl")]))


def test_long_parts_between_separators_come_in_pieces_and_join_back(tiny_shakespeare, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_CHARS", 400)  # many speeches are longer than a piece
    monkeypatch.setattr(sources, "READ_BYTES", 300)
    text = tiny_shakespeare.read_text(encoding="utf-8")
    pieces, size = [], 0
    for piece in iter_pieces(SourceSpec([str(tiny_shakespeare)], separator="\n\n")):
        pieces.append(piece)
        size += len(piece[0])
        if size > 200_000:
            break
    docs = _docs_of(pieces)[:-1]  # the last one may be cut short by the break
    want = text.split("\n\n")[: len(docs)]
    assert docs == want and sum(not f for _, f in pieces) > 50


def _docs_of(pieces) -> list[str]:
    """Join continuation pieces onto the document they belong to."""
    docs: list[str] = []
    for text, first in pieces:
        if first:
            docs.append(text)
        else:
            docs[-1] += text
    return docs
