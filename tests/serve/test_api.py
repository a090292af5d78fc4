"""The OpenAI API of `gpt2lab serve`, used as people use it: the official `openai` client (and
plain HTTP for what a client never sends) against a live server, checked against transformers
and `gpt2lab sample`."""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gpt2lab import cli

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

PROMPTS = ["Hello", "The quick brown fox", "Once upon a time there was", "1 2 3 4"]


@pytest.fixture(scope="module")
def hf_model(model_dir):
    """The same weights in transformers: the independent reference."""
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def tok():
    from gpt2lab.tokenizer import get_tokenizer

    return get_tokenizer("gpt2")


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=50256
        )
    return out[0, len(ids) :].tolist()


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """(T, V) log-probabilities of the token after each position."""
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def post(live, path: str, body, headers=None, raw: bytes | None = None) -> httpx.Response:
    h = {**live.headers, **(headers or {})}
    if raw is not None:
        return httpx.post(live.url + path, content=raw, headers=h, timeout=30)
    return httpx.post(live.url + path, json=body, headers=h, timeout=30)


def sse(live, body) -> list[dict]:
    """The data objects of a streamed response, which must end in [DONE]."""
    with httpx.stream(
        "POST", live.url + "/v1/completions", json=body, headers=live.headers, timeout=30
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def test_greedy_completion_is_transformers_greedy(live, hf_model, tok):
    c = live.client()
    for prompt in PROMPTS[:2]:
        r = c.completions.create(
            model="tiny", prompt=prompt, max_tokens=20, temperature=0, user="tester"
        )
        ids = tok.encode_ordinary(prompt)
        want = hf_greedy(hf_model, ids, 20)
        stop = want.index(50256) if 50256 in want else len(want)
        assert r.choices[0].text == tok.decode(want[:stop])
        assert r.choices[0].finish_reason == ("stop" if stop < len(want) else "length")
        assert r.usage.prompt_tokens == len(ids)
        assert r.usage.completion_tokens == min(stop + 1, 20)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.model == "tiny" and r.object == "text_completion" and r.id.startswith("cmpl-")


def test_greedy_completion_equals_gpt2lab_sample(live, model_dir, capsys):
    prompt = "Once upon a time there was"
    code = cli.main(
        ["sample", "--model", str(model_dir), "-p", prompt, "-m", "30"]
        + ["--temperature", "0", "--dtype", "float32", "--json"]
    )
    assert code == 0
    sampled = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    r = live.client().completions.create(model="x", prompt=prompt, max_tokens=30, temperature=0)
    assert r.choices[0].text == sampled["text"]
    assert r.choices[0].finish_reason == {"eos": "stop"}.get(
        sampled["finish_reason"], sampled["finish_reason"]
    )


def test_a_list_of_prompts_gets_one_choice_each_in_order(live, hf_model, tok):
    r = live.client().completions.create(model="x", prompt=PROMPTS, max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c, prompt in zip(r.choices, PROMPTS):
        want = hf_greedy(hf_model, tok.encode_ordinary(prompt), 8)
        stop = want.index(50256) if 50256 in want else len(want)
        assert c.text == tok.decode(want[:stop])
    ids = live.client().completions.create(
        model="x", prompt=[tok.encode_ordinary(p) for p in PROMPTS[:2]], max_tokens=8, temperature=0
    )
    assert [c.text for c in ids.choices] == [c.text for c in r.choices[:2]]


def test_the_stream_concatenates_to_the_whole_response(live):
    body = {"prompt": "The quick brown fox", "max_tokens": 40, "temperature": 0}
    whole = post(live, "/v1/completions", body).json()
    chunks = sse(live, {**body, "stream": True, "logprobs": 0})
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert all(ch["choices"][0]["finish_reason"] is None for ch in chunks[:-1])
    # one token per chunk, none lost or repeated: the same tokens as the whole response's
    streamed = [
        t
        for ch in chunks
        if ch["choices"][0]["logprobs"]
        for t in ch["choices"][0]["logprobs"]["tokens"]
    ]
    whole_lp = post(live, "/v1/completions", {**body, "logprobs": 0}).json()
    assert streamed == whole_lp["choices"][0]["logprobs"]["tokens"]
    assert all(ch["id"] == chunks[0]["id"] and ch["object"] == "text_completion" for ch in chunks)


def test_the_openai_client_streams_and_reports_usage(live):
    c = live.client()
    stream = c.completions.create(
        model="x",
        prompt="Hello",
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    whole = c.completions.create(model="x", prompt="Hello", max_tokens=12, temperature=0)
    assert text == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_n_choices_are_seeded_per_choice(live):
    c = live.client()
    kw = dict(model="x", prompt="Hello", max_tokens=16, temperature=1.0, seed=7)
    r = c.completions.create(n=3, **kw)
    again = c.completions.create(n=3, **kw)
    single = c.completions.create(n=1, **kw)
    texts = [ch.text for ch in r.choices]
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert texts == [ch.text for ch in again.choices]  # a seed repeats
    assert len(set(texts)) > 1  # the choices differ
    assert single.choices[0].text == texts[0]  # choice i draws from seed + i
    other = c.completions.create(n=1, **{**kw, "seed": 8})
    assert other.choices[0].text == texts[1]
    assert r.usage.prompt_tokens == 1  # the prompt counts once, not once per choice
    assert 3 <= r.usage.completion_tokens <= 48


def test_stop_strings_end_the_text_before_them(live):
    c = live.client()
    full = c.completions.create(model="x", prompt="Hello", max_tokens=30, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    r = c.completions.create(model="x", prompt="Hello", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    chunks = sse(
        live, {"prompt": "Hello", "max_tokens": 30, "temperature": 0, "stop": stop, "stream": True}
    )
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == text[: text.index(stop)]


def test_logprobs_are_the_models_and_the_top_ones_are_sorted(live, hf_model, tok):
    r = live.client().completions.create(
        model="x", prompt="The quick brown fox", max_tokens=10, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    prompt = tok.encode_ordinary("The quick brown fox")
    generated = hf_greedy(hf_model, prompt, 10)
    stop = generated.index(50256) if 50256 in generated else 10
    ref = hf_logprobs(hf_model, prompt + generated)
    for i, token in enumerate(generated[:stop]):
        want = float(ref[len(prompt) - 1 + i, token])
        assert lp.token_logprobs[i] == pytest.approx(want, abs=1e-3)
        top = lp.top_logprobs[i]
        assert len(top) <= 3 and max(top.values()) == pytest.approx(want, abs=1e-3)
        values = list(top.values())
        assert values == sorted(values, reverse=True)
    assert lp.tokens[:stop] == [tok.decode([t]) for t in generated[:stop]]
    assert lp.text_offset[0] == 0


def test_echo_returns_the_prompt_and_its_logprobs(live, hf_model, tok):
    prompt = "Once upon a time there was"
    ids = tok.encode_ordinary(prompt)
    r = live.client().completions.create(
        model="x", prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=1
    )
    ch = r.choices[0]
    assert ch.text.startswith(prompt)
    lp = ch.logprobs
    assert lp.tokens[: len(ids)] == [tok.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = hf_logprobs(hf_model, ids)
    for j in range(1, len(ids)):
        assert lp.token_logprobs[j] == pytest.approx(float(ref[j - 1, ids[j]]), abs=1e-3)
    assert lp.text_offset[: len(ids)] == [len(tok.decode(ids[:j])) for j in range(len(ids))]
    plain = live.client().completions.create(model="x", prompt=prompt, max_tokens=0, echo=True)
    assert plain.choices[0].text == prompt and plain.usage.completion_tokens == 0
    chunks = sse(
        live, {"prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": True, "stream": True}
    )
    assert "".join(c["choices"][0]["text"] for c in chunks) == ch.text


def test_models_and_health(live):
    models = live.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    h = live.health()
    assert h["status"] == "ok" and h["slots"] == 8


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
]


def hf_chat_reply(hf_model, model_dir, messages, n: int) -> str:
    """The greedy reply, with the prompt made by transformers' apply_chat_template from the
    template's Jinja and the reply cut as the template says (stop strings, reply lead)."""
    transformers = pytest.importorskip("transformers")
    from gpt2lab.tokenizer.chat import load_chat_template

    template = load_chat_template(model_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = hf_tok.apply_chat_template(
        messages, chat_template=template.to_jinja(), add_generation_prompt=True, tokenize=True
    )
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    out = hf_greedy(hf_model, ids, n)
    stop = out.index(50256) if 50256 in out else len(out)
    return template.parse_reply(hf_tok.decode(out[:stop]))


def test_chat_greedy_reply_is_transformers_with_the_template(live, hf_model, model_dir):
    r = live.client().chat.completions.create(
        model="x", messages=MESSAGES, max_tokens=24, temperature=0
    )
    ch = r.choices[0]
    assert ch.message.role == "assistant"
    assert ch.message.content == hf_chat_reply(hf_model, model_dir, MESSAGES, 24)
    assert len(ch.message.content) > 10 and not ch.message.content.startswith(" ")
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streams_the_same_reply(live):
    c = live.client()
    kw = dict(model="x", messages=MESSAGES, max_tokens=24, temperature=0)
    whole = c.chat.completions.create(**kw).choices[0]
    chunks = list(c.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)


def test_chat_n_and_logprobs(live):
    r = live.client().chat.completions.create(
        model="x",
        messages=MESSAGES,
        max_tokens=8,
        temperature=1.0,
        seed=3,
        n=2,
        logprobs=True,
        top_logprobs=3,
    )
    assert [ch.index for ch in r.choices] == [0, 1]
    for ch in r.choices:
        content = ch.logprobs.content
        assert content and all(len(e.top_logprobs) == 3 for e in content)
        for e in content:
            assert e.logprob <= 0 and bytes(e.bytes) == e.token.encode()
            assert e.top_logprobs[0].logprob >= e.logprob - 1e-6


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hi",
        [{"role": "robot", "content": "hi"}],
        [{"role": "user", "content": 5}],
        [{"content": "hi"}],
    ],
)
def test_bad_chat_messages_are_400(live, messages):
    r = post(live, "/v1/chat/completions", {"messages": messages})
    err = error_of(r, 400)
    assert err["param"].startswith("messages")


def test_chat_without_a_chat_template_is_a_clear_400(live, tmp_path):
    from gpt2lab.tokenizer.chat import load_chat_template

    plain = live.state.template
    assert load_chat_template(tmp_path) is None  # a model directory without a template
    live.state.template = None
    try:
        with pytest.raises(openai.BadRequestError) as e:
            live.client().chat.completions.create(
                model="x", messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        live.state.template = plain
    assert e.value.status_code == 400
    assert "chat template" in e.value.body["message"]
    assert e.value.body["code"] == "no_chat_template"


def error_of(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "stream": "yes"}, "stream"),
        ({"prompt": "hi", "n": 1.5}, "n"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "hi", "temperature": 2.5}, "temperature"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "n": 5}, "n"),  # the server's --max-n 4
        ({"prompt": "hi", "logprobs": 6}, "logprobs"),
        ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 49}, "max_tokens"),  # the server's --max-tokens 48
        ({"prompt": "hi", "frobnicate": 1}, "frobnicate"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": [99999999]}, "prompt"),
        ({"max_tokens": 3}, "prompt"),
    ],
)
def test_bad_requests_get_openai_error_json(live, body, param):
    err = error_of(post(live, "/v1/completions", body), 400, param)
    assert err["type"] == "invalid_request_error"


def test_bad_json_and_too_long_prompts_are_400(live):
    error_of(post(live, "/v1/completions", None, raw=b'{"prompt": "hi",'), 400)
    error_of(post(live, "/v1/completions", None, raw=b"[1, 2]"), 400)
    long = " ".join(["word"] * 80)  # more tokens than the model's context of 64
    err = error_of(post(live, "/v1/completions", {"prompt": long}), 400, "prompt")
    assert err["code"] == "context_length_exceeded" and "64" in err["message"]
    # a prompt that fits, with more new tokens than the context has room for
    err = error_of(
        post(live, "/v1/completions", {"prompt": " ".join(["word"] * 30), "max_tokens": 40}),
        400,
        "max_tokens",
    )
    assert err["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        live.client().completions.create(model="x", prompt=long, max_tokens=4)


def test_the_body_size_limit_is_a_400_not_a_crash(live):
    err = error_of(post(live, "/v1/completions", {"prompt": "x" * 30000}), 400)
    assert err["code"] == "request_too_large"
    assert live.health()["status"] == "ok"


def test_every_api_route_needs_the_key(live):
    for path in ("/v1/models", "/api/info"):
        error_of(httpx.get(live.url + path), 401)
        assert httpx.get(live.url + path, headers=live.headers).status_code == 200
    error_of(post(live, "/v1/completions", {"prompt": "hi"}, {"Authorization": "Bearer no"}), 401)
    for path in ("/v1/completions", "/v1/chat/completions", "/api/tokenize", "/api/attention"):
        error_of(httpx.post(live.url + path, json={}), 401)
    with pytest.raises(openai.AuthenticationError):
        from openai import OpenAI

        OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(live.url + "/health").status_code == 200  # no key: for load balancers


def test_unknown_routes_and_methods_are_openai_errors(live):
    error_of(httpx.get(live.url + "/v1/nothing", headers=live.headers), 404)
    error_of(httpx.get(live.url + "/v1/completions", headers=live.headers), 405)


def raw_get(live, path: str) -> tuple[int, bytes]:
    """GET a path exactly as written (no client-side normalisation of `..`)."""
    host, port = live.url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("GET", path, skip_accept_encoding=True)
    conn.endheaders()
    r = conn.getresponse()
    return r.status, r.read()


@pytest.mark.parametrize(
    "path",
    [
        "/static/../app.py",
        "/static/../../serve/app.py",
        "/static/%2e%2e/app.py",
        "/static/..%2fapp.py",
        "/static/%2e%2e%2f%2e%2e%2f__init__.py",
        "/static//etc/passwd",
        "/static/%2fetc%2fpasswd",
        "/static/..\\app.py",
        "/static/.",
        "/static/",
        "/static/nothing.js",
        "/../../../../etc/passwd",
    ],
)
def test_static_files_never_leave_the_package_directory(live, path):
    status, body = raw_get(live, path)
    assert status in (400, 404)
    assert b"create_app" not in body and b"root:" not in body


def test_the_static_guard_refuses_links_that_lead_out(tmp_path, monkeypatch):
    from gpt2lab.serve import app

    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "ok.js").write_text("1")
    (tmp_path / "secret.txt").write_text("s")
    (tmp_path / "static" / "link.txt").symlink_to(tmp_path / "secret.txt")
    monkeypatch.setattr(app, "STATIC", tmp_path / "static")
    assert app.static_file("ok.js") == (tmp_path / "static" / "ok.js").resolve()
    for name in ("link.txt", "../secret.txt", str(tmp_path / "secret.txt"), "", "a\x00b"):
        assert app.static_file(name) is None


def test_the_playground_page_is_served(live):
    r = httpx.get(live.url + "/")
    assert r.status_code == 200 and "<html" in r.text.lower()
    for name in ("app.js", "style.css"):
        assert httpx.get(live.url + "/static/" + name).status_code == 200


def test_tokenize_and_attention_endpoints(live, tok):
    r = post(live, "/api/tokenize", {"text": "Hello world"}).json()
    assert r["ids"] == tok.encode_ordinary("Hello world")
    assert r["texts"] == ["Hello", " world"]
    a = post(live, "/api/attention", {"text": "Hello world again", "layer": 1, "head": 1}).json()
    grid = torch.tensor(a["attention"])
    assert grid.shape == (3, 3) and a["n_layer"] == 2 and a["n_head"] == 2
    assert torch.allclose(grid.sum(-1), torch.ones(3), atol=1e-3)
    assert torch.all(grid.triu(1) == 0)  # causal
    error_of(post(live, "/api/attention", {"text": "Hi", "layer": 2, "head": 0}), 400, "layer")


def paused(live):
    """A context in which the engine thread waits (between steps) until the block ends."""
    gate = threading.Event()
    started = threading.Event()

    class Pause:
        def __enter__(self):
            live.state.engine.call(lambda: (started.set(), gate.wait(30)))
            assert started.wait(10)
            return self

        def __exit__(self, *exc):
            gate.set()

    return Pause()


def test_too_many_concurrent_requests_get_429_and_then_run(live):
    body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}
    with ThreadPoolExecutor(6) as pool:
        with paused(live):  # the 6 requests wait in the engine, in flight
            futures = [pool.submit(post, live, "/v1/completions", body) for _ in range(6)]
            deadline = time.monotonic() + 10
            while live.state.active < 6 and time.monotonic() < deadline:
                time.sleep(0.01)
            t0 = time.monotonic()  # the event loop answers while the engine thread is busy
            assert live.health()["waiting"] + live.health()["queued"] >= 1
            assert time.monotonic() - t0 < 2
            err = error_of(post(live, "/v1/completions", body), 429)
            assert "--max-concurrent" in err["message"]
            with pytest.raises(openai.RateLimitError):
                live.client().completions.create(model="x", prompt="hi", max_tokens=2)
    assert [f.result().status_code for f in futures] == [200] * 6
    assert live.wait_idle()["busy_slots"] == 0


def test_a_client_that_disconnects_frees_its_slot_at_once(live):
    engine = live.state.engine
    step = engine.cache.step

    def slow_step(tokens):  # ~50 tokens take seconds: the stream is still going when cut
        time.sleep(0.05)
        return step(tokens)

    engine.cache.step = slow_step
    try:
        body = {"prompt": "Hello", "max_tokens": 48, "temperature": 0, "stream": True}
        tokens_before = engine.tokens
        with httpx.stream(
            "POST", live.url + "/v1/completions", json=body, headers=live.headers, timeout=30
        ) as r:
            lines = r.iter_lines()
            first = next(ln for ln in lines if ln)
            assert first.startswith("data: ")
            assert live.health()["busy_slots"] == 1
        # the connection is closed: the row is freed within a step or two, long before 48
        t0 = time.monotonic()
        h = live.wait_idle(timeout=2)
        assert h["busy_slots"] == 0 and h["running"] == 0, h
        assert time.monotonic() - t0 < 1.0
        assert engine.tokens - tokens_before < 40
        # a non-streaming request whose client gives up is freed too
        with pytest.raises(httpx.ReadTimeout):
            post_body = {"prompt": "Hello", "max_tokens": 48, "temperature": 0}
            httpx.post(
                live.url + "/v1/completions", json=post_body, headers=live.headers, timeout=0.5
            )
        h = live.wait_idle(timeout=2)
        assert h["busy_slots"] == 0 and h["running"] == 0, h
    finally:
        engine.cache.step = step


def test_concurrent_streams_lose_and_repeat_nothing(live):
    """The load test, small: 4 clients x 3 streams each, all greedy, checked token by token
    against each prompt's response computed alone, beside a client that walks away from two
    streams; every slot is free at the end."""
    prompts = [f"{p} {i}" for i, p in enumerate(PROMPTS * 3)]
    body = {"max_tokens": 24, "temperature": 0, "logprobs": 0}
    alone = {
        p: post(live, "/v1/completions", {**body, "prompt": p}).json()["choices"][0]
        for p in prompts
    }

    def client(mine: list[str]) -> list[tuple[str, str, list[str]]]:
        out = []
        for p in mine:
            chunks = sse(live, {**body, "prompt": p, "stream": True})
            text = "".join(c["choices"][0]["text"] for c in chunks)
            tokens = [
                t
                for c in chunks
                if c["choices"][0]["logprobs"]
                for t in c["choices"][0]["logprobs"]["tokens"]
            ]
            out.append((p, text, tokens))
        return out

    def quitter() -> int:  # two streams cut after their first tokens, while the others run
        cut = 0
        for p in prompts[:2]:
            with httpx.stream(
                "POST",
                live.url + "/v1/completions",
                json={**body, "prompt": p, "stream": True},
                headers=live.headers,
                timeout=30,
            ) as r:
                cut += next(ln for ln in r.iter_lines() if ln).startswith("data: ")
        return cut

    with ThreadPoolExecutor(5) as pool:
        cutting = pool.submit(quitter)
        results = [
            r for f in [pool.submit(client, prompts[i::4]) for i in range(4)] for r in f.result()
        ]
        assert cutting.result() == 2
    assert len(results) == len(prompts)
    for p, text, tokens in results:
        assert text == alone[p]["text"]
        assert tokens == alone[p]["logprobs"]["tokens"]
    assert live.state.engine.steps > 0
    assert live.wait_idle()["busy_slots"] == 0


def test_quantized_serving_equals_quantized_sampling(start_server, model_dir, capsys):
    """--quantize comes from `gpt2lab sample`'s options: the same int8 model either way. (Two
    samples, so that sampling takes the batched int8 products the server takes; one sequence
    alone decodes through decode.c's weight-only int8, docs/performance.md.)"""
    prompt = "The quick brown fox"
    code = cli.main(
        ["sample", "--model", str(model_dir), "-p", prompt, "-m", "16", "--quantize", "int8"]
        + ["--temperature", "0", "--dtype", "float32", "--json", "--num-samples", "2"]
    )
    assert code == 0
    sampled = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    server = start_server("--quantize", "int8")
    from gpt2lab.quantize import Int8Linear

    assert isinstance(server.state.model.lm_head, Int8Linear)
    r = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": prompt, "max_tokens": 16, "temperature": 0},
        timeout=30,
    ).json()
    assert r["choices"][0]["text"] == sampled["text"]


def test_an_unexpected_failure_is_a_500_in_openai_json(live, monkeypatch):
    from gpt2lab.serve import protocol

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(protocol, "parse_completion", broken)
    err = error_of(post(live, "/v1/completions", {"prompt": "hi"}), 500)
    assert "boom" in err["message"] and err["type"] == "server_error"
    monkeypatch.undo()
    assert post(live, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200
