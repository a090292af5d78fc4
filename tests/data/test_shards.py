"""Shard format: header round trip, header checks that name the shard, temp shards stay hidden."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from gpt2lab.data import load_tokens, read_header
from gpt2lab.data.shards import ShardWriter, dtype_for_vocab, list_shards
from gpt2lab.errors import DataError


def test_header_and_tokens_round_trip(tmp_path, write_data_dir):
    tokens = np.random.default_rng(1).integers(0, 50257, 2500)
    d = write_data_dir(tmp_path, {"train": tokens}, vocab_size=50257, shard_tokens=1000)
    names = [p.name for p in list_shards(d, "train")]
    assert names == ["train_000000.bin", "train_000001.bin", "train_000002.bin"]
    raw = (d / names[2]).read_bytes()
    # the documented layout, read independently with struct: magic, version, itemsize, vocab, count
    assert struct.unpack("<4sIIIQ", raw[:24]) == (b"GP2L", 1, 2, 50257, 500)
    assert np.array_equal(np.frombuffer(raw[64:], "<u2"), tokens[2000:])
    out = load_tokens(d, "train")
    assert out.dtype == np.uint16 and np.array_equal(out, tokens)
    assert len(load_tokens(d, "val")) == 0


def test_large_vocab_uses_uint32_and_too_small_dtype_fails(tmp_path, write_data_dir):
    tokens = np.array([0, 70000, 99999])
    d = write_data_dir(tmp_path, {"train": tokens}, vocab_size=100000, shard_tokens=10)
    assert read_header(d / "train_000000.bin")["dtype"] == np.uint32
    assert np.array_equal(load_tokens(d), tokens)
    assert dtype_for_vocab(65536) == np.uint16
    with pytest.raises(DataError, match="does not fit `dtype=uint16`"):
        dtype_for_vocab(100000, "uint16")


def _corrupt(path, offset, fmt, value):
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, offset, value)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "offset, fmt, value, message",
    [
        (0, "<I", 0x12345678, "magic number 0x12345678"),
        (4, "<I", 2, "format version 2"),
        (8, "<I", 3, "token size 3"),
        (16, "<Q", 99, "truncated or corrupt"),
    ],
)
def test_bad_headers_name_the_shard_and_the_fix(
    tmp_path, offset, fmt, value, message, write_data_dir
):
    d = write_data_dir(tmp_path, {"train": np.arange(50)}, vocab_size=64, shard_tokens=100)
    shard = d / "train_000000.bin"
    _corrupt(shard, offset, fmt, value)
    with pytest.raises(DataError) as e:
        load_tokens(d)
    assert message in str(e.value) and str(shard) in str(e.value)
    assert "re-create it with" in str(e.value) and "\n" not in str(e.value)


def test_vocab_check_and_meta_disagreement(tmp_path, write_data_dir):
    d = write_data_dir(tmp_path, {"train": np.arange(50)}, vocab_size=64, shard_tokens=100)
    with pytest.raises(DataError, match="vocabulary of 64 tokens but the model expects 65"):
        read_header(d / "train_000000.bin", vocab_size=65)
    _corrupt(d / "train_000000.bin", 12, "<I", 65)
    with pytest.raises(DataError, match="meta.json says 64"):
        load_tokens(d)


def test_unfinished_shard_is_hidden_and_resumable(tmp_path):
    w = ShardWriter(tmp_path, "train", np.dtype("<u2"), 100, shard_tokens=10)
    w.write(np.arange(25))
    w.flush()
    assert [p.name for p in list_shards(tmp_path, "train")] == [
        "train_000000.bin",
        "train_000001.bin",
    ]
    tmp = tmp_path / ".train_000002.bin.tmp"
    assert tmp.exists() and read_header_count(tmp) == 0  # a temp shard never claims its tokens
    w.abort()
    w2 = ShardWriter(tmp_path, "train", np.dtype("<u2"), 100, shard_tokens=10)
    w2.resume(23)  # keep 3 of the 5 tokens in the temp shard
    w2.write(np.arange(23, 30))
    assert w2.finish() == [f"train_{i:06d}.bin" for i in range(3)]
    assert np.array_equal(
        np.fromfile(tmp_path / "train_000002.bin", "<u2", offset=64), np.arange(20, 30)
    )
    assert not tmp.exists()


def read_header_count(path):
    return struct.unpack_from("<Q", path.read_bytes(), 16)[0]
