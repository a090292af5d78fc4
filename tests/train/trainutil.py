"""Helpers of the training tests: data directories of real text, a tiny run config."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from gpt2lab.config import Config, resolve
from gpt2lab.data.shards import VERSION, ShardWriter, dtype_for_vocab
from gpt2lab.tokenizer import get_tokenizer


def write_char_data(out: Path, text: str, val_fraction: float = 0.1) -> Path:
    """A data directory (shards, meta.json, tokenizer/) of `text` under a char tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    tok = get_tokenizer("char", text=text)
    ids = np.asarray(tok.encode_ordinary(text), dtype=np.int64)
    n_val = int(len(ids) * val_fraction)
    dtype = dtype_for_vocab(tok.n_vocab)
    shards = {}
    for split, part in (("train", ids[:-n_val]), ("val", ids[-n_val:])):
        w = ShardWriter(out, split, dtype, tok.n_vocab, 1 << 20)
        w.write(part)
        shards[split] = w.finish()
    tok.save(str(out / "tokenizer"))
    meta = {
        "format_version": VERSION,
        "vocab_size": tok.n_vocab,
        "shards": shards,
        "tokenizer": tok.spec(),
    }
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def tiny_config(data_dir: Path, *overrides: str) -> Config:
    """2 layers x 32 wide, context 32, float32 on the CPU: milliseconds per step."""
    base = [
        f"data.dir={data_dir}",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=32",
        "model.dropout=0.0",
        "train.micro_batch_size=4",
        "train.max_steps=8",
        "train.warmup_steps=2",
        "train.lr=3e-3",
        "train.min_lr=3e-4",
        "train.eval_interval=4",
        "train.eval_steps=2",
        "train.log_interval=1",
        "train.checkpoint_interval=4",
        "train.device=cpu",
        "train.dtype=float32",
        "train.peak_flops=1e12",
    ]
    return resolve(None, None, [*base, *overrides])


def cli_args(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """`gpt2lab train` arguments for a 1-layer, 16-wide model on the CPU."""
    return [
        "train",
        "--data",
        str(data_dir),
        "--out",
        str(run_dir),
        "--model.n_layer=1",
        "--model.n_embd=16",
        "--model.n_head=1",
        "--model.block_size=16",
        "--train.device=cpu",
        "--train.micro_batch_size=2",
        *extra,
    ]


def torchrun(ranks: int, *gpt2lab_args: str) -> list[str]:
    """The command line of `torchrun --standalone --nproc_per_node RANKS -m gpt2lab ...`."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*run, f"--nproc_per_node={ranks}", "-m", "gpt2lab", *gpt2lab_args]
