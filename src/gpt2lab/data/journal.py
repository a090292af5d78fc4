"""The journal that lets an interrupted `prepare` resume, and the clean-up of prepare's files.

After each task `prepare` appends {"task", "tokens", "docs"} (per split) to `.prepare.journal`,
whose first line holds the fingerprint of the settings. A rerun with the same fingerprint resumes
from the newest entry whose tokens are all on disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpt2lab.data import shards
from gpt2lab.errors import DataError

JOURNAL = ".prepare.journal"


def read_journal(out: Path, fingerprint: str) -> list[dict[str, Any]] | None:
    """The journal's entries if it belongs to a run with these settings, else None."""
    try:
        lines = (out / JOURNAL).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            break  # a line cut short by the crash
    if not entries or entries[0].get("fingerprint") != fingerprint:
        return None
    return [{"task": 0, "tokens": [0, 0], "docs": [0, 0]}] + entries[1:]


def _on_disk(out: Path, writer: shards.ShardWriter) -> int:
    """Tokens of a split that are on disk in order: complete shards, then the temp shard."""
    n, i = 0, 0
    while True:
        path = out / shards.shard_name(writer.split, i)
        if not path.exists():
            break
        try:
            h = shards.read_header(path)
        except DataError:
            return n
        n += h["count"]
        if h["count"] != writer.shard_tokens:
            return n  # a last, short shard: nothing can follow it
        i += 1
    tmp = out / f".{shards.shard_name(writer.split, i)}.tmp"
    if tmp.exists():
        n += max(0, (tmp.stat().st_size - shards.HEADER_BYTES) // writer.dtype.itemsize)
    return n


def resume_from(
    out: Path, writers: list[shards.ShardWriter], entries: list[dict], fingerprint: str
) -> dict[str, Any]:
    """The newest journal entry whose tokens are all on disk; shards are cut back to it."""
    have = [_on_disk(out, w) for w in writers]
    k = max(i for i, e in enumerate(entries) if all(e["tokens"][s] <= have[s] for s in (0, 1)))
    for s, w in enumerate(writers):
        w.resume(entries[k]["tokens"][s])
    lines = [{"fingerprint": fingerprint}] + entries[1 : k + 1]  # drop entries past the point
    with open(out / JOURNAL, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(e) + "\n" for e in lines))
    e = entries[k]
    return {"task": e["task"], "tokens": list(e["tokens"]), "docs": list(e["docs"])}


def adopt_legacy(out: Path) -> list[str] | None:
    """The entries of a data directory that an older gpt2lab (before ownership markers) wrote,
    or None if `out` does not look like one: a meta.json of this format with its fingerprint
    whose shards all exist and start with the shard magic, or a prepare journal. Nothing else
    (a project's own meta.json or tokenizer/) is ever adopted."""
    names: list[str] = []
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    if isinstance(meta, dict):
        listed = meta.get("shards")
        if (
            meta.get("format_version") != shards.VERSION
            or not isinstance(meta.get("fingerprint"), str)
            or not isinstance(listed, dict)
        ):
            return None
        for split in shards.SPLITS:
            for name in listed.get(split) or []:
                if not isinstance(name, str) or Path(name).name != name:
                    return None
                try:
                    shards.read_header(out / name)
                except DataError:
                    return None
                names.append(name)
        names.append("meta.json")
    elif read_journal(out, _journal_fingerprint(out)) is not None:
        names.append(JOURNAL)
        names += [p.name for s in shards.SPLITS for p in shards.list_shards(out, s)]
    else:
        return None
    if (out / "tokenizer").is_dir():
        names.append("tokenizer")
    return names


def _journal_fingerprint(out: Path) -> str:
    try:
        with open(out / JOURNAL, encoding="utf-8") as f:
            return str(json.loads(f.readline()).get("fingerprint") or "-")
    except (OSError, ValueError, AttributeError):
        return "-"
