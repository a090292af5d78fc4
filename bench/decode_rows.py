"""The C decoding step (`decode.c`) against the PyTorch step, by rows a step, and short prompts.

The 124M shape with random weights, 2 threads by default. For each dtype and row count: tokens/s
of 48 steps from column 16, the C step and the PyTorch `DecodeStep` in turns (median of
--repeats, spread in brackets). Then the prompt: one call of the plain model against one C step
per token, for prompts of 1-3 tokens (why `gpt2lab.generate` steps prompts of up to two tokens).
This is what `gpt2lab.kernels.native.MAX_ROWS` and `MAX_ROWS_FLOAT32` were set from.

    .venv/bin/python bench/decode_rows.py                 # bf16, int8, float32 at 1, 2, 4, 8, 16
    .venv/bin/python bench/decode_rows.py --quick         # bf16 at 1 and 4 rows, one run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpt2lab.config import GPTConfig  # noqa: E402
from gpt2lab.generate import cached_forward  # noqa: E402
from gpt2lab.kernels import cpu_decode  # noqa: E402
from gpt2lab.model import GPT, KVCache  # noqa: E402
from sample import twin  # noqa: E402  (bench/sample.py: a copy of a model at a precision)


def steps_in_turns(model, dtype, rows: int, repeats: int) -> dict[str, list[float]]:
    """tokens/s of the C step and of the PyTorch step, `repeats` runs of each in turns."""
    steps = {"C": cpu_decode.DecodeStep(model, rows, dtype)}
    real = cpu_decode.native_step
    cpu_decode.native_step = lambda *a: None  # the same class, without its C step
    try:
        steps["PyTorch"] = cpu_decode.DecodeStep(model, rows, dtype)
    finally:
        cpu_decode.native_step = real
    ids = torch.randint(0, model.config.vocab_size, (rows, 1))
    rates: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats + 1):  # the first round warms up
        for name, step in steps.items():
            cache = KVCache(model.config, rows, 80, dtype=dtype)
            cache.pos = 16
            t0 = time.perf_counter()
            for _ in range(48):
                step.step(ids, cache)
            rates[name].append(rows * 48 / (time.perf_counter() - t0))
    return {k: v[1:] for k, v in rates.items()}


def prompt_ms(model, dtype, length: int, repeats: int) -> tuple[float, float]:
    """(ms of one plain forward, ms of one C step per token) for a prompt of `length` tokens."""
    step = cpu_decode.decode_step(model, 1)
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    plain, stepped = [], []
    for _ in range(repeats + 2):
        cache = KVCache(model.config, 1, length + 1, dtype=dtype)
        t0 = time.perf_counter()
        cached_forward(model, ids, cache)
        plain.append(time.perf_counter() - t0)
        cache = KVCache(model.config, 1, length + 1, dtype=dtype)
        t0 = time.perf_counter()
        for t in range(length):
            step.step(ids[:, t : t + 1], cache)
        stepped.append(time.perf_counter() - t0)
    return statistics.median(plain[2:]) * 1e3, statistics.median(stepped[2:]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="bf16 at 1 and 4 rows, one run")
    ap.add_argument("--dtypes", default="bfloat16,int8,float32")
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    dtypes, rows, repeats = args.dtypes, args.rows, args.repeats
    if args.quick:
        dtypes, rows, repeats = "bfloat16", "1,4", 1
    torch.manual_seed(0)
    base = GPT(GPTConfig()).eval()
    threads, version = torch.get_num_threads(), torch.__version__
    print(f"124M shape, random weights | {threads} threads | torch {version}")
    head = f"{'C step tok/s':>13} {'(spread)':>13} {'PyTorch':>8} {'ratio':>6}"
    print(f"{'weights':<9} {'rows':>4} {head}")
    models = {}
    for name in dtypes.split(","):
        model = twin(base, "int8" if name == "int8" else getattr(torch, name))
        dtype = torch.float32 if name == "int8" else getattr(torch, name)
        models[name] = (model, dtype)
        for n in (int(r) for r in rows.split(",")):
            got = steps_in_turns(model, dtype, n, repeats)
            c, p = statistics.median(got["C"]), statistics.median(got["PyTorch"])
            spread = f"{min(got['C']):.0f}-{max(got['C']):.0f}"
            print(f"{name:<9} {n:>4} {c:>13.1f} {spread:>13} {p:>8.1f} {c / p:>5.2f}x")
    print(f"\n{'weights':<9} {'prompt':>6} {'plain forward ms':>17} {'C steps ms':>11}")
    for name, (model, dtype) in models.items():
        for length in (1, 2, 3):
            plain, stepped = prompt_ms(model, dtype, length, repeats)
            print(f"{name:<9} {length:>6} {plain:>17.1f} {stepped:>11.1f}")


if __name__ == "__main__":
    main()
