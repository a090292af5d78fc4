"""The `gpt2lab` command line: a table of subcommands; parse, call one function, map errors.

Each subcommand lives in `gpt2lab.commands.<name>` and defines `add_arguments(parser)` and
`run(args)`; it is imported by name only when that command runs.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import importlib.util
import os
import pickle
import re
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from typing import NoReturn

from gpt2lab.errors import ConfigError, GPT2LabError, UsageError
from gpt2lab.io import disk_full_reason, is_disk_full

# name -> (module, one-line purpose, worked example). Issues add their rows here.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "tokenizer": (
        "gpt2lab.commands.tokenizer",
        "train, inspect and run byte-level BPE tokenizers",
        "gpt2lab tokenizer show 'Hello world'",
    ),
    "prepare": (
        "gpt2lab.commands.prepare",
        "turn text files or datasets into token shards",
        "gpt2lab prepare shakespeare-char --input input.txt --out data/shakespeare-char",
    ),
    "train": (
        "gpt2lab.commands.train",
        "pretrain or fine-tune a GPT (CPU, GPU, torchrun)",
        "gpt2lab train --data data/shakespeare-char --out runs/sc --preset shakespeare-char",
    ),
    "sft": (
        "gpt2lab.commands.sft",
        "supervised fine-tuning on chats or prompt/completion records",
        "gpt2lab sft --init-from runs/demo --data chats.jsonl --out runs/sft",
    ),
    "dpo": (
        "gpt2lab.commands.dpo",
        "preference tuning (DPO) from an SFT model and preference pairs",
        "gpt2lab dpo --init-from runs/sft --data pairs.jsonl --out runs/dpo",
    ),
    "sample": (
        "gpt2lab.commands.sample",
        "generate text from a trained model",
        "gpt2lab sample --model runs/sc -p 'ROMEO:' -m 200",
    ),
    "serve": (
        "gpt2lab.commands.serve",
        "an OpenAI-compatible API server with a web playground",
        "gpt2lab serve --model runs/sc --port 8000",
    ),
    "chat": (
        "gpt2lab.commands.chat",
        "talk to a chat model in the terminal (history, /reset, /system)",
        "gpt2lab chat --model runs/sft",
    ),
    "eval": (
        "gpt2lab.commands.eval",
        "zero-shot evaluations from the paper, HellaSwag, perplexity",
        "gpt2lab eval perplexity --model runs/sc --data input.txt",
    ),
    "inspect": (
        "gpt2lab.commands.inspect",
        "look inside: attention maps, next tokens, surprise, logit lens, norms",
        "gpt2lab inspect attention --model runs/sc -p 'ROMEO: But soft'",
    ),
    "convert": (
        "gpt2lab.commands.convert",
        "convert a model: Hugging Face GPT-2, GGUF (llama.cpp), ONNX (onnxruntime)",
        "gpt2lab convert runs/sc hf/sc",
    ),
    "plot": (
        "gpt2lab.commands.plot",
        "plot loss and perplexity curves of training runs",
        "gpt2lab plot runs/sc runs/other --out curves.png",
    ),
    "reward": (
        "gpt2lab.commands.reward",
        "train a reward model on preference pairs, or score texts with one",
        "gpt2lab reward --init-from runs/sft --data pairs.jsonl --out runs/rm",
    ),
    "rlhf": (
        "gpt2lab.commands.rlhf",
        "RLHF: PPO (or GRPO) against a reward model, KL-penalised to the start",
        "gpt2lab rlhf --policy runs/sft --reward runs/rm --prompts prompts.txt --out runs/ppo",
    ),
    "rlhf-demo": (
        "gpt2lab.commands.rlhf_demo",
        "RLHF demo: make the Shakespeare chatbot cheerful (VADER, reward model, PPO, DPO)",
        "gpt2lab rlhf-demo --sft runs/posttrain-demo/sft",
    ),
    "demo": (
        "gpt2lab.commands.demo",
        "train a small GPT on Shakespeare in minutes, then sample",
        "gpt2lab demo --minutes 5",
    ),
    "posttrain-demo": (
        "gpt2lab.commands.posttrain_demo",
        "SFT then DPO on Shakespeare's dialogue in minutes, measured on held-out plays",
        "gpt2lab posttrain-demo --model runs/demo",
    ),
    "config": (
        "gpt2lab.commands.config",
        "show a resolved config, its presets and every key",
        "gpt2lab config --preset gpt2 --train.lr=3e-4",
    ),
}


def available_commands() -> dict[str, tuple[str, str, str]]:
    """The rows of COMMANDS whose module is installed."""
    return {name: row for name, row in COMMANDS.items() if _module_exists(row[0])}


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class _Parser(argparse.ArgumentParser):
    """argparse with gpt2lab's one-line errors (exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, fix=f"see `{self.prog} --help`")


def _version() -> str:
    try:
        return version("gpt2lab")
    except PackageNotFoundError:  # running from a source tree
        return "0.1.0+src"


def _top_parser(commands: dict[str, tuple[str, str, str]]) -> argparse.ArgumentParser:
    lines = [f"  {name:<10} {purpose}" for name, (_, purpose, _) in commands.items()]
    examples = [f"  {example}" for _, _, example in commands.values()]
    epilog = (
        "commands:\n"
        + "\n".join(lines)
        + "\n\nexamples:\n"
        + "\n".join(examples)
        + "\n\nRun `gpt2lab COMMAND --help` for a command's options. "
        "Add --debug for a traceback on errors."
    )
    p = _Parser(
        prog="gpt2lab",
        description="GPT-2 from scratch: tokenizer, model, data, training, "
        "sampling and the paper's evaluations.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="gpt2lab [--version] [--debug] COMMAND [options]",
    )
    p.add_argument("--version", action="version", version=f"gpt2lab {_version()}")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    p.add_argument("command", nargs="?", help=argparse.SUPPRESS)
    return p


def _command_parser(name: str, purpose: str, example: str, module) -> argparse.ArgumentParser:
    examples = getattr(module, "EXAMPLES", None) or example
    p = _Parser(
        prog=f"gpt2lab {name}",
        description=purpose[0].upper() + purpose[1:] + ".",
        epilog="examples:\n" + "\n".join("  " + ln for ln in examples.strip().splitlines()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    module.add_arguments(p)
    return p


def _split_overrides(rest: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--section.key=value` / `--section.key value` overrides from other leftovers."""
    overrides, unknown = [], []
    i = 0
    while i < len(rest):
        arg = rest[i]
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "." in key and not key.startswith("."):
            if "=" in arg:
                overrides.append(arg[2:])
            elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                overrides.append(f"{key}={rest[i + 1]}")
                i += 1
            else:
                raise ConfigError(
                    f"override {arg} has no value",
                    "--section.key=value",
                    f"write it as {arg}=VALUE",
                )
        else:
            unknown.append(arg)
        i += 1
    return overrides, unknown


# arguments whose flag is not `--` + the name with dashes
_FLAG_NAMES = {"inputs": "--input", "shard_tokens": "--shard-size"}


def as_flag(name: str, value: str | None = None) -> str:
    """The flag that sets key `name`: `train.lr` -> `--train.lr`, `val_docs` -> `--val-docs`."""
    if "." in name:  # a config key: a dotted override
        return f"--{name}" if value is None else f"--{name}={value}"
    flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))  # a command's own option
    return flag if value is None else f"{flag} {value}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `gpt2lab` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("GPT2LAB_DEBUG") == "1"
    try:
        return _dispatch(argv)
    except KeyboardInterrupt:
        print("gpt2lab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `gpt2lab sample | head`
        with _suppress_all():
            sys.stdout = None  # type: ignore[assignment]  # no flush at exit: the pipe is gone
        return 0
    except GPT2LabError as e:
        error: BaseException = e
        message, code = e.render(as_flag), e.exit_code
    except Exception as e:  # noqa: BLE001 - the last net: every failure is one line
        error = e
        message, code = describe_unexpected(e, _command_of(argv)), 1
    if debug:
        traceback.print_exception(error)
    print(f"gpt2lab: error: {one_line(message)}", file=sys.stderr)
    return code


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(text: str, limit: int = 600) -> str:
    """`text` without colour codes, its lines joined, cut to `limit` characters."""
    text = " ".join(_ANSI.sub("", text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _suppress_all:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def _command_of(argv: list[str]) -> str:
    name = next((a for a in argv if not a.startswith("-")), None)
    return f"gpt2lab {name}" if name in COMMANDS else "gpt2lab"


def describe_unexpected(e: BaseException, command: str = "gpt2lab") -> str:
    """One line for an error the library did not turn into a GPT2LabError: what, where, the fix."""
    debug = "rerun with --debug for the traceback and report it if the cause is not clear"
    if isinstance(e, OSError):
        name = e.filename or ""
        target = f" {name}" + (f" -> {e.filename2}" if e.filename2 else "") if name else ""
        if is_disk_full(e):
            return (
                f"{command} could not write{target}: {disk_full_reason(e, name or None)}; files "
                "gpt2lab finished before are intact, expected room for the output, free some "
                "space (or raise the limit) and run the same command again"
            )
        fixes = {
            errno.EACCES: "check the permissions, or choose another path",
            errno.EPERM: "check the permissions, or choose another path",
            errno.EROFS: "choose a path on a writable file system",
            errno.EEXIST: "move it away, or choose another path",
            errno.ENOENT: "check the path",
            errno.ENOTDIR: "a path component is a file: check the path",
            errno.EISDIR: "name a file, not a directory",
            errno.ENAMETOOLONG: "use a shorter path",
            errno.ELOOP: "the path loops through symbolic links: check it",
        }
        why = e.strerror or one_line(str(e), 200) or type(e).__name__
        return f"{command}:{target} {why}, {fixes.get(e.errno or 0, debug)}"
    if isinstance(e, MemoryError):
        return (
            f"{command} ran out of memory, expected a job that fits, use a smaller batch, "
            "context or model (nothing was written half-way)"
        )
    if isinstance(e, RecursionError):
        return f"{command} hit Python's recursion limit (a deeply nested input?), {debug}"
    if isinstance(e, pickle.UnpicklingError):
        return f"{command}: a file could not be unpickled safely ({one_line(str(e), 200)}), {debug}"
    if isinstance(e, UnicodeError):
        return (
            f"{command}: text is not valid UTF-8 ({one_line(str(e), 200)}), convert it to UTF-8 "
            "or pass --errors replace where the command has it"
        )
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    kind = type(e).__name__
    if "out of memory" in first.lower():
        return f"{command} ran out of memory ({one_line(first, 200)}), use a smaller batch or model"
    return f"{command} failed: {kind}: {one_line(first, 300)}, {debug}"


def _dispatch(argv: list[str]) -> int:
    commands = available_commands()
    name = next((a for a in argv if not a.startswith("-")), None)
    if name is None or name not in COMMANDS:
        top = _top_parser(commands)
        if name is not None:
            close = difflib.get_close_matches(name, list(commands), n=1)
            hint = f"did you mean `gpt2lab {close[0]}`?" if close else "see `gpt2lab --help`"
            raise UsageError(f"unknown command {name!r}", f"one of {', '.join(commands)}", hint)
        top.parse_args(argv)
        top.print_help()
        return 0
    if name not in commands:
        raise UsageError(
            f"command {name!r} is not part of this installation yet",
            f"one of {', '.join(commands)}",
            "upgrade gpt2lab",
        )
    module_name, purpose, example = commands[name]
    module = importlib.import_module(module_name)
    parser = _command_parser(name, purpose, example, module)
    rest = list(argv)
    rest.remove(name)
    args, leftover = parser.parse_known_args(rest)
    overrides, unknown = _split_overrides(leftover)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides and not getattr(module, "ACCEPTS_OVERRIDES", False):
        parser.error(f"`gpt2lab {name}` takes no config overrides (got --{overrides[0]})")
    args.overrides = overrides
    result = module.run(args)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
