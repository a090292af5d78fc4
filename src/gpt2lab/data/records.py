"""Post-training records: instruction / chat examples, preference pairs and prompts.

    examples = read_examples("chats.jsonl")             # SFT
    pairs = read_pairs("prefs.parquet", errors="skip")  # DPO, reward models
    prompts = read_prompts("prompts.txt")               # RLHF rollouts

Sources: JSON Lines (.jsonl, or .json holding lines or one array), Parquet (pyarrow), or a
Hugging Face dataset by name or folder, `NAME` or `NAME:SPLIT` (through `datasets`, which
runs no code from the dataset: datasets 4 and later do not run loading scripts). Formats,
recognised per record by their fields:

- `{"prompt": str, "completion": str}` -> a user / assistant conversation (`Example.raw`
  keeps the two strings for plain-text fine-tuning without a template);
- `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`;
- `{"prompt", "chosen", "rejected"}`, each a string or a message list (TRL). Chosen and rejected
  lists may repeat the prompt's turns first (UltraFeedback-binarized): that prefix is dropped;
- `{"chosen": str, "rejected": str}` (Anthropic HH-RLHF): the prompt is the shared text through
  the last `\\n\\nAssistant:`; its `Human:` / `Assistant:` turns become messages.

A bad record is a one-line DataError naming the file, the line (1-based; "row" for Parquet,
"record" for datasets and JSON arrays) and the field. With `errors="skip"` bad records are
left out and counted by reason in `Records.skipped`.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from gpt2lab.data.sources import SourceSpec, open_hf_dataset
from gpt2lab.errors import ConfigError, DataError

MAX_RECORD_BYTES = 64 << 20  # a record (JSON line) larger than this is refused
ROLES = ("system", "user", "assistant")
ERRORS = ("raise", "skip")
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
Message = dict[str, str]
T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """An SFT conversation. `messages` alternate user / assistant (an optional system message
    first) and end with a non-empty assistant message. `raw` is (prompt, completion) for a
    prompt / completion record, for training without a chat template."""

    messages: tuple[Message, ...]
    raw: tuple[str, str] | None = None
    where: str = ""


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (ending with a user message) and two different continuations (starting with an
    assistant message). `raw` is (prompt, chosen, rejected) text when the record was text."""

    prompt_messages: tuple[Message, ...]
    chosen_messages: tuple[Message, ...]
    rejected_messages: tuple[Message, ...]
    raw: tuple[str, str, str] | None = None
    where: str = ""


@dataclass(frozen=True)
class Prompt:
    """A prompt for sampling: messages ending with a user message; `raw` the text if it was."""

    messages: tuple[Message, ...]
    raw: str | None = None
    where: str = ""


@dataclass
class Records(Generic[T]):
    """What a reader returns: the good records in order, and the bad ones counted by reason."""

    items: list[T]
    source: str
    skipped: Counter[str] = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __getitem__(self, i: int) -> T:
        return self.items[i]

    def summary(self) -> str:
        """`1,234 records from FILE` (+ `, skipped 3: 2 empty completion, 1 invalid JSON`)."""
        text = f"{len(self.items):,} records from {self.source}"
        if self.skipped:
            total = sum(self.skipped.values())
            reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
            text += f", skipped {total}: {reasons}"
        return text


class BadRecord(DataError):
    """One record that cannot be used; `reason` is its short category for skip counts."""

    def __init__(self, where: str, problem: str, expected: str, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{where}: {problem}", expected, "fix or remove it, or pass --errors skip")


# --- the public readers ---------------------------------------------------------------------------
def read_examples(
    source: str | Path, errors: str = "raise", max_record_bytes: int = MAX_RECORD_BYTES
) -> Records[Example]:
    """SFT examples from prompt / completion or messages records."""
    return _read(source, errors, max_record_bytes, parse_example)


def read_pairs(
    source: str | Path, errors: str = "raise", max_record_bytes: int = MAX_RECORD_BYTES
) -> Records[PreferencePair]:
    """Preference pairs: TRL's prompt / chosen / rejected, or HH-RLHF's chosen / rejected."""
    return _read(source, errors, max_record_bytes, parse_pair)


def read_prompts(
    source: str | Path, errors: str = "raise", max_record_bytes: int = MAX_RECORD_BYTES
) -> Records[Prompt]:
    """Prompts: JSON Lines / Parquet / datasets with a `prompt` field (text or messages), or a
    plain text file (.txt or any other suffix) with one prompt per non-empty line."""
    path = Path(source)
    if path.is_file() and _kind(path) == "text":
        return _read_text_prompts(path, errors)
    return _read(source, errors, max_record_bytes, parse_prompt)


def check_errors_mode(errors: str) -> None:
    if errors not in ERRORS:
        raise ConfigError(f"errors={errors!r}", f"one of {', '.join(ERRORS)}")


# --- parsing one record ---------------------------------------------------------------------------
def parse_example(rec: Any, where: str) -> Example:
    """An Example from one decoded record (a dict), or BadRecord."""
    rec = _object(rec, where)
    if "messages" in rec:
        messages = _messages(rec["messages"], where, "messages")
        _check_conversation(messages, where, "messages")
        return Example(tuple(messages), None, where)
    if "prompt" in rec or "completion" in rec:
        prompt = _text(rec, "prompt", where)
        completion = _text(rec, "completion", where)
        if not completion:
            raise BadRecord(
                where, "field 'completion' is empty", "a non-empty completion", "empty completion"
            )
        messages = (
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        )
        return Example(messages, (prompt, completion), where)
    raise _missing(rec, where, "'messages', or 'prompt' and 'completion'")


def parse_pair(rec: Any, where: str) -> PreferencePair:
    """A PreferencePair from one decoded record, or BadRecord."""
    rec = _object(rec, where)
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise _missing(rec, where, "'prompt' (optional), 'chosen' and 'rejected'", key)
    chosen, rejected = rec["chosen"], rec["rejected"]
    raw = None
    if "prompt" in rec:
        p = rec["prompt"]
        if isinstance(p, str) and isinstance(chosen, str) and isinstance(rejected, str):
            raw = (p, chosen, rejected)
        prompt = _str_or_messages(p, where, "prompt", "user")
    elif isinstance(chosen, str) and isinstance(rejected, str):  # Anthropic HH-RLHF
        prompt_text, chosen, rejected = _split_hh(chosen, rejected, where)
        prompt = _hh_messages(prompt_text)
        raw = (prompt_text, chosen, rejected)
    else:  # two whole conversations: the prompt is the turns they share
        c = _messages(chosen, where, "chosen")
        r = _messages(rejected, where, "rejected")
        k = _shared_prefix(c, r)
        prompt, chosen, rejected = c[:k], c[k:], r[k:]
    _check_prompt(prompt, where, "prompt")
    sides = []
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        msgs = _str_or_messages(value, where, key, "assistant")
        if msgs[: len(prompt)] == prompt and len(msgs) > len(prompt):
            msgs = msgs[len(prompt) :]  # the prompt's turns repeated (UltraFeedback-binarized)
        _check_continuation(msgs, where, key, isinstance(value, str))
        sides.append(tuple(msgs))
    if sides[0] == sides[1]:
        raise BadRecord(
            where, "'chosen' equals 'rejected'", "two different responses", "chosen equals rejected"
        )
    return PreferencePair(tuple(prompt), sides[0], sides[1], raw, where)


def parse_prompt(rec: Any, where: str) -> Prompt:
    """A Prompt from one decoded record with a `prompt` (or `messages`) field, or BadRecord."""
    rec = _object(rec, where)
    key = "prompt" if "prompt" in rec else "messages" if "messages" in rec else None
    if key is None:
        raise _missing(rec, where, "'prompt' (text or messages)", "prompt")
    value = rec[key]
    messages = _str_or_messages(value, where, key, "user")
    _check_prompt(messages, where, key)
    return Prompt(tuple(messages), value if isinstance(value, str) else None, where)


# --- checks ---------------------------------------------------------------------------------------
def _object(rec: Any, where: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise BadRecord(where, f"is a JSON {type(rec).__name__}", "a JSON object", "wrong type")
    return rec


def _missing(rec: dict, where: str, expected: str, key: str | None = None) -> BadRecord:
    what = f"no field {key!r}" if key else "none of the expected fields"
    return BadRecord(where, f"{what} (has {sorted(rec)})", f"fields {expected}", "missing field")


def _text(rec: dict, key: str, where: str) -> str:
    if key not in rec:
        raise _missing(rec, where, "'prompt' and 'completion'", key)
    value = rec[key]
    if not isinstance(value, str):
        raise BadRecord(
            where, f"field {key!r} is a {type(value).__name__}", "a string", "wrong type"
        )
    return value


def _str_or_messages(value: Any, where: str, key: str, role: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, where, key)


def _messages(value: Any, where: str, key: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else f"a {type(value).__name__}"
        raise BadRecord(
            where,
            f"field {key!r} is {got}",
            'a non-empty list of {"role", "content"} messages (or a string)',
            "wrong type",
        )
    out = []
    for i, m in enumerate(value):
        name = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise BadRecord(
                where, f"field {name!r} is a {type(m).__name__}", "a message object", "wrong type"
            )
        for part in ("role", "content"):
            if part not in m:
                raise BadRecord(
                    where,
                    f"field '{name}.{part}' is missing",
                    'messages with "role" and "content"',
                    "missing field",
                )
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise BadRecord(
                where, f"field '{name}.role' is {role!r}", f"one of {', '.join(ROLES)}", "bad role"
            )
        if not isinstance(content, str):
            raise BadRecord(
                where,
                f"field '{name}.content' is a {type(content).__name__}",
                "a string",
                "wrong type",
            )
        out.append({"role": role, "content": content})
    return out


def _alternation_error(messages: list[Message], where: str, key: str, start: str) -> None:
    """Roles must go [system,] start, other, start, ... (system only first)."""
    i0 = 1 if messages and messages[0]["role"] == "system" else 0
    other = "assistant" if start == "user" else "user"
    for i in range(i0, len(messages)):
        want = start if (i - i0) % 2 == 0 else other
        if messages[i]["role"] != want:
            raise BadRecord(
                where,
                f"field '{key}[{i}].role' is {messages[i]['role']!r} where {want!r} follows",
                f"roles that alternate: [system,] {start}, {other}, {start}, ...",
                "roles do not alternate",
            )


def _check_conversation(messages: list[Message], where: str, key: str) -> None:
    _alternation_error(messages, where, key, "user")
    _check_replies(messages, where, key)


def _check_replies(messages: list[Message], where: str, key: str, text: bool = False) -> None:
    """The last message is the assistant's and no assistant message is empty."""
    last = messages[-1]
    if last["role"] != "assistant":
        raise BadRecord(
            where,
            f"field '{key}[{len(messages) - 1}]' is a {last['role']} message",
            "a conversation that ends with an assistant message (what is learned)",
            "no assistant reply",
        )
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"]:
            raise BadRecord(
                where,
                f"field {key!r} is empty" if text else f"field '{key}[{i}].content' is empty",
                "non-empty assistant messages",
                "empty completion",
            )


def _check_prompt(messages: list[Message], where: str, key: str) -> None:
    if not messages:
        raise BadRecord(where, f"field {key!r} is empty", "a prompt", "missing field")
    _alternation_error(messages, where, key, "user")
    if messages[-1]["role"] != "user":
        raise BadRecord(
            where,
            f"field '{key}[{len(messages) - 1}]' is a {messages[-1]['role']} message",
            "a prompt that ends with a user message",
            "roles do not alternate",
        )


def _check_continuation(messages: list[Message], where: str, key: str, text: bool) -> None:
    if messages[0]["role"] == "system":
        raise BadRecord(
            where, f"field '{key}[0]' is a system message", "a reply", "roles do not alternate"
        )
    _alternation_error(messages, where, key, "assistant")
    _check_replies(messages, where, key, text)


def _shared_prefix(a: list[Message], b: list[Message]) -> int:
    """How many leading messages a and b share, cut back to end before an assistant reply."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    while k > 0 and a[k - 1]["role"] == "assistant":
        k -= 1
    return k


def _split_hh(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    """HH-RLHF: (prompt through the last "\\n\\nAssistant:", chosen reply, rejected reply)."""
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRecord(
            where,
            f"field 'chosen' has no {HH_ASSISTANT!r}",
            "Anthropic HH-RLHF text ('\\n\\nHuman: ...\\n\\nAssistant: ...'), or a 'prompt' field",
            "missing field",
        )
    prompt = chosen[: cut + len(HH_ASSISTANT)]
    if not rejected.startswith(prompt):
        raise BadRecord(
            where,
            "fields 'chosen' and 'rejected' do not share the text through chosen's last "
            f"{HH_ASSISTANT!r}",
            "two replies to the same conversation",
            "prompts differ",
        )
    return prompt, chosen[len(prompt) :], rejected[len(prompt) :]


def _hh_messages(prompt: str) -> list[Message]:
    """'\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:' -> user a, assistant b,
    user c (the space after each marker dropped; text before the first marker is a user turn)."""
    parts = _HH_TURN.split(prompt)
    turns = [("Human", parts[0])] if parts[0].strip() else []
    turns += list(zip(parts[1::2], parts[2::2]))
    messages = [
        {"role": "user" if who == "Human" else "assistant", "content": _drop_space(text)}
        for who, text in turns
    ]
    if messages and messages[-1] == {"role": "assistant", "content": ""}:
        messages.pop()  # the final "Assistant:" that the replies follow
    return messages


def _drop_space(text: str) -> str:
    return text[1:] if text.startswith(" ") else text


# --- reading sources ------------------------------------------------------------------------------
def _read(
    source: str | Path, errors: str, max_bytes: int, parse: Callable[[Any, str], T]
) -> Records[T]:
    check_errors_mode(errors)
    records: Records[T] = Records([], str(source))
    for where, rec in _iter_raw(source, max_bytes):
        try:
            if isinstance(rec, BadRecord):
                raise rec
            records.items.append(parse(rec, where))
        except BadRecord as e:
            if errors == "raise":
                raise
            records.skipped[e.reason] += 1
    return records


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".gz":
        suffix = Path(path.stem).suffix.lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(suffix, "text")


def _iter_raw(source: str | Path, max_bytes: int) -> Iterator[tuple[str, Any]]:
    """(where, decoded record or BadRecord) for every record of `source`."""
    path = Path(source)
    if path.is_file():
        kind = _kind(path)
        if kind == "parquet":
            yield from _parquet_rows(path, max_bytes)
        elif kind == "jsonl":
            yield from _jsonl_lines(path, max_bytes)
        else:
            raise DataError(
                f"{path} is neither JSON Lines nor Parquet",
                "a .jsonl, .json or .parquet file, or a Hugging Face dataset name",
            )
        return
    if (path.exists() and not path.is_dir()) or path.suffix in (".jsonl", ".json", ".parquet"):
        raise DataError(f"{path} is not a readable file", "a .jsonl, .json or .parquet file")
    yield from _dataset_rows(str(source), max_bytes)  # a dataset name, or a folder of its files


def _jsonl_lines(path: Path, max_bytes: int) -> Iterator[tuple[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        first = f.read(1 << 16).lstrip()
        f.seek(0)
        if first.startswith(b"["):  # one JSON array
            yield from _json_array(path, f.read(), max_bytes)
            return
        lineno = 0
        while True:
            raw = f.readline(max_bytes + 1)
            if not raw:
                return
            lineno += 1
            where = f"{path} line {lineno}"
            if len(raw) > max_bytes and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest of the long line
                    raw = f.readline(1 << 20)
                yield where, _too_large(where, max_bytes)
                continue
            if not raw.strip():
                continue
            yield where, _decode(raw, where)


def _json_array(path: Path, data: bytes, max_bytes: int) -> Iterator[tuple[str, Any]]:
    value = _decode(data, str(path))
    if isinstance(value, BadRecord):
        raise DataError(str(value))
    for i, rec in enumerate(value, 1):
        where = f"{path} record {i}"
        yield where, _too_large(where, max_bytes) if _size(rec) > max_bytes else rec


def _decode(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return BadRecord(where, f"is not UTF-8 ({e.reason})", "UTF-8 JSON", "invalid JSON")
    except ValueError as e:
        return BadRecord(where, f"is not JSON ({e})", "one JSON object per line", "invalid JSON")
    except RecursionError:
        return BadRecord(where, "is JSON nested too deeply", "one flat JSON object per line",
                         "nested too deeply")  # fmt: skip


def _too_large(where: str, max_bytes: int) -> BadRecord:
    return BadRecord(
        where,
        f"is larger than {max_bytes / 2**20:g} MB",
        "records under the size limit",
        "too large",
    )


def _size(value: Any) -> int:
    """About how many bytes a decoded record holds (its strings and numbers)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_size(k) + _size(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_size(v) for v in value)
    return 8


def _parquet_rows(path: Path, max_bytes: int) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path} is Parquet but pyarrow is not installed", None, "pip install pyarrow"
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path} is not a Parquet file ({e})", "a .parquet file") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            where = f"{path} row {row}"
            yield where, _too_large(where, max_bytes) if _size(rec) > max_bytes else rec


def _dataset_rows(source: str, max_bytes: int) -> Iterator[tuple[str, Any]]:
    name, _, split = source.partition(":")
    ds = open_hf_dataset(SourceSpec(dataset=name, dataset_split=split or "train"))
    for i, rec in enumerate(ds, 1):
        where = f"dataset {source} record {i}"
        yield where, _too_large(where, max_bytes) if _size(rec) > max_bytes else rec


def _read_text_prompts(path: Path, errors: str) -> Records[Prompt]:
    records: Records[Prompt] = Records([], str(path))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 ({e.reason})", "a UTF-8 text file") from None
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            msg = {"role": "user", "content": line}
            records.items.append(Prompt((msg,), line, f"{path} line {lineno}"))
    return records
