"""Command-line pieces shared by the commands that read post-training records (sft, dpo, ...)."""

from __future__ import annotations

import argparse
import sys

from gpt2lab.data.records import ERRORS, MAX_RECORD_BYTES, Records


def add_record_args(p: argparse.ArgumentParser) -> None:
    """`--errors raise|skip` and `--max-record-mb`: how bad records are handled."""
    p.add_argument(
        "--errors",
        choices=ERRORS,
        default="raise",
        help="a bad record stops with a one-line error naming file, line and field (raise, "
        "the default), or is left out and counted by reason (skip)",
    )
    p.add_argument(
        "--max-record-mb",
        type=float,
        default=MAX_RECORD_BYTES / 2**20,
        metavar="MB",
        help="refuse records larger than this (default %(default)g)",
    )


def record_options(args: argparse.Namespace) -> dict[str, object]:
    """Keyword arguments of the readers (`read_examples(path, **record_options(args))`)."""
    return {"errors": args.errors, "max_record_bytes": int(args.max_record_mb * 2**20)}


def report_records(records: Records) -> None:
    """One line on stderr: how many records were read, and the skipped ones by reason."""
    print(f"read {records.summary()}", file=sys.stderr)
