"""prepare(): stream documents, tokenize them in parallel, write train/val shards and meta.json.

Memory stays bounded: documents are read in pieces, at most 2 tasks per worker are in flight, and
tokens go straight to the shard files. After every task a journal line (see journal.py) records how
many tokens of each split are written, so a rerun after a crash resumes from the last task.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gpt2lab.data import shards, sources
from gpt2lab.data.events import (
    AlreadyComplete,
    Finished,
    PrepareEvent,
    Resumed,
    StartedClean,
    TaskWritten,
    ValSplitEmpty,
)
from gpt2lab.data.journal import JOURNAL, adopt_legacy, read_journal, resume_from
from gpt2lab.data.sources import (
    ByteCounter,
    SourceSpec,
    expand_inputs,
    iter_pieces,
    iter_text,
    open_hf_dataset,
)
from gpt2lab.data.split import Splitter
from gpt2lab.errors import DataError, ResourceError, mark_key
from gpt2lab.io import (
    atomic_dir,
    atomic_write_json,
    disk_full_reason,
    is_disk_full,
    sane_workers,
    usable_cores,
)
from gpt2lab.outdir import OutputDir, check_not_overlapping, claim_output_dir
from gpt2lab.tokenizer import get_tokenizer
from gpt2lab.tokenizer.parallel import start_pool, worker_tokenizer

TASK_CHARS = 1 << 18  # text per task sent to a worker: small enough to balance the workers
TRAIN, VAL = 0, 1

Task = list[tuple[int, str, bool]]  # (split, text, starts a document)


def prepare(
    source: SourceSpec | str | list[str],
    out_dir: str | os.PathLike,
    tokenizer: Any = "gpt2",
    *,
    val_fraction: float | None = None,
    val_docs: int | None = None,
    val_tail: float | None = None,
    seed: int = 1337,
    shard_tokens: int = 100_000_000,
    workers: int | None = None,
    dtype: str = "auto",
    force: bool = False,
    progress: bool = False,
    command: str | None = None,
    on_event: Callable[[PrepareEvent], None] | None = None,
) -> dict[str, Any]:
    """Tokenize `source` into `out_dir`/{train,val}_NNNNNN.bin + meta.json + tokenizer/.

    `tokenizer` is "gpt2", "char", a saved tokenizer directory or a tokenizer object. The val split
    takes whole documents: a seeded `val_fraction` (default 0.005), exactly `val_docs` documents,
    or, for one text file, its last `val_tail` of characters. Returns the meta.json contents.
    Prints nothing: `on_event` receives the events of data/events.py (a clean start or a resume,
    each task written, the end), and `progress=True` shows a progress bar on stderr.
    """
    emit = on_event or _ignore
    spec = source if isinstance(source, SourceSpec) else SourceSpec(inputs=_as_list(source))
    out = Path(out_dir)
    if shard_tokens < 1:
        raise DataError(
            f"shard size {shard_tokens}",
            "a positive number of tokens",
            f"fix {mark_key('shard_tokens')}",
        )
    files = [] if spec.dataset else expand_inputs(spec.inputs)
    local_data = [Path(f) for f in spec.data_files or [] if Path(f).is_file()]  # changes restart
    given = [*spec.inputs, *(spec.data_files or []), *files]
    if isinstance(tokenizer, (str, os.PathLike)) and os.fspath(tokenizer) not in ("gpt2", "char"):
        given.append(tokenizer)
    check_not_overlapping(out, given)  # before anything is read or written
    workers = sane_workers(workers)
    claim = claim_output_dir(out, "prepare", adopt=adopt_legacy)  # ours, locked, or refused
    try:
        return _prepare(
            spec, claim, files, local_data, tokenizer, val_fraction, val_docs, val_tail, seed,
            shard_tokens, workers, dtype, force, progress, command, emit,
        )  # fmt: skip
    except BaseException as e:
        if claim.created and not (claim.path / "meta.json").exists():
            if not (claim.path / JOURNAL).exists() or isinstance(e, DataError):
                claim.discard()  # nothing to resume from: leave no trace of this run
        raise
    finally:
        claim.release()


def _prepare(
    spec, claim: OutputDir, files, local_data, tokenizer, val_fraction, val_docs, val_tail, seed,
    shard_tokens, workers, dtype, force, progress, command, emit,
) -> dict[str, Any]:  # fmt: skip
    out = claim.path
    splitter = Splitter.create(spec, files, val_fraction, val_docs, val_tail, seed)
    tok = _build_tokenizer(tokenizer, spec)
    token_dtype = shards.dtype_for_vocab(tok.n_vocab, dtype)
    settings = {
        "format_version": shards.VERSION,
        "source": spec.describe(),
        "files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files + local_data],
        "tokenizer": tok.spec(),
        "split": splitter.describe(),
        "seed": seed,
        "shard_tokens": shard_tokens,
        "dtype": token_dtype.name,
        "task_chars": TASK_CHARS,  # tasks and pieces must be cut the same way to resume
        "piece_chars": sources.PIECE_CHARS,
        "read_bytes": sources.READ_BYTES,
    }
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    meta_path = out / "meta.json"
    if meta_path.exists() and not force:
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if old.get("fingerprint") == fingerprint:
            emit(AlreadyComplete(out))
            return old
    resume = None if force else read_journal(out, fingerprint)
    writers = [
        shards.ShardWriter(out, name, token_dtype, tok.n_vocab, shard_tokens, claim.record)
        for name in shards.SPLITS
    ]
    state = {"task": 0, "tokens": [0, 0], "docs": [0, 0]}
    try:
        if resume is None:
            emit(StartedClean(out, removed_earlier=bool(claim.remove_ours())))
            claim.record("tokenizer", JOURNAL)
            with atomic_dir(out / "tokenizer") as tok_dir:
                tok.save(tok_dir)
            with open(out / JOURNAL, "w", encoding="utf-8") as f:
                f.write(json.dumps({"fingerprint": fingerprint}) + "\n")
        else:
            state = resume_from(out, writers, resume, fingerprint)
            emit(Resumed(out, state["task"], dict(zip(shards.SPLITS, state["tokens"]))))
        _run(spec, splitter, tok, out, writers, state, workers, progress, files, emit)
    except DataError:
        for w in writers:
            w.abort()
        claim.remove_ours()  # bad input: leave nothing (a rerun with fixed input starts clean)
        raise
    except OSError as e:
        for w in writers:
            w.abort()
        if is_disk_full(e):
            raise _disk_full(e, out, state) from e
        raise
    except BaseException:
        for w in writers:
            w.abort()
        raise
    if state["docs"][TRAIN] == 0 and state["docs"][VAL] == 0:
        claim.remove_ours()
        raise DataError(
            f"the input has no text ({_where(spec)})",
            "at least one non-empty document",
            f"check {mark_key('inputs')} (and {mark_key('field')} for tables)",
        )
    try:
        names = [w.finish() for w in writers]
    except OSError as e:
        if is_disk_full(e):
            raise _disk_full(e, out, state) from e
        raise
    meta = {
        "format_version": shards.VERSION,
        "fingerprint": fingerprint,
        "vocab_size": tok.n_vocab,
        "eot_token": tok.eot_token,
        "dtype": token_dtype.name,
        "tokenizer": tok.spec(),
        "documents": dict(zip(shards.SPLITS, state["docs"])),
        "tokens": dict(zip(shards.SPLITS, state["tokens"])),
        "shards": dict(zip(shards.SPLITS, names)),
        "shard_tokens": shard_tokens,
        "source": spec.describe(),
        "split": splitter.describe(),
        "seed": seed,
        "command": command,
    }
    claim.record("meta.json")
    try:
        atomic_write_json(meta_path, meta)  # last: a directory without it is never read as data
    except OSError as e:
        if is_disk_full(e):
            raise _disk_full(e, out, state) from e
        raise
    (out / JOURNAL).unlink(missing_ok=True)
    if state["docs"][VAL] == 0 and splitter.value > 0:
        emit(ValSplitEmpty(out))
    emit(Finished(out, meta))
    return meta


def _ignore(event: PrepareEvent) -> None:
    pass


def _disk_full(e: OSError, out: Path, state: dict[str, Any]) -> ResourceError:
    """The one line for a full disk (or a file-size limit) while writing shards."""
    done = state["task"]
    return ResourceError(
        f"writing token shards in {out} stopped: {disk_full_reason(e, out / 'x')}; the "
        f"{done} task(s) recorded in {out / JOURNAL} are intact on disk and resumable",
        "room for the shards",
        "free some space (or raise the limit) and run the same command again: it resumes",
    )


def _as_list(source: str | list[str]) -> list[str]:
    return [os.fspath(source)] if isinstance(source, (str, os.PathLike)) else list(source)


def _where(spec: SourceSpec) -> str:
    if spec.dataset:
        return f"dataset {spec.dataset}"
    return mark_key("inputs", " ".join(spec.inputs))


def _build_tokenizer(tokenizer: Any, spec: SourceSpec) -> Any:
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if os.fspath(tokenizer) == "char":
        chars: set[str] = set()
        for text in iter_text(spec):  # one pass over the input for its character set
            chars.update(text)
        if not chars:
            raise DataError(
                f"the input has no text ({_where(spec)})",
                "some text",
                f"check {mark_key('inputs')}",
            )
        return get_tokenizer("char", text="".join(sorted(chars)))
    return get_tokenizer(os.fspath(tokenizer))


# --- the main loop ----------------------------------------------------------------------------


def _tasks(spec: SourceSpec, splitter: Splitter, counter: ByteCounter) -> Iterator[Task]:
    """Pieces with their split, grouped into tasks of ~TASK_CHARS characters (a fixed grouping)."""
    task: Task = []
    size = 0
    for split, text, first in splitter.assign(iter_pieces(spec, counter)):
        task.append((split, text, first))
        size += len(text)
        if size >= TASK_CHARS:
            yield task
            task, size = [], 0
    if task:
        yield task


def _init_worker() -> None:
    # Ctrl-C reaches the whole process group: the parent handles it and stops the pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if sys.platform == "linux":  # and a worker whose parent died (SIGKILL) goes too
        with contextlib.suppress(Exception):
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _encode_task(task: Task, tok: Any = None) -> tuple[list[np.ndarray], list[int]]:
    """Token arrays of the two splits and their document counts; every document starts with EOT."""
    tok = tok if tok is not None else worker_tokenizer()
    eot = tok.eot_token
    ids: list[list[int]] = [[], []]
    docs = [0, 0]
    for split, text, first in task:
        if first:
            ids[split].append(eot)
            docs[split] += 1
        ids[split] += tok.encode_ordinary(text)
    dtype = shards.dtype_for_vocab(tok.n_vocab)
    return [np.asarray(x, dtype=dtype) for x in ids], docs


def _run(spec, splitter, tok, out, writers, state, workers, progress, files, emit) -> None:
    counter = ByteCounter()
    tasks = _tasks(spec, splitter, counter)
    for _ in range(state["task"]):  # already written: read past them without tokenizing
        next(tasks)
    workers = workers or usable_cores()
    bar = _ProgressBar(spec, files, counter.n, sum(state["docs"])) if progress else None
    journal = open(out / JOURNAL, "a", encoding="utf-8")
    pool = None
    try:
        if workers > 1:
            # Ctrl-C while Pool() forks would orphan its workers: hold it until `pool` is set
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                pool = start_pool(tok, workers, _init_worker)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            results = _bounded_imap(pool, tasks, 2 * workers)
        else:
            results = (_encode_task(t, tok) for t in tasks)
        for arrays, docs in results:
            for s in (TRAIN, VAL):
                writers[s].write(arrays[s])
                writers[s].flush()
                state["tokens"][s] += len(arrays[s])
                state["docs"][s] += docs[s]
            state["task"] += 1
            journal.write(json.dumps(state) + "\n")
            journal.flush()
            event = TaskWritten(counter.n, sum(state["docs"]), sum(state["tokens"]))
            if bar is not None:
                bar.update(event)
            emit(event)
    finally:
        journal.close()
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()


def _bounded_imap(pool: Any, tasks: Iterator[Task], max_in_flight: int) -> Iterator[Any]:
    """Pool.imap in order, but never more than `max_in_flight` tasks read ahead (bounded memory)."""
    pending: collections.deque = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(_encode_task, (task,)))
        if len(pending) >= max_in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class _ProgressBar:
    """tqdm on stderr over input bytes (local files: MB, MB/s, ETA) or documents (HF datasets)."""

    def __init__(self, spec: SourceSpec, files: list[Path], done_bytes: int, done_docs: int):
        self.by_docs = bool(spec.dataset)
        self.t0, self.bytes0 = time.perf_counter(), done_bytes
        if self.by_docs:  # a streamed dataset: its card may say how many documents it has
            total, initial, unit = _hf_num_docs(spec), done_docs, "doc"
            if spec.max_docs is not None:
                total = min(total or spec.max_docs, spec.max_docs)
        else:
            total, initial, unit = sum(f.stat().st_size for f in files), done_bytes, "B"
        self.bar = tqdm(total=total, initial=initial, unit=unit, unit_scale=True, desc="prepare")

    def update(self, e: TaskWritten) -> None:
        if self.by_docs:
            rate = (e.bytes_read - self.bytes0) / max(1e-9, time.perf_counter() - self.t0) / 1e6
            self.bar.update(e.documents - self.bar.n)
            self.bar.set_postfix(tokens=f"{e.tokens:,}", MBps=f"{rate:.1f}", refresh=False)
        else:
            self.bar.update(e.bytes_read - self.bar.n)
            self.bar.set_postfix(docs=f"{e.documents:,}", tokens=f"{e.tokens:,}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _hf_num_docs(spec: SourceSpec) -> int | None:
    try:
        splits = open_hf_dataset(spec).info.splits or {}
        return int(splits[spec.dataset_split].num_examples) or None
    except Exception:  # no card, no split info: a bar without an ETA
        return None
