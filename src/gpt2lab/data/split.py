"""Which documents go to the val split: chosen by document, deterministically from a seed.

`val_fraction`: document i is val when a hash of (seed, i) falls below the fraction, so the choice
needs no count and no memory. `val_docs`: the N documents with the smallest hashes (after a
pass that counts the documents). `val_tail`: one text file's last fraction of characters, as
nanoGPT's shakespeare_char does it.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from gpt2lab.data.sources import SourceSpec, file_kind, iter_pieces
from gpt2lab.errors import DataError, mark_key

TRAIN, VAL = 0, 1
_M = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser (Steele et al. 2014): a well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _M
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M
    return x ^ (x >> 31)


def doc_uniform(seed: int, index: int) -> float:
    """A number in [0, 1) fixed by (seed, document index): the document's draw for the split."""
    return _mix(_mix(seed & _M) ^ index) / 2.0**64


class Splitter:
    """Assigns each piece of the document stream to train or val."""

    def __init__(
        self, method: str, value: float, seed: int, cut: int = 0, spec: SourceSpec | None = None
    ) -> None:
        self.method, self.value, self.seed = method, value, seed
        self.cut = cut  # val_tail: characters before the val part
        self.spec = spec  # val_docs: the source whose documents are counted
        self._val_set: set[int] | None = None

    def val_set(self) -> set[int]:
        """val_docs: the N documents with the smallest draws (counted on first use)."""
        if self._val_set is None:
            assert self.spec is not None
            n = _count_documents(self.spec)
            if self.value >= n:
                raise DataError(
                    f"{mark_key('val_docs', self.value)} asks for all {n} documents of the input",
                    "fewer val documents than documents",
                    f"lower {mark_key('val_docs')} "
                    f"(or use {mark_key('val_tail')} for a single file)",
                )
            key = lambda i: doc_uniform(self.seed, i)  # noqa: E731
            self._val_set = set(heapq.nsmallest(int(self.value), range(n), key=key))
        return self._val_set

    @classmethod
    def create(
        cls,
        spec: SourceSpec,
        files: list[Path],
        val_fraction: float | None,
        val_docs: int | None,
        val_tail: float | None,
        seed: int,
    ) -> Splitter:
        """Check the split options and do the counting pass that val_docs / val_tail need."""
        given = [mark_key(n) for n, v in (("val_fraction", val_fraction), ("val_docs", val_docs),
                                          ("val_tail", val_tail)) if v is not None]  # fmt: skip
        if len(given) > 1:
            raise DataError(
                f"{' and '.join(given)} are both given", "one way to choose the val split",
                f"keep only {given[0]}",
            )  # fmt: skip
        if val_tail is not None:
            if not 0 <= val_tail < 1:
                raise DataError(
                    mark_key("val_tail", val_tail),
                    "0 <= F < 1",
                    f"e.g. {mark_key('val_tail', 0.1)}",
                )
            if spec.dataset or len(files) != 1 or file_kind(files[0]) != "text":
                raise DataError(
                    f"{mark_key('val_tail')} needs exactly one text file, got {len(files)} input "
                    "files"
                    if not spec.dataset
                    else f"{mark_key('val_tail')} needs one text file, not a dataset",
                    f"a single {mark_key('inputs', 'FILE')}",
                    f"use {mark_key('val_fraction')} or {mark_key('val_docs')} "
                    "for several documents",
                )
            total = sum(len(text) for text, _ in iter_pieces(spec))
            return cls("val_tail", val_tail, seed, cut=int(total * (1 - val_tail)))
        if val_docs is not None:
            if val_docs < 0:
                raise DataError(
                    mark_key("val_docs", val_docs), "N >= 0", f"e.g. {mark_key('val_docs', 100)}"
                )
            return cls("val_docs", val_docs, seed, spec=spec)  # counted when first needed
        frac = 0.005 if val_fraction is None else val_fraction
        if not 0 <= frac < 1:
            raise DataError(
                mark_key("val_fraction", frac),
                "0 <= F < 1",
                f"e.g. {mark_key('val_fraction', 0.005)}",
            )
        return cls("val_fraction", frac, seed)

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, self.method: self.value, "seed": self.seed}

    def assign(self, pieces: Iterable[tuple[str, bool]]) -> Iterator[tuple[int, str, bool]]:
        """(split, text, first) for each (text, first) piece; a document never straddles splits,
        except the one document that val_tail cuts in two."""
        if self.method == "val_tail":
            yield from self._tail(pieces)
            return
        doc, split = -1, TRAIN
        val_set = self.val_set() if self.method == "val_docs" else set()
        for text, first in pieces:
            if first:
                doc += 1
                if self.method == "val_docs":
                    split = VAL if doc in val_set else TRAIN
                else:
                    split = VAL if doc_uniform(self.seed, doc) < self.value else TRAIN
            yield split, text, first

    def _tail(self, pieces: Iterable[tuple[str, bool]]) -> Iterator[tuple[int, str, bool]]:
        pos, val_started = 0, False
        for text, first in pieces:
            head = text[: max(0, self.cut - pos)]
            if head:
                yield TRAIN, head, first
            tail = text[len(head) :]
            if tail:
                yield VAL, tail, first or not val_started
                val_started = True
            pos += len(text)


def _count_documents(spec: SourceSpec) -> int:
    """How many (non-empty) documents the source has: one pass that reads but does not tokenize."""
    return sum(first for _, first in iter_pieces(spec))
