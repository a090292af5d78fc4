"""Byte-level BPE as GPT-2 does it: pieces from a regex, UTF-8 bytes, merges applied by rank.

One class, two backends: "python" (the readable reference below) and "tiktoken" (the same ranks,
pattern and special tokens handed to a `tiktoken.Encoding`, so custom vocabularies are fast too).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from typing import Any

import tiktoken

from gpt2lab.errors import TokenizerError
from gpt2lab.tokenizer.base import EOT, AllowedSpecial, Tokenizer
from gpt2lab.tokenizer.files import read_gpt2_vocab, write_gpt2_files, write_hf_files
from gpt2lab.tokenizer.parallel import FORKS, start_pool, worker_tokenizer
from gpt2lab.tokenizer.pretokenize import GPT2_PATTERN, compile_pattern

BACKENDS = ("tiktoken", "python")
_CACHE_MAX = 1 << 18  # pieces whose merges we remember; natural text repeats words a lot
_NONE = 1 << 62  # the rank of a pair that never merges
PARALLEL_MIN_CHARS = 1 << 20  # below this, worker processes cost more than they save


class BPETokenizer(Tokenizer):
    """A byte-level BPE tokenizer: `ranks`: token bytes -> id; `merges`: pairs, in order."""

    def __init__(
        self,
        ranks: dict[bytes, int],
        merges: Sequence[tuple[bytes, bytes]],
        pattern: str = GPT2_PATTERN,
        special_tokens: dict[str, int] | None = None,
        backend: str = "tiktoken",
        kind: str = "bpe",
    ) -> None:
        if backend not in BACKENDS:
            raise TokenizerError(f"unknown backend {backend!r}", f"one of {', '.join(BACKENDS)}")
        self.backend, self.kind, self.pattern = backend, kind, pattern
        self.ranks, self.merges = dict(ranks), list(merges)
        self.special_tokens = dict(special_tokens or {})
        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing:
            raise TokenizerError(
                f"the vocabulary lacks {len(missing)} single bytes (first: {missing[0]})",
                "all 256 byte values as tokens (byte-level BPE)",
            )
        self._decoder: dict[int, bytes] = {i: t for t, i in self.ranks.items()}
        if len(self._decoder) != len(self.ranks):
            raise TokenizerError("the vocabulary gives one id to two tokens", "distinct ids")
        for s, i in self.special_tokens.items():
            if i in self._decoder:
                raise TokenizerError(
                    f"special token {s!r} has id {i}, which the vocabulary already uses",
                    "special ids after the vocabulary",
                )
            self._decoder[i] = s.encode("utf-8")
        self.n_vocab = max(self._decoder) + 1
        self._byte_ids = [self.ranks[bytes([b])] for b in range(256)]
        # pair of ids -> merge rank (GPT-2 applies the lowest first); rank -> id of the result
        self._merge_rank: dict[tuple[int, int], int] = {}
        self._rank_to_id: list[int] = []
        for rank, (a, b) in enumerate(self.merges):
            try:
                pair, new = (self.ranks[a], self.ranks[b]), self.ranks[a + b]
            except KeyError:
                raise TokenizerError(
                    f"merge {rank} ({a!r} + {b!r}) uses or makes a token not in the vocabulary",
                    "every merge's parts and result in the vocabulary",
                ) from None
            self._merge_rank.setdefault(pair, rank)
            self._rank_to_id.append(new)
        self._pat = compile_pattern(pattern)
        self._cache: dict[str, list[int]] = {}
        self._tiktoken: Any = None
        if backend == "tiktoken":
            self._tiktoken = self._build_tiktoken()

    # --- the python backend: GPT-2's algorithm, written out ---------------------------------------
    def _bpe(self, piece: bytes) -> list[int]:
        """Merge the bytes of one pre-token: repeatedly join the adjacent pair of lowest rank.

        The leftmost lowest-rank pair goes first, so "aaa" becomes [aa, a]. `ranks[i]` is the rank
        of the pair (ids[i], ids[i+1]); a merge changes only the two pairs beside it.
        """
        ids = [self._byte_ids[b] for b in piece]
        get, new_id = self._merge_rank.get, self._rank_to_id
        ranks = [get(p, _NONE) for p in zip(ids, ids[1:])]
        while ranks:
            r = min(ranks)
            if r == _NONE:
                break
            i = ranks.index(r)
            ids[i : i + 2] = [new_id[r]]
            del ranks[i]
            if i > 0:
                ranks[i - 1] = get((ids[i - 1], ids[i]), _NONE)
            if i < len(ranks):
                ranks[i] = get((ids[i], ids[i + 1]), _NONE)
        return ids

    def _encode_python(self, text: str) -> list[int]:
        out: list[int] = []
        cache = self._cache
        for piece in self._pat.findall(text):
            ids = cache.get(piece)
            if ids is None:
                ids = self._bpe(piece.encode("utf-8"))
                if len(cache) >= _CACHE_MAX:
                    cache.clear()
                cache[piece] = ids
            out += ids
        return out

    # --- the tiktoken backend ---------------------------------------------------------------------
    def _build_tiktoken(self) -> Any:
        # tiktoken ranks a merge by the id of its result, so ids must grow with the merge order.
        ids = [self.ranks[a + b] for a, b in self.merges]
        if any(x >= y for x, y in zip(ids, ids[1:])):
            raise TokenizerError(
                "this vocabulary's merged-token ids do not grow with the merge order",
                "ids in merge order for backend='tiktoken'",
                "use backend='python'",
            )
        return tiktoken.Encoding(
            name=f"gpt2lab-{self.vocab_sha256()[:12]}",
            pat_str=self.pattern,
            mergeable_ranks=self.ranks,
            special_tokens=self.special_tokens,
        )

    # --- the interface ----------------------------------------------------------------------------
    def _encode_ordinary(self, text: str) -> list[int]:
        if self._tiktoken is not None:
            return self._tiktoken.encode_ordinary(text)
        return self._encode_python(text)

    def _encode_with_special(self, text: str, allowed: set[str]) -> list[int]:
        if self._tiktoken is not None:
            return self._tiktoken.encode(text, allowed_special=allowed, disallowed_special=())
        return super()._encode_with_special(text, allowed)

    def encode_batch(
        self,
        texts: Sequence[str],
        allowed_special: AllowedSpecial = frozenset(),
        disallowed_special: AllowedSpecial = "all",
        num_threads: int | None = None,
    ) -> list[list[int]]:
        """Encode many texts in parallel: tiktoken threads, or worker processes for "python"."""
        workers = num_threads or min(8, os.cpu_count() or 1)
        if self._tiktoken is not None:
            allowed = self._allowed(allowed_special)
            self._check_disallowed_batch(texts, allowed, disallowed_special)
            return self._tiktoken.encode_batch(
                list(texts), num_threads=workers, allowed_special=allowed, disallowed_special=()
            )
        total = sum(len(t) for t in texts)
        # Only forked workers: spawning would re-run the caller's script without a main guard.
        if workers < 2 or total < PARALLEL_MIN_CHARS or len(texts) < 2 or not FORKS:
            return super().encode_batch(texts, allowed_special, disallowed_special)
        with start_pool(self, workers) as pool:
            args = [(t, allowed_special, disallowed_special) for t in texts]
            return pool.starmap(
                _encode_in_worker, args, chunksize=max(1, len(texts) // (4 * workers))
            )

    def _check_disallowed_batch(self, texts, allowed, disallowed_special) -> None:
        disallowed = self._disallowed(allowed, disallowed_special)
        if disallowed:
            for t in texts:
                if any(s in t for s in disallowed):
                    self.encode(t, allowed, disallowed)  # raises the descriptive error

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of a token sequence (special tokens as their text)."""
        dec = self._decoder
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy / torch -> ints
        try:
            return b"".join([dec[i] for i in ids])
        except (KeyError, TypeError):
            bad = next(i for i in ids if not isinstance(i, int) or i not in dec)
            raise self._bad_id(bad) from None

    def token_bytes(self, i: int) -> bytes:
        """The bytes of one token id."""
        if i not in self._decoder:
            raise self._bad_id(i)
        return self._decoder[i]

    def with_special_tokens(self, names: Iterable[str]) -> BPETokenizer:
        """A copy with extra special tokens, given the next free ids in order."""
        specials = dict(self.special_tokens)
        for name in names:
            if name not in specials:
                specials[name] = self.n_vocab + len(specials) - len(self.special_tokens)
        tok = BPETokenizer(self.ranks, self.merges, self.pattern, specials, self.backend, self.kind)
        tok.chat_template = self.chat_template
        return tok

    def with_backend(self, backend: str) -> BPETokenizer:
        """The same vocabulary on another backend."""
        tok = BPETokenizer(
            self.ranks, self.merges, self.pattern, self.special_tokens, backend, self.kind
        )
        tok.chat_template = self.chat_template
        return tok

    def __reduce__(self) -> tuple:
        # Pickle (e.g. for DataLoader workers) the definition, not the caches and tiktoken state;
        # GPT-2's own vocabulary travels as its name and is re-read from the package files.
        if self.kind == "gpt2":
            extra = [s for s in self.special_tokens if s != EOT]
            return (load_gpt2, (self.backend, extra))
        args = (self.ranks, self.merges, self.pattern, self.special_tokens, self.backend, self.kind)
        return (BPETokenizer, args)

    def vocab_sha256(self) -> str:
        """A digest of the vocabulary and merges: equal digests mean identical encodings."""
        h = hashlib.sha256()
        for token, i in sorted(self.ranks.items(), key=lambda kv: kv[1]):
            h.update(b"%d %s\n" % (i, token.hex().encode()))
        for a, b in self.merges:
            h.update(b"m %s %s\n" % (a.hex().encode(), b.hex().encode()))
        return h.hexdigest()

    def spec(self) -> dict[str, Any]:
        """`{"kind": "gpt2"}` for GPT-2's own vocabulary, else kind, size, pattern and digest."""
        if self.kind == "gpt2":
            extra = {s: i for s, i in self.special_tokens.items() if s != EOT}
            return {"kind": "gpt2", **({"special_tokens": extra} if extra else {})}
        return {
            "kind": self.kind,
            "n_vocab": self.n_vocab,
            "pattern": self.pattern,
            "special_tokens": dict(self.special_tokens),
            "vocab_sha256": self.vocab_sha256(),
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Write encoder.json + vocab.bpe (GPT-2's format) and gpt2lab's small tokenizer.json."""
        meta = {
            "kind": self.kind,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "n_vocab": self.n_vocab,
            "vocab_sha256": self.vocab_sha256(),
        }
        write_gpt2_files(directory, self.ranks, self.merges, self.special_tokens, meta)
        self._save_chat_template(directory)

    def save_hf(self, directory: str | os.PathLike, model_max_length: int = 1024) -> None:
        """Write vocab.json, merges.txt and tokenizer_config.json for `transformers` (with the
        chat template as Jinja, if this tokenizer has one)."""
        jinja = self.chat_template.to_jinja() if self.chat_template is not None else None
        write_hf_files(
            directory,
            self.ranks,
            self.merges,
            self.special_tokens,
            self.pattern,
            model_max_length,
            jinja,
        )


def load_gpt2(backend: str = "tiktoken", special_tokens: list[str] | None = None) -> BPETokenizer:
    """GPT-2's own tokenizer: 50257 ids, `<|endoftext|>` = 50256, extra specials after it."""
    ranks, merges, specials = read_gpt2_vocab()
    tok = BPETokenizer(ranks, merges, GPT2_PATTERN, specials, backend, kind="gpt2")
    return tok.with_special_tokens(special_tokens) if special_tokens else tok


def _encode_in_worker(text: str, allowed: Any, disallowed: Any) -> list[int]:
    return worker_tokenizer().encode(text, allowed, disallowed)
