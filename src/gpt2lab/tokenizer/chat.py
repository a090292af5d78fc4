"""Chat templates: a conversation (a list of messages) as text and as token ids.

    template = CHAT                                  # <|system|> <|user|> <|assistant|> <|end|>
    ids = template.encode(tok, [{"role": "user", "content": "Hi"}])   # ends in <|assistant|>
    ids, learn = template.encode_with_mask(tok, conversation)           # what SFT trains on

Two built-in layouts (docs/chat.md):

- `CHAT` ("chat"), for a vocabulary with the special tokens `<|system|>`, `<|user|>`,
  `<|assistant|>` and `<|end|>`: each message is `<|role|>` + content + `<|end|>` + "\\n", and
  the generation prompt is `<|assistant|>`.
- `PLAIN` ("plain"), for base models without chat tokens: `System: ...\\n\\n`, `User: ...\\n\\n`,
  `Assistant: ...<|endoftext|>\\n\\n`; the generation prompt is `Assistant:` and the model writes
  the space before its reply.

Safety: message content is always text. `encode` turns only the template's own markers into
special ids; a user who types `<|end|>` or `<|endoftext|>` gets the tokens of those characters,
never the control token, so nobody can close a turn or fake a role from inside a message.
(`transformers`' `apply_chat_template` tokenizes the rendered string as a whole, so for such
content, and only for it, its ids differ from ours.)

A template travels with its tokenizer as `chat_template.json` in the tokenizer's directory;
an exported Hugging Face directory also carries it as Jinja (`to_jinja()`) in
`tokenizer_config.json`. A template read from a Hugging Face directory we did not write is
arbitrary Jinja: it is rendered in jinja2's immutable sandbox, never executed as Python.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2lab.errors import DataError, TokenizerError
from gpt2lab.io import atomic_write_json

ROLES = ("system", "user", "assistant")
TEMPLATE_FILE = "chat_template.json"
FORMAT = "gpt2lab-chat-template"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
_EOT = "<|endoftext|>"
Message = dict[str, str]


@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation becomes text. A message of role r renders as
    `prefix[r] + content + suffix[r]`; an assistant message as
    `prefix + reply_lead + content + suffix`, where `suffix` starts with `end_token` (the model
    learns `reply_lead + content + end_token`). `add_generation_prompt` appends the assistant
    prefix. `special_tokens` are the markers encoded as special ids (the tokenizer must have
    them). A template read from Hugging Face we did not write has only `name`, `end_token` and
    `jinja` (rendered in a sandbox)."""

    name: str
    system: tuple[str, str] = ("", "")
    user: tuple[str, str] = ("", "")
    assistant: tuple[str, str] = ("", "")
    end_token: str = _EOT
    reply_lead: str = ""
    special_tokens: tuple[str, ...] = ()
    stop_strings: tuple[str, ...] = ()
    jinja: str | None = None

    def __post_init__(self) -> None:
        if self.jinja is None and not self.assistant[1].startswith(self.end_token):
            raise TokenizerError(
                f"chat template {self.name!r}: the assistant suffix {self.assistant[1]!r} does "
                f"not start with the end-of-turn token {self.end_token!r}",
                "an assistant suffix that begins with end_token",
            )

    # --- text ----------------------------------------------------------------------------------
    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The conversation as text (what `to_jinja()` renders in `transformers` too)."""
        messages = validate_messages(messages)
        if self.jinja is not None:
            return _render_jinja(self, messages, add_generation_prompt)
        return "".join(text for text, _, _ in self._parts(messages, add_generation_prompt))

    def parse_reply(self, text: str) -> str:
        """A generated reply as the user should see it: cut at the first stop string, without
        the `reply_lead` the template puts before every assistant message."""
        for stop in self.stop_strings or (self.end_token,):
            if stop in text:
                text = text[: text.index(stop)]
        if self.reply_lead and text.startswith(self.reply_lead):
            text = text[len(self.reply_lead) :]
        return text

    # --- ids -----------------------------------------------------------------------------------
    def encode(
        self, tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the rendered conversation; the template's markers are special ids and
        message content is ordinary text (see the module docstring: the safety property)."""
        if self.jinja is not None:
            messages = validate_messages(messages)
            return _encode_foreign(self, tokenizer, messages, add_generation_prompt)
        return self._encode(tokenizer, messages, add_generation_prompt)[0]

    def encode_with_mask(
        self, tokenizer: Any, messages: Sequence[Message]
    ) -> tuple[list[int], list[bool]]:
        """(ids, learn): `learn[i]` is True exactly on the tokens the model is trained to write:
        each assistant message's content (with `reply_lead`) and its end-of-turn token. System
        and user messages, role markers and the separators after `end_token` are False."""
        if self.jinja is not None:
            return _mask_foreign(self, tokenizer, validate_messages(messages))
        return self._encode(tokenizer, messages, add_generation_prompt=False)

    def _parts(
        self, messages: Sequence[Message], add_generation_prompt: bool
    ) -> list[tuple[str, bool, bool]]:
        """(text, is_content, learn) pieces in order. Template pieces may hold special tokens;
        content pieces never become special ids."""
        parts: list[tuple[str, bool, bool]] = []
        for m in messages:
            prefix, suffix = getattr(self, m["role"])
            if m["role"] == "assistant":
                end, rest = suffix[: len(self.end_token)], suffix[len(self.end_token) :]
                parts += [(prefix, False, False), (self.reply_lead, False, True)]
                parts += [(m["content"], True, True), (end, False, True), (rest, False, False)]
            else:
                parts += [(prefix, False, False), (m["content"], True, False)]
                parts += [(suffix, False, False)]
        if add_generation_prompt:
            parts.append((self.assistant[0], False, False))
        return [p for p in parts if p[0]]

    def _encode(
        self, tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool
    ) -> tuple[list[int], list[bool]]:
        messages = validate_messages(messages)
        specials = self._special_ids(tokenizer)
        # Runs of ordinary text with the same `learn` flag are encoded together, as a tokenizer
        # encodes the rendered string between two special tokens. The one place text is cut
        # without a special token is where the reply starts: after the assistant prefix. Both
        # built-in layouts put a special token or a space there (no GPT-2 / GPT-4 pre-token runs
        # across a non-space followed by a space), so the ids equal a whole-string encoding.
        ids: list[int] = []
        learn: list[bool] = []
        run: list[str] = []
        run_learn = False

        def flush() -> None:
            if run:
                new = tokenizer.encode_ordinary("".join(run))
                ids.extend(new)
                learn.extend([run_learn] * len(new))
                run.clear()

        for text, is_content, flag in self._parts(messages, add_generation_prompt):
            if flag != run_learn:
                flush()
                run_learn = flag
            pieces = [(text, False)] if is_content else _split_special(text, specials)
            for piece, special in pieces:
                if special:
                    flush()
                    ids.append(specials[piece])
                    learn.append(flag)
                else:
                    run.append(piece)
        flush()
        return ids, learn

    def _special_ids(self, tokenizer: Any) -> dict[str, int]:
        have = getattr(tokenizer, "special_tokens", {})
        missing = [s for s in self.special_tokens if s not in have]
        if missing:
            raise TokenizerError(
                f"chat template {self.name!r} needs the special tokens {', '.join(missing)}, "
                "which this tokenizer does not have",
                f"a tokenizer with {', '.join(self.special_tokens)}",
                "prepare the data with `--add-special '" + ",".join(self.special_tokens) + "'` "
                "(the model grows to fit), or use the 'plain' template",
            )
        return {s: have[s] for s in self.special_tokens}

    # --- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (what chat_template.json holds)."""
        d = dataclasses.asdict(self)
        return {"format": FORMAT, "version": 1, **{k: v for k, v in d.items() if v is not None}}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = TEMPLATE_FILE) -> ChatTemplate:
        """Inverse of `to_dict`; a bad file is a one-line TokenizerError naming it."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise TokenizerError(
                f"{where} is not a gpt2lab chat template",
                f'a JSON object with "format": "{FORMAT}"',
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        for key, value in d.items():
            if key in ("format", "version"):
                continue
            if key not in fields:
                raise TokenizerError(
                    f"{where} has an unknown field {key!r}", f"fields of {sorted(fields)}"
                )
            if key in ("system", "user", "assistant", "special_tokens", "stop_strings"):
                ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
                ok = ok and (len(value) == 2 or key in ("special_tokens", "stop_strings"))
                value = tuple(value) if ok else value
            else:
                ok = isinstance(value, str)
            if not ok:
                raise TokenizerError(
                    f"{where}: field {key!r} is {value!r}",
                    "a [prefix, suffix] pair of strings"
                    if key in ROLES
                    else ("a list of strings" if key.endswith("s") else "a string"),
                )
            kw[key] = value
        if "name" not in kw:
            raise TokenizerError(f"{where} has no 'name'", "the template's name")
        return cls(**kw)

    def save(self, directory: str | os.PathLike) -> None:
        """Write `chat_template.json` into `directory` (a tokenizer's directory)."""
        atomic_write_json(Path(directory) / TEMPLATE_FILE, self.to_dict())

    def to_jinja(self) -> str:
        """A Jinja template that, as `chat_template` in a Hugging Face tokenizer_config.json,
        makes `tokenizer.apply_chat_template(messages, add_generation_prompt=...)` give the ids
        of `encode` (for content without special-token text). transformers renders with
        trim_blocks and lstrip_blocks, so every literal is a string inside an expression."""
        if self.jinja is not None:
            return self.jinja
        q = json.dumps  # a JSON string literal is a Jinja string literal with the same escapes
        lines = ["{%- for message in messages -%}"]
        for i, role in enumerate(ROLES):
            prefix, suffix = getattr(self, role)
            lead = self.reply_lead if role == "assistant" else ""
            keyword = "if" if i == 0 else "elif"
            lines.append(f"{{%- {keyword} message['role'] == {q(role)} -%}}")
            lines.append(f"{{{{ {q(prefix + lead)} + message['content'] + {q(suffix)} }}}}")
        lines += [
            "{%- else -%}",
            "{{ raise_exception('role must be system, user or assistant, not ' "
            "+ message['role']) }}",
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}",
            f"{{{{ {q(self.assistant[0])} }}}}",
            "{%- endif -%}",
        ]
        return "\n".join(lines)


CHAT = ChatTemplate(
    name="chat",
    system=("<|system|>", "<|end|>\n"),
    user=("<|user|>", "<|end|>\n"),
    assistant=("<|assistant|>", "<|end|>\n"),
    end_token="<|end|>",
    special_tokens=CHAT_TOKENS,
    stop_strings=("<|end|>",),
)
PLAIN = ChatTemplate(
    name="plain",
    system=("System: ", "\n\n"),
    user=("User: ", "\n\n"),
    assistant=("Assistant:", _EOT + "\n\n"),
    end_token=_EOT,
    reply_lead=" ",
    special_tokens=(_EOT,),
    stop_strings=(_EOT, "\nUser:", "\nSystem:"),
)
TEMPLATES = {t.name: t for t in (CHAT, PLAIN)}


def get_chat_template(name: str) -> ChatTemplate:
    """A built-in template by name ("chat", "plain"), or one read from a chat_template.json."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    p = Path(name)
    if p.is_file() or (p / TEMPLATE_FILE).is_file():
        found = load_chat_template(p.parent if p.is_file() else p)
        if found is not None:
            return found
    raise TokenizerError(
        f"no chat template named {name!r}",
        f"one of {', '.join(TEMPLATES)}, or a {TEMPLATE_FILE} file",
    )


def validate_messages(messages: Any, where: str = "the conversation") -> list[Message]:
    """The messages as a list of {"role", "content"} dicts, or a one-line DataError naming the
    message index and field."""
    if not isinstance(messages, (list, tuple)):
        raise DataError(
            f"{where} is a {type(messages).__name__}",
            'a list of {"role": ..., "content": ...} messages',
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(
                f"{where}: message {i} is a {type(m).__name__}",
                'a {"role": ..., "content": ...} object',
            )
        role = m.get("role")
        if role not in ROLES:
            raise DataError(
                f"{where}: message {i} has role {role!r}"
                if "role" in m
                else f"{where}: message {i} has no 'role'",
                f"role one of {', '.join(ROLES)}",
            )
        content = m.get("content")
        if not isinstance(content, str):
            raise DataError(
                f"{where}: message {i} ({role}) has content {type(content).__name__}"
                if "content" in m
                else f"{where}: message {i} ({role}) has no 'content'",
                "content a string",
            )
    return list(messages)


def _split_special(text: str, specials: dict[str, int]) -> list[tuple[str, bool]]:
    """`text` (template text) cut into (piece, is_special) at the special tokens it holds."""
    out: list[tuple[str, bool]] = []
    start, i = 0, 0
    names = sorted(specials, key=len, reverse=True)  # longest first
    while i < len(text):
        hit = next((s for s in names if text.startswith(s, i)), None)
        if hit is None:
            i += 1
            continue
        if i > start:
            out.append((text[start:i], False))
        out.append((hit, True))
        i = start = i + len(hit)
    if start < len(text):
        out.append((text[start:], False))
    return out


# --- templates from Hugging Face directories we did not write ------------------------------
def _render_jinja(t: ChatTemplate, messages: list[Message], add_generation_prompt: bool) -> str:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(t.jinja or "").render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            eos_token=t.end_token,
            bos_token=t.end_token,
        )
    except TemplateError as e:
        raise DataError(
            f"chat template {t.name!r} cannot render this conversation ({e})",
            "a conversation the model's template accepts",
        ) from None


def _check_content(t: ChatTemplate, tokenizer: Any, messages: list[Message]) -> None:
    specials = getattr(tokenizer, "special_tokens", {})
    for i, m in enumerate(messages):
        hit = next((s for s in specials if s in m["content"]), None)
        if hit is not None:
            raise DataError(
                f"message {i} holds the special token text {hit!r}, which chat template "
                f"{t.name!r} (Jinja from a Hugging Face directory) could not keep as text",
                "content without special-token text",
                "remove it, or use a gpt2lab template ('chat' or 'plain')",
            )


def _encode_foreign(
    t: ChatTemplate, tokenizer: Any, messages: list[Message], add_generation_prompt: bool
) -> list[int]:
    _check_content(t, tokenizer, messages)
    text = _render_jinja(t, messages, add_generation_prompt)
    return tokenizer.encode(text, allowed_special="all")


def _mask_foreign(
    t: ChatTemplate, tokenizer: Any, messages: list[Message]
) -> tuple[list[int], list[bool]]:
    """Assistant spans by rendering prefixes: the tokens between the conversation up to an
    assistant message (with the generation prompt) and up to its end are learned."""
    ids = _encode_foreign(t, tokenizer, messages, False)
    learn = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_encode_foreign(t, tokenizer, messages[:i], True))
        stop = len(_encode_foreign(t, tokenizer, messages[: i + 1], False))
        learn[start:stop] = [True] * max(stop - start, 0)
    return ids, learn


# --- finding a template beside a model, a tokenizer or data ---------------------------------
def load_chat_template(path: str | os.PathLike) -> ChatTemplate | None:
    """The chat template that travels with `path`, or None if it has none.

    `path` may be a tokenizer directory, a data directory (`tokenizer/`), a run directory
    (`tokenizer/`), a checkpoint directory (`../../tokenizer/`) or a Hugging Face directory
    (`gpt2lab_tokenizer/`, else `chat_template` in tokenizer_config.json or chat_template.jinja:
    arbitrary Jinja, rendered sandboxed).
    """
    p = Path(path)
    if p.is_file():
        p = p.parent
    for folder in (p / "tokenizer", p / "gpt2lab_tokenizer", p.parent.parent / "tokenizer"):
        if (folder / TEMPLATE_FILE).is_file():
            return _read_template_file(folder / TEMPLATE_FILE)
    return read_chat_template(p)


def read_chat_template(directory: str | os.PathLike) -> ChatTemplate | None:
    """The template in this very directory: chat_template.json (ours), else a Hugging Face
    `chat_template` (tokenizer_config.json or chat_template.jinja), else None."""
    p = Path(directory)
    if (p / TEMPLATE_FILE).is_file():
        return _read_template_file(p / TEMPLATE_FILE)
    return _hf_template(p)


def _read_template_file(f: Path) -> ChatTemplate:
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(
            f"cannot read {f} ({e})", "a chat template written by gpt2lab", "save it again"
        ) from None
    return ChatTemplate.from_dict(d, where=str(f))


def _hf_template(p: Path) -> ChatTemplate | None:
    config_file, jinja_file = p / "tokenizer_config.json", p / "chat_template.jinja"
    config: dict[str, Any] = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(
                f"cannot read {config_file} ({e})", "a Hugging Face tokenizer_config.json"
            ) from None
    source = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in source if isinstance(d, dict)}
        source = named.get("default")
    if source is None and jinja_file.is_file():
        source = jinja_file.read_text(encoding="utf-8")
    if not isinstance(source, str) or not source:
        return None
    eos = config.get("eos_token", _EOT)
    if isinstance(eos, dict):  # an AddedToken written out
        eos = eos.get("content", _EOT)
    return ChatTemplate(
        name=f"jinja:{p.name}", end_token=str(eos), stop_strings=(str(eos),), jinja=source
    )
