"""Errors that gpt2lab raises. Library code raises these; only cli.py prints them and exits.

Each message is one line: what is wrong, what was expected, and how to fix it.
"""

from __future__ import annotations


class GPT2LabError(Exception):
    """Base class: a runtime failure the user can fix (exit code 1)."""

    exit_code = 1

    def __init__(self, what: str, expected: str | None = None, fix: str | None = None) -> None:
        parts = [what]
        if expected:
            parts.append(expected if expected.startswith("expected") else f"expected {expected}")
        if fix:
            parts.append(fix)
        super().__init__(", ".join(parts))


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
