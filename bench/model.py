"""Training speed of the model: forward + backward tokens/s of gpt2lab's GPT beside transformers'
GPT2LMHeadModel with the same config, the same weights and the same batch (CPU).

Both run float32 and bfloat16 autocast; the two models alternate step by step so that load from
other processes hits both alike. Figures are medians over the timed steps.

    .venv/bin/python bench/model.py            # gpt2-10m shape, batch 8 x 256 (a few minutes)
    .venv/bin/python bench/model.py --quick    # a tiny run that checks everything works
    .venv/bin/python bench/model.py --preset gpt2 --batch 1 --seq 1024 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from gpt2lab.checkpoint.hf import config_to_hf, to_hf_state
from gpt2lab.config import MODEL_PRESETS, GPTConfig
from gpt2lab.device import autocast, cpu_has_native_bf16
from gpt2lab.model import GPT


def hf_twin(model: GPT):
    """transformers' GPT2LMHeadModel holding `model`'s weights (SDPA attention, its default)."""
    import transformers

    transformers.logging.set_verbosity_error()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(model.config)))
    missing, unexpected = hf.load_state_dict(to_hf_state(model), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    return hf.train()


def step_time(step: Callable[[], None], dtype: torch.dtype) -> float:
    t0 = time.perf_counter()
    with autocast(torch.device("cpu"), dtype):
        step()
    return time.perf_counter() - t0


def bench(cfg: GPTConfig, batch: int, seq: int, steps: int, warmup: int) -> list[tuple]:
    """Rows (dtype, ours tok/s, peer tok/s) for float32 and bfloat16 autocast."""
    torch.manual_seed(0)
    ours = GPT(cfg).train()
    peer = hf_twin(ours)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    x, y = idx[:, :-1], idx[:, 1:]

    def ours_step() -> None:
        _, loss = ours(x, y)
        loss.backward()
        ours.zero_grad(set_to_none=True)

    def peer_step() -> None:
        loss = peer(input_ids=x, labels=x).loss  # HF shifts the labels itself
        loss.backward()
        peer.zero_grad(set_to_none=True)

    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_native_bf16() else [])
    rows = []
    for dtype in dtypes:
        for _ in range(warmup):
            step_time(ours_step, dtype), step_time(peer_step, dtype)
        t_ours, t_peer = [], []
        for _ in range(steps):  # alternate, so background load hits both alike
            t_ours.append(step_time(ours_step, dtype))
            t_peer.append(step_time(peer_step, dtype))
        tokens = batch * seq
        rows.append(
            (
                str(dtype).removeprefix("torch."),
                tokens / statistics.median(t_ours),
                tokens / statistics.median(t_peer),
            )
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shape, 3 steps: checks it runs")
    p.add_argument("--preset", default="gpt2-10m", choices=sorted(MODEL_PRESETS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default block_size)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = MODEL_PRESETS[args.preset]
    batch, seq, steps, warmup = args.batch, args.seq or cfg.block_size, args.steps, args.warmup
    if args.quick:
        cfg = GPTConfig(block_size=64, vocab_size=8192, n_layer=2, n_head=4, n_embd=128)
        batch, seq, steps, warmup = 4, 64, 3, 1
    cfg = GPTConfig(**{**cfg.__dict__, "dropout": 0.0})
    print(
        f"forward+backward, {'quick ' if args.quick else ''}n_layer={cfg.n_layer} "
        f"n_embd={cfg.n_embd} vocab={cfg.vocab_size} (padded {cfg.padded_vocab_size}), "
        f"batch {batch} x {seq}, {steps} timed steps, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(f"{'dtype':<10} {'gpt2lab tok/s':>14} {'transformers tok/s':>19} {'ratio':>7}")
    for dtype, ours, peer in bench(cfg, batch, seq, steps, warmup):
        print(f"{dtype:<10} {ours:>14,.0f} {peer:>19,.0f} {ours / peer:>6.2f}x")


if __name__ == "__main__":
    main()
