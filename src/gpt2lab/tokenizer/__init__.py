"""gpt2lab's tokenizers: GPT-2's byte-level BPE (two backends), a trainer, and a char tokenizer.

tok = get_tokenizer("gpt2")                       # GPT-2's own vocabulary, tiktoken backend
tok = get_tokenizer("gpt2", backend="python")     # the from-scratch reference, same ids
tok = get_tokenizer("char", text=open("input.txt").read())
tok = get_tokenizer("runs/sc/tokenizer")          # whatever tok.save(dir) wrote
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gpt2lab.errors import TokenizerError
from gpt2lab.tokenizer.base import EOT, Tokenizer
from gpt2lab.tokenizer.bpe import BACKENDS, BPETokenizer
from gpt2lab.tokenizer.char import UNK, CharTokenizer
from gpt2lab.tokenizer.pretokenize import GPT2_PATTERN, GPT4_PATTERN
from gpt2lab.tokenizer.train import train_bpe

__all__ = [
    "BACKENDS",
    "BPETokenizer",
    "CharTokenizer",
    "EOT",
    "GPT2_PATTERN",
    "GPT4_PATTERN",
    "UNK",
    "Tokenizer",
    "get_tokenizer",
    "train_bpe",
]


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
        from gpt2lab.tokenizer.io import load_gpt2

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
        from gpt2lab.tokenizer.io import load_dir

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
