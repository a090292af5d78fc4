"""Getting a tokenizer: by name ("gpt2", "char"), from a saved directory, or from a spec dict."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gpt2lab.errors import TokenizerError
from gpt2lab.tokenizer.base import EOT, Tokenizer
from gpt2lab.tokenizer.bpe import BACKENDS, BPETokenizer, load_gpt2
from gpt2lab.tokenizer.char import CharTokenizer
from gpt2lab.tokenizer.chat import read_chat_template
from gpt2lab.tokenizer.files import META_FILE, read_meta, read_vocab_dir
from gpt2lab.tokenizer.pretokenize import GPT2_PATTERN


def get_tokenizer(
    name_or_dir: str | os.PathLike | dict[str, Any], backend: str = "tiktoken", **kw: Any
) -> Tokenizer:
    """`"gpt2"`, `"char"` (with `text=`, optional `unk=True`), a saved dir, or a `spec()` dict.

    Keyword arguments: `special_tokens=[...]` adds special tokens to "gpt2" (ids 50257, ...);
    `text=` / `unk=` build "char".
    """
    if backend not in BACKENDS:
        raise TokenizerError(f"unknown backend {backend!r}", f"one of {', '.join(BACKENDS)}")
    if isinstance(name_or_dir, dict):
        return _from_spec(name_or_dir, backend)
    name = os.fspath(name_or_dir)
    if name == "gpt2":
        _only(kw, {"special_tokens"}, name)
        return load_gpt2(backend, kw.get("special_tokens"))
    if name == "char":
        _only(kw, {"text", "unk"}, name)
        if kw.get("text") is None:
            raise TokenizerError(
                "get_tokenizer('char') needs the training text",
                "text=<a string>",
                "pass text=open(path).read()",
            )
        return CharTokenizer.from_text(kw["text"], unk=bool(kw.get("unk", False)))
    if Path(name).is_dir():
        _only(kw, set(), name)
        return load_dir(name, backend)
    raise TokenizerError(
        f"no tokenizer named {name!r}, and no directory there",
        "'gpt2', 'char' or a directory written by tok.save(dir)",
    )


def _only(kw: dict[str, Any], allowed: set[str], name: str) -> None:
    extra = sorted(set(kw) - allowed)
    if extra:
        raise TokenizerError(
            f"get_tokenizer({name!r}) got unexpected arguments {extra}",
            f"only {sorted(allowed)}" if allowed else "no extra arguments",
        )


def _from_spec(spec: dict[str, Any], backend: str) -> Tokenizer:
    kind = spec.get("kind")
    if kind == "gpt2":
        return get_tokenizer("gpt2", backend, special_tokens=list(spec.get("special_tokens", {})))
    if kind == "char":
        return CharTokenizer.from_meta(spec, where="the tokenizer spec")
    raise TokenizerError(
        f"tokenizer spec of kind {kind!r} cannot be rebuilt from the spec alone",
        "kind 'gpt2' or 'char'",
        "load the tokenizer from the directory it was saved in",
    )


def load_dir(directory: str | os.PathLike, backend: str = "tiktoken") -> Tokenizer:
    """Load what `save(dir)` wrote, a dir of GPT-2 / HF files, or of a .tiktoken file, with the
    chat template saved beside it (`tok.chat_template`, None if there is none)."""
    tok = _load_vocab_dir(directory, backend)
    tok.chat_template = read_chat_template(directory)
    return tok


def _load_vocab_dir(directory: str | os.PathLike, backend: str) -> Tokenizer:
    meta = read_meta(directory)
    meta_path = Path(directory) / META_FILE
    if meta.get("kind") == "char":
        return CharTokenizer.from_meta(meta, where=str(meta_path))
    if meta.get("kind") == "gpt2":
        extra = [s for s in meta.get("special_tokens", {}) if s != EOT]
        return load_gpt2(backend, extra)
    ranks, merges, specials = read_vocab_dir(directory, meta.get("special_tokens", {}))
    tok = BPETokenizer(
        ranks, merges, meta.get("pattern", GPT2_PATTERN), specials, backend, meta.get("kind", "bpe")
    )
    want = meta.get("vocab_sha256")
    if want and want != tok.vocab_sha256():
        raise TokenizerError(
            f"the vocabulary in {directory} has digest {tok.vocab_sha256()[:16]}..., but "
            f"{meta_path} records {want[:16]}...",
            "files written together by one save()",
            "save the tokenizer again",
        )
    return tok
