"""Training speed: gpt2lab's training step beside transformers' GPT2LMHeadModel, same everything.

Both models start from the same weights and see the same batches (gpt2lab's BatchLoader on Tiny
Shakespeare), with the same AdamW groups, LR, gradient clipping and autocast dtype; each step ends
with the loss read back (one sync), as a training loop does. The four runs of a shape (ours and
the reference, float32 and bfloat16) take turns step by step, so a busy machine slows them alike.
Reported: median tokens/s over the timed steps, MFU against this machine's measured matmul peak,
the median loss of the last half of the steps and the median per-step loss difference between
the two implementations (the curves must match), and the ratios:

  same dtype             ours / reference, float32 and bfloat16 (goal >= 1)
  defaults vs float32    ours with our CPU default (bfloat16 autocast where the CPU has it)
                         / reference float32 (goal >= 2)

Shapes: the shakespeare-char preset (6 x 384, context 256, char vocabulary; with biases, as the
reference always has them) and the gpt2 shape (12 x 768, 50257 tokens) at a short context.

    .venv/bin/python bench/train.py            # full run (tens of minutes on 2 cores)
    .venv/bin/python bench/train.py --quick    # a short run that checks everything works
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gpt2lab import config
from gpt2lab.checkpoint.hf import to_hf_state
from gpt2lab.data import load_meta, prepare
from gpt2lab.data.loader import BatchLoader
from gpt2lab.device import autocast, pick_dtype
from gpt2lab.model import GPT
from gpt2lab.train.loop import Trainer
from gpt2lab.train.memory import flops_per_token
from gpt2lab.train.metrics import peak_flops
from gpt2lab.train.recipe import configure_optimizer, lr_at

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def prepare_data(root: Path, tokenizer: str) -> Path:
    """Tiny Shakespeare tokenized with `tokenizer`, last 10% held out."""
    out = root / f"data-{tokenizer}"
    if not (out / "meta.json").exists():
        prepare(str(TEXT), out, tokenizer, val_tail=0.1)
    return out


def ours(cfg: config.Config, run_dir: Path) -> Callable[[], float]:
    """One step of gpt2lab's own training loop (Trainer.train_step); returns the loss."""
    tr = Trainer(cfg, run_dir)  # one process on the CPU, reporting to no one

    def step() -> float:
        loss = tr.train_step().loss
        tr.state.step += 1
        return loss

    return step


def reference(cfg: config.Config, init: dict) -> Callable[[], float]:
    """The same step with transformers.GPT2LMHeadModel (weights from `init`, HF layout)."""
    import transformers

    m, tc = cfg.model, cfg.train
    hcfg = transformers.GPT2Config(
        vocab_size=m.vocab_size,
        n_positions=m.block_size,
        n_embd=m.n_embd,
        n_layer=m.n_layer,
        n_head=m.n_head,
        resid_pdrop=m.dropout,
        embd_pdrop=m.dropout,
        attn_pdrop=m.dropout,
    )
    model = transformers.GPT2LMHeadModel(hcfg)
    model.load_state_dict(init, strict=False)
    device = torch.device("cpu")
    dtype = pick_dtype(tc.dtype, device)
    opt = configure_optimizer(model, tc, device)
    loader = BatchLoader(
        cfg.data.dir,
        "train",
        block_size=m.block_size,
        batch_size=tc.micro_batch_size,
        grad_accum_steps=tc.grad_accum_steps,
        seed=tc.seed,
        sampling=cfg.data.sampling,
    )
    model.train()
    done = [0]

    def step() -> float:
        total = torch.zeros(())
        for _ in range(tc.grad_accum_steps):
            x, y = loader.next_batch()
            with autocast(device, dtype):
                logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().view(-1, logits.size(-1)), y.reshape(-1)
            )
            (loss / tc.grad_accum_steps).backward()
            total += loss.detach() / tc.grad_accum_steps
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr_at(done[0], tc)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done[0] += 1
        return total.item()

    return step


def alternate(steps: dict, n: int, warmup: int) -> dict:
    """Run the step functions in turn, n + warmup times each: load on a shared machine then
    slows both alike. Returns name -> (seconds per timed step, losses)."""
    out: dict = {k: ([], []) for k in steps}
    for i in range(warmup + n):
        for name, step in steps.items():
            t = time.perf_counter()
            loss = step()
            if i >= warmup:
                out[name][0].append(time.perf_counter() - t)
            out[name][1].append(loss)
    return out


def bench_shape(name: str, cfg: config.Config, root: Path, steps: int, warmup: int) -> list[dict]:
    rows = []
    tokens = cfg.train.micro_batch_size * cfg.model.block_size * cfg.train.grad_accum_steps
    default = str(pick_dtype("auto", torch.device("cpu"))).replace("torch.", "")
    funcs: dict[tuple[str, str], Callable[[], float]] = {}
    for dtype in ("float32", "bfloat16"):
        c = config.merge(cfg, {"train": {"dtype": dtype}})
        funcs[dtype, "gpt2lab"] = ours(c, Path(tempfile.mkdtemp(dir=root)))
        # the reference starts from our initial weights (same seed => same init as `ours`)
        torch.manual_seed(c.train.seed)
        c = config.merge(c, {"model": {"vocab_size": _vocab(c)}})
        funcs[dtype, "transformers"] = reference(c, to_hf_state(GPT(c.model)))
    # all four take turns, step by step: a busy machine slows each of them alike
    got = alternate(funcs, steps, warmup)
    vocab = {"model": {"vocab_size": _vocab(cfg)}}
    flops = flops_per_token(config.merge(cfg, vocab).model, cfg.model.block_size)
    for (dtype, who), (t, losses) in got.items():
        tps = tokens / statistics.median(t)
        # the median of the last half: one-step bfloat16 spikes (both models show them on
        # the CPU) do not decide whether the curves agree
        tail = losses[len(losses) // 2 :]
        peak = peak_flops(torch.device("cpu"), getattr(torch, dtype))
        rows.append(
            dict(
                shape=name,
                dtype=dtype,
                impl=who,
                tokens_per_s=tps,
                mfu=flops * tps / peak,
                loss=statistics.median(tail),
                losses=losses,
                default=dtype == default,
            )
        )
    return rows


def _vocab(cfg: config.Config) -> int:
    return int(load_meta(cfg.data.dir)["vocab_size"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny batches, a few steps")
    p.add_argument("--steps", type=int, help="timed steps per run")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if not TEXT.is_file():
        print(f"bench/train.py: {TEXT} is missing", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (3 if args.quick else 20)
    warmup = 1 if args.quick else 3
    common = ["train.device=cpu", "train.warmup_steps=2", "train.seed=1337", "model.dropout=0.0"]
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    char = prepare_data(root, "char")
    gpt2 = prepare_data(root, "gpt2")
    shapes = {
        "shakespeare-char": config.resolve(
            "shakespeare-char",
            None,
            # biases on, as GPT2LMHeadModel always has them: the same parameters, the same curve
            [
                *common,
                f"data.dir={char}",
                "model.bias=true",
                f"train.micro_batch_size={4 if args.quick else 16}",
            ],
        ),
        f"gpt2 @ T={64 if args.quick else 128}": config.resolve(
            "gpt2",
            None,
            [
                *common,
                f"data.dir={gpt2}",
                "train.grad_accum_steps=1",
                f"model.block_size={64 if args.quick else 128}",
                f"train.micro_batch_size={1 if args.quick else 4}",
            ],
        ),
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians over {steps} "
        f"steps after {warmup} warm-up; timings on a shared machine are noisy"
    )
    rows = []
    for name, cfg in shapes.items():
        rows += bench_shape(name, cfg, root, steps, warmup)
    print(f"\n{'shape':<18} {'dtype':<9} {'impl':<13} {'tokens/s':>10} {'MFU':>7} {'loss':>8}")
    for r in rows:
        print(
            f"{r['shape']:<18} {r['dtype']:<9} {r['impl']:<13} {r['tokens_per_s']:>10,.0f} "
            f"{100 * r['mfu']:>6.1f}% {r['loss']:>8.4f}"
        )
    print()
    for name in shapes:
        get = {(r["dtype"], r["impl"]): r for r in rows if r["shape"] == name}
        for dtype in ("float32", "bfloat16"):
            ratio = (
                get[dtype, "gpt2lab"]["tokens_per_s"] / get[dtype, "transformers"]["tokens_per_s"]
            )
            gap = statistics.median(
                abs(a - b)
                for a, b in zip(
                    get[dtype, "gpt2lab"]["losses"], get[dtype, "transformers"]["losses"]
                )
            )
            print(
                f"{name}: {dtype} ours/reference = {ratio:.2f}x (goal >= 1); "
                f"median per-step loss difference {gap:.1e}"
            )
        d = next(r for r in rows if r["shape"] == name and r["default"] and r["impl"] == "gpt2lab")
        ratio = d["tokens_per_s"] / get["float32", "transformers"]["tokens_per_s"]
        same = math.isclose(d["loss"], get["float32", "transformers"]["loss"], rel_tol=0.02)
        print(
            f"{name}: ours {d['dtype']} (default) / reference float32 = {ratio:.2f}x (goal >= 2)"
            f"; late loss {d['loss']:.4f} vs {get['float32', 'transformers']['loss']:.4f}"
            f" ({'same' if same else 'DIFFERENT'} curve)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
