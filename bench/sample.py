"""Sampling speed: gpt2lab's KV-cached greedy loop beside transformers' `generate`, same weights.

The 124M shape with random weights, a 16-token prompt, 256 new tokens, batch 1 and 8, float32 and
bfloat16, and the memory-bandwidth limit (weight bytes read per step against measured bandwidth).
With llama-cpp-python installed, llama.cpp runs the same weights from our GGUF files (f16, bf16,
q8_0) at batch 1, beside gpt2lab at the matching precision (q8_0: gpt2lab's int8 weights where
this gpt2lab has `gpt2lab.quantize`, else bfloat16).

    .venv/bin/python bench/sample.py            # full run (several minutes on 2 cores)
    .venv/bin/python bench/sample.py --quick    # a short run that checks everything works
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gpt2lab.checkpoint.gguf import save_gguf
from gpt2lab.config import GPTConfig
from gpt2lab.device import cpu_has_native_bf16, pick_dtype
from gpt2lab.generate import generate
from gpt2lab.model import GPT
from gpt2lab.tokenizer import get_tokenizer

# GGUF type -> gpt2lab's dtype at the same precision (q8_0: int8 weights, see gpt2lab_twin)
GGUF_TWINS = {"f16": torch.float16, "bf16": torch.bfloat16, "q8_0": torch.bfloat16}


def measure_bandwidth(mbytes: int = 512, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` sums over a buffer larger than any cache."""
    x = torch.ones(mbytes * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


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


def time_alternating(a, b, repeats: int) -> tuple[float, float]:
    """Median seconds of `a` and of `b`, run in turns so that load from elsewhere hits both."""
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def gpt2lab_twin(base: GPT, outtype: str, dtype: torch.dtype) -> tuple[GPT, str]:
    """gpt2lab with `base`'s weights at the GGUF type's precision, and its name: q8_0 (8-bit
    weights, a scale per block of 32) beside gpt2lab's int8 (a scale per row) when available."""
    ours = GPT(base.config).eval()
    ours.load_state_dict(base.state_dict())
    if outtype == "q8_0" and importlib.util.find_spec("gpt2lab.quantize") is not None:
        from gpt2lab.quantize import quantize

        return quantize(ours, "int8"), "int8"
    return ours.to(dtype), str(dtype).removeprefix("torch.")


def llama_cpp_rows(base: GPT, prompt: list[int], new: int, repeats: int) -> None:
    """Batch-1 greedy tokens/s of llama.cpp on our GGUF files beside gpt2lab, printed as rows."""
    import llama_cpp

    print(f"{'llama.cpp':<9} {'batch':>5} {'llama.cpp tok/s':>15} {'gpt2lab':>8} {'ratio':>6}")
    idx = torch.tensor([prompt])
    with tempfile.TemporaryDirectory() as tmp:
        for outtype, dtype in GGUF_TWINS.items():
            path = Path(tmp) / f"gpt2-{outtype}.gguf"
            save_gguf(base, path, tokenizer=get_tokenizer("gpt2"), outtype=outtype)
            llm = llama_cpp.Llama(
                str(path),
                n_ctx=len(prompt) + new,
                n_threads=torch.get_num_threads(),
                verbose=False,
            )

            def run_llama(llm=llm) -> None:
                for i, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0)):
                    if i + 1 == new:
                        break

            ours, name = gpt2lab_twin(base, outtype, dtype)
            run_ours = functools.partial(generate, ours, idx, new, temperature=0)
            with torch.inference_mode():
                run_ours(), run_llama()  # warm-up
                t_ours, t_llama = time_alternating(run_ours, run_llama, repeats)
            print(
                f"{outtype:<9} {1:>5} {new / t_llama:>15.1f} {new / t_ours:>8.1f} "
                f"{t_ours / t_llama:>5.2f}x   (gpt2lab at {name})"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 new tokens, one timed run")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    new, repeats = (32, 1) if args.quick else (args.new_tokens, args.repeats)
    torch.manual_seed(0)
    base = GPT(GPTConfig()).eval()
    bw = measure_bandwidth()
    default_dtype = pick_dtype("auto", torch.device("cpu"))
    print(
        f"GPT-2 124M, random weights | prompt {args.prompt_tokens} tokens, {new} new, greedy | "
        f"{torch.get_num_threads()} threads | native bf16: {cpu_has_native_bf16()} | "
        f"read bandwidth {bw / 1e9:.1f} GB/s | torch {torch.__version__}"
    )
    print(
        f"{'dtype':<9} {'batch':>5} {'gpt2lab tok/s':>14} {'transformers':>13} {'ratio':>6} "
        f"{'bw limit':>9} {'of limit':>8}"
    )
    results: dict[tuple[str, int], tuple[float, float]] = {}
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        ours = GPT(base.config).eval()
        ours.load_state_dict(base.state_dict())
        ours.to(dtype)
        hf = hf_twin(base, dtype)
        for B in map(int, args.batches.split(",")):
            g = torch.Generator().manual_seed(B)
            idx = torch.randint(0, base.config.vocab_size, (B, args.prompt_tokens), generator=g)
            run_ours = functools.partial(generate, ours, idx, new, temperature=0)
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
                t_ours, t_hf = time_alternating(run_ours, run_hf, repeats)
            ours_tps, hf_tps = B * new / t_ours, B * new / t_hf
            limit = B * bw / weight_bytes_per_step(ours, dtype)
            results[(dname, B)] = (ours_tps, hf_tps)
            print(
                f"{dname:<9} {B:>5} {ours_tps:>14.1f} {hf_tps:>13.1f} {ours_tps / hf_tps:>5.2f}x "
                f"{limit:>9.1f} {ours_tps / limit:>7.0%}   (greedy ids equal: {same:.0%} of rows)"
            )
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


if __name__ == "__main__":
    main()
