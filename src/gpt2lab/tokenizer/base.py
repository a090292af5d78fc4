"""What every gpt2lab tokenizer shares: special-token rules (as tiktoken has them) and batching."""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Literal

import regex

from gpt2lab.errors import TokenizerError

EOT = "<|endoftext|>"
AllowedSpecial = Literal["all"] | Collection[str]


class Tokenizer:
    """The interface: encode/decode, special tokens, save/spec. Subclasses fill in the codec."""

    special_tokens: dict[str, int]
    n_vocab: int
    # a gpt2lab.tokenizer.chat.ChatTemplate that travels with the vocabulary (None: no chat);
    # save() writes it as chat_template.json, get_tokenizer(dir) reads it back
    chat_template: Any = None

    # --- what a subclass provides -------------------------------------------------------------
    def _encode_ordinary(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of a token sequence (special tokens as their text)."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable description of this tokenizer."""
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> None:
        """Write this tokenizer's files into `directory` (read back by `get_tokenizer(dir)`)."""
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------------
    def _save_chat_template(self, directory: str | os.PathLike) -> None:
        if self.chat_template is not None:
            self.chat_template.save(directory)

    @property
    def eot_token(self) -> int:
        """The id of `<|endoftext|>`."""
        if EOT not in self.special_tokens:
            raise TokenizerError(
                f"this tokenizer has no {EOT} token",
                f"one of its special tokens {sorted(self.special_tokens)}",
                f"add it with tok.with_special_tokens([{EOT!r}])",
            )
        return self.special_tokens[EOT]

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode `text` treating special-token text (e.g. "<|endoftext|>") as plain text."""
        return self._encode_ordinary(text)

    def encode(
        self,
        text: str,
        allowed_special: AllowedSpecial = frozenset(),
        disallowed_special: AllowedSpecial = "all",
    ) -> list[int]:
        """Encode `text`; special-token text must be allowed (then it becomes the special id).

        >>> tok.encode("hi<|endoftext|>", allowed_special="all")[-1] == tok.eot_token
        True

        A special token's text that is neither allowed nor disallowed is encoded as plain text;
        by default every special token is disallowed and its text raises TokenizerError.
        """
        allowed = self._allowed(allowed_special)
        disallowed = self._disallowed(allowed, disallowed_special)
        for s in sorted(disallowed):
            if s in text:
                raise TokenizerError(
                    f"the text contains the special token {s!r} at character {text.index(s)}",
                    "no special-token text unless it is allowed",
                    f"pass allowed_special={{{s!r}}} (or 'all') to encode it as id "
                    f"{self.special_tokens.get(s)}, or use encode_ordinary() to encode it as text",
                )
        if not allowed:
            return self._encode_ordinary(text)
        return self._encode_with_special(text, allowed)

    def _allowed(self, allowed_special: AllowedSpecial) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        allowed = _as_set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise TokenizerError(
                f"allowed_special names {sorted(unknown)}, which are not special tokens here",
                f"a subset of {sorted(self.special_tokens)}",
                "add them with special_tokens=... when building the tokenizer",
            )
        return allowed

    def _disallowed(self, allowed: set[str], disallowed_special: AllowedSpecial) -> set[str]:
        if disallowed_special == "all":
            return set(self.special_tokens) - allowed
        return _as_set(disallowed_special)

    def _encode_with_special(self, text: str, allowed: set[str]) -> list[int]:
        # Longest first, so that a special token that is a prefix of another never wins wrongly.
        pat = regex.compile(
            "|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True))
        )
        ids: list[int] = []
        start = 0
        for m in pat.finditer(text):
            ids += self._encode_ordinary(text[start : m.start()])
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        ids += self._encode_ordinary(text[start:])
        return ids

    def encode_batch(
        self,
        texts: Sequence[str],
        allowed_special: AllowedSpecial = frozenset(),
        disallowed_special: AllowedSpecial = "all",
        num_threads: int | None = None,
    ) -> list[list[int]]:
        """Encode many texts, in parallel where the backend can."""
        return [self.encode(t, allowed_special, disallowed_special) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text; bytes that are not valid UTF-8 become U+FFFD (as in tiktoken)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _bad_id(self, i: Any) -> TokenizerError:
        return TokenizerError(
            f"token id {i!r} is outside the vocabulary",
            f"an int in [0, {self.n_vocab})",
            "decode ids made by this same tokenizer",
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_vocab={self.n_vocab}, spec={self.spec()!r})"


def _as_set(tokens: Collection[str]) -> set[str]:
    # a lone string names one token; set("<|pad|>") would be its characters
    return {tokens} if isinstance(tokens, str) else set(tokens)


# how `piece_label` shows whitespace, so that a label never looks empty nor spans lines
_VISIBLE = str.maketrans({" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"})


def readable_piece(piece: bytes, visible_space: bool = False) -> str:
    """A token's bytes as text: UTF-8 where they decode, else `<e6 97>` (part of a character).
    `visible_space=True` shows spaces, tabs and newlines as marks, for labels on one line."""
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError:
        return "<" + " ".join(f"{x:02x}" for x in piece) + ">"
    return text.translate(_VISIBLE) if visible_space else text


def piece_label(tokenizer: Tokenizer, i: int) -> str:
    """Token `i` as one short label, whitespace visible: `\u2423the`, `\u21b5`, `<e6 97>`."""
    return readable_piece(tokenizer.decode_bytes([i]), visible_space=True)
