"""`gpt2lab serve`: an OpenAI-compatible HTTP server with continuous batching, and a playground."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

import torch

from gpt2lab.batching import default_max_len, model_dtype
from gpt2lab.budget import estimate_inference, require, require_model
from gpt2lab.checkpoint.load import peek_config
from gpt2lab.commands.sample import add_model_arguments, load_model_for, sample_config
from gpt2lab.device import pick_device, pick_dtype
from gpt2lab.errors import GPT2LabError, UsageError, mark_key
from gpt2lab.serve.app import Server, State, bind, create_app, missing_packages
from gpt2lab.serve.engine import Engine
from gpt2lab.serve.protocol import Limits
from gpt2lab.tokenizer.chat import load_chat_template

EXAMPLES = """
gpt2lab serve --model runs/sc                        # http://127.0.0.1:8000/ (playground)
gpt2lab serve --model hf/gpt2 --port 8080 --max-batch 8
gpt2lab serve --model runs/chat --host 0.0.0.0 --api-key $(openssl rand -hex 16)
curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
    -d '{"prompt": "ROMEO:", "max_tokens": 32, "temperature": 0}'
python -c 'from openai import OpenAI; c = OpenAI(base_url="http://127.0.0.1:8000/v1", \\
    api_key="none"); print(c.completions.create(model="m", prompt="Hi").choices[0].text)'
"""

LOCALHOST = {"localhost", "127.0.0.1", "::1"}
_LIMITS = Limits()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    g = p.add_argument_group("network")
    g.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only); beyond localhost "
        "an API key is required unless --insecure",
    )
    g.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free one)")
    g.add_argument(
        "--api-key",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every API route (default: the "
        "GPT2LAB_API_KEY environment variable, else none)",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening beyond localhost without an API key",
    )
    g.add_argument(
        "--model-name",
        metavar="NAME",
        help="the model's id in /v1/models and responses (default: the model directory's name)",
    )
    g = p.add_argument_group("batching")
    g.add_argument(
        "--max-batch",
        type=int,
        default=16,
        metavar="N",
        help="sequences decoded together: the KV cache's rows (default 16)",
    )
    g.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for the model (default: PyTorch's, one per core; on a machine other "
        "jobs share, fewer can be much faster)",
    )
    g.add_argument(
        "--prefill-chunk",
        type=int,
        default=128,
        metavar="N",
        help="prompt tokens run per step while others decode (default 128)",
    )
    g = p.add_argument_group("limits (past one: HTTP 400, or 429 for --max-concurrent)")
    g.add_argument(
        "--max-body-bytes",
        type=int,
        default=_LIMITS.max_body_bytes,
        metavar="N",
        help=f"largest request body (default {_LIMITS.max_body_bytes})",
    )
    g.add_argument(
        "--max-prompt-tokens",
        type=int,
        metavar="N",
        help="longest prompt in tokens (default: the model's context)",
    )
    g.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help="largest max_tokens a request may ask for (default: the model's context)",
    )
    g.add_argument(
        "--max-n",
        type=int,
        metavar="N",
        help=f"most choices per request, n x prompts (default {_LIMITS.max_n}, at most "
        "--max-batch)",
    )
    g.add_argument(
        "--max-concurrent",
        type=int,
        default=_LIMITS.max_concurrent,
        metavar="N",
        help="generation requests in flight, running or queued; more get HTTP 429 "
        f"(default {_LIMITS.max_concurrent})",
    )
    g.add_argument(
        "--drain-seconds",
        type=float,
        default=5.0,
        metavar="S",
        help="on SIGINT/SIGTERM, let requests in flight finish for this long (default 5)",
    )


def run(args: argparse.Namespace) -> int:
    state, server = build(args)
    print(
        f"gpt2lab serve: {state.model_name} at {url(args.host, server.sock)} "
        f"(OpenAI API at /v1, playground at /); Ctrl-C stops",
        flush=True,
    )
    if state.api_key is None and not is_local(args.host):
        print(
            f"gpt2lab: warning: listening on {args.host} without an API key (--insecure): "
            "whoever reaches this port can use the model",
            file=sys.stderr,
            flush=True,
        )
    try:
        server.run()
    finally:
        state.engine.close()
    print("gpt2lab serve: stopped", file=sys.stderr, flush=True)
    return 0


def url(host: str, sock: Any) -> str:
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def build(args: argparse.Namespace) -> tuple[State, Server]:
    """Check the flags, load the model, start the engine, bind the socket: (state, server)."""
    missing = missing_packages()
    if missing:
        raise UsageError(
            f"gpt2lab serve needs {' and '.join(missing)}, which are not installed",
            fix="pip install 'gpt2lab[serve]'",
        )
    key = args.api_key or os.environ.get("GPT2LAB_API_KEY") or None
    if not is_local(args.host) and key is None and not args.insecure:
        raise UsageError(
            f"--host {args.host} lets other machines reach the server, and it has no API key",
            "an API key for a server beyond localhost",
            "add --api-key KEY (or set GPT2LAB_API_KEY), or --insecure to serve without one",
        )
    for name in ("max_batch", "prefill_chunk", "max_body_bytes", "max_concurrent"):
        _positive(args, name)
    if args.threads is not None:
        _positive(args, "threads")
    if args.max_n is None:
        args.max_n = min(_LIMITS.max_n, args.max_batch)
    for name in ("max_n", "max_prompt_tokens", "max_tokens"):
        if getattr(args, name) is not None:
            _positive(args, name)
    if args.max_n > args.max_batch:
        raise UsageError(
            f"--max-n {args.max_n} is more than --max-batch {args.max_batch}",
            "a request's n choices decode together, so n <= --max-batch",
            f"lower --max-n or raise --max-batch to {args.max_n}",
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = sample_config(args)
    check_memory(args.model, cfg, args.max_batch, args.prefill_chunk, before_loading=True)
    model, tok = load_model_for(args.model, cfg)
    check_memory(model, cfg, args.max_batch, args.prefill_chunk)
    context = model.config.block_size
    limits = Limits(
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=min(args.max_prompt_tokens or context, context),
        max_tokens=min(args.max_tokens or context, context),
        max_n=args.max_n,
        max_concurrent=args.max_concurrent,
    )
    template = load_chat_template(args.model)  # None: a completion model (chat gets a 400)
    name = args.model_name or Path(args.model).resolve().name or str(args.model)
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        raise UsageError(
            f"cannot listen on {args.host}:{args.port} ({e.strerror or e})",
            fix="choose another --port (or stop what is using it)",
        ) from e
    engine = Engine(model, tok, slots=args.max_batch, prefill_chunk=args.prefill_chunk).start()
    state = State(engine, tok, name, limits, key, template)

    def on_signal(signal_name: str) -> None:
        print(
            f"gpt2lab serve: {signal_name}: no new connections; finishing {state.active} "
            f"requests in flight (up to {args.drain_seconds:g} s)",
            file=sys.stderr,
            flush=True,
        )

    return state, Server(create_app(state), sock, args.drain_seconds, on_signal)


def is_local(host: str) -> bool:
    if host in LOCALHOST:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_memory(
    model: Any, cfg: Any, slots: int, chunk: int, before_loading: bool = False
) -> None:
    """Refuse, in one line, a server that cannot fit: the weights (before loading, from the
    config alone: a config.json may claim anything), the KV cache of --max-batch slots of a
    context and a quarter, and a prefill chunk's forward pass (gpt2lab.budget)."""
    try:
        mcfg = peek_config(model) if before_loading else model.config
    except GPT2LabError:  # not a model: loading it says so in its own words
        return
    if mcfg is None:  # a hub name: checked once loaded
        return
    device = pick_device(cfg.device, key="device")
    if before_loading:
        dtype = (
            pick_dtype(cfg.dtype, device, key="dtype") if cfg.dtype != "float16" else torch.float16
        )
        require_model(mcfg, device, dtype, source=str(model))
    else:
        dtype = model_dtype(model)
    columns = default_max_len(mcfg.block_size)
    cache = estimate_inference(mcfg, slots, columns, 0, dtype).kv_cache  # capped at the block
    cache = cache * columns // mcfg.block_size
    step = estimate_inference(mcfg, max(chunk, slots), 1, 0, dtype, kv_cache=False)
    prefill = estimate_inference(mcfg, 1, min(chunk, mcfg.block_size), 0, dtype)
    need = cache + prefill.kv_cache + 3 * max(step.logits, prefill.logits)  # logits, softmax
    need += max(step.activations, prefill.activations) + (prefill.weights if before_loading else 0)
    require(
        need,
        device,
        f"serving --max-batch {slots} x {columns:,} tokens (KV cache {cache / 2**30:.2f} GiB"
        + (f", weights {prefill.weights / 2**30:.2f} GiB" if before_loading else "")
        + ")",
        "lower --max-batch (or use --dtype bfloat16)",
    )


def _positive(args: argparse.Namespace, name: str) -> None:
    value = getattr(args, name)
    if value < 1:
        raise UsageError(f"{mark_key(name, value)} is out of range", "an integer >= 1")
