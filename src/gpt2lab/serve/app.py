"""The HTTP side of `gpt2lab serve`: Starlette routes for the OpenAI API, the playground's own
endpoints and its static files, and a uvicorn server that drains in-flight requests on SIGINT or
SIGTERM. Starlette and uvicorn (the `serve` extra) are imported when the app or the server is
made, so that this module imports without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.util
import json
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2lab import inspect as look
from gpt2lab.generate import prompt_ids
from gpt2lab.serve import protocol
from gpt2lab.serve.engine import (
    Engine,
    ErrorEvent,
    FinishEvent,
    PromptEvent,
    TokenEvent,
)
from gpt2lab.serve.engine import Request as EngineRequest
from gpt2lab.serve.protocol import APIError, Limits, Parsed

STATIC = Path(__file__).resolve().parent / "static"
ATTENTION_TOKENS = 256  # the playground's attention map shows at most the last this many tokens


@dataclass
class State:
    """What the routes share: the engine, the model's tokenizer and chat template, settings."""

    engine: Engine
    tokenizer: Any
    model_name: str
    limits: Limits
    api_key: str | None = None
    template: Any = None  # a ChatTemplate, or None for a model without one
    active: int = 0  # generation requests in flight (the --max-concurrent count)
    created: int = field(default_factory=protocol.now)

    @property
    def model(self) -> Any:
        return self.engine.model

    @property
    def context(self) -> int:
        return self.engine.model.config.block_size


def missing_packages() -> list[str]:
    """The web packages `gpt2lab serve` needs that are not installed."""
    return [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]


def create_app(state: State) -> Any:
    """The ASGI app: /v1 (OpenAI), /api (the playground's views), /health, / and /static."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    class Stream(StreamingResponse):
        """The SSE response of a run, which releases the run however the response ends (also
        when the client is gone before the first chunk, and the stream never starts)."""

        def __init__(self, run: _Run) -> None:
            super().__init__(
                run.sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
            self.run = run

        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.run.release()

    def error(e: APIError) -> Response:
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def api(handler: Callable) -> Callable:
        """Authorization, and APIErrors as OpenAI's error JSON."""

        async def endpoint(request: Request) -> Response:
            try:
                _authorize(request, state.api_key)
                return await handler(request)
            except APIError as e:
                return error(e)

        return endpoint

    async def completions(request: Request) -> Response:
        body = await _read_json(request, state.limits.max_body_bytes)
        parsed = protocol.parse_completion(body, state.tokenizer, state.context, state.limits)
        return await generate(request, parsed, chat=False)

    async def chat(request: Request) -> Response:
        body = await _read_json(request, state.limits.max_body_bytes)
        parsed = protocol.parse_chat(
            body, state.tokenizer, state.template, state.context, state.limits
        )
        return await generate(request, parsed, chat=True)

    async def generate(request: Request, parsed: Parsed, chat: bool) -> Response:
        if state.active >= state.limits.max_concurrent:
            raise APIError(
                f"the server is busy: {state.active} requests in flight, its limit is "
                f"{state.limits.max_concurrent} (--max-concurrent); retry shortly",
                429,
                code="too_many_requests",
            )
        run = _Run(state, parsed, chat)
        state.active += 1
        try:
            run.submit()
        except BaseException:
            state.active -= 1
            raise
        if parsed.stream:
            return Stream(run)
        collect = asyncio.ensure_future(run.collect())
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not collect.done():  # the client went away: free its rows now
            collect.cancel()
            with contextlib.suppress(asyncio.CancelledError, APIError):
                await collect
            return Response(status_code=499)
        gone.cancel()
        return JSONResponse(collect.result())

    async def models(request: Request) -> Response:
        card = {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "gpt2lab",
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", **state.engine.stats()})

    async def info(request: Request) -> Response:
        cfg = state.model.config
        return JSONResponse(
            {
                "model": state.model_name,
                "context": cfg.block_size,
                "n_layer": cfg.n_layer,
                "n_head": cfg.n_head,
                "n_embd": cfg.n_embd,
                "vocab_size": state.tokenizer.n_vocab,
                "chat": state.template is not None,
                "limits": {
                    "max_tokens": state.limits.max_tokens,
                    "max_n": state.limits.max_n,
                    "max_prompt_tokens": state.limits.max_prompt_tokens,
                    "max_logprobs": state.limits.max_logprobs,
                },
            }
        )

    async def tokenize(request: Request) -> Response:
        body = await _read_json(request, state.limits.max_body_bytes)
        ids = _playground_ids(state, body)
        return JSONResponse(_token_view(state, ids))

    async def attention(request: Request) -> Response:
        body = await _read_json(request, state.limits.max_body_bytes)
        ids = _playground_ids(state, body)
        layer, head = body.get("layer", 0), body.get("head", 0)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (layer, head)):
            raise APIError("'layer' and 'head' must be integers", param="layer")
        cfg = state.model.config
        if not 0 <= layer < cfg.n_layer or not 0 <= head < cfg.n_head:
            raise APIError(
                f"layer {layer}, head {head} is not in the model: layers 0 to {cfg.n_layer - 1}, "
                f"heads 0 to {cfg.n_head - 1}",
                param="layer" if not 0 <= layer < cfg.n_layer else "head",
                code="invalid_value",
            )
        cropped = len(ids) > ATTENTION_TOKENS
        ids = ids[-ATTENTION_TOKENS:]
        att = await asyncio.wrap_future(state.engine.call(lambda: look.attention(state.model, ids)))
        grid = att[layer, head]
        return JSONResponse(
            {
                **_token_view(state, ids),
                "layer": layer,
                "head": head,
                "n_layer": cfg.n_layer,
                "n_head": cfg.n_head,
                "cropped": cropped,
                "attention": [[round(float(x), 4) for x in row] for row in grid.tolist()],
            }
        )

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=_NO_CACHE)

    async def static(request: Request) -> Response:
        path = static_file(request.path_params["path"])
        if path is None:
            raise HTTPException(404)
        return FileResponse(path, headers=_NO_CACHE)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        status = exc.status_code
        if request.url.path.startswith(("/v1", "/api")):
            what = "method not allowed" if status == 405 else "no such route"
            return error(APIError(f"{what}: {request.method} {request.url.path}", status))
        return Response(f"{status} {exc.detail}\n", status_code=status, media_type="text/plain")

    routes = [
        Route("/v1/completions", api(completions), methods=["POST"]),
        Route("/v1/chat/completions", api(chat), methods=["POST"]),
        Route("/v1/models", api(models), methods=["GET"]),
        Route("/api/info", api(info), methods=["GET"]),
        Route("/api/tokenize", api(tokenize), methods=["POST"]),
        Route("/api/attention", api(attention), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/", index, methods=["GET"]),
        Route("/static/{path:path}", static, methods=["GET"]),
    ]

    async def internal(request: Request, exc: Exception) -> Response:
        return error(APIError(f"internal error: {type(exc).__name__}: {exc}", 500))

    return Starlette(
        routes=routes, exception_handlers={HTTPException: not_found, Exception: internal}
    )


_NO_CACHE = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def static_file(name: str) -> Path | None:
    """The playground file `name` inside the package's static directory, or None: nothing
    outside it (`..`, absolute paths, links that lead out) is ever served."""
    if not name or "\x00" in name or "\\" in name:
        return None
    base = STATIC.resolve()
    try:
        path = (base / name).resolve()
    except (OSError, RuntimeError):
        return None
    if not path.is_relative_to(base) or not path.is_file():
        return None
    return path


def _authorize(request: Any, key: str | None) -> None:
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise APIError(
            "this server needs an API key: send the header 'Authorization: Bearer KEY'",
            401,
            code="invalid_api_key",
        )
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError("incorrect API key provided", 401, code="invalid_api_key")


async def _read_json(request: Any, limit: int) -> Any:
    length = request.headers.get("content-length")
    too_big = APIError(
        f"the request body is larger than this server's limit of {limit} bytes (--max-body-bytes)",
        400,
        code="request_too_large",
    )
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(
            f"We could not parse the JSON body of your request ({e}). The body must be JSON.",
            400,
            code="invalid_json",
        ) from e


def _playground_ids(state: State, body: Any) -> list[int]:
    if not isinstance(body, dict):
        raise APIError("the body must be a JSON object with 'text' or 'ids'")
    if isinstance(body.get("ids"), list) and body["ids"]:
        ids = body["ids"]
        if not all(isinstance(i, int) and 0 <= i < state.tokenizer.n_vocab for i in ids):
            raise APIError("'ids' must be token ids of the model's vocabulary", param="ids")
        return ids
    text = body.get("text", "")
    if not isinstance(text, str):
        raise APIError("'text' must be a string", param="text")
    return prompt_ids(state.tokenizer, text)[: state.limits.max_prompt_tokens * 4]


def _token_view(state: State, ids: list[int]) -> dict[str, Any]:
    tok = state.tokenizer
    return {
        "ids": ids,
        "pieces": look.labels(tok, ids),
        "texts": [protocol.token_text(tok, i) for i in ids],
    }


# ---- generation ----


async def _disconnected(request: Any) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class _Choice:
    lead: str = ""  # what is left to strip of a chat template's reply lead (its " ")
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: Any = None  # CompletionLogprobs, or a list of chat logprob entries


class _Run:
    """One HTTP request's engine requests (one per prompt) and what came back."""

    def __init__(self, state: State, parsed: Parsed, chat: bool) -> None:
        self.state, self.parsed, self.chat = state, parsed, chat
        self.id = protocol.new_id("chatcmpl" if chat else "cmpl")
        self.created = protocol.now()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.n = parsed.params.n
        lead = getattr(state.template, "reply_lead", "") if chat else ""
        self.choices = [_Choice(lead=lead or "") for _ in range(len(parsed.prompts) * self.n)]
        self.requests: list[EngineRequest] = []
        self.released = False

    def submit(self) -> None:
        loop = asyncio.get_running_loop()
        for i, prompt in enumerate(self.parsed.prompts):

            def emit(event, i=i) -> None:
                loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))

            r = EngineRequest(prompt, self.parsed.params, emit)
            self.requests.append(r)
        try:
            for r in self.requests:
                self.state.engine.submit(r)
        except (ValueError, RuntimeError) as e:
            self.cancel()
            status = 503 if isinstance(e, RuntimeError) else 400
            raise APIError(str(e), status) from e

    def cancel(self) -> None:
        for r in self.requests:
            if not r.done:
                self.state.engine.cancel(r)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.state.active -= 1
            self.cancel()

    async def events(self) -> AsyncIterator[tuple[int, Any]]:
        """(choice index or prompt index for PromptEvents, event) until every choice ended."""
        left = len(self.choices)
        while left:
            i, event = await self.queue.get()
            if isinstance(event, ErrorEvent):
                raise APIError(event.message, 500, code="engine_error")
            if isinstance(event, PromptEvent):
                yield i, event
                continue
            index = i * self.n + event.choice
            c = self.choices[index]
            if isinstance(event, TokenEvent | FinishEvent) and c.lead and event.text:
                event.text = _strip_lead(c, event.text)
            if isinstance(event, TokenEvent):
                c.tokens += 1
                c.text.append(event.text)
                self._add_logprob(c, event)
            elif isinstance(event, FinishEvent):
                c.text.append(event.text)
                c.tokens, c.finish_reason = event.tokens, event.reason
                left -= 1
            yield index, event

    def _add_logprob(self, c: _Choice, event: TokenEvent) -> None:
        if event.logprob is None:
            return
        tok = self.state.tokenizer
        if self.chat:
            c.logprobs = c.logprobs or []
            c.logprobs.append(
                protocol.chat_logprob(tok, event.token, event.logprob, event.top or [])
            )
        else:
            if c.logprobs is None:
                c.logprobs = protocol.CompletionLogprobs(tok)
            c.logprobs.add(event.token, event.logprob, event.top)

    def _echo(self, prompt_index: int, event: PromptEvent | None) -> tuple[str, Any]:
        """The echoed prompt of one prompt: its text, and its logprobs object (or None)."""
        tok = self.state.tokenizer
        ids = self.parsed.prompts[prompt_index]
        text = tok.decode(ids)
        if event is None:
            return text, None
        lp = protocol.CompletionLogprobs(tok)
        for t, logprob, top in zip(ids, event.logprobs, event.top):
            lp.add(t, logprob, top)
        return text, lp

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.parsed.prompts)
        return protocol.usage(prompt, sum(c.tokens for c in self.choices))

    async def collect(self) -> dict[str, Any]:
        prompt_lp: dict[int, PromptEvent] = {}
        try:
            async for index, event in self.events():
                if isinstance(event, PromptEvent):
                    prompt_lp[index] = event
        finally:
            self.release()
        choices = []
        for index, c in enumerate(self.choices):
            text = "".join(c.text)
            if self.chat:
                logprobs = None if c.logprobs is None else {"content": c.logprobs}
                choices.append(
                    {
                        "index": index,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs,
                        "finish_reason": c.finish_reason,
                    }
                )
                continue
            logprobs = None if c.logprobs is None else c.logprobs.body()
            if self.parsed.echo:
                prompt_index = index // self.n
                head, lp = self._echo(prompt_index, prompt_lp.get(prompt_index))
                text = head + text
                if lp is not None:
                    lp.offset = 0
                    body = lp.body()
                    if logprobs is not None:  # generated tokens' offsets follow the prompt's
                        shift = len(head)
                        logprobs["text_offset"] = [o + shift for o in logprobs["text_offset"]]
                        logprobs = {k: body[k] + logprobs[k] for k in body}
                    else:
                        logprobs = body
            choices.append(
                {
                    "text": text,
                    "index": index,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                }
            )
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.state.model_name,
            "choices": choices,
            "usage": self.usage(),
        }

    async def sse(self) -> AsyncIterator[bytes]:
        """The stream: one chunk per token, a last chunk per choice, usage if asked, [DONE]."""
        try:
            for chunk in self._first_chunks():
                yield _data(chunk)
            async for index, event in self.events():
                for chunk in self._chunks(index, event):
                    yield _data(chunk)
            if self.parsed.include_usage:
                yield _data(self._chunk([], usage=self.usage()))
        except APIError as e:
            yield _data(e.body())
        finally:
            self.release()
        yield b"data: [DONE]\n\n"

    def _chunk(self, choices: list, **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.state.model_name,
            "choices": choices,
            **extra,
        }

    def _first_chunks(self) -> list[dict[str, Any]]:
        if self.chat:
            return [
                self._chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
                for i in range(len(self.choices))
            ]
        if self.parsed.echo and not self.parsed.params.prompt_logprobs:
            return [
                self._text_chunk(i, self._echo(i // self.n, None)[0], None, None)
                for i in range(len(self.choices))
            ]
        return []

    def _text_chunk(self, index: int, text: str, logprobs: Any, finish: str | None) -> dict:
        if self.chat:
            delta = {"content": text} if text else {}
            return self._chunk(
                [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
            )
        return self._chunk(
            [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}]
        )

    def _chunks(self, index: int, event: Any) -> list[dict[str, Any]]:
        if isinstance(event, PromptEvent):  # echo with logprobs: the prompt, for each choice
            text, lp = self._echo(index, event)
            return [
                self._text_chunk(index * self.n + j, text, lp.body(), None) for j in range(self.n)
            ]
        c = self.choices[index]
        if isinstance(event, TokenEvent):
            logprobs = None
            if event.logprob is not None:
                if self.chat:
                    logprobs = {"content": [c.logprobs[-1]]}
                else:
                    one = protocol.CompletionLogprobs(self.state.tokenizer)
                    one.add(event.token, event.logprob, event.top)
                    logprobs = one.body()
            if not event.text and logprobs is None:
                return []
            return [self._text_chunk(index, event.text, logprobs, None)]
        out = []
        if self.chat and event.text:
            out.append(self._text_chunk(index, event.text, None, None))
            return [*out, self._text_chunk(index, "", None, event.reason)]
        return [self._text_chunk(index, event.text, None, event.reason)]


def _strip_lead(c: _Choice, text: str) -> str:
    """A chat reply's text without the template's reply lead, which may arrive in pieces."""
    n = 0
    while n < min(len(c.lead), len(text)) and text[n] == c.lead[n]:
        n += 1
    if n < min(len(c.lead), len(text)):  # the reply does not start with the lead after all
        c.lead = ""
        return text
    c.lead = c.lead[n:]
    return text[n:]


def _data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


# ---- the server ----


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class Server:
    """uvicorn serving one app on a bound socket. SIGINT or SIGTERM stops accepting connections
    and lets the requests in flight finish for up to `drain_seconds`, then stops; `on_signal`
    is told which signal came."""

    def __init__(
        self,
        app: Any,
        sock: socket.socket,
        drain_seconds: float = 5.0,
        on_signal: Callable[[str], None] | None = None,
    ) -> None:
        import uvicorn

        on_signal = on_signal or (lambda name: None)

        class _Uvicorn(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # noqa: ANN202 - uvicorn's hook
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return

                def stop(sig: int, frame: Any) -> None:
                    if self.should_exit:  # a second signal: stop now
                        self.force_exit = True
                    else:
                        on_signal(signal.Signals(sig).name)
                    self.should_exit = True

                old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for s, handler in old.items():
                        signal.signal(s, handler)

        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=drain_seconds,
            access_log=False,
        )
        self.uvicorn = _Uvicorn(config)
        self.sock = sock

    def run(self) -> None:
        """Serve until a signal (or `stop()`); returns after the drain."""
        self.uvicorn.run(sockets=[self.sock])

    def stop(self) -> None:
        self.uvicorn.should_exit = True
