"""Evaluation speed: `gpt2lab eval perplexity`'s batched sliding windows beside the transformers
loop (one window per forward, loss from `labels`), same weights, same windows, same text (CPU).

The text is WikiText-2 validation, de-tokenized as `gpt2lab eval wikitext2` does; weights are
random (speed does not depend on them). Both sides score the same tokens and must agree on the
perplexity; they alternate repeat by repeat so other load hits both alike. Figures are medians.

    .venv/bin/python bench/eval.py            # 124M shape, context 1024, stride 512 (~10 min)
    .venv/bin/python bench/eval.py --quick    # a tiny model, a few windows: checks it all works
    .venv/bin/python bench/eval.py --dtype bfloat16 --batch 4
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from gpt2lab.checkpoint.hf import config_to_hf, to_hf_state
from gpt2lab.config import MODEL_PRESETS, GPTConfig
from gpt2lab.device import DTYPES, autocast
from gpt2lab.eval.detok import wikitext_detokenize
from gpt2lab.eval.scoring import as_logits_fn, score_ids, sliding_windows
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and text")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of text to score")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass (ours)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = p.parse_args()
    cfg = MODEL_PRESETS["gpt2"]
    if a.quick:
        cfg = GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=64)
        a.tokens, a.context, a.stride, a.repeats = 1024, 128, 64, 3
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    ours = GPT(cfg).eval()
    import transformers

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(cfg)))
    hf.load_state_dict(to_hf_state(ours), strict=False)  # lm_head is tied to wte
    hf.eval()
    tok = get_tokenizer("gpt2")
    text = "\n".join(wikitext_detokenize(ln) for ln in WIKI.read_text(encoding="utf-8").split("\n"))
    ids = [tok.eot_token, *tok.encode_ordinary(text)][: a.tokens + 1]
    dtype = DTYPES[a.dtype]
    fn = as_logits_fn(ours, dtype)
    times: dict[str, list[float]] = {"ours": [], "transformers": []}
    nlls: dict[str, float] = {}
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        nlls["ours"] = score_ids(fn, ids, a.context, a.stride, a.batch).nll
        times["ours"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        nlls["transformers"] = transformers_loop(hf, ids, a.context, a.stride, dtype)
        times["transformers"].append(time.perf_counter() - t0)
    n = len(ids) - 1
    windows = len(sliding_windows(len(ids), a.context, a.stride))
    print(
        f"eval perplexity | {cfg.n_layer} layers x {cfg.n_embd} | {n} tokens scored in {windows} "
        f"windows (context {a.context}, stride {a.stride}) | {a.dtype} | "
        f"{torch.get_num_threads()} threads | median of {a.repeats}"
    )
    speed = {k: n / statistics.median(v) for k, v in times.items()}
    for k in ("ours", "transformers"):
        ppl = torch.tensor(nlls[k] / n).exp().item()
        print(f"  {k:<13} {speed[k]:9.1f} scored tokens/s   perplexity {ppl:.6g}")
    print(f"  ratio (ours / transformers): {speed['ours'] / speed['transformers']:.2f}x")
    rel = abs(nlls["ours"] - nlls["transformers"]) / nlls["transformers"]
    print(f"  loss agreement: relative difference {rel:.1e}")


if __name__ == "__main__":
    main()
