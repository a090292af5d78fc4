"""Sampling speed: gpt2lab's KV-cached greedy loop beside transformers' `generate`, same weights.

The 124M shape with random weights, a 16-token prompt, 256 new tokens, batch 1 and 8, float32 and
bfloat16, and the memory-bandwidth limit (weight bytes read per step against measured bandwidth).
Then gpt2lab's int8 weights (`gpt2lab.quantize`) beside its bfloat16, in turns, with the limit of
the int8 bytes read per step. With llama-cpp-python installed, llama.cpp runs the same weights
from our GGUF files (f16, bf16, q8_0) at batch 1, beside gpt2lab at the matching precision (int8
for q8_0); both run the prompt every time (llama.cpp's state is reset before each run, or it
would reuse the prompt's cache). Every figure is the median of --repeats runs taken in turns with
its peer; the spread (min-max) is printed beside it, since this machine is shared.

    .venv/bin/python bench/sample.py            # full run (several minutes on 2 cores)
    .venv/bin/python bench/sample.py --quick    # a short run that checks everything works
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gpt2lab.checkpoint.gguf import save_gguf
from gpt2lab.config import GPTConfig
from gpt2lab.device import cpu_has_native_bf16, pick_dtype
from gpt2lab.generate import generate, iter_tokens
from gpt2lab.kernels.native import huge_page_buffer
from gpt2lab.model import GPT
from gpt2lab.quantize import model_bytes, quantize
from gpt2lab.tokenizer import get_tokenizer

# GGUF type -> gpt2lab's weights at the same precision
GGUF_TWINS = {"f16": torch.float16, "bf16": torch.bfloat16, "q8_0": "int8"}


class Bandwidth:
    """Read bandwidth: each probe times one sum over a buffer larger than any cache. On a shared
    machine it moves by 2x within seconds (two threads read 33 or 60 GB/s here, by turns), so
    each run's limit comes from the probes right before and right after it (`time_with_probes`).
    The buffer lies in huge pages where Linux gives them, as the C step's weights do: from 4 KiB
    pages the same sum reads a third slower, and that would understate the limit."""

    def __init__(self, mbytes: int = 512) -> None:
        self.x = huge_page_buffer(mbytes * 2**20).view(torch.float32).fill_(1.0)
        self.all: list[float] = []

    def probe(self) -> None:
        self.x.sum()

    def now(self) -> float:
        """Bytes/s of one probe (kept in `all`)."""
        t0 = time.perf_counter()
        self.probe()
        self.all.append(self.x.numel() * 4 / (time.perf_counter() - t0))
        return self.all[-1]

    def measure(self, repeats: int = 5) -> float:
        """The median of `repeats` probes on their own (after one to warm up)."""
        self.probe()
        return statistics.median(self.now() for _ in range(repeats))


def weight_bytes_per_step(model: GPT, dtype: torch.dtype) -> int:
    """Bytes of weights one decoding step reads: everything but the embedding tables, plus the
    head's real rows (the token and position embeddings are a lookup of one row each)."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    n -= model.transformer.wpe.weight.numel() + cfg.padded_vocab_size * cfg.n_embd
    n += cfg.vocab_size * cfg.n_embd
    return n * torch.empty((), dtype=dtype).element_size()


def hf_twin(model: GPT, dtype: torch.dtype):
    """transformers' GPT2LMHeadModel with `model`'s weights."""
    import transformers

    from gpt2lab.checkpoint.hf import config_to_hf, to_hf_state

    cfg = transformers.GPT2Config(**config_to_hf(model.config))
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    missing, _ = hf.load_state_dict(to_hf_state(model), strict=False)
    assert set(missing) <= {"lm_head.weight"}, missing  # tied to wte
    return hf.to(dtype)


def time_alternating(*fns, repeats: int) -> list[list[float]]:
    """Seconds of each run of each of `fns`, run in turns so that load from elsewhere hits all."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return times


def time_with_probes(
    fns: dict[str, Callable[[], object]], bw: Bandwidth, repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(seconds, bytes/s) of each run of each of `fns`, run in turns with a bandwidth probe
    between every two runs: a run's bandwidth is the mean of the probes on either side of it."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    rates: dict[str, list[float]] = {k: [] for k in fns}
    before = bw.now()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
            after = bw.now()
            rates[k].append((before + after) / 2)
            before = after
    return times, rates


def share_of_limit(
    decode: list[float], rates: list[float], step_bytes: int
) -> tuple[float, float, str]:
    """(median limit tokens/s, median of each run's decode / its own limit, 'min-max' of those),
    for runs decoding at `decode` tokens/s while memory read `rates` bytes/s, `step_bytes` a
    token (per row: a batch of B reads the weights once for B tokens, so pass bytes / B)."""
    limits = [r / step_bytes for r in rates]
    shares = sorted(d / lim for d, lim in zip(decode, limits))
    return statistics.median(limits), statistics.median(shares), f"{shares[0]:.0%}-{shares[-1]:.0%}"


class Greedy:
    """`generate(model, idx, new, temperature=0)` as a run to time, noting in `first` when each
    run's first token came: the prompt's forward. Decoding is what the bandwidth limit bounds,
    so its rate, `decode_rates`, leaves the prompt out, as llama.cpp's "eval time" does."""

    def __init__(self, model: torch.nn.Module, idx: torch.Tensor, new: int) -> None:
        self.model, self.idx, self.new = model, idx, new
        self.first: list[float] = []

    def __call__(self) -> torch.Tensor:
        t0, steps = time.perf_counter(), []
        for tok in iter_tokens(self.model, self.idx, self.new, temperature=0):
            if not steps:
                self.first.append(time.perf_counter() - t0)
            steps.append(tok)
        return torch.cat([self.idx, torch.stack(steps, dim=1)], dim=1)

    def decode_rates(self, times: list[float]) -> list[float]:
        """Tokens/s after the first, of each of the last len(times) runs, which took `times`."""
        first = self.first[-len(times) :]
        B = self.idx.size(0)
        return [B * (self.new - 1) / (t - f) for t, f in zip(times, first)]


def rate(work: float, times: list[float]) -> tuple[float, str]:
    """(median work/s, 'min-max' work/s) of runs that took `times` seconds each."""
    rates = sorted(work / t for t in times)
    return statistics.median(rates), f"{rates[0]:.1f}-{rates[-1]:.1f}"


def twin(base: GPT, precision) -> torch.nn.Module:
    """A copy of `base` at a dtype, or int8 (`gpt2lab.quantize`; int8-fast: compact=False)."""
    ours = GPT(base.config).eval()
    ours.load_state_dict(base.state_dict())
    if precision in ("int8", "int8-fast"):
        return quantize(ours, "int8", compact=precision == "int8")
    return ours.to(precision)


def int8_rows(
    base: GPT, prompt_tokens: int, new: int, repeats: int, batches, bw: Bandwidth
) -> None:
    """gpt2lab int8 (the default, and compact=False) beside gpt2lab bfloat16, in turns, and the
    int8 bandwidth limit."""
    variants = {"int8": twin(base, "int8"), "int8 (compact=False)": twin(base, "int8-fast")}
    bf16 = twin(base, torch.bfloat16)
    int8_bytes = weight_bytes_per_step(base, torch.int8)
    f32_bytes = model_bytes(base)
    sizes = ", ".join(
        f"{k} {model_bytes(m) / 1e6:.0f} MB = {model_bytes(m) / f32_bytes:.2f}x"
        for k, m in variants.items()
    )
    print(f"int8 weights loaded: {sizes} (float32 {f32_bytes / 1e6:.0f} MB)")
    print(
        f"{'weights':<20} {'batch':>5} {'tok/s':>8} {'(spread)':>13} {'bf16 tok/s':>11} "
        f"{'ratio':>6} {'decode':>7} {'ratio':>6} {'bw limit':>9} {'of limit':>8} {'(spread)':>9}"
    )
    for B in batches:
        g = torch.Generator().manual_seed(B)
        idx = torch.randint(0, base.config.vocab_size, (B, prompt_tokens), generator=g)
        models = {**variants, "bf16": bf16}
        runs = {k: Greedy(m, idx, new) for k, m in models.items()}
        with torch.inference_mode():
            ref = runs["bf16"]()
            same = {k: (runs[k]() == ref).float().mean().item() for k in models}  # + warm-up
            times, rates = time_with_probes(runs, bw, repeats)
        b_tps, _ = rate(B * new, times["bf16"])
        b_decode = statistics.median(runs["bf16"].decode_rates(times["bf16"]))
        for k in variants:
            q_tps, q_spread = rate(B * new, times[k])
            decode = runs[k].decode_rates(times[k])
            limit, share, shares = share_of_limit(decode, rates[k], int8_bytes // B)
            d = statistics.median(decode)
            print(
                f"{k:<20} {B:>5} {q_tps:>8.1f} {q_spread:>13} {b_tps:>11.1f} "
                f"{q_tps / b_tps:>5.2f}x {d:>7.1f} {d / b_decode:>5.2f}x {limit:>9.1f} "
                f"{share:>7.0%} {shares:>9}   (greedy ids equal to bf16: {same[k]:.0%})"
            )


def llama_crashes(path: Path, prompt: list[int]) -> str:
    """Why llama.cpp cannot run this file, tried in a child process (some builds segfault on
    q8_0 GPT-2 files, which would end this whole run), or '' where it runs."""
    code = (
        "import sys, llama_cpp; llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, verbose=False); "
        f"next(iter(llm.generate({prompt[:4]!r}, top_k=1, temp=0.0)))"
    )
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=300)
    if r.returncode == 0:
        return ""
    if r.returncode < 0:
        return f"llama.cpp crashed on this file (signal {-r.returncode}): this build's fault"
    return "llama.cpp failed: " + r.stderr.decode(errors="replace").strip().splitlines()[-1]


def llama_cpp_rows(base: GPT, prompt: list[int], new: int, repeats: int) -> None:
    """Batch-1 greedy tokens/s of llama.cpp on our GGUF files beside gpt2lab, printed as rows."""
    import llama_cpp

    print(
        f"{'llama.cpp':<9} {'batch':>5} {'llama.cpp tok/s':>15} {'(spread)':>11} {'gpt2lab':>8} "
        f"{'ratio':>6}"
    )
    idx = torch.tensor([prompt])
    with tempfile.TemporaryDirectory() as tmp:
        for outtype, dtype in GGUF_TWINS.items():
            path = Path(tmp) / f"gpt2-{outtype}.gguf"
            save_gguf(base, path, tokenizer=get_tokenizer("gpt2"), outtype=outtype)
            crash = llama_crashes(path, prompt)
            if crash:
                print(f"{outtype:<9} {1:>5} {'not measured':>15}   ({crash})")
                continue
            llm = llama_cpp.Llama(
                str(path),
                n_ctx=len(prompt) + new,
                n_threads=torch.get_num_threads(),
                verbose=False,
            )

            def run_llama(llm=llm) -> None:
                # without a reset, llama-cpp-python reuses the KV cache of the prompt it saw last
                # and skips its evaluation; ours runs the prompt every time
                llm.reset()
                for i, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0)):
                    if i + 1 == new:
                        break

            ours = twin(base, dtype)
            run_ours = functools.partial(generate, ours, idx, new, temperature=0)
            with torch.inference_mode():
                run_ours(), run_llama()  # warm-up
                t_ours, t_llama = time_alternating(run_ours, run_llama, repeats=repeats)
            (ours_tps, _), (llama_tps, llama_spread) = rate(new, t_ours), rate(new, t_llama)
            name = str(dtype).removeprefix("torch.")
            print(
                f"{outtype:<9} {1:>5} {llama_tps:>15.1f} {llama_spread:>11} {ours_tps:>8.1f} "
                f"{ours_tps / llama_tps:>5.2f}x   (gpt2lab at {name})"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 new tokens, one timed run")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtypes", default="float32,bfloat16,int8")
    args = ap.parse_args()
    new, repeats = (32, 1) if args.quick else (args.new_tokens, args.repeats)
    torch.manual_seed(0)
    base = GPT(GPTConfig()).eval()
    bw = Bandwidth()
    bw_start = bw.measure()
    default_dtype = pick_dtype("auto", torch.device("cpu"))
    print(
        f"GPT-2 124M, random weights | prompt {args.prompt_tokens} tokens, {new} new, greedy | "
        f"{torch.get_num_threads()} threads | native bf16: {cpu_has_native_bf16()} | "
        f"read bandwidth {bw_start / 1e9:.1f} GB/s at the start (each run's limit: the probes "
        f"right before and after it; 'of limit': the median run's share) | "
        f"torch {torch.__version__}"
    )
    print(
        f"{'dtype':<9} {'batch':>5} {'gpt2lab tok/s':>14} {'(spread)':>13} {'transformers':>13} "
        f"{'ratio':>6} {'decode':>7} {'bw limit':>9} {'of limit':>8} {'(spread)':>9}"
    )
    results: dict[tuple[str, int], tuple[float, float]] = {}
    batches = [int(b) for b in args.batches.split(",")]
    for dname in (d for d in args.dtypes.split(",") if d != "int8"):
        dtype = getattr(torch, dname)
        ours = twin(base, dtype)
        hf = hf_twin(base, dtype)
        for B in batches:
            g = torch.Generator().manual_seed(B)
            idx = torch.randint(0, base.config.vocab_size, (B, args.prompt_tokens), generator=g)
            run_ours = Greedy(ours, idx, new)
            run_hf = functools.partial(
                hf.generate,
                idx,
                attention_mask=torch.ones_like(idx),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
            with torch.inference_mode():
                same = (run_ours() == run_hf()).all(dim=1).float().mean().item()  # + warm-up
                times, rates = time_with_probes({"ours": run_ours, "hf": run_hf}, bw, repeats)
            t_ours = times["ours"]
            (ours_tps, spread), (hf_tps, _) = rate(B * new, t_ours), rate(B * new, times["hf"])
            decode = run_ours.decode_rates(t_ours)
            step_bytes = weight_bytes_per_step(ours, dtype) // B
            limit, share, shares = share_of_limit(decode, rates["ours"], step_bytes)
            results[(dname, B)] = (ours_tps, hf_tps)
            print(
                f"{dname:<9} {B:>5} {ours_tps:>14.1f} {spread:>13} {hf_tps:>13.1f} "
                f"{ours_tps / hf_tps:>5.2f}x {statistics.median(decode):>7.1f} {limit:>9.1f} "
                f"{share:>7.0%} {shares:>9}   (greedy ids equal: {same:.0%} of rows)"
            )
    if "int8" in args.dtypes.split(","):
        int8_rows(base, args.prompt_tokens, new, repeats, batches, bw)
    key = (str(default_dtype).removeprefix("torch."), 1)
    if key in results and ("float32", 1) in results:
        print(
            f"batch 1, gpt2lab default CPU dtype ({key[0]}) vs transformers default (float32): "
            f"{results[key][0] / results[('float32', 1)][1]:.2f}x"
        )
    if importlib.util.find_spec("llama_cpp") is not None:
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, base.config.vocab_size, (args.prompt_tokens,), generator=g)
        llama_cpp_rows(base, prompt.tolist(), new, repeats)
    else:
        print("llama.cpp: not measured (pip install llama-cpp-python to add it)")
    rates = sorted(bw.all)
    print(
        f"read bandwidth over the run: median {statistics.median(rates) / 1e9:.1f} GB/s "
        f"({rates[0] / 1e9:.1f}-{rates[-1] / 1e9:.1f}, {len(rates)} probes)"
    )


if __name__ == "__main__":
    main()
