"""What `prepare()` reports as it runs: one small dataclass per kind of event.

Pass `on_event=` to `prepare()` to receive them; `gpt2lab prepare` turns them into its lines. The
library itself prints nothing (a progress bar only with `progress=True`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class AlreadyComplete:
    """`out` already holds a finished run with the same settings: nothing was done."""

    out: Path


@dataclass(frozen=True)
class StartedClean:
    """A fresh run in `out`; `removed_earlier`: the files of a run with other settings went."""

    out: Path
    removed_earlier: bool


@dataclass(frozen=True)
class Resumed:
    """An interrupted run with the same settings goes on after its `task` finished tasks."""

    out: Path
    task: int
    tokens: dict[str, int]  # per split, already on disk


@dataclass(frozen=True)
class TaskWritten:
    """One task's tokens are on disk; the totals so far, for a progress display."""

    bytes_read: int  # of the input (text characters for a streamed dataset)
    documents: int  # both splits
    tokens: int  # both splits


@dataclass(frozen=True)
class ValSplitEmpty:
    """The split options chose no val document (a small input); training has no val loss."""

    out: Path


@dataclass(frozen=True)
class Finished:
    """`out` is complete; `meta` is its meta.json."""

    out: Path
    meta: dict[str, Any]


PrepareEvent = AlreadyComplete | StartedClean | Resumed | TaskWritten | ValSplitEmpty | Finished
