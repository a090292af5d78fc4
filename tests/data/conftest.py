"""Fixtures for the data tests: a data directory written straight from token arrays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpt2lab.data.shards import VERSION, ShardWriter, dtype_for_vocab


def _write_data_dir(out: Path, splits: dict, vocab_size: int, shard_tokens: int) -> Path:
    """Shards and a minimal meta.json for given token arrays (no tokenizer involved)."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for_vocab(vocab_size)
    shards = {}
    for split in ("train", "val"):
        w = ShardWriter(out, split, dtype, vocab_size, shard_tokens)
        w.write(np.asarray(splits.get(split, []), dtype=np.int64))
        shards[split] = w.finish()
    meta = {"format_version": VERSION, "vocab_size": vocab_size, "shards": shards}
    meta["tokenizer"] = {"kind": "test"}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


@pytest.fixture
def write_data_dir():
    """`write_data_dir(out, {"train": tokens, "val": tokens}, vocab_size, shard_tokens)`."""
    return _write_data_dir


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """5,000 train and 700 val tokens of a 1000-token vocabulary, in shards of 1,100 tokens."""
    rng = np.random.default_rng(0)
    splits = {"train": rng.integers(0, 1000, 5000), "val": rng.integers(0, 1000, 700)}
    return _write_data_dir(tmp_path / "d", splits, vocab_size=1000, shard_tokens=1100)


@pytest.fixture(scope="session")
def gpt2_ref():
    """tiktoken's GPT-2 encoding, built offline from GPT-2's own files: the reference."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    from gpt2lab.tokenizer.files import gpt2_files_dir

    d = gpt2_files_dir()
    ranks = data_gym_to_mergeable_bpe_ranks(str(d / "vocab.bpe"), str(d / "encoder.json"))
    return tiktoken.Encoding(
        "gpt2-data-ref",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256},
    )
