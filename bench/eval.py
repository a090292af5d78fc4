"""Evaluation speed: `gpt2lab eval perplexity`'s batched sliding windows beside the transformers
loop (one window per forward, loss from `labels`), same weights, same windows, same text (CPU).

The text is WikiText-2 validation (the test split is not on this machine), de-tokenized as
`gpt2lab eval wikitext2` does; weights are random (speed does not depend on them). Both sides
score the same tokens and must agree on the perplexity; they alternate repeat by repeat so other
load hits both alike. Figures are medians with their spread (min-max).

Also printed: the matmul-peak limit, i.e. a 1024-token bfloat16 forward returning every
position's logits (the path `gpt2lab eval` takes) against the bfloat16 matmul peak measured in
the same process, in turns (FLOPs per token 2N + 4*L*C*T); the time the whole validation split
takes at stride 512 (estimated from the measured windows/s, or run with --full); and candidate
scoring on CBT-shaped requests (a ~450-token story, 10 candidates of ~20 tokens) with the story's
KV cache shared, beside scoring each candidate with the story again.

    .venv/bin/python bench/eval.py            # 124M shape, context 1024, stride 512 (~10 min)
    .venv/bin/python bench/eval.py --quick    # a tiny model, a few windows: checks it all works
    .venv/bin/python bench/eval.py --dtype bfloat16 --batch 4
    .venv/bin/python bench/eval.py --dtype bfloat16 --full   # + the whole split, timed
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import torch

from gpt2lab.checkpoint.hf import config_to_hf, to_hf_state
from gpt2lab.config import MODEL_PRESETS, GPTConfig
from gpt2lab.device import DTYPES, autocast, keep_freed_memory
from gpt2lab.eval.detok import wikitext_detokenize
from gpt2lab.eval.scoring import (
    as_logits_fn,
    score_continuations,
    score_ids,
    sliding_windows,
)
from gpt2lab.model import GPT
from gpt2lab.tokenizer import get_tokenizer

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "wiki.valid.tokens"


def transformers_loop(hf, ids: list[int], context: int, stride: int, dtype) -> float:
    """The usual loop: one window per forward pass, cross-entropy of its new tokens (nats)."""
    nll = 0.0
    data = torch.tensor(ids)
    for w in sliding_windows(len(ids), context, stride):
        with torch.inference_mode(), autocast(torch.device("cpu"), dtype):
            logits = hf(input_ids=data[None, w.start : w.end]).logits[0, -w.scored :]
        target = data[w.end - w.scored + 1 : w.end + 1]
        nll += torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum").item()
    return nll


def spread(work: float, times: list[float]) -> str:
    rates = sorted(work / t for t in times)
    return f"{statistics.median(rates):,.1f} ({rates[0]:,.1f}-{rates[-1]:,.1f})"


def in_turns(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each run of each callable, run in turns so that load hits them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def matmul_peak_rows(ours: GPT, dtype: torch.dtype, T: int, repeats: int) -> None:
    """A T-token forward that returns every position's logits, against the matmul peak."""
    cfg = ours.config
    n = ours.num_params() - ours.transformer.wpe.weight.numel()
    flops = T * (2 * n + 4 * cfg.n_layer * cfg.n_embd * T)
    fn = as_logits_fn(ours, dtype)
    plain = as_logits_fn(ours, dtype, kernels=False)
    idx = torch.randint(0, cfg.vocab_size, (1, T))
    a = torch.randn(1024, 768, dtype=dtype)  # the peak: GPT-2 small's MLP shape at 1024 rows
    w = torch.randn(3072, 768, dtype=dtype)
    mm_flops = 2 * 1024 * 768 * 3072

    def matmuls() -> None:
        for _ in range(10):
            torch.nn.functional.linear(a, w)

    with torch.inference_mode():
        fn(idx, T), plain(idx, T), matmuls()  # warm-up
        t = in_turns(
            {"peak": matmuls, "ours": lambda: fn(idx, T), "plain": lambda: plain(idx, T)}, repeats
        )
    peak = statistics.median(10 * mm_flops / x for x in t["peak"])
    name = str(dtype).removeprefix("torch.")
    print(
        f"{T}-token forward, every position's logits, {name}: matmul peak "
        f"{spread(10 * mm_flops / 1e9, t['peak'])} GFLOP/s (1024x768 @ 768x3072)"
    )
    for k, label in (("ours", "gpt2lab eval path"), ("plain", "model forward (no kernels)")):
        achieved = statistics.median(flops / x for x in t[k])
        print(
            f"  {label:<27} {spread(T, t[k])} tok/s = {achieved / 1e9:,.0f} GFLOP/s "
            f"= {achieved / peak:.0%} of the peak"
        )


def cbt_rows(ours: GPT, ids: list[int], dtype, repeats: int, story: int, cands: int) -> None:
    """CBT-shaped candidate scoring with and without the shared context's KV cache."""
    requests = []
    for e in range(2):
        start = e * (story + cands * 20)
        context = ids[start : start + story]
        for c in range(cands):
            off = start + story + 20 * c
            requests.append((context, ids[off : off + 18 + c % 5]))
    fn = as_logits_fn(ours, dtype)

    def plain(idx, keep):  # the same model and path, without `after_prefix`
        return fn(idx, keep)

    shared = functools.partial(score_continuations, fn, requests, 1024, 8)
    each = functools.partial(score_continuations, plain, requests, 1024, 8)
    with torch.inference_mode():
        a, b = shared(), each()  # + warm-up
        t = in_turns({"shared": shared, "each": each}, repeats)
    worst = max(abs(x.logprob - y.logprob) for x, y in zip(a, b))
    n = len(requests)
    print(
        f"CBT-shaped scoring ({n // cands} stories of {story} tokens x {cands} candidates of "
        f"18-22 tokens): shared context {spread(n, t['shared'])} candidates/s, context per "
        f"candidate {spread(n, t['each'])}; speed-up "
        f"{statistics.median(t['each']) / statistics.median(t['shared']):.1f}x "
        f"(largest log-prob difference {worst:.1e})"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and text")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of text to score")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass (ours)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--full", action="store_true", help="also score the whole split, timed")
    a = p.parse_args()
    cfg = MODEL_PRESETS["gpt2"]
    story, cands = 450, 10
    if a.quick:
        cfg = GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=64)
        a.tokens, a.context, a.stride, a.repeats = 1024, 128, 64, 3
        story, cands = 60, 4
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    keep_freed_memory()  # as `gpt2lab eval` does on a CPU
    ours = GPT(cfg).eval()
    import transformers

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(cfg)))
    hf.load_state_dict(to_hf_state(ours), strict=False)  # lm_head is tied to wte
    hf.eval()
    tok = get_tokenizer("gpt2")
    text = "\n".join(wikitext_detokenize(ln) for ln in WIKI.read_text(encoding="utf-8").split("\n"))
    all_ids = [tok.eot_token, *tok.encode_ordinary(text)]
    ids = all_ids[: a.tokens + 1]
    dtype = DTYPES[a.dtype]
    fn = as_logits_fn(ours, dtype)
    nlls: dict[str, float] = {}

    def run_ours() -> None:
        nlls["ours"] = score_ids(fn, ids, a.context, a.stride, a.batch).nll

    def run_hf() -> None:
        nlls["transformers"] = transformers_loop(hf, ids, a.context, a.stride, dtype)

    times = in_turns({"ours": run_ours, "transformers": run_hf}, a.repeats)
    n = len(ids) - 1
    windows = len(sliding_windows(len(ids), a.context, a.stride))
    print(
        f"eval perplexity | {cfg.n_layer} layers x {cfg.n_embd} | {n} tokens scored in {windows} "
        f"windows (context {a.context}, stride {a.stride}) | {a.dtype} | "
        f"{torch.get_num_threads()} threads | median of {a.repeats} (min-max)"
    )
    for k in ("ours", "transformers"):
        ppl = torch.tensor(nlls[k] / n).exp().item()
        print(f"  {k:<13} {spread(n, times[k])} scored tokens/s   perplexity {ppl:.6g}")
    ratio = statistics.median(times["transformers"]) / statistics.median(times["ours"])
    print(f"  ratio (ours / transformers): {ratio:.2f}x")
    rel = abs(nlls["ours"] - nlls["transformers"]) / nlls["transformers"]
    print(f"  loss agreement: relative difference {rel:.1e}")
    split_windows = len(sliding_windows(len(all_ids), a.context, a.stride))
    per_window = statistics.median(times["ours"]) / windows
    print(
        f"  whole validation split: {len(all_ids) - 1:,} tokens, {split_windows} windows, "
        f"estimated {split_windows * per_window / 60:.1f} min for ours"
    )
    if a.full:
        t0 = time.perf_counter()
        score = score_ids(fn, all_ids, a.context, a.stride, a.batch)
        print(
            f"  whole validation split, measured: {(time.perf_counter() - t0) / 60:.1f} min, "
            f"perplexity {torch.tensor(score.loss).exp().item():.6g} (random weights)"
        )
    matmul_peak_rows(ours, dtype if dtype != torch.float32 else torch.bfloat16, a.context, 3)
    cbt_rows(ours, all_ids, dtype, a.repeats, story, cands)


if __name__ == "__main__":
    main()
