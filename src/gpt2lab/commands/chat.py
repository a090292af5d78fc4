"""`gpt2lab chat`: talk to a model in the terminal, with its chat template and a history."""

from __future__ import annotations

import argparse
import sys

import torch

from gpt2lab.commands.sample import (
    PROMPT_LIMIT,
    _warnings_to_stderr,
    add_device_arguments,
    add_sampling_arguments,
    load_model_for,
    sample_config,
)
from gpt2lab.errors import DataError
from gpt2lab.generate import complete
from gpt2lab.tokenizer.chat import ChatTemplate, crop_history, resolve_chat_template

EXAMPLES = """
gpt2lab chat --model runs/sft
gpt2lab chat --model runs/sft --system 'You are a helpful assistant.' --temperature 0.7
gpt2lab chat --model gpt2 --template plain       # a base model, with the plain-text template
printf 'Hello\\n/reset\\nWho are you?\\n' | gpt2lab chat --model runs/sft --seed 0
In the chat: /reset forgets the conversation, /system TEXT sets the system message,
/quit (or Ctrl-D) leaves; Ctrl-C leaves at once.
"""
HELP = "commands: /reset, /system TEXT, /quit"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="a run, checkpoint or Hugging Face directory whose tokenizer has a chat template",
    )
    p.add_argument("--system", metavar="TEXT", help="a system message to start with")
    add_template_argument(p)
    g = p.add_argument_group("decoding")
    g.add_argument(
        "-m",
        "--max-new-tokens",
        type=int,
        metavar="N",
        help="most tokens per reply (default 200, at most half the context)",
    )
    add_sampling_arguments(g)
    add_device_arguments(p.add_argument_group("speed"))


def add_template_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--template",
        metavar="NAME",
        help="the chat template: the model's own (default), 'chat' (<|user|> ... tokens), "
        "'plain' (User: / Assistant: text, for base models) or a chat_template.json",
    )


def run(args: argparse.Namespace) -> int:
    args.stop, args.batch_size, args.num_samples = None, None, None
    cfg = sample_config(args)
    with _warnings_to_stderr():
        model, tok = load_model_for(args.model, cfg)
        template = resolve_chat_template(args.model, tok, args.template)
        template.encode(tok, [{"role": "user", "content": ""}])  # its tokens exist: fail early
        block = model.config.block_size
        max_new = max(1, min(cfg.max_new_tokens, block // 2))
        generator = None
        if cfg.seed is not None:
            device = next(model.parameters()).device
            generator = torch.Generator(device=device).manual_seed(cfg.seed)
        session = _Session(args.system)
        tty = _is_tty()
        print(f"chatting with {args.model} (template {template.name}); {HELP}", file=sys.stderr)
        while True:
            if tty:
                print("you> ", end="", flush=True)
            line = _read_line()
            if not line:  # Ctrl-D or the end of piped input
                if tty:
                    print()
                return 0
            text = line.rstrip("\n")
            if session.command(text):
                if session.quit:
                    return 0
                continue
            asked = [*session.messages, {"role": "user", "content": text}]
            try:
                history, ids = crop_history(template, tok, asked, block - max_new)
            except DataError as e:
                print(f"gpt2lab: error: {e}", file=sys.stderr)
                continue
            if len(history) < len(asked):
                left_out = len(asked) - len(history)
                print(f"(context full: the oldest {left_out} messages left out)", file=sys.stderr)
            session.messages = history
            reply = _reply(model, tok, template, ids, cfg, max_new, generator)
            session.messages.append({"role": "assistant", "content": reply})


def _read_line() -> str:
    """One message from stdin, at most PROMPT_LIMIT characters: an endless line (/dev/zero) is
    refused, not read into memory."""
    line = sys.stdin.readline(PROMPT_LIMIT + 1)
    if len(line) > PROMPT_LIMIT:
        raise DataError(
            f"a line on standard input is longer than {PROMPT_LIMIT:,} characters (or never ends)",
            "one message per line",
            "send shorter messages",
        )
    return line


class _Session:
    """The conversation so far and the in-chat commands."""

    def __init__(self, system: str | None) -> None:
        self.system, self.quit = system, False
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def command(self, text: str) -> bool:
        """Handle a /command; True if `text` was one (nothing to send to the model)."""
        word, _, rest = text.strip().partition(" ")
        if not word.startswith("/"):
            return not text.strip()  # an empty line: ask again
        if word == "/reset":
            self.reset()
            print("(conversation reset)", file=sys.stderr)
        elif word == "/system":
            self.system = rest.strip() or None
            history = [m for m in self.messages if m["role"] != "system"]
            self.messages = [{"role": "system", "content": self.system}] if self.system else []
            self.messages += history
            print(f"(system message {'set' if self.system else 'cleared'})", file=sys.stderr)
        elif word in ("/quit", "/exit"):
            self.quit = True
        else:
            print(f"(unknown command {word}; {HELP})", file=sys.stderr)
        return True


def _reply(model, tok, template: ChatTemplate, ids, cfg, max_new: int, generator) -> str:
    """Stream the assistant's reply to stdout; return it as the history keeps it."""
    print("assistant> ", end="", flush=True)
    lead = template.reply_lead

    def show(row: int, piece: str) -> None:
        nonlocal lead
        if lead:  # the template's text before every reply (a space) is not shown
            piece = piece[len(lead) :] if piece.startswith(lead) else piece
            lead = ""
        print(piece, end="", flush=True)

    (c,) = complete(
        model,
        tok,
        [ids],
        max_new,
        cfg.temperature,
        cfg.top_k,
        cfg.top_p,
        cfg.repetition_penalty,
        generator,
        stop=template.stop_strings or (template.end_token,),
        on_text=show,
    )
    print(flush=True)
    return template.parse_reply(c.text)


def _is_tty() -> bool:
    try:
        return sys.stdin.isatty()
    except (OSError, ValueError):
        return False
