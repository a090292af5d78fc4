"""`gpt2lab tokenizer`: train a BPE vocabulary; encode, decode, count and show tokens."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from gpt2lab.errors import DataError, TokenizerError, UsageError
from gpt2lab.io import decode_utf8
from gpt2lab.outdir import OutputDir, claim_output_dir
from gpt2lab.tokenizer import get_tokenizer, train_bpe
from gpt2lab.tokenizer.base import readable_piece
from gpt2lab.tokenizer.trainer import ALGORITHMS

EXAMPLES = """
gpt2lab tokenizer train data/*.txt --vocab-size 8192 --out tok/my8k
gpt2lab tokenizer train input.txt --vocab-size 512 --out tok/ref --algorithm reference
gpt2lab tokenizer encode --json < input.txt > ids.json
gpt2lab tokenizer decode ids.json
gpt2lab tokenizer count input.txt other.txt --tokenizer tok/my8k
gpt2lab tokenizer show 'Hello world! 日本語 😀'
gpt2lab tokenizer encode --add-special '<|startoftext|>,<|pad|>' --allow-special < chat.txt
"""

# background colours of the pieces in `show` (ANSI 256-colour codes, light so black text reads)
_COLOURS = (153, 186, 223, 217, 151, 189)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def with_tokenizer(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--tokenizer", default="gpt2", help="'gpt2' or a directory saved by a tokenizer"
        )
        q.add_argument("--backend", default="tiktoken", choices=["tiktoken", "python"])
        add_special_argument(q)

    def with_inputs(q: argparse.ArgumentParser) -> None:
        q.add_argument("files", nargs="*", metavar="FILE", help="input files (default: stdin)")
        q.add_argument("--json", action="store_true", help="print JSON (one object per input)")
        q.add_argument(
            "--errors",
            default="strict",
            choices=["strict", "replace"],
            help="what to do with bytes that are not UTF-8 (default: strict)",
        )

    t = sub.add_parser("train", help="train byte-level BPE on text files")
    t.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files")
    t.add_argument(
        "--vocab-size", type=int, required=True, help="ids in all: 256 + merges + specials"
    )
    t.add_argument("--out", required=True, help="directory to write the tokenizer into")
    t.add_argument("--pattern", default="gpt2", help="'gpt2', 'gpt4' or a regex (default: gpt2)")
    t.add_argument(
        "--special",
        action="append",
        metavar="TOKEN",
        help="a special token (repeatable; default: <|endoftext|>)",
    )
    t.add_argument("--errors", default="strict", choices=["strict", "replace"])
    t.add_argument(
        "--algorithm",
        default="incremental",
        choices=list(ALGORITHMS),
        help="'incremental' (fast, default) or 'reference' (the plain loop; same merges, slower)",
    )
    t.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    e = sub.add_parser("encode", help="text -> token ids")
    with_inputs(e)
    with_tokenizer(e)
    e.add_argument(
        "--allow-special",
        action="store_true",
        help="encode special-token text (e.g. <|endoftext|>) as the special id",
    )

    decode = sub.add_parser("decode", help="token ids (JSON list or whitespace-separated) -> text")
    decode.add_argument("files", nargs="*", metavar="FILE", help="input files (default: stdin)")
    with_tokenizer(decode)

    c = sub.add_parser("count", help="count tokens of text files")
    with_inputs(c)
    with_tokenizer(c)

    s = sub.add_parser("show", help="show how a text splits into tokens, colour-coded")
    s.add_argument("text", nargs="+", help="the text (joined by spaces)")
    with_tokenizer(s)
    s.add_argument("--color", default="auto", choices=["auto", "always", "never"])


def add_special_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--add-special",
        metavar="TOKENS",
        help="comma-separated special tokens added to gpt2's vocabulary, ids 50257, 50258, ...",
    )


def special_tokens(args: argparse.Namespace, tokenizer: str) -> list[str]:
    """The tokens of --add-special (none if not given); they extend GPT-2's vocabulary only."""
    if not args.add_special:
        return []
    names = [t.strip() for t in args.add_special.split(",")]
    if not all(names):
        raise UsageError(
            f"--add-special {args.add_special!r} has an empty token",
            "comma-separated tokens such as '<|startoftext|>,<|pad|>'",
            "drop the extra comma",
        )
    if tokenizer != "gpt2":
        raise UsageError(
            f"--add-special with --tokenizer {tokenizer}",
            "--tokenizer gpt2",
            "give the special tokens when training a tokenizer (`gpt2lab tokenizer train "
            "--special TOKEN`), or use --tokenizer gpt2",
        )
    return names


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        specials = args.special or ["<|endoftext|>"]
        # the output: new, empty or gpt2lab's; never one of the inputs; locked while written
        out = claim_output_dir(args.out, "tokenizer", inputs=args.files)
        try:
            _train(args, specials, out)
        except BaseException:
            if out.created:
                out.discard()
            raise
        finally:
            out.release()
        return 0
    extra = special_tokens(args, args.tokenizer)
    tok = get_tokenizer(args.tokenizer, backend=args.backend, **_with(extra))
    if args.action == "show":
        _show(tok, " ".join(args.text), args.color)
        return 0
    if args.action == "decode":
        for name, data in _inputs(args.files):
            print(tok.decode(_parse_ids(data.decode("utf-8", errors="replace"), name)), end="")
        return 0
    total = 0
    for name, data in _inputs(args.files):
        text = decode_utf8(data, name, args.errors)
        if args.action == "encode":
            special = next((s for s in tok.special_tokens if s in text), None)
            if special and not args.allow_special:
                raise TokenizerError(
                    f"{name} contains the special token {special!r}",
                    "no special-token text",
                    "pass --allow-special to encode it as its id",
                )
            ids = tok.encode(text, allowed_special="all" if args.allow_special else frozenset())
            print(json.dumps(ids) if args.json else " ".join(map(str, ids)))
        else:
            n = len(tok.encode_ordinary(text))
            total += n
            row: dict[str, Any] = {"source": name, "tokens": n, "bytes": len(data)}
            row["bytes_per_token"] = round(len(data) / n, 3) if n else None
            print(json.dumps(row) if args.json else f"{n}\t{name}")
    if args.action == "count" and len(args.files) > 1 and not args.json:
        print(f"{total}\ttotal")
    return 0


def _with(specials: list[str]) -> dict[str, Any]:
    return {"special_tokens": specials} if specials else {}


INPUT_LIMIT = 1 << 30  # bytes of one input read at most (a FIFO or /dev/zero never ends)


def _inputs(files: list[str]):
    if not files:
        yield "<stdin>", _bounded(sys.stdin.buffer, "<stdin>")
    for f in files:
        try:
            with open(f, "rb") as fh:
                data = _bounded(fh, f)
        except OSError as e:
            raise DataError(f"cannot read {f} ({e.strerror})", "a readable file") from None
        yield f, data


def _bounded(fh: Any, name: str) -> bytes:
    data = fh.read(INPUT_LIMIT + 1)
    if len(data) > INPUT_LIMIT:
        raise DataError(
            f"{name} is longer than {INPUT_LIMIT:,} bytes (or never ends)",
            "a text file under 1 GiB",
            "split it, or use `gpt2lab prepare` for large corpora",
        )
    return data


def _parse_ids(text: str, where: str) -> list[int]:
    text = text.strip()
    try:
        ids = json.loads(text) if text.startswith("[") else [int(x) for x in text.split()]
    except ValueError:
        raise DataError(
            f"{where} does not hold token ids", "a JSON list or whitespace-separated integers"
        ) from None
    if not all(isinstance(i, int) for i in ids):
        raise DataError(f"{where} holds non-integer ids", "a JSON list of integers")
    return ids


def _show(tok: Any, text: str, color: str) -> None:
    ids = tok.encode(text, allowed_special="all")
    use_colour = color == "always" or (color == "auto" and sys.stdout.isatty())
    out = []
    for k, i in enumerate(ids):
        piece = readable_piece(tok.decode_bytes([i])).replace("\n", "\u21b5\n")
        if use_colour:
            out.append(f"\x1b[48;5;{_COLOURS[k % len(_COLOURS)]}m\x1b[30m{piece}\x1b[0m")
        else:
            out.append(piece)
    print(("" if use_colour else "|").join(out))
    print(f"{len(ids)} tokens, {len(text.encode('utf-8'))} bytes: {ids}")


def _train(args: argparse.Namespace, specials: list[str], out: OutputDir) -> None:
    tok = train_bpe(
        [Path(f) for f in args.files],
        args.vocab_size,
        args.pattern,
        specials,
        errors=args.errors,
        progress=False if args.no_progress else None,  # None: bars when stderr is a terminal
        algorithm=args.algorithm,
    )
    out.remove_ours()  # an earlier tokenizer gpt2lab wrote here
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=out.path))
    try:
        tok.save(staging)
        for f in sorted(staging.iterdir()):
            os.replace(f, out.claim_file(f.name))  # refused if a file there is not gpt2lab's
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(
        f"wrote {args.out}: {tok.n_vocab} ids ({len(tok.merges)} merges, "
        f"special {tok.special_tokens})"
    )
