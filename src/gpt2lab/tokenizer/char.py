"""A character-level tokenizer with the BPE interface (as in nanoGPT's shakespeare-char)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from gpt2lab.errors import TokenizerError
from gpt2lab.tokenizer.base import EOT, Tokenizer
from gpt2lab.tokenizer.files import write_meta

UNK = "<|unk|>"


class CharTokenizer(Tokenizer):
    """Ids 0..len(chars)-1 are the sorted characters; `<|endoftext|>` (and `<|unk|>`) come after,
    then any special tokens added later (`with_special_tokens`, e.g. chat tokens), in order."""

    kind = "char"

    def __init__(
        self, chars: Iterable[str], unk: bool = False, specials: Iterable[str] = ()
    ) -> None:
        self.chars = "".join(sorted(set(chars)))
        if not self.chars:
            raise TokenizerError(
                "the char tokenizer got an empty training text",
                "at least one character",
                "pass text=... with the text the model will see",
            )
        self.unk = unk
        self._stoi = {c: i for i, c in enumerate(self.chars)}
        n = len(self.chars)
        self.special_tokens = {EOT: n, **({UNK: n + 1} if unk else {})}
        self.added = tuple(s for s in dict.fromkeys(specials) if s not in self.special_tokens)
        for name in self.added:
            self.special_tokens[name] = n + len(self.special_tokens)
        self.n_vocab = n + len(self.special_tokens)
        self._itos = list(self.chars) + list(self.special_tokens)

    @classmethod
    def from_text(cls, text: str, unk: bool = False) -> CharTokenizer:
        """The vocabulary is the sorted set of characters of `text`."""
        return cls(set(text), unk)

    @classmethod
    def from_meta(cls, meta: dict[str, Any], where: str = "tokenizer.json") -> CharTokenizer:
        chars = meta.get("chars")
        if not isinstance(chars, str):
            raise TokenizerError(
                f"{where} has no 'chars' string", "the char tokenizer's characters"
            )
        added = meta.get("specials", [])
        if not isinstance(added, list) or not all(isinstance(a, str) for a in added):
            raise TokenizerError(f"{where}: 'specials' is {added!r}", "a list of strings")
        tok = cls(chars, bool(meta.get("unk", False)), added)
        if tok.chars != chars:
            raise TokenizerError(f"{where}: 'chars' is not sorted and unique", "sorted characters")
        return tok

    def _encode_ordinary(self, text: str) -> list[int]:
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            pass
        if self.unk:
            u = self.special_tokens[UNK]
            return [stoi.get(c, u) for c in text]
        i, c = next((i, c) for i, c in enumerate(text) if c not in stoi)
        raise TokenizerError(
            f"character {c!r} (U+{ord(c):04X}) at position {i} is not in the char vocabulary "
            f"of {len(self.chars)} characters",
            "only characters of the training text",
            "build the tokenizer with unk=True to map unknown characters to <|unk|>, "
            "or from a text that has this character",
        )

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text (special tokens as their text)."""
        itos, n = self._itos, self.n_vocab
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # numpy / torch -> ints
        out = []
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < n:
                try:
                    i = int(i)  # numpy / torch integers
                except (TypeError, ValueError):
                    raise self._bad_id(i) from None
                if not 0 <= i < n:
                    raise self._bad_id(i)
            out.append(itos[i])
        return "".join(out)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The UTF-8 bytes of `decode(ids)`."""
        return self.decode(ids).encode("utf-8")

    def spec(self) -> dict[str, Any]:
        """`{"kind": "char", "chars": ..., "unk": ...}` (and the added `specials`, if any):
        enough to rebuild the tokenizer."""
        spec = {"kind": "char", "chars": self.chars, "unk": self.unk}
        return {**spec, "specials": list(self.added)} if self.added else spec

    def with_special_tokens(self, names: Iterable[str]) -> CharTokenizer:
        """A copy with extra special tokens, given the next free ids in order."""
        tok = CharTokenizer(self.chars, self.unk, [*self.added, *names])
        tok.chat_template = self.chat_template
        return tok

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json (kind, characters, special tokens)."""
        write_meta(directory, {**self.spec(), "special_tokens": self.special_tokens})
        self._save_chat_template(directory)
