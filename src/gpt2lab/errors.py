"""Errors that gpt2lab raises. Library code raises these; only cli.py prints them and exits.

Each message is one line: what is wrong, what was expected, and how to fix it. A message names
a setting by its key (`mark_key("train.device")`): `str(error)` shows the key as a Python caller
writes it (`train.device`, `val_docs=5`), and `error.render(flag)` lets cli.py show the flag
(`--train.device`, `--val-docs 5`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

_KEY = re.compile("\x1f([^\x1f\x1e]*)(?:\x1e([^\x1f]*))?\x1f")  # mark_key's marks


def mark_key(name: str, value: object = None) -> str:
    """`name` (a config key such as `train.device`, or an argument such as `val_docs`) marked
    for an error message, with an example `value` if given: `train.lr=3e-4`, `--train.lr=3e-4`."""
    return f"\x1f{name}\x1f" if value is None else f"\x1f{name}\x1e{value}\x1f"


def _as_key(name: str, value: str | None) -> str:
    return f"`{name}`" if value is None else f"`{name}={value}`"


class GPT2LabError(Exception):
    """Base class: a runtime failure the user can fix (exit code 1)."""

    exit_code = 1

    def __init__(self, what: str, expected: str | None = None, fix: str | None = None) -> None:
        parts = [what]
        if expected:
            parts.append(expected if expected.startswith("expected") else f"expected {expected}")
        if fix:
            parts.append(fix)
        self.marked = ", ".join(parts)
        super().__init__(self.render(_as_key))

    def render(self, flag: Callable[[str, str | None], str]) -> str:
        """The message with every marked key written as `flag(name, value)` (value may be None)."""
        return _KEY.sub(lambda m: flag(m.group(1), m.group(2)), self.marked)

    def rename_keys(self, names: Mapping[str, str]) -> None:
        """Mark `names[key]` where the message marks `key` (a setting a command sets through an
        option of its own: `sample.top_p` given as --top-p is marked `top_p`)."""

        self.marked = _KEY.sub(
            lambda m: mark_key(names.get(m.group(1), m.group(1)), m.group(2)), self.marked
        )
        self.args = (self.render(_as_key),)


class ConfigError(GPT2LabError):
    """A bad flag, preset, override or config file (exit code 2)."""

    exit_code = 2


class UsageError(ConfigError):
    """A command line that cannot work as written (exit code 2)."""


class TokenizerError(GPT2LabError):
    """A vocabulary file, special token or text the tokenizer cannot handle."""


class DataError(GPT2LabError):
    """Input text, a dataset or a shard that cannot be read or is inconsistent."""


class CheckpointError(GPT2LabError):
    """A checkpoint or model directory that is missing, corrupt or does not match the config."""


class TrainingError(GPT2LabError):
    """Training cannot go on (non-finite loss, nothing to resume, out of memory)."""


class OutputError(ConfigError):
    """An output path gpt2lab may not write: not its own, or overlapping an input (exit code 2)."""


class BusyError(GPT2LabError):
    """Another gpt2lab process is writing the same output directory (exit code 1)."""


class ResourceError(GPT2LabError):
    """Not enough memory or disk for what was asked; checked before allocating (exit code 1)."""
