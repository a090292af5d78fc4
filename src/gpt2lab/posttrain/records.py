"""Reading post-training records (gpt2lab.data.records) into the dicts the tasks encode.

SFT: `{"prompt": str, "completion": str}` records stay text (prompt + completion + end-of-turn
token, no template, as TRL treats plain prompt-completion data); conversations become
`{"messages": [...]}` for the chat template. Pairs: text pairs (TRL strings, HH-RLHF) stay
text; message pairs become `{"prompt": [...], "chosen": [...], "rejected": [...]}`.
"""

from __future__ import annotations

from typing import Any

from gpt2lab.data.records import check_errors_mode, read_examples, read_pairs
from gpt2lab.errors import ConfigError, mark_key


def read_records(
    source: str, kind: str, errors: str, key: str, notes: list[str] | None = None
) -> list[dict[str, Any]]:
    """The records of `source` ("sft" examples or preference "pairs"); skipped ones noted."""
    if not source:
        raise ConfigError(
            f"no {'preference pairs' if kind == 'pairs' else 'training records'} given",
            "a JSONL or Parquet file, or a dataset name",
            f"pass {mark_key('data', 'FILE')} (sets {mark_key(key)})",
        )
    check_errors_mode(errors)
    if kind == "sft":
        examples = read_examples(source, errors)
        out = [
            {"prompt": e.raw[0], "completion": e.raw[1]}
            if e.raw is not None
            else {"messages": list(e.messages)}
            for e in examples
        ]
        summary = examples.summary()
        skipped = examples.skipped
    else:
        pairs = read_pairs(source, errors)
        out = [
            dict(zip(("prompt", "chosen", "rejected"), p.raw))
            if p.raw is not None
            else {
                "prompt": list(p.prompt_messages),
                "chosen": list(p.chosen_messages),
                "rejected": list(p.rejected_messages),
            }
            for p in pairs
        ]
        summary = pairs.summary()
        skipped = pairs.skipped
    if notes is not None and skipped:
        notes.append(summary)
    return out
