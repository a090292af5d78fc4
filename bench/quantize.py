"""int8 weights on trained models: how much of what they learned `quantize(model, "int8")` keeps.

Two models trained here for a few minutes each by `gpt2lab demo` on Tiny Shakespeare: the demo's
character model, and the same recipe on GPT-2's BPE (50,257 ids, so the int8 head is the largest
matrix). On each model's own validation split, int8 beside bfloat16 (the CPU default) and float32:

- validation perplexity, and int8's rise over bf16 (goal: at most +1%);
- greedy agreement with bf16: the argmax next token at every position of the same windows (goal:
  at least 95%), and free-running greedy continuations from the same prompts, token by token, at
  batch 1 as `gpt2lab sample` runs them;
- the loaded model's bytes against float32 (goal: at most 0.3x).

The peer, where llama-cpp-python is installed: llama.cpp's own 8-bit format, q8_0, on the same
weights (our GGUF files), over the same windows: its perplexity rise over its bf16 file and its
argmax agreement with it. (A GGUF needs GPT-2's vocabulary, so only the BPE model has this row.)

Then the two layouts of `quantize` on the 124M shape (random weights), in turns: the default
(every matrix once, as plain int8 values) beside `compact=False` (every matrix also packed for
fbgemm), for scoring, a long prompt, a batch of 32 and one sequence, and the bytes each holds.

    .venv/bin/python bench/quantize.py                   # trains both (4 minutes each), measures
    .venv/bin/python bench/quantize.py --work /tmp/q     # keeps the runs; a second call reuses them
    .venv/bin/python bench/quantize.py --quick           # half a minute each, fewer windows
    .venv/bin/python bench/quantize.py --layouts-only    # just the layouts' table (~2 minutes)
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpt2lab.checkpoint.gguf import save_gguf
from gpt2lab.checkpoint.load import load_model
from gpt2lab.config import GPTConfig
from gpt2lab.data import load_tokens
from gpt2lab.generate import generate
from gpt2lab.kernels.cpu_decode import decode_step
from gpt2lab.model import GPT
from gpt2lab.quantize import model_bytes, quantize

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
TOKENIZERS = ("char", "gpt2")


@dataclass
class Scores:
    """One model's predictions over the validation windows."""

    loss: float  # mean next-token loss (nats)
    argmax: torch.Tensor  # (windows, T) greedy choice at every position

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def train(work: Path, tokenizer: str, minutes: float) -> Path:
    """`gpt2lab demo` on Tiny Shakespeare into work/<tokenizer>, unless a finished run is there."""
    run = work / tokenizer
    if (run / "latest").exists():
        print(f"{tokenizer}: reusing {run}")
        return run
    cmd = [sys.executable, "-m", "gpt2lab", "demo", "--input", str(TEXT), "--out", str(run)]
    cmd += ["--tokenizer", tokenizer, "--minutes", str(minutes), "--no-progress"]
    cmd += ["--samples", "1", "--sample-tokens", "40"]
    print(f"{tokenizer}: training for {minutes:g} minutes: {' '.join(cmd[1:])}", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"training failed:\n{done.stderr.strip()}")
    for line in done.stdout.splitlines():
        if line.startswith(("validation loss", "trained ")):
            print(f"{tokenizer}: {line}")
    return run


def val_windows(run: Path, T: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to n non-overlapping windows of T tokens from the run's validation split, and targets."""
    val = np.asarray(load_tokens(run / "data", "val"), dtype=np.int64)
    n = min(n, (len(val) - 1) // T)
    x = np.stack([val[i * T : i * T + T] for i in range(n)])
    y = np.stack([val[i * T + 1 : i * T + T + 1] for i in range(n)])
    return torch.from_numpy(x), torch.from_numpy(y)


def score(model, x: torch.Tensor, y: torch.Tensor, batch: int = 8) -> Scores:
    nll, argmax = 0.0, []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            logits, _ = model(x[i : i + batch])
            logits = logits.float()
            nll += F.cross_entropy(
                logits.flatten(0, 1), y[i : i + batch].flatten(), reduction="sum"
            )
            argmax.append(logits.argmax(-1))
    return Scores(float(nll) / y.numel(), torch.cat(argmax))


def greedy(model, prompts: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy continuations, one prompt at a time (batch 1, as `gpt2lab sample` decodes)."""
    with torch.inference_mode():
        rows = [model.generate(p[None], new, temperature=0)[0, p.numel() :] for p in prompts]
    return torch.stack(rows)


def free_running(ref: torch.Tensor, other: torch.Tensor) -> str:
    """Token-by-token agreement of two sets of continuations, and where they first part."""
    same = (ref == other).float().mean().item()
    parted = (ref != other).int().argmax(1).tolist()
    first = [p if (r != o).any() else r.numel() for p, r, o in zip(parted, ref, other)]
    whole = sum(f == ref.size(1) for f in first)
    return (
        f"{same:.1%} of tokens; {whole}/{len(first)} continuations identical; "
        f"median first difference at token {statistics.median(first):g}"
    )


def llama_scores(path: Path, x: torch.Tensor, y: torch.Tensor) -> Scores:
    """llama.cpp's logits for every position of the windows (one window per call)."""
    import llama_cpp

    T = x.size(1)
    llm = llama_cpp.Llama(
        str(path),
        n_ctx=T,
        n_batch=T,
        logits_all=True,
        n_threads=torch.get_num_threads(),
        verbose=False,
    )
    nll, argmax = 0.0, []
    for xi, yi in zip(x, y):
        llm.reset()
        llm.eval(xi.tolist())
        logits = torch.from_numpy(np.asarray(llm.scores[:T], dtype=np.float32))
        nll += float(F.cross_entropy(logits, yi, reduction="sum"))
        argmax.append(logits.argmax(-1))
    return Scores(nll / y.numel(), torch.stack(argmax))


def llama_row(f32, tok, x: torch.Tensor, y: torch.Tensor, ours: str) -> None:
    """q8_0 against bf16, both llama.cpp on our GGUF files of the same weights."""
    sys.path.insert(0, str(Path(__file__).parent))
    from sample import llama_crashes  # the same guard as the speed benchmark's

    with tempfile.TemporaryDirectory() as tmp:
        scores = {}
        for outtype in ("bf16", "q8_0"):
            path = Path(tmp) / f"model-{outtype}.gguf"
            save_gguf(f32, path, tokenizer=tok, outtype=outtype)
            crash = llama_crashes(path, x[0].tolist())
            if crash:
                print(f"  llama.cpp {outtype}: not measured ({crash})")
                return
            scores[outtype] = llama_scores(path, x, y)
    b, q = scores["bf16"], scores["q8_0"]
    rise = q.perplexity / b.perplexity - 1
    agree = (q.argmax == b.argmax).float().mean().item()
    print(
        f"  peer, llama.cpp on our GGUF files: perplexity bf16 {b.perplexity:.4f}, q8_0 "
        f"{q.perplexity:.4f}: q8_0 {rise:+.2%} over bf16, argmax agreement {agree:.2%} | "
        f"gpt2lab int8: {ours}"
    )


def measure(run: Path, windows: int, prompts: int, new: int, llama: bool) -> None:
    bf16, tok = load_model(run, dtype=torch.bfloat16)
    f32, _ = load_model(run, dtype=torch.float32)
    int8 = quantize(f32, "int8")
    T = f32.config.block_size
    x, y = val_windows(run, T, windows)
    s = {name: score(m, x, y) for name, m in (("float32", f32), ("bf16", bf16), ("int8", int8))}
    rise = s["int8"].perplexity / s["bf16"].perplexity - 1
    params = sum(p.numel() for p in f32.parameters())
    print(
        f"{run.name}: vocabulary {f32.config.vocab_size:,}, {params:,} parameters | {len(x)} "
        f"validation windows of {T} tokens ({y.numel():,} predictions)"
    )
    print(
        f"  perplexity: float32 {s['float32'].perplexity:.4f}, bf16 {s['bf16'].perplexity:.4f}, "
        f"int8 {s['int8'].perplexity:.4f}: int8 {rise:+.2%} over bf16 (goal at most +1%)"
    )
    agreement = {}
    for a, b in (("int8", "bf16"), ("int8", "float32"), ("bf16", "float32")):
        agreement[a, b] = agree = (s[a].argmax == s[b].argmax).float().mean().item()
        goal = " (goal at least 95%)" if (a, b) == ("int8", "bf16") else ""
        print(f"  argmax next token, {a} vs {b}: {agree:.2%} of positions{goal}")
    starts = x[:prompts, :16]
    ref = greedy(bf16, starts, new)
    print(
        f"  free-running greedy, {len(starts)} prompts x {new} tokens, int8 vs bf16: "
        f"{free_running(ref, greedy(int8, starts, new))}"
    )
    print(f"  (for scale, float32 vs bf16: {free_running(ref, greedy(f32, starts, new))})")
    ratio = model_bytes(int8) / model_bytes(f32)
    print(
        f"  loaded model: int8 {model_bytes(int8) / 1e6:.1f} MB, float32 "
        f"{model_bytes(f32) / 1e6:.1f} MB: {ratio:.2f}x (goal at most 0.3x; the float "
        f"position table and LayerNorms weigh more in a small model)"
    )
    if llama and f32.config.vocab_size >= 50257:
        ours = f"{rise:+.2%}, {agreement['int8', 'bf16']:.2%}"
        llama_row(f32, tok, x, y, ours)


def held_bytes(model) -> int:
    """The model's bytes and what its batch-1 decoding step keeps beside them, each storage once
    (fbgemm's packed weights counted by `model_bytes`)."""
    step = decode_step(model, 1)
    keep = step.native.keep if step is not None and step.native is not None else []
    tensors = [*model.parameters(), *model.buffers()]
    own = {t.untyped_storage().data_ptr() for t in tensors}
    extra = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in keep}
    return model_bytes(model) + sum(n for p, n in extra.items() if p not in own)


def layouts(repeats: int) -> None:
    """quantize()'s default beside compact=False, in turns, on GPT-2 124M with random weights."""
    torch.manual_seed(0)
    base = GPT(GPTConfig()).eval()
    models = {
        "default": quantize(base, "int8"),
        "compact=False": quantize(base, "int8", compact=False),
    }
    g = torch.Generator().manual_seed(0)
    ids = {
        n: torch.randint(0, 50257, shape, generator=g)
        for n, shape in (
            ("score", (4, 1024)),
            ("prompt", (1, 512)),
            ("b32", (32, 16)),
            ("b1", (1, 16)),
        )
    }
    work = {
        "4 x 1024 tokens scored, all logits": lambda m: m(ids["score"]),
        "a 512-token prompt (last logits)": lambda m: m(ids["prompt"], logits_to_keep=1),
        "32 sequences, 16 + 16 tokens, greedy": lambda m: generate(
            m, ids["b32"], 16, temperature=0
        ),
        "one sequence, 16 + 64 tokens, greedy": lambda m: generate(m, ids["b1"], 64, temperature=0),
    }
    f32 = model_bytes(base)
    print(
        f"\nquantize() layouts, GPT-2 124M, random weights | seconds, median of {repeats} in turns"
    )
    print(f"{'work':<40} {'default':>9} {'(spread)':>13} {'compact=False':>14} {'ratio':>6}")
    with torch.inference_mode():
        for label, fn in work.items():
            times = {k: [] for k in models}
            for m in models.values():
                fn(m)  # warm-up: the C step is built on the first decode
            for _ in range(repeats):
                for name, m in models.items():
                    t = time.perf_counter()
                    fn(m)
                    times[name].append(time.perf_counter() - t)
            a, b = (statistics.median(times[k]) for k in models)
            spread = f"{min(times['default']):.2f}-{max(times['default']):.2f}"
            print(f"{label:<40} {a:>9.2f} {spread:>13} {b:>14.2f} {b / a:>5.2f}x")
    for name, m in models.items():
        own, held = model_bytes(m), held_bytes(m)
        print(
            f"{name}: {own / 1e6:.0f} MB ({own / f32:.2f}x float32); with its decoding step, "
            f"after decoding: {held / 1e6:.0f} MB ({held / f32:.2f}x)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="where the runs go (default: a temp dir)")
    ap.add_argument("--minutes", type=float, default=4.0, help="training time per model")
    ap.add_argument("--windows", type=int, default=200, help="validation windows scored")
    ap.add_argument("--prompts", type=int, default=16, help="free-running greedy prompts")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--tokenizers", default="char,gpt2", help="which models: char, gpt2")
    ap.add_argument("--quick", action="store_true", help="half a minute each, 24 windows")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs in the layouts' table")
    ap.add_argument("--layouts-only", action="store_true", help="skip the trained models")
    args = ap.parse_args()
    if args.layouts_only:
        layouts(args.repeats)
        return
    if not TEXT.exists():
        sys.exit(f"{TEXT} is missing: this benchmark trains on ../shared/data/tinyshakespeare.txt")
    if args.quick:
        args.minutes, args.windows, args.prompts, args.new_tokens = 0.5, 24, 4, 32
    tokenizers = [t for t in args.tokenizers.split(",") if t]
    if unknown := set(tokenizers) - set(TOKENIZERS):
        sys.exit(f"--tokenizers: {', '.join(sorted(unknown))} unknown; use char and/or gpt2")
    llama = importlib.util.find_spec("llama_cpp") is not None
    peer = "yes" if llama else "no (llama-cpp-python absent)"
    print(
        f"int8 weights on trained models | {torch.get_num_threads()} threads | torch "
        f"{torch.__version__} | llama.cpp peer: {peer}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for tokenizer in tokenizers:
            run = train(work, tokenizer, args.minutes)
            measure(run, args.windows, args.prompts, args.new_tokens, llama)
    layouts(1 if args.quick else args.repeats)


if __name__ == "__main__":
    main()
