"""Atomic writes (complete or absent, normal permissions) and UTF-8 reading (one-line errors)."""

from __future__ import annotations

import os
import stat

import pytest

from gpt2lab.errors import DataError
from gpt2lab.io import (
    UTF8Decoder,
    atomic_dir,
    atomic_open,
    atomic_path,
    atomic_write_json,
    decode_utf8,
    read_utf8,
)


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_open(target, "w") as f:
        f.write("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert os.listdir(tmp_path) == ["x.json"]


def test_files_and_dirs_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "f.json", {})
        with atomic_dir(tmp_path / "d") as d:
            (d / "w").write_text("ok")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as d:
        (d / "a").write_text("1")
    with pytest.raises(KeyError), atomic_dir(target) as d:
        (d / "a").write_text("2")
        raise KeyError("killed")
    assert (target / "a").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


# --- reading UTF-8 ------------------------------------------------------------------------------


def test_decode_error_names_file_byte_offset_line_and_fix(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(DataError) as e:
        read_utf8(bad)
    message = str(e.value)
    assert "latin1.txt is not UTF-8: byte 0xe9 at offset 6 (line 2)" in message
    assert "--errors replace" in message and "\n" not in message
    assert read_utf8(bad, errors="replace") == "ok\ncaf\ufffd\n"
    with pytest.raises(DataError, match="at offset 1006, expected X, Y$"):
        decode_utf8(b"ab\xff", "f", offset=1004, expected="X", fix="Y")  # no line mid-file
    with pytest.raises(DataError, match="unknown errors='nope'"):
        decode_utf8(b"\xff", "f", errors="nope")


@pytest.mark.parametrize("errors", ["strict", "replace"])
@pytest.mark.parametrize("block", [1, 2, 3, 7, 1000])
def test_decoding_in_blocks_equals_decoding_at_once(errors, block):
    data = "a é € 😀 日本語\n".encode() * 5
    if errors == "replace":
        data += b"\xe2\x82 x \xff\xf0\x9f\x98"  # cut and invalid sequences, one at the very end
    want = data.decode("utf-8", errors=errors)
    for skip_bom in (False, True):
        decoder = UTF8Decoder("f", errors, skip_bom=skip_bom)
        got = "".join(decoder.decode(data[i : i + block]) for i in range(0, len(data), block))
        assert got + decoder.decode(b"", final=True) == want


def test_block_decoder_skips_a_bom_and_reports_file_offsets():
    bom = b"\xef\xbb\xbf"
    decoder = UTF8Decoder("f.txt", skip_bom=True)
    assert decoder.decode(bom[:2]) == "" and decoder.decode(bom[2:] + b"hi") == "hi"
    assert UTF8Decoder("f.txt").decode(bom + b"hi", final=True) == "\ufeffhi"
    decoder = UTF8Decoder("f.txt", skip_bom=True)
    decoder.decode(bom + b"abc\xe2\x82")
    with pytest.raises(DataError, match=r"f.txt is not UTF-8: byte 0xe2 at offset 6"):
        decoder.decode(b"x")


def test_atomic_path_replaces_only_when_the_writer_finishes(tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")  # a writer that opens the file itself, then fails
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
