"""Token shards on disk: a fixed 64-byte header, then the tokens; written atomically, read by mmap.

Header (little-endian): magic u32, format version u32, token itemsize u32 (2 = uint16, 4 = uint32),
vocabulary size u32, token count u64, then zero padding to 64 bytes so the tokens stay aligned.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gpt2lab.errors import DataError, mark_key
from gpt2lab.io import fsync_dir
from gpt2lab.tokenizer import get_tokenizer

MAGIC = 0x4C325047  # b"GP2L" read as a little-endian u32
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<IIIIQ")
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
SPLITS = ("train", "val")


def dtype_for_vocab(n_vocab: int, requested: str | None = None) -> np.dtype:
    """uint16 when every id fits (n_vocab <= 65536), else uint32; a too-small request fails."""
    if n_vocab > 2**32:
        raise DataError(
            f"vocabulary of {n_vocab} tokens is too large for any shard dtype",
            "at most 2**32 tokens",
            "use a smaller tokenizer",
        )
    natural = np.dtype("<u2") if n_vocab <= 2**16 else np.dtype("<u4")
    if requested is None or requested == "auto":
        return natural
    want = np.dtype(requested).newbyteorder("<")
    if want not in DTYPES.values():
        raise DataError(
            f"{mark_key('dtype', requested)} is not a shard dtype",
            "uint16 or uint32",
            f"drop {mark_key('dtype')}",
        )
    if np.iinfo(want).max + 1 < n_vocab:
        raise DataError(
            f"vocabulary of {n_vocab} tokens does not fit {mark_key('dtype', requested)} "
            f"(max id {np.iinfo(want).max})",
            "uint32 for vocabularies over 65536",
            f"drop {mark_key('dtype')} (it picks uint32) or pass {mark_key('dtype', 'uint32')}",
        )
    return want


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def pack_header(dtype: np.dtype, vocab_size: int, count: int) -> bytes:
    """The 64-byte header of a shard holding `count` tokens."""
    return _HEADER.pack(MAGIC, VERSION, dtype.itemsize, vocab_size, count).ljust(
        HEADER_BYTES, b"\0"
    )


def recreate_hint(path: Path) -> str:
    """How to re-create the data directory holding `path` (the command recorded in meta.json)."""
    try:
        cmd = json.loads((path.parent / "meta.json").read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError):
        cmd = None
    return (
        f"re-create it with `{cmd}`"
        if cmd
        else f"re-create it with `gpt2lab prepare ... --out {path.parent}`"
    )


def read_header(path: str | os.PathLike, vocab_size: int | None = None) -> dict[str, Any]:
    """Check a shard's header and size; returns {dtype, vocab_size, count}."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = path.stat().st_size
    except OSError as e:
        raise DataError(
            f"cannot read shard {path} ({e.strerror})", None, recreate_hint(path)
        ) from e
    if len(raw) < HEADER_BYTES:
        raise DataError(
            f"shard {path} is {len(raw)} bytes, shorter than its {HEADER_BYTES}-byte header",
            None,
            recreate_hint(path),
        )
    magic, version, itemsize, vocab, count = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise DataError(
            f"shard {path} has magic number {magic:#010x}, expected {MAGIC:#010x} "
            "(not a gpt2lab token shard)",
            None,
            recreate_hint(path),
        )
    if version != VERSION:
        raise DataError(
            f"shard {path} has format version {version}", f"expected {VERSION}", recreate_hint(path)
        )
    if itemsize not in DTYPES:
        raise DataError(
            f"shard {path} has token size {itemsize} bytes", "2 or 4", recreate_hint(path)
        )
    if vocab > 2 ** (8 * itemsize):
        raise DataError(
            f"shard {path} says vocabulary {vocab} but stores {8 * itemsize}-bit tokens",
            "a vocabulary that fits the dtype",
            recreate_hint(path),
        )
    if size != HEADER_BYTES + count * itemsize:
        raise DataError(
            f"shard {path} is {size} bytes but its header promises {count} tokens "
            f"({HEADER_BYTES + count * itemsize} bytes); it is truncated or corrupt",
            None,
            recreate_hint(path),
        )
    if vocab_size is not None and vocab != vocab_size:
        raise DataError(
            f"shard {path} was tokenized with a vocabulary of {vocab} tokens but the model "
            f"expects {vocab_size}",
            "the tokenizer the model was trained with",
            f"set {mark_key('model.vocab_size', vocab)} or re-create the data with the model's "
            "tokenizer",
        )
    return {"dtype": DTYPES[itemsize], "vocab_size": vocab, "count": count}


def open_shard(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map a shard's tokens after checking its header."""
    h = read_header(path, vocab_size)
    if h["count"] == 0:
        return np.zeros(0, dtype=h["dtype"])
    return np.memmap(path, dtype=h["dtype"], mode="r", offset=HEADER_BYTES, shape=(h["count"],))


def list_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """Complete shards of a split, in order (temp files of an unfinished run are never listed)."""
    pat = re.compile(rf"{re.escape(split)}_(\d{{6}})\.bin")
    return sorted(p for p in Path(data_dir).iterdir() if pat.fullmatch(p.name))


class ShardWriter:
    """Appends tokens of one split to shards of `shard_tokens` tokens each.

    A shard grows under a hidden temp name (`.train_000003.bin.tmp`) with a zero count in its
    header; when full it gets its real count, is fsynced and renamed, so a crash never leaves a
    shard that looks whole. `resume` reopens an unfinished temp shard and keeps its first tokens.
    """

    def __init__(
        self,
        out_dir: Path,
        split: str,
        dtype: np.dtype,
        vocab_size: int,
        shard_tokens: int,
        on_create: Callable[[str], None] | None = None,
    ) -> None:
        self.out_dir, self.split, self.dtype = Path(out_dir), split, dtype
        self.on_create = on_create  # told each shard's name before it is created (ownership)
        self.vocab_size, self.shard_tokens = vocab_size, shard_tokens
        self.done: list[str] = []  # names of complete shards
        self.fill = 0  # tokens in the open temp shard
        self._f: Any = None

    @property
    def tokens(self) -> int:
        """Tokens written so far, complete shards and the open one together."""
        return len(self.done) * self.shard_tokens + self.fill

    def _tmp(self, index: int) -> Path:
        return self.out_dir / f".{shard_name(self.split, index)}.tmp"

    def resume(self, tokens: int) -> None:
        """Continue after the first `tokens` tokens already on disk (complete shards, then temp).

        A shard completed past that point is reopened as the temp shard and cut back; everything
        after it is removed (the resumed run writes the same tokens again).
        """
        complete, keep = divmod(tokens, self.shard_tokens)
        self.done = [shard_name(self.split, i) for i in range(complete)]
        for p in list_shards(self.out_dir, self.split)[complete:]:
            if p.name == shard_name(self.split, complete) and keep:
                os.replace(p, self._tmp(complete))
            else:
                p.unlink()
        for p in self.out_dir.glob(f".{self.split}_*.bin.tmp"):
            if p != self._tmp(complete) or not keep:
                p.unlink()
        if keep:
            self._f = open(self._tmp(complete), "r+b")
            self._f.write(pack_header(self.dtype, self.vocab_size, 0))
            self._f.truncate(HEADER_BYTES + keep * self.dtype.itemsize)
            self._f.seek(0, os.SEEK_END)
            self.fill = keep

    def write(self, tokens: np.ndarray) -> None:
        """Append tokens, closing shards as they fill."""
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._f is None:
                if self.on_create is not None:
                    self.on_create(shard_name(self.split, len(self.done)))
                self._f = open(self._tmp(len(self.done)), "wb")
                self._f.write(pack_header(self.dtype, self.vocab_size, 0))
            n = min(len(tokens), self.shard_tokens - self.fill)
            self._f.write(tokens[:n].tobytes())
            self.fill += n
            tokens = tokens[n:]
            if self.fill == self.shard_tokens:
                self._close_shard()

    def flush(self) -> None:
        """Push buffered tokens to the OS, so a killed process loses none of them."""
        if self._f is not None:
            self._f.flush()

    def finish(self) -> list[str]:
        """Close the last, partly filled shard; returns the names of every shard written."""
        if self._f is not None and self.fill:
            self._close_shard()
        return self.done

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def _close_shard(self) -> None:
        f, self._f = self._f, None
        f.seek(0)
        f.write(pack_header(self.dtype, self.vocab_size, self.fill))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        name = shard_name(self.split, len(self.done))
        os.replace(self._tmp(len(self.done)), self.out_dir / name)
        fsync_dir(self.out_dir)
        self.done.append(name)
        self.fill = 0


def load_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The meta.json of a directory written by `gpt2lab prepare` (present once complete)."""
    path = Path(data_dir) / "meta.json"
    if not Path(data_dir).is_dir():
        raise DataError(
            f"data directory {data_dir} does not exist",
            "a directory written by `gpt2lab prepare`",
            f"run `gpt2lab prepare ... --out {data_dir}` first",
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{path} is missing (an unfinished or foreign data directory)",
            "a directory written by `gpt2lab prepare`",
            f"run (or rerun, to resume) `gpt2lab prepare ... --out {data_dir}`",
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not valid JSON ({e})", None, recreate_hint(path)) from e
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != VERSION:
        raise DataError(
            f"{path} has format_version {version}",
            f"expected {VERSION}",
            recreate_hint(path),
        )
    _check_meta(meta, path)
    return meta


def _check_meta(meta: dict[str, Any], path: Path) -> None:
    """The fields readers rely on, by type: a hand-edited or damaged meta.json is one line."""

    def names(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(n, str) and Path(n).name == n for n in v)

    def counts(v: Any) -> bool:
        return isinstance(v, dict) and all(
            isinstance(v.get(s), int) and not isinstance(v.get(s), bool) for s in SPLITS
        )

    checks = [
        ("vocab_size", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 2**32),
        ("shards", lambda v: isinstance(v, dict) and all(names(v.get(s)) for s in SPLITS)),
        ("tokens", lambda v: v is None or counts(v)),
        ("documents", lambda v: v is None or counts(v)),
        ("tokenizer", lambda v: v is None or isinstance(v, dict)),
    ]
    for key, ok in checks:
        if not ok(meta.get(key)):
            shown = repr(meta.get(key))[:60]
            raise DataError(
                f"{path} has {key}={shown}",
                "the meta.json `gpt2lab prepare` writes (shard file names in this directory, "
                "counts, the vocabulary size)",
                recreate_hint(path),
            )


def split_shards(
    data_dir: str | os.PathLike, split: str = "train", vocab_size: int | None = None
) -> list[np.ndarray]:
    """Memory-maps of a split's shards, in order, each header checked against meta.json."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}", "train or val", "pass split='train' or 'val'")
    meta = load_meta(data_dir)
    names = meta["shards"][split]
    on_disk = [p.name for p in list_shards(data_dir, split)]
    if on_disk != names:
        raise DataError(
            f"{data_dir} holds {split} shards {on_disk[:3]}... but meta.json lists {names[:3]}...",
            "the shards prepare wrote",
            recreate_hint(Path(data_dir) / "meta.json"),
        )
    out = []
    total = 0
    for name in names:
        arr = open_shard(Path(data_dir) / name, vocab_size)
        h = read_header(Path(data_dir) / name)
        total += len(arr)
        if total <= SCAN_LIMIT:  # larger splits are checked batch by batch (BatchLoader)
            check_token_ids(arr, h["vocab_size"], Path(data_dir) / name, vocab_size)
        if h["vocab_size"] != meta["vocab_size"]:
            raise DataError(
                f"shard {Path(data_dir) / name} has vocabulary {h['vocab_size']} but meta.json "
                f"says {meta['vocab_size']}",
                "shards from one tokenizer",
                recreate_hint(Path(data_dir) / name),
            )
        out.append(arr)
    return out


SCAN_LIMIT = 1 << 31  # tokens of a split checked for ids past the vocabulary when opened


def check_token_ids(
    tokens: np.ndarray, vocab: int, path: str | os.PathLike, model_vocab: int | None = None
) -> None:
    """Refuse ids >= the vocabulary (the shard's, and the model's if given), naming both sizes."""
    limit = min(vocab, model_vocab) if model_vocab else vocab
    if len(tokens) == 0 or (limit >= 2 ** (8 * tokens.dtype.itemsize)):
        return  # empty, or the dtype cannot hold an id that large
    chunk = 1 << 26
    top = max(int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk))
    if top >= limit:
        sizes = f"the shard's vocabulary has {vocab} tokens" + (
            f" and the model's {model_vocab}" if model_vocab else ""
        )
        raise DataError(
            f"{path} holds token id {top} but {sizes}",
            f"ids below {limit}",
            "prepare the data again with the model's tokenizer (the shard is damaged or from "
            "another tokenizer)",
        )


def load_tokens(data_dir: str | os.PathLike, split: str = "train") -> np.ndarray:
    """A split's tokens (all shards, in order) as one numpy array (uint16 or uint32)."""
    parts = split_shards(data_dir, split)
    if not parts:
        return np.zeros(0, dtype=dtype_for_vocab(load_meta(data_dir)["vocab_size"]))
    return np.concatenate(parts)


def load_data_tokenizer(data_dir: str | os.PathLike):
    """The tokenizer a data directory was prepared with (its `tokenizer/` copy)."""
    meta = load_meta(data_dir)
    tok_dir = Path(data_dir) / "tokenizer"
    if tok_dir.is_dir():
        tok = get_tokenizer(str(tok_dir))
    elif (meta.get("tokenizer") or {}).get("kind") == "gpt2":
        tok = get_tokenizer("gpt2")
    else:
        raise DataError(
            f"{tok_dir} is missing", "the tokenizer files prepare copies", recreate_hint(tok_dir)
        )
    if tok.n_vocab != meta["vocab_size"]:
        raise DataError(
            f"tokenizer in {tok_dir} has {tok.n_vocab} tokens but the shards were written with "
            f"{meta['vocab_size']}",
            "the tokenizer that wrote the shards",
            recreate_hint(tok_dir),
        )
    return tok
