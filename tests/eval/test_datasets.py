"""Files in the wrong format: one-line errors that name the line and the expected format."""

from __future__ import annotations

import json

import pytest

from gpt2lab.errors import DataError
from gpt2lab.eval import datasets

CBT_OK = [f"{i} Sentence {i} ." for i in range(1, 21)] + ["21 The XXXXX ran .\tdog\t\tcat|dog"]
HS_OK = json.dumps({"ctx": "A man", "endings": ["a", "b"], "label": 1})


@pytest.mark.parametrize(
    "reader,lines,line,fragment",
    [
        (datasets.read_lambada, ['{"text": "a b"}', "not json"], 2, "lambada_test.jsonl"),
        (datasets.read_lambada, ['{"text": "oneword"}'], 1, "no last word"),
        (datasets.read_lambada, ['["a list"]'], 1, "not an object"),
        (datasets.read_hellaswag, [HS_OK, '{"ctx": "x", "endings": [], "label": 0}'], 2, "endings"),
        (datasets.read_hellaswag, [HS_OK, HS_OK.replace('"label": 1', '"label": 5')], 2, "label"),
        (datasets.read_cbt, CBT_OK[:5] + ["7 skipped"], 6, "numbered 1-20"),
        (datasets.read_cbt, CBT_OK[:-1] + ["21 no blank .\tdog\t\tcat|hen"], 21, "XXXXX"),
        (datasets.read_cbt, CBT_OK[:10], 11, "record ends after 10 lines"),
        (datasets.read_tokenized, [" = Title = ", "Plain text line"], 2, "start with a space"),
    ],
)
def test_wrong_format_names_line_and_format(tmp_path, reader, lines, line, fragment):
    path = tmp_path / "data.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = (path, "WikiText") if reader is datasets.read_tokenized else (path,)
    with pytest.raises(DataError) as e:
        reader(*args)
    msg = str(e.value)
    assert f"{path}:{line}:" in msg and fragment in msg and "expected" in msg and "\n" not in msg


def test_good_records_parse(tmp_path):
    path = tmp_path / "cbt.txt"
    path.write_text("\n".join(CBT_OK + [""] + CBT_OK) + "\n", encoding="utf-8")
    (a, b) = datasets.read_cbt(path)
    assert a.query == "The XXXXX ran ." and a.answer == "dog" and a.candidates == ("cat", "dog")
    assert len(a.context) == 20 and a == b
    hs = tmp_path / "hs.jsonl"
    hs.write_text(HS_OK + "\n\n", encoding="utf-8")
    assert datasets.read_hellaswag(hs) == [datasets.ChoiceExample("A man", ("a", "b"), 1)]


def test_binary_text8_and_missing_files(tmp_path):
    bad = tmp_path / "text8"
    bad.write_bytes(b"abc def Ghi\n")
    with pytest.raises(DataError, match=r"text8:1: byte b'G' at offset 8.*a-z and spaces"):
        datasets.read_text8(bad)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8: byte 0xe9 at offset 6 \(line 2"):
        datasets.read_text(latin1)
    with pytest.raises(DataError, match="does not exist"):
        datasets.read_text(tmp_path / "nope.txt")
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(DataError, match="is empty"):
        datasets.read_bytes(tmp_path / "empty")
