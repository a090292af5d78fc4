"""Serving under load: `gpt2lab serve` with N concurrent streaming clients, beside llama.cpp's
`llama-server` on the same weights when a llama-server binary is given or found.

The 124M shape with random weights (GGUF for llama.cpp at the same precision), clients at
127.0.0.1 each sending streamed /v1/completions requests one after another: a 16-token prompt
(random ids, so no prompt cache helps), `--max-tokens` new tokens at temperature 1. Per
concurrency level N (1, 4, 8, 16): aggregate tokens/s over the level's wall time, time to first
token (TTFT) and the gaps between a stream's tokens (per-token latency), p50 and p99. Requests
per client and seconds per level are bounded. The goal for gpt2lab on this CPU: at N = 8,
aggregate tokens/s at least 4x N = 1, and p99 TTFT under 2 s.

    .venv/bin/python bench/serve.py                   # both servers, N = 1 4 8 16
    .venv/bin/python bench/serve.py --quick           # a short run that checks everything works
    .venv/bin/python bench/serve.py --llama-server ~/llama.cpp/build/bin/llama-server

llama-server is not built by `pip`; build it from llama.cpp's source (`cmake -B build
-DLLAMA_CURL=OFF && cmake --build build --target llama-server`, ~25 minutes on 2 busy cores).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from gpt2lab.config import GPTConfig
from gpt2lab.device import pick_device, pick_dtype
from gpt2lab.model import GPT
from gpt2lab.tokenizer import get_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sample import Bandwidth, weight_bytes_per_step  # noqa: E402 - bench/sample.py

PROMPT_TOKENS = 16


@dataclass
class Stream:
    """One request's timings: when it was sent, when each token arrived."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.sent

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def stream_once(url: str, body: dict) -> Stream:
    s = Stream(time.perf_counter())
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {r.read()[:200]!r}"
                return s
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or []
                if choices and (choices[0].get("text") or choices[0].get("logprobs")):
                    s.arrivals.append(time.perf_counter())
    except httpx.HTTPError as e:
        s.error = f"{type(e).__name__}: {e}"
    if not s.arrivals and s.error is None:
        s.error = "no tokens"
    return s


def run_level(url: str, n: int, args, extra: dict, seed: int) -> tuple[list[Stream], float]:
    """N clients, each sending up to args.requests requests in turn within args.seconds; the
    streams and the wall time."""
    rng = random.Random(seed)
    streams: list[Stream] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + args.seconds

    def client() -> None:
        for _ in range(args.requests):
            if time.perf_counter() > stop_at:
                return
            with lock:
                prompt = [rng.randrange(256, 50000) for _ in range(PROMPT_TOKENS)]
            body = {
                "prompt": prompt,
                "max_tokens": args.max_tokens,
                "temperature": 1.0,
                "stream": True,
                **extra,
            }
            s = stream_once(url, body)
            with lock:
                streams.append(s)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return streams, time.perf_counter() - t0


def summarize(n: int, runs: list[tuple[list[Stream], float]]) -> dict:
    """Aggregate tokens/s of each run (median, min, max); latencies pooled over the runs."""
    rates = []
    ok: list[Stream] = []
    errors = []
    for streams, wall in runs:
        good = [s for s in streams if s.error is None]
        rates.append(sum(len(s.arrivals) for s in good) / wall)
        ok += good
        errors += [s.error for s in streams if s.error]
    gaps = [g for s in ok for g in s.gaps()]
    return {
        "n": n,
        "requests": sum(len(streams) for streams, _ in runs),
        "tokens": sum(len(s.arrivals) for s in ok),
        "errors": errors,
        "tok_s": statistics.median(rates),
        "tok_s_min": min(rates),
        "tok_s_max": max(rates),
        "ttft_p50": percentile([s.ttft for s in ok], 50),
        "ttft_p99": percentile([s.ttft for s in ok], 99),
        "itl_p50": percentile(gaps, 50),
        "itl_p99": percentile(gaps, 99),
    }


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not come up")


def start_gpt2lab(model_dir: Path, args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "gpt2lab", "serve", "--model", str(model_dir), "--port", "0"]
    cmd += ["--max-batch", str(max(args.levels)), "--dtype", args.dtype]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if " at " not in line:
        proc.kill()
        raise RuntimeError(f"gpt2lab serve did not start: {line!r}")
    url = line.split(" at ")[1].split()[0].rstrip("/")
    wait_ready(url, proc)
    return proc, url


def start_llama(binary: str, gguf: Path, args, port: int) -> tuple[subprocess.Popen, str]:
    slots = max(args.levels)
    per_slot = 2 ** (PROMPT_TOKENS + args.max_tokens + 8).bit_length()
    cmd = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    threads = str(args.threads or os.cpu_count() or 1)
    cmd += ["-np", str(slots), "-c", str(slots * per_slot), "-t", threads, "-tb", threads]
    cmd += ["--no-webui", "-cb"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_llama_server(given: str | None) -> str | None:
    if given:
        return given
    for candidate in (shutil.which("llama-server"), os.environ.get("LLAMA_SERVER")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def bench(name: str, url: str, args, extra: dict) -> list[dict]:
    stream_once(url, {"prompt": [464] * PROMPT_TOKENS, "max_tokens": 4, "stream": True})
    rows = []
    for n in args.levels:
        runs = [run_level(url, n, args, extra, seed=100 * n + r) for r in range(args.repeat)]
        row = summarize(n, runs)
        rows.append(row)
        base = rows[0]["tok_s"]
        spread = f" ({row['tok_s_min']:.1f}-{row['tok_s_max']:.1f})" if args.repeat > 1 else ""
        print(
            f"{name:<12} N={n:<3} {row['requests']:>3} req {row['tokens']:>5} tok "
            f"{row['tok_s']:7.1f} tok/s{spread} = {row['tok_s'] / base:4.1f}x N=1  "
            f"TTFT p50 {row['ttft_p50']:.2f} p99 {row['ttft_p99']:.2f} s  "
            f"per-token p50 {1000 * row['itl_p50']:.0f} p99 {1000 * row['itl_p99']:.0f} ms"
            + (f"  ERRORS {len(row['errors'])}: {row['errors'][0]}" if row["errors"] else ""),
            flush=True,
        )
    return rows


def decode_limit(dtype: torch.dtype) -> float:
    """One sequence's tokens/s if each token only read the weights once at the measured memory
    bandwidth (bench/sample.py's measure)."""
    model = GPT(GPTConfig())
    return Bandwidth().measure() / weight_bytes_per_step(model, dtype)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N = 1 and 4, few tokens")
    p.add_argument("--levels", default="1,4,8,16", help="concurrency levels (default 1,4,8,16)")
    p.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--seconds", type=float, default=90, help="stop new requests after this")
    p.add_argument("--repeat", type=int, default=2, help="runs of each level (default 2)")
    p.add_argument("--dtype", default="auto", help="gpt2lab's dtype (auto: as gpt2lab sample)")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads of both servers (default: each one's own, every core; on a machine "
        "other jobs share, 1 is much faster for both: their threads wait for each other, "
        "spinning, at every operation)",
    )
    p.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server binary")
    p.add_argument("--no-peer", action="store_true", help="gpt2lab only")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    if args.quick:
        args.levels, args.max_tokens, args.requests, args.repeat = [1, 4], 16, 1, 1
    dtype = pick_dtype(args.dtype, pick_device("cpu"))
    gguf_type = {torch.bfloat16: "bf16", torch.float16: "f16"}.get(dtype, "f32")
    print(
        f"serving bench: 124M shape, random weights, {PROMPT_TOKENS}-token prompts, "
        f"{args.max_tokens} new tokens, {args.requests} requests per client, "
        f"{os.cpu_count()} CPUs, threads {args.threads or 'default'}, gpt2lab {dtype}, "
        f"llama.cpp {gguf_type}",
        flush=True,
    )
    limit = decode_limit(dtype)
    print(
        "machine limit at N=1 (the weights read once per token at the measured bandwidth): "
        f"{limit:.0f} tok/s",
        flush=True,
    )
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "gpt2-random"
        torch.manual_seed(0)
        GPT(GPTConfig()).save_pretrained(model_dir, tokenizer=get_tokenizer("gpt2"))
        proc, url = start_gpt2lab(model_dir, args)
        try:
            results["gpt2lab"] = bench("gpt2lab", url, args, {})
        finally:
            stop(proc)
        binary = None if args.no_peer else find_llama_server(args.llama_server)
        if binary is None and not args.no_peer:
            print("llama-server: not run (no binary: pass --llama-server PATH or put it on PATH)")
        elif binary is not None:
            from gpt2lab.checkpoint.gguf import save_gguf
            from gpt2lab.checkpoint.load import load_model

            gguf = Path(tmp) / f"model-{gguf_type}.gguf"
            model, tok = load_model(model_dir)
            save_gguf(model, gguf, tokenizer=tok, outtype=gguf_type)
            del model
            proc, url = start_llama(binary, gguf, args, free_port())
            try:
                results["llama-server"] = bench(
                    "llama-server", url, args, {"ignore_eos": True, "n_probs": 0}
                )
            finally:
                stop(proc)
    ours = {r["n"]: r for r in results["gpt2lab"]}
    if 1 in ours and 8 in ours:
        scale = ours[8]["tok_s"] / ours[1]["tok_s"]
        print(
            f"goal N=8: aggregate {scale:.1f}x N=1 (goal >= 4x: "
            f"{'met' if scale >= 4 else 'NOT met'}); p99 TTFT {ours[8]['ttft_p99']:.2f} s "
            f"(goal < 2 s: {'met' if ours[8]['ttft_p99'] < 2 else 'NOT met'})"
        )
    if "llama-server" in results:
        for mine, theirs in zip(results["gpt2lab"], results["llama-server"]):
            print(
                f"N={mine['n']:<3} gpt2lab / llama-server aggregate tokens/s: "
                f"{mine['tok_s'] / theirs['tok_s']:.2f}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
