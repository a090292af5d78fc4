"""Where documents come from: text files, .jsonl, .csv, .parquet or a Hugging Face dataset.

Sources yield `(text, first)` pieces: `first` starts a new document. A long document comes in
pieces cut only after a lone newline between two non-space characters ("a\nB"), where GPT-2's
pre-tokenizer splits anyway, so the pieces encode to exactly the tokens of the whole.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import gzip
import io
import itertools
import json
import os
import re
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2lab.data.catalog import local_example
from gpt2lab.errors import DataError, mark_key
from gpt2lab.io import RECORD_LIMIT, UTF8Decoder, read_line_bounded

PIECE_CHARS = 1 << 18  # aim for pieces of ~256K characters
HARD_PIECE_CHARS = 1 << 24  # a 16M-character line is cut anywhere (the only inexact cut)
READ_BYTES = 1 << 20  # bytes read from a file at a time
_BLANK_LINES = r"\n[ \t\r]*\n\s*"
TABLE_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}

Piece = tuple[str, bool]


@dataclass
class SourceSpec:
    """What to read: local inputs (files, directories, globs) or a Hugging Face dataset."""

    inputs: list[str] = field(default_factory=list)
    field: str = "text"  # the jsonl field / csv or parquet column holding the text
    split_on_blank_lines: bool = False
    separator: str | None = None  # a string that separates documents inside a text file
    errors: str = "strict"  # "replace" maps undecodable bytes to U+FFFD
    dataset: str | None = None  # a Hugging Face dataset name, e.g. "openwebtext"
    dataset_config: str | None = None
    dataset_split: str = "train"
    data_files: list[str] | None = None  # for load_dataset("json", data_files=...) and the like
    preset: str | None = None  # for the offline error message
    max_docs: int | None = None  # stop after this many documents (a slice of a large corpus)
    max_record_bytes: int = RECORD_LIMIT  # a longer JSONL line / CSV field is an error

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description for meta.json."""
        if self.dataset:
            keys = ("dataset", "dataset_config", "dataset_split", "data_files", "field")
        else:
            keys = ("inputs", "field", "split_on_blank_lines", "separator", "errors")
        if self.max_docs is not None:
            keys = (*keys, "max_docs")
        return {k: getattr(self, k) for k in keys}


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named by paths, directories (every file below, sorted) and globs, in order."""
    if not inputs:
        raise DataError(
            "no input given",
            "one or more files, directories or globs",
            f"pass {mark_key('inputs')}",
        )
    out: list[Path] = []
    for spec in inputs:
        p = Path(spec).expanduser()
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts)
            )
        elif p.is_file():
            found = [p]
        elif glob.has_magic(spec):
            found = sorted(Path(f) for f in glob.glob(os.path.expanduser(spec), recursive=True))
            found = [f for f in found if f.is_file()]
        else:
            raise DataError(
                f"input {spec} does not exist",
                "a file, directory or glob",
                f"check {mark_key('inputs')}",
            )
        if not found:
            raise DataError(
                f"input {spec} matches no files",
                "at least one text file",
                f"check {mark_key('inputs')}",
            )
        out += found
    return out


def file_kind(path: Path) -> str:
    """'jsonl', 'csv', 'parquet' or 'text', from the suffix (a trailing .gz is looked through)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return TABLE_SUFFIXES.get(suffixes[-1] if suffixes else "", "text")


class ByteCounter:
    """Bytes of input consumed so far: the progress bar reads it."""

    def __init__(self) -> None:
        self.n = 0


def iter_pieces(spec: SourceSpec, counter: ByteCounter | None = None) -> Iterator[Piece]:
    """Every piece of every document of the source (the first `max_docs`), in a fixed order."""
    pieces = _all_pieces(spec, counter or ByteCounter())
    if spec.max_docs is None:
        return pieces
    return _first_docs(pieces, spec.max_docs)


def _first_docs(pieces: Iterator[Piece], n: int) -> Iterator[Piece]:
    """The pieces of the first `n` documents; the source is not read past them."""
    seen = 0
    for text, starts in pieces:
        if starts:
            seen += 1
            if seen > n:
                return
        yield text, starts


def _all_pieces(spec: SourceSpec, counter: ByteCounter) -> Iterator[Piece]:
    if spec.dataset:
        yield from _iter_hf(spec, counter)
        return
    for path in expand_inputs(spec.inputs):
        kind = file_kind(path)
        if kind == "text":
            yield from _text_pieces(path, spec, counter)
        else:
            for text in _RECORD_READERS[kind](path, spec, counter):
                if text:
                    yield text, True


def iter_text(spec: SourceSpec) -> Iterator[str]:
    """The raw text of the source in chunks (for a char vocabulary or a character count)."""
    if spec.max_docs is not None:
        for text, _ in iter_pieces(spec):
            yield text
        return
    if spec.dataset:
        for text, _ in _iter_hf(spec, ByteCounter()):
            yield text
        return
    for path in expand_inputs(spec.inputs):
        if file_kind(path) == "text":
            yield from _decoded_chunks(path, spec.errors, ByteCounter())
        else:
            yield from _RECORD_READERS[file_kind(path)](path, spec, ByteCounter())


def _open_binary(path: Path) -> Any:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _decoded_chunks(path: Path, errors: str, counter: ByteCounter) -> Iterator[str]:
    """A text file decoded as UTF-8 in chunks; binary files and bad bytes are one-line errors."""
    decoder = UTF8Decoder(path, errors, skip_bom=True)
    offset = 0
    with _open_binary(path) as f:
        while True:
            raw = f.read(READ_BYTES)
            if b"\0" in raw:
                raise DataError(
                    f"{path} looks binary (a NUL byte at offset {offset + raw.index(0)})",
                    "a UTF-8 text file",
                    "leave it out of --input (or pick the right --field for tables)",
                )
            text = decoder.decode(raw, final=not raw)
            offset += len(raw)
            counter.n += len(raw)
            if text:
                yield text
            if not raw:
                return


def _cut_point(buf: str, limit: int) -> int:
    """Where to end a piece of `buf` (0: keep reading): just after the last safe newline."""
    if len(buf) < limit:
        return 0
    i = buf.rfind("\n", 1, len(buf) - 1)
    while i >= 1 and (buf[i + 1].isspace() or buf[i - 1].isspace()):
        i = buf.rfind("\n", 1, i)
    if i >= 0:
        return i + 1
    return len(buf) if len(buf) >= HARD_PIECE_CHARS else 0


def _text_pieces(path: Path, spec: SourceSpec, counter: ByteCounter) -> Iterator[Piece]:
    """One document per file, or per part between separators; long documents come in pieces."""
    sep, margin = None, 0
    if spec.separator is not None:
        sep, margin = re.compile(re.escape(spec.separator)), len(spec.separator)
    elif spec.split_on_blank_lines:
        sep = re.compile(_BLANK_LINES)
    buf, started = "", False  # started: a piece of the current document was already emitted
    for chunk in itertools.chain(_decoded_chunks(path, spec.errors, counter), [None]):
        final = chunk is None
        buf += chunk or ""
        if sep is not None:
            start = 0
            for m in sep.finditer(buf):
                if m.end() == len(buf) and not final:
                    break  # the separator may go on in the next chunk
                part = buf[start : m.start()]
                if started or part.strip():
                    yield part, not started
                started, start = False, m.end()
            buf = buf[start:]
        # never cut inside a separator that the next chunk may complete
        cut = 0 if final else _cut_point(buf[: len(buf) - margin], PIECE_CHARS)
        if cut:
            if started or buf[:cut].strip():
                yield buf[:cut], not started
                started = True
            buf = buf[cut:]
    if started or buf.strip():
        yield buf, not started


def _bad_record(path: Path, where: str, problem: str, fix: str) -> DataError:
    return DataError(f"{path}{where}: {problem}", None, fix)


def _jsonl_records(path: Path, spec: SourceSpec, counter: ByteCounter) -> Iterator[str]:
    key = spec.field
    with _open_binary(path) as f:
        for lineno in itertools.count(1):
            raw = read_line_bounded(f, spec.max_record_bytes, path, lineno)  # never a whole 1 TB
            if not raw:
                return
            counter.n += len(raw)
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8", errors=spec.errors))
            except RecursionError:
                raise _bad_record(
                    path, f" line {lineno}", "JSON nested too deeply", "fix or remove that line"
                ) from None
            except UnicodeDecodeError:
                raise _bad_record(
                    path, f" line {lineno}", "not UTF-8", "convert it or pass --errors replace"
                ) from None
            except ValueError as e:
                raise _bad_record(
                    path, f" line {lineno}", f"not JSON ({e})", "fix or remove that line"
                ) from None
            if not isinstance(rec, dict) or key not in rec:
                keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                raise _bad_record(
                    path,
                    f" line {lineno}",
                    f"no field {key!r} (has {keys})",
                    f"name the text field with {mark_key('field')}",
                )
            yield _as_text(rec[key], path, f" line {lineno}", key)


def _as_text(value: Any, path: Path, where: str, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _bad_record(
            path,
            where,
            f"field {key!r} is a {type(value).__name__}, not text",
            f"choose {mark_key('field')}",
        )
    return value


def _csv_records(path: Path, spec: SourceSpec, counter: ByteCounter) -> Iterator[str]:
    # the csv module's limit is process-wide: raise it for long documents, restore it after
    old_limit = csv.field_size_limit(min(sys.maxsize, 2**31 - 1, spec.max_record_bytes))
    try:
        yield from _csv_rows(path, spec, counter)
    finally:
        csv.field_size_limit(old_limit)


def _csv_rows(path: Path, spec: SourceSpec, counter: ByteCounter) -> Iterator[str]:
    with _open_binary(path) as fb:
        f = io.TextIOWrapper(fb, encoding="utf-8-sig", errors=spec.errors, newline="")
        reader = csv.DictReader(f)
        try:
            if reader.fieldnames is None or spec.field not in reader.fieldnames:
                raise _bad_record(
                    path,
                    "",
                    f"no column {spec.field!r} (has {reader.fieldnames or []})",
                    f"name the text column with {mark_key('field')}",
                )
            for row in reader:
                counter.n = fb.tell() if hasattr(fb, "tell") else counter.n
                yield _as_text(row[spec.field], path, f" row {reader.line_num}", spec.field)
        except UnicodeDecodeError:
            raise _bad_record(
                path, "", "not UTF-8", "convert it or pass --errors replace"
            ) from None
        except csv.Error as e:  # a field over the limit, a stray quote
            raise _bad_record(
                path,
                f" row {reader.line_num}",
                f"not CSV ({e})",
                f"fix that row, or raise {mark_key('max_record_bytes')} for long fields",
            ) from None


def _parquet_records(path: Path, spec: SourceSpec, counter: ByteCounter) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path} is parquet but pyarrow is not installed", None, "pip install pyarrow"
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise _bad_record(
            path, "", f"not a parquet file ({e})", f"check {mark_key('inputs')}"
        ) from None
    if spec.field not in pf.schema_arrow.names:
        raise _bad_record(
            path,
            "",
            f"no column {spec.field!r} (has {pf.schema_arrow.names})",
            f"name the text column with {mark_key('field')}",
        )
    size, groups = path.stat().st_size, max(1, pf.num_row_groups)
    for g in range(pf.num_row_groups):
        table = pf.read_row_group(g, columns=[spec.field])
        for batch in table.to_batches(max_chunksize=1024):
            for value in batch.column(0).to_pylist():
                yield _as_text(value, path, f" row group {g}", spec.field)
        counter.n += size // groups


_RECORD_READERS = {"jsonl": _jsonl_records, "csv": _csv_records, "parquet": _parquet_records}


def offline_fix(spec: SourceSpec) -> str:
    """How to run the same named dataset (or any dataset) on local files."""
    if spec.preset:
        return f"point the same preset at local files: {local_example(spec.preset)}"
    return "or pass local files: `gpt2lab prepare --input 'DIR/*.jsonl' --out DIR`"


_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def open_hf_dataset(spec: SourceSpec) -> Any:
    """`datasets.load_dataset(..., streaming=True)`; offline, an error that shows --input."""
    offline = (
        spec.dataset not in _LOCAL_BUILDERS
        and not Path(spec.dataset).exists()
        and not _hub_reachable()
    )
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"dataset {spec.dataset!r} needs the `datasets` package",
            None,
            "pip install 'gpt2lab[hf]', or " + offline_fix(spec),
        ) from None
    try:
        with _hub_offline(offline):  # fail in seconds from the cache, not after minutes of retries
            return datasets.load_dataset(
                spec.dataset,
                spec.dataset_config,
                split=spec.dataset_split,
                streaming=True,
                data_files=spec.data_files,
                trust_remote_code=False,  # never run a dataset's script (datasets>=4 has none)
            )
    except Exception as e:  # offline, unknown name, bad config: datasets raises many types
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise DataError(
            f"cannot open Hugging Face dataset {spec.dataset!r} ({reason}); it needs the network "
            "or a local copy in the HF cache",
            None,
            offline_fix(spec),
        ) from None


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """HF offline mode for a while: the flags are read at import time, so set the modules' too."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    flags = [
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
    ]
    saved = [(m, name, getattr(m, name)) for m, name in flags if hasattr(m, name)]
    for m, name, _ in saved:
        setattr(m, name, True)
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def _iter_hf(spec: SourceSpec, counter: ByteCounter) -> Iterator[Piece]:
    ds = open_hf_dataset(spec)
    name = f"dataset {spec.dataset}"
    try:
        for i, rec in enumerate(ds):
            if spec.field not in rec:
                raise DataError(
                    f"{name} record {i} has no field {spec.field!r} (has {sorted(rec)})",
                    None,
                    f"name the text field with {mark_key('field')}",
                )
            text = _as_text(rec[spec.field], Path(name), f" record {i}", spec.field)
            counter.n += len(text)
            if text:
                yield text, True
    except DataError:
        raise
    except Exception as e:  # the stream can fail mid-way (network, bad file)
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise DataError(f"reading {name} failed ({reason})", None, offline_fix(spec)) from None
