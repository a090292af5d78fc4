"""`gpt2lab prepare`: text files, tables or a Hugging Face dataset -> token shards + meta.json."""

from __future__ import annotations

import argparse
import difflib
import glob
import logging
import os
import re
import shlex
import sys

from gpt2lab.commands.tokenizer import add_special_argument, special_tokens
from gpt2lab.data import SourceSpec, prepare
from gpt2lab.data.catalog import DATASETS, download
from gpt2lab.data.events import (
    AlreadyComplete,
    Finished,
    PrepareEvent,
    Resumed,
    StartedClean,
    ValSplitEmpty,
)
from gpt2lab.errors import UsageError
from gpt2lab.io import RECORD_LIMIT
from gpt2lab.tokenizer import get_tokenizer

EXAMPLES = """
gpt2lab prepare shakespeare-char --input input.txt --out data/shakespeare-char
gpt2lab prepare shakespeare --input input.txt                 # GPT-2 BPE, last 10% is val
gpt2lab prepare --input 'books/**/*.txt' --out data/books --val-docs 5
gpt2lab prepare notes.txt --out data/notes --val-tail 0.1       # a path works in place of -i
gpt2lab prepare --input notes.txt --split-on-blank-lines --tokenizer char --out data/notes
gpt2lab prepare --input chats.jsonl --field content --out data/chats --workers 8
gpt2lab prepare --dataset json --data-files a.jsonl b.jsonl --out data/ab   # via `datasets`
gpt2lab prepare openwebtext --out data/owt                     # needs the network
gpt2lab prepare fineweb-edu-10B --input 'fineweb/*.parquet' --out data/fwe   # local copy
gpt2lab prepare tinystories --out data/tinystories             # also paul-graham-essays,
gpt2lab prepare --input chats.txt --add-special '<|startoftext|>,<|pad|>' --out data/chats
gpt2lab prepare wikipedia-de --max-docs 100K --out data/wiki-de  # openwebtext-10k, pile-10k
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "preset",
        nargs="?",
        help=f"a known corpus: {', '.join(DATASETS)}; or a file/directory/glob (as --input)",
    )
    src = p.add_argument_group("source")
    src.add_argument(
        "-i",
        "--input",
        nargs="+",
        action="extend",
        metavar="PATH",
        help="text, .jsonl, .csv or .parquet files, directories or globs",
    )
    src.add_argument(
        "--field",
        "--column",
        help="jsonl field / csv or parquet column with the text (default: the preset's, or text)",
    )
    src.add_argument(
        "--split-on-blank-lines",
        action="store_true",
        help="in text files, each blank-line-separated part is a document",
    )
    src.add_argument(
        "--separator",
        metavar="STR",
        help=r"in text files, documents are separated by STR (e.g. '\n%%\n')",
    )
    src.add_argument(
        "--errors",
        choices=["strict", "replace"],
        default="strict",
        help="bytes that are not UTF-8: fail (default) or replace with U+FFFD",
    )
    src.add_argument(
        "--dataset",
        metavar="NAME",
        help="a Hugging Face dataset, streamed (openwebtext; json with --data-files)",
    )
    src.add_argument("--dataset-config", metavar="NAME", help="its config, e.g. sample-10BT")
    src.add_argument("--dataset-split", default="train", help="its split (default: train)")
    src.add_argument("--data-files", nargs="+", metavar="PATH", help="data_files= for --dataset")
    src.add_argument(
        "--max-docs",
        type=_count,
        metavar="N",
        help="only the first N documents: a slice of a large corpus (100K, 1e6 ...)",
    )
    out = p.add_argument_group("output")
    out.add_argument("-o", "--out", metavar="DIR", help="output directory (default: data/PRESET)")
    out.add_argument("--tokenizer", help="gpt2 (default), char, or a saved tokenizer directory")
    add_special_argument(out)
    out.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help="fraction of documents for val, chosen by seed (default 0.005)",
    )
    out.add_argument("--val-docs", type=int, metavar="N", help="exactly N val documents")
    out.add_argument(
        "--val-tail",
        type=float,
        metavar="F",
        help="one text file: its last F of characters is val (nanoGPT style)",
    )
    out.add_argument("--seed", type=int, default=1337, help="seed of the val choice")
    out.add_argument(
        "--shard-size",
        type=_count,
        default=100_000_000,
        metavar="N",
        help="tokens per shard: 100M (default), 500K, 1e6 ...",
    )
    out.add_argument(
        "--dtype",
        choices=["auto", "uint16", "uint32"],
        default="auto",
        help="token dtype (auto: uint16 when the vocabulary fits)",
    )
    out.add_argument(
        "--workers", type=int, metavar="N", help="tokenizer processes (default: all cores)"
    )
    out.add_argument(
        "--max-record-bytes",
        type=_count,
        default=RECORD_LIMIT,
        metavar="N",
        help="longest JSONL line / CSV field read (default 64M); a longer one is an error",
    )
    out.add_argument(
        "--force",
        action="store_true",
        help="start clean even if a run can resume (removes only files gpt2lab wrote in --out)",
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def _count(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.e+]+)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count such as 100M or 1e6")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    try:
        return int(float(m.group(1)) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count such as 100M") from None


_FLAGS = [
    ("--input", "input"), ("--field", "field"), ("--separator", "separator"),
    ("--errors", "errors"), ("--dataset", "dataset"), ("--dataset-config", "dataset_config"),
    ("--dataset-split", "dataset_split"), ("--data-files", "data_files"),
    ("--max-docs", "max_docs"),
    ("--tokenizer", "tokenizer"), ("--add-special", "add_special"),
    ("--val-fraction", "val_fraction"), ("--val-docs", "val_docs"),
    ("--val-tail", "val_tail"), ("--seed", "seed"), ("--shard-size", "shard_size"),
    ("--dtype", "dtype"),
]  # fmt: skip
_DEFAULTS = {"field": "text", "errors": "strict", "dataset_split": "train", "seed": 1337,
             "shard_size": 100_000_000, "dtype": "auto"}  # fmt: skip


def _command_line(args: argparse.Namespace, out: str) -> str:
    """The command that re-creates this data directory (quoted in error messages)."""
    parts = ["gpt2lab", "prepare", *([args.preset] if args.preset else [])]
    for flag, key in _FLAGS:
        value = getattr(args, key)
        if value is None or value == _DEFAULTS.get(key):
            continue
        parts += [flag, *(value if isinstance(value, list) else [str(value)])]
    if args.split_on_blank_lines:
        parts.append("--split-on-blank-lines")
    return " ".join(shlex.quote(p) for p in [*parts, "--out", out])


def _looks_like_input(arg: str) -> bool:
    return os.path.exists(arg) or glob.has_magic(arg)


def run(args: argparse.Namespace) -> int:
    if args.preset and args.preset not in DATASETS and _looks_like_input(args.preset):
        # `gpt2lab prepare notes.txt --out DIR`: a path where the preset goes is an input
        args.input, args.preset = [args.preset, *(args.input or [])], None
    preset = DATASETS.get(args.preset) if args.preset else {}
    if args.preset and preset is None:
        close = difflib.get_close_matches(args.preset, list(DATASETS), n=1)
        raise UsageError(
            f"unknown preset {args.preset!r}",
            f"one of {', '.join(DATASETS)}, or --input FILES without a preset",
            f"did you mean `gpt2lab prepare {close[0]}`?"
            if close
            else "see `gpt2lab prepare --help`",
        )
    if not preset and not args.input and not args.dataset:
        raise UsageError(
            "nothing to prepare",
            "a preset, --input or --dataset",
            "e.g. `gpt2lab prepare --input notes.txt --out data/notes`",
        )
    out = args.out or (f"data/{args.preset}" if args.preset else None)
    if out is None:
        raise UsageError("no output directory", "--out DIR", "add --out data/NAME")
    separator = args.separator
    if separator is not None:
        separator = separator.replace("\\n", "\n").replace("\\t", "\t")
    spec = SourceSpec(
        inputs=list(args.input or []),
        field=args.field or preset.get("field", "text"),
        split_on_blank_lines=args.split_on_blank_lines,
        separator=separator,
        errors=args.errors,
        dataset=args.dataset,
        dataset_config=args.dataset_config,
        dataset_split=args.dataset_split,
        data_files=args.data_files,
        preset=args.preset,
        max_docs=args.max_docs,
        max_record_bytes=args.max_record_bytes,
    )
    if not args.input and not args.dataset:  # the preset's own source
        if "url" in preset:
            spec.inputs = [str(download(args.preset, preset["url"]))]
        else:
            spec.dataset, spec.dataset_config = preset["dataset"], preset.get("dataset_config")
    split = {k: getattr(args, k) for k in ("val_fraction", "val_docs", "val_tail")}
    if all(v is None for v in split.values()):  # the preset's split, unless one is given
        split = {k: preset.get(k) for k in split}
        if split["val_tail"] is not None and (args.input and len(args.input) > 1 or args.dataset):
            split = {"val_fraction": None, "val_docs": None, "val_tail": None}
    if spec.dataset:
        _quiet_hf_logging()
    tokenizer = args.tokenizer or preset.get("tokenizer", "gpt2")
    if extra := special_tokens(args, tokenizer):  # GPT-2's ids, then these
        tokenizer = get_tokenizer("gpt2", special_tokens=extra)
    prepare(
        spec,
        out,
        tokenizer,
        **split,
        seed=args.seed,
        shard_tokens=args.shard_size,
        workers=args.workers,
        dtype=args.dtype,
        force=args.force,
        progress=not args.no_progress and sys.stderr.isatty(),
        command=_command_line(args, out),
        on_event=_print_event,
    )
    return 0


def _print_event(event: PrepareEvent) -> None:
    """The line `gpt2lab prepare` shows on stderr for an event (none for each task written)."""
    line = describe(event)
    if line:
        print(line, file=sys.stderr)


def describe(event: PrepareEvent) -> str | None:
    """An event of prepare() as one line of text."""
    if isinstance(event, AlreadyComplete):
        return (
            f"{event.out} is already complete for these settings; nothing to do (--force redoes it)"
        )
    if isinstance(event, StartedClean):
        why = " (removed the output of an earlier, different run)" if event.removed_earlier else ""
        return f"starting clean in {event.out}{why}"
    if isinstance(event, Resumed):
        return (
            f"resuming in {event.out} from task {event.task}: {event.tokens['train']:,} train and "
            f"{event.tokens['val']:,} val tokens already written"
        )
    if isinstance(event, ValSplitEmpty):
        return "warning: the val split is empty; use --val-docs N or --val-tail F for small inputs"
    if isinstance(event, Finished):
        m = event.meta
        return (
            f"wrote {event.out}: {m['tokens']['train']:,} train tokens "
            f"({m['documents']['train']:,} documents, {len(m['shards']['train'])} shards), "
            f"{m['tokens']['val']:,} val tokens ({m['documents']['val']:,} documents)"
        )
    return None


def _quiet_hf_logging() -> None:
    """The hub's retries log tracebacks' worth of warnings; our one-line error says it all."""
    try:
        import datasets
    except ImportError:  # prepare's own error names the missing package
        return
    datasets.logging.set_verbosity_error()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
