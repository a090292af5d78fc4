"""Worker processes that hold a tokenizer, for encoding in parallel.

On Linux the workers are forked and inherit the tokenizer (no copy, no second load). Elsewhere,
where forking is unsafe, they are spawned and each unpickles it once, in the pool's initializer.
A task running in a worker gets the tokenizer from `worker_tokenizer()`.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable
from multiprocessing.pool import Pool

from gpt2lab.tokenizer.base import Tokenizer

FORKS = sys.platform == "linux"  # whether start_pool forks its workers

_TOKENIZER: Tokenizer | None = None


def start_pool(tok: Tokenizer, workers: int, initializer: Callable[[], None] | None = None) -> Pool:
    """A pool of `workers` processes holding `tok`; `initializer()` runs first in each of them.

    The caller closes the pool (`with start_pool(...) as pool:`, or terminate() and join()).
    """
    global _TOKENIZER
    if FORKS:
        _TOKENIZER = tok  # inherited by the workers forked now (and any the pool forks later)
        return multiprocessing.get_context("fork").Pool(workers, _init_worker, (None, initializer))
    return multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tok, initializer))


def worker_tokenizer() -> Tokenizer:
    """The tokenizer of this worker process (in a task run by a `start_pool` pool)."""
    if _TOKENIZER is None:
        raise RuntimeError("worker_tokenizer() is only available in a start_pool() worker")
    return _TOKENIZER


def _init_worker(tok: Tokenizer | None, initializer: Callable[[], None] | None) -> None:
    global _TOKENIZER
    if initializer is not None:
        initializer()
    if tok is not None:
        _TOKENIZER = tok
