"""A tiny GPT-2-vocabulary model on disk and a live `gpt2lab serve` on a free port.

The server runs in a thread of the test process (uvicorn on a real socket, the same `build()` as
the command); tests talk to it over HTTP with the official `openai` client and httpx.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

API_KEY = "test-key-123"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster, and immune to other jobs on the machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def save_tiny(path: Path, block_size: int = 64, seed: int = 0, chat: bool = False) -> Path:
    """A 2-layer GPT over GPT-2's vocabulary, written as a Hugging Face GPT-2 directory; with
    `chat`, the plain chat template (User: ... Assistant:) travels with its tokenizer."""
    from gpt2lab.config import GPTConfig
    from gpt2lab.model import GPT
    from gpt2lab.tokenizer import get_tokenizer

    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=block_size, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg).eval()
    with torch.no_grad():  # sharp distributions: greedy choices are far from ties
        for p in model.parameters():
            p.mul_(8)
    model.save_pretrained(path, tokenizer=get_tokenizer("gpt2"))
    if chat:
        from gpt2lab.tokenizer.chat import PLAIN

        PLAIN.save(path / "gpt2lab_tokenizer")
    return path


@pytest.fixture(scope="session")
def make_tiny():
    """save_tiny(path, block_size=64, seed=0) -> path."""
    return save_tiny


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("serve") / "tiny", chat=True)


def serve_args(model_dir: Path, *flags: str) -> argparse.Namespace:
    from gpt2lab.commands import serve

    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    return p.parse_args(["--model", str(model_dir), "--port", "0", "--dtype", "float32", *flags])


class Live:
    """A running server: its base URL, state (engine, limits) and a way to stop it."""

    def __init__(self, args: argparse.Namespace) -> None:
        import httpx

        from gpt2lab.commands import serve

        self.state, self.server = serve.build(args)
        self.url = serve.url(args.host, self.server.sock).rstrip("/")
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """/health once no slot is busy and nothing runs or waits (or the last one seen)."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if (h["busy_slots"], h["running"], h["waiting"]) == (0, 0, 0):
                return h
            if time.monotonic() > deadline:
                return h
            time.sleep(0.02)

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, **kw)

    def close(self) -> None:
        self.server.stop()
        self.thread.join(20)
        self.state.engine.close()


@pytest.fixture(scope="session")
def live(model_dir):
    pytest.importorskip("openai")
    pytest.importorskip("httpx")
    server = Live(
        serve_args(
            model_dir,
            "--api-key",
            API_KEY,
            "--max-batch",
            "8",
            "--max-n",
            "4",
            "--max-tokens",
            "48",
            "--max-concurrent",
            "6",
            "--max-body-bytes",
            "20000",
            "--prefill-chunk",
            "16",
        )
    )
    yield server
    server.close()


@pytest.fixture
def start_server(model_dir):
    """start_server(*flags) -> a Live server over the tiny model with more flags; stopped after."""
    pytest.importorskip("httpx")
    servers = []

    def start(*flags: str) -> Live:
        servers.append(Live(serve_args(model_dir, *flags)))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
