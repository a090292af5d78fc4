"""The OpenAI HTTP API's shapes: request validation (each problem an `APIError` that renders as
OpenAI's error JSON with its status code) and the response and stream-chunk objects.

Pure functions of JSON values, the tokenizer and the limits; no web framework here.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from gpt2lab.errors import GPT2LabError
from gpt2lab.generate import prompt_ids
from gpt2lab.serve.engine import SamplingParams


class APIError(Exception):
    """An error response: `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,  # noqa: A002 - OpenAI's field name
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; past a limit the request gets a 400 (429 for load)."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 1024
    max_tokens: int = 1024
    max_n: int = 8
    max_concurrent: int = 64
    max_logprobs: int = 5  # completions' logprobs (OpenAI's own limit is 5)
    max_top_logprobs: int = 20  # chat's top_logprobs (OpenAI's limit)


@dataclass
class Parsed:
    """A validated request: token-id prompts, the sampling settings and the response options."""

    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool = False


# ---- field checks ----

_MISSING = object()


def _field(body: dict, name: str, kinds: tuple[str, ...], default: Any = None) -> Any:
    """body[name] if it is of one of `kinds` (int, number, bool, str, list, dict, null)."""
    value = body.get(name, _MISSING)
    if value is _MISSING:
        return default
    if _kind(value) in kinds or (_kind(value) == "int" and "number" in kinds):
        return default if value is None else value
    wanted = " or ".join("an integer" if k == "int" else _ARTICLE.get(k, k) for k in kinds)
    raise APIError(
        f"{value!r} is not valid under any of the given schemas - '{name}' must be {wanted}",
        param=name,
        code="invalid_type",
    )


_ARTICLE = {
    "number": "a number",
    "bool": "a boolean",
    "str": "a string",
    "list": "an array",
    "dict": "an object",
    "null": "null",
}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number" if math.isfinite(value) else "nonfinite"
    return {str: "str", list: "list", dict: "dict"}.get(type(value), type(value).__name__)


def _range(name: str, value: Any, lo: float | None, hi: float | None, why: str = "") -> None:
    if value is None:
        return
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "" if lo is None else f" >= {lo}"
        hi_s = "" if hi is None else f" <= {hi}"
        both = " and" if lo_s and hi_s else ""
        raise APIError(
            f"{value!r} is out of range for '{name}': it must be{lo_s}{both}{hi_s}{why}",
            param=name,
            code="invalid_value",
        )


def _check_fields(body: Any, known: set[str]) -> dict:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object", code="invalid_body")
    unknown = sorted(set(body) - known)
    if unknown:
        raise APIError(
            f"Unrecognized request argument supplied: {unknown[0]}",
            param=unknown[0],
            code="unknown_parameter",
        )
    return body


def _unsupported(body: dict, name: str, default_ok: tuple = (None,)) -> None:
    value = body.get(name)
    if value not in default_ok and not (isinstance(value, dict | list) and not value):
        raise APIError(
            f"'{name}' is not supported by this server (got {value!r})",
            param=name,
            code="unsupported_parameter",
        )


_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "user",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {
    "messages",
    "logprobs",
    "top_logprobs",
    "max_completion_tokens",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
}


def _sampling(body: dict, limits: Limits, max_tokens: int | None) -> dict[str, Any]:
    """The fields both endpoints share, checked; `max_tokens` None = the endpoint's default."""
    _field(body, "model", ("str", "null"))
    _field(body, "user", ("str", "null"))
    for name in ("frequency_penalty", "presence_penalty"):
        _field(body, name, ("number", "null"))
        _unsupported(body, name, (None, 0, 0.0))
    _field(body, "logit_bias", ("dict", "null"))
    _unsupported(body, "logit_bias")
    temperature = _field(body, "temperature", ("number", "null"), 1.0)
    _range("temperature", temperature, 0, 2)
    top_p = _field(body, "top_p", ("number", "null"))
    _range("top_p", top_p, 0, 1)
    if top_p == 0:
        raise APIError("0 is out of range for 'top_p': it must be > 0", param="top_p")
    top_k = _field(body, "top_k", ("int", "null"))
    _range("top_k", top_k, -1, None)
    n = _field(body, "n", ("int", "null"), 1)
    _range("n", n, 1, limits.max_n, " (the server's --max-n)")
    if max_tokens is not None:
        _range("max_tokens", max_tokens, 0, limits.max_tokens, " (the server's --max-tokens)")
    seed = _field(body, "seed", ("int", "null"))
    stop = _field(body, "stop", ("str", "list", "null"))
    if isinstance(stop, str):
        stop = [stop]
    stop = list(stop or [])
    if len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise APIError("'stop' must be a string or a list of up to 4 strings", param="stop")
    stream = _field(body, "stream", ("bool", "null"), False)
    options = _field(body, "stream_options", ("dict", "null"))
    include_usage = False
    if options is not None:
        if not stream:
            raise APIError(
                "'stream_options' is only allowed when 'stream' is true", param="stream_options"
            )
        include_usage = _field(options, "include_usage", ("bool", "null"), False)
    sampler = dict(
        temperature=float(temperature),
        top_p=None if top_p is None or top_p >= 1 else float(top_p),
        top_k=None if top_k in (None, -1, 0) else top_k,
        n=n,
        seed=seed,
        stop=tuple(s for s in stop if s),
    )
    return dict(sampler=sampler, n=n, stream=stream, include_usage=include_usage)


def _fit(name: str, prompt_len: int, max_tokens: int, context: int, limits: Limits) -> None:
    if prompt_len > limits.max_prompt_tokens and prompt_len <= context:
        raise APIError(
            f"the prompt has {prompt_len} tokens; this server takes at most "
            f"{limits.max_prompt_tokens} (--max-prompt-tokens)",
            param=name,
            code="prompt_too_long",
        )
    if prompt_len + max_tokens > context:
        raise APIError(
            f"This model's maximum context length is {context} tokens, however you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in your prompt; {max_tokens} for "
            "the completion). Please reduce your prompt; or completion length.",
            param=name if prompt_len > context else "max_tokens",
            code="context_length_exceeded",
        )


def parse_completion(body: Any, tokenizer, context: int, limits: Limits) -> Parsed:
    """A /v1/completions body: `prompt` is a string, a list of strings, a list of token ids or
    a list of lists of token ids."""
    body = _check_fields(body, COMPLETION_FIELDS)
    max_tokens = _field(body, "max_tokens", ("int", "null"), 16)
    common = _sampling(body, limits, max_tokens)
    _field(body, "suffix", ("str", "null"))
    _unsupported(body, "suffix", (None, ""))
    best_of = _field(body, "best_of", ("int", "null"))
    if best_of is not None and best_of != common["n"]:
        raise APIError("'best_of' other than n is not supported", param="best_of")
    logprobs = _field(body, "logprobs", ("int", "null"))
    _range("logprobs", logprobs, 0, limits.max_logprobs)
    echo = _field(body, "echo", ("bool", "null"), False)
    if "prompt" not in body:
        raise APIError("you must provide a 'prompt'", param="prompt", code="missing_required")
    prompts = _prompts(body["prompt"], tokenizer)
    for p in prompts:
        _fit("prompt", len(p), max_tokens, context, limits)
    if len(prompts) * common["n"] > limits.max_n:
        raise APIError(
            f"{len(prompts)} prompts x n={common['n']} is more than the server's --max-n "
            f"{limits.max_n}",
            param="prompt",
        )
    params = SamplingParams(
        max_tokens=max_tokens,
        **common["sampler"],
        stop_ids=_eos(tokenizer),
        logprobs=logprobs,
        prompt_logprobs=bool(echo and logprobs is not None),
    )
    return Parsed(prompts, params, common["stream"], common["include_usage"], echo)


def _eos(tokenizer) -> tuple[int, ...]:
    eos = tokenizer.special_tokens.get("<|endoftext|>")
    return () if eos is None else (eos,)


def _prompts(prompt: Any, tokenizer) -> list[list[int]]:
    def ids(p: Any) -> list[int]:
        if isinstance(p, str):
            return prompt_ids(tokenizer, p)
        if isinstance(p, list) and p and all(_kind(t) == "int" for t in p):
            bad = [t for t in p if not 0 <= t < tokenizer.n_vocab]
            if bad:
                raise APIError(
                    f"token id {bad[0]} is outside the vocabulary (0 to {tokenizer.n_vocab - 1})",
                    param="prompt",
                    code="invalid_value",
                )
            return list(p)
        raise APIError(
            "'prompt' must be a string, a list of strings, a list of token ids or a list of "
            "lists of token ids",
            param="prompt",
            code="invalid_type",
        )

    if isinstance(prompt, str):
        return [ids(prompt)]
    if isinstance(prompt, list) and prompt and all(_kind(t) == "int" for t in prompt):
        return [ids(prompt)]
    if isinstance(prompt, list) and prompt:
        return [ids(p) for p in prompt]
    return [ids(prompt)]


def parse_chat(body: Any, tokenizer, template, context: int, limits: Limits) -> Parsed:
    """A /v1/chat/completions body, its messages rendered by the model's chat template."""
    body = _check_fields(body, CHAT_FIELDS)
    for name in ("tools", "tool_choice", "response_format", "parallel_tool_calls"):
        _unsupported(body, name, (None, {"type": "text"}, "none"))
    max_tokens = _field(body, "max_completion_tokens", ("int", "null"))
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", ("int", "null"))
    common = _sampling(body, limits, max_tokens)
    logprobs = _field(body, "logprobs", ("bool", "null"), False)
    top_logprobs = _field(body, "top_logprobs", ("int", "null"))
    _range("top_logprobs", top_logprobs, 0, limits.max_top_logprobs)
    if top_logprobs is not None and not logprobs:
        raise APIError(
            "'top_logprobs' needs 'logprobs' set to true", param="top_logprobs", code="invalid"
        )
    messages = _messages(body.get("messages", _MISSING))
    if template is None:
        raise APIError(
            "this model has no chat template, so /v1/chat/completions cannot format messages; "
            "use /v1/completions, or serve a chat model (one fine-tuned with a chat template)",
            param="messages",
            code="no_chat_template",
        )
    try:
        prompt = list(template.encode(tokenizer, messages, add_generation_prompt=True))
    except GPT2LabError as e:  # a role the template has no place for, content it refuses
        raise APIError(f"messages: {e}", param="messages", code="invalid_value") from e
    if max_tokens is None:
        max_tokens = max(min(limits.max_tokens, context - len(prompt)), 0)
    _fit("messages", len(prompt), max_tokens, context, limits)
    stop_ids = set(_eos(tokenizer))
    end = getattr(template, "end_token", None)
    if isinstance(end, str) and end in tokenizer.special_tokens:
        stop_ids.add(tokenizer.special_tokens[end])
    elif isinstance(end, int):
        stop_ids.add(end)
    sampler = common["sampler"]
    sampler["stop"] += tuple(getattr(template, "stop_strings", ()) or ())
    params = SamplingParams(
        max_tokens=max_tokens,
        **sampler,
        stop_ids=tuple(sorted(stop_ids)),
        logprobs=(top_logprobs or 0) if logprobs else None,
    )
    return Parsed([prompt], params, common["stream"], common["include_usage"])


def _messages(messages: Any) -> list[dict[str, str]]:
    if messages is _MISSING:
        raise APIError("you must provide 'messages'", param="messages", code="missing_required")
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages.[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(f"{where} must be an object with a 'role' string", param=where)
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise APIError(
                        f"{where}.content: only text parts are supported",
                        param=f"{where}.content",
                    )
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        if not isinstance(content, str):
            raise APIError(f"{where}.content must be a string", param=f"{where}.content")
        out.append({"role": m["role"], "content": content})
    return out


# ---- responses ----


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def token_text(tokenizer, token: int) -> str:
    """A token as text; a token that is part of a UTF-8 character shows as `bytes:\\xNN`."""
    raw = tokenizer.decode_bytes([token])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class CompletionLogprobs:
    """The legacy completions `logprobs` object, built token by token."""

    def __init__(self, tokenizer, offset: int = 0) -> None:
        self.tokenizer, self.offset = tokenizer, offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, token: int, logprob: float | None, top: list | None) -> None:
        text = token_text(self.tokenizer, token)
        self.tokens.append(text)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(
            None if top is None else {token_text(self.tokenizer, t): lp for t, lp in top}
        )
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def body(self) -> dict[str, list]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


def chat_logprob(tokenizer, token: int, logprob: float, top: list) -> dict[str, Any]:
    """One entry of a chat choice's `logprobs.content`."""

    def entry(t: int, lp: float) -> dict[str, Any]:
        return {
            "token": token_text(tokenizer, t),
            "logprob": lp,
            "bytes": list(tokenizer.decode_bytes([t])),
        }

    return {**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top]}
