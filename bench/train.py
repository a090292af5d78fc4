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

First rows: the C kernels `gpt2lab train` uses on a CPU (GELU, causal attention) beside PyTorch's,
forward + backward, then the BPE demo's step with the fused head and loss beside the model's own
(`kernels.cross_entropy`). Shapes: the shakespeare-char preset (6 x 384, context 256, char
vocabulary; with biases, as the reference always has them) and the gpt2 shape (12 x 768, 50257
tokens) at a short context.

With --nanogpt DIR (a clone of karpathy/nanoGPT, run from a copy in a temporary directory, never
vendored), nanoGPT's own train.py is a second peer, run as its README says for a CPU, on the same
Tiny Shakespeare tokens written in its format: its CPU recipe (4 x 128, context 64, batch 12,
char vocabulary) and the gpt2 shape at T=256. gpt2lab's `gpt2lab train` runs the same shapes
(no biases, as nanoGPT's train.py). The two take turns, run by run; tokens/s comes from each
one's own per-step times (nanoGPT's `iter ... time` lines, our metrics.jsonl), medians of the
second half of the steps; MFU for both with the same FLOP count and this CPU's measured peak.
nanoGPT's train.py runs float32 on a CPU whatever --dtype says (no autocast there), so the ratios
are: ours float32 / nanoGPT float32 (goal >= 1) and ours with its CPU default (bfloat16 autocast
where the CPU has it) / nanoGPT float32 (goal >= 2).

    .venv/bin/python bench/train.py            # full run (tens of minutes on 2 cores)
    .venv/bin/python bench/train.py --quick    # a short run that checks everything works
    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
    .venv/bin/python bench/train.py --nanogpt /tmp/nanoGPT --only-nanogpt
    .venv/bin/python bench/train.py --nanogpt /tmp/nanoGPT --only-nanogpt --nanogpt-shapes nanoGPT \
        --rounds 6                                   # its CPU recipe alone, more turns
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gpt2lab import config
from gpt2lab.checkpoint.hf import to_hf_state
from gpt2lab.config import GPTConfig
from gpt2lab.data import load_meta, load_tokens, prepare
from gpt2lab.data.loader import BatchLoader
from gpt2lab.device import autocast, keep_freed_memory, pick_dtype
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
    return trainer_step(Trainer(cfg, run_dir))  # one process on the CPU, reporting to no one


def trainer_step(tr: Trainer) -> Callable[[], float]:
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


# nanoGPT's README CPU recipe, and the gpt2 shape at T=256 (nanoGPT's train.py defaults)
NANOGPT_SHAPES = {
    "nanoGPT CPU recipe (4x128, T=64)": dict(
        dataset="shakespeare_char", tokenizer="char", n_layer=4, n_head=4, n_embd=128,
        block_size=64, batch_size=12,
    ),
    "gpt2 (12x768, T=256)": dict(
        dataset="shakespeare", tokenizer="gpt2", n_layer=12, n_head=12, n_embd=768,
        block_size=256, batch_size=2,
    ),
}  # fmt: skip


def nanogpt_workdir(src: Path, root: Path, data: dict[str, Path]) -> Path:
    """A copy of nanoGPT's train.py, model.py, configurator.py and config/ in a temporary
    directory, with our Tiny Shakespeare tokens written as its data/<dataset>/{train,val}.bin."""
    work = root / "nanoGPT"
    work.mkdir()
    for name in ("train.py", "model.py", "configurator.py"):
        shutil.copy(src / name, work / name)
    shutil.copytree(src / "config", work / "config")
    for dataset, tokenizer in (("shakespeare_char", "char"), ("shakespeare", "gpt2")):
        out = work / "data" / dataset
        out.mkdir(parents=True)
        for split in ("train", "val"):
            load_tokens(data[tokenizer], split).astype("uint16").tofile(out / f"{split}.bin")
        if tokenizer == "char":
            meta = {"vocab_size": int(load_meta(data[tokenizer])["vocab_size"])}
            (out / "meta.pkl").write_bytes(pickle.dumps(meta))
    return work


def run_nanogpt(work: Path, shape: dict, iters: int) -> list[float]:
    """Seconds per iteration of nanoGPT's train.py (its own `iter N: ... time Xms` lines)."""
    argv = [
        sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu",
        "--compile=False", "--eval_iters=1", "--eval_interval=1000000", "--log_interval=1",
        f"--dataset={shape['dataset']}", f"--block_size={shape['block_size']}",
        f"--batch_size={shape['batch_size']}", f"--n_layer={shape['n_layer']}",
        f"--n_head={shape['n_head']}", f"--n_embd={shape['n_embd']}",
        f"--max_iters={iters}", f"--lr_decay_iters={iters}", "--dropout=0.0",
        "--gradient_accumulation_steps=1", "--dtype=float32", "--out_dir=out",
        "--always_save_checkpoint=False",
    ]  # fmt: skip
    r = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"nanoGPT train.py failed:\n{r.stderr[-3000:]}")
    ms = [float(m) for m in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms", r.stdout, re.M)]
    return [t / 1000 for t in ms[1:]]  # iter 0 includes the first evaluation


def run_ours(data: Path, root: Path, shape: dict, steps: int, dtype: str) -> list[float]:
    """Tokens/s of `gpt2lab train` on the same shape, step by step (metrics.jsonl)."""
    out = Path(tempfile.mkdtemp(dir=root)) / "run"
    argv = [
        sys.executable, "-m", "gpt2lab", "train", "--data", str(data), "--out", str(out),
        f"--model.n_layer={shape['n_layer']}", f"--model.n_head={shape['n_head']}",
        f"--model.n_embd={shape['n_embd']}", f"--model.block_size={shape['block_size']}",
        "--model.bias=false", "--model.dropout=0.0", f"--train.max_steps={steps}",
        f"--train.micro_batch_size={shape['batch_size']}", "--train.grad_accum_steps=1",
        f"--train.dtype={dtype}", "--train.device=cpu", "--train.log_interval=1",
        "--train.eval_interval=1000000", "--train.eval_steps=1", "--train.final_eval_steps=1",
        "--train.checkpoint_interval=1000000", "--no-plot", "--no-progress",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    r = subprocess.run(argv, capture_output=True, text=True, timeout=3600, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"gpt2lab train failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = shape["batch_size"] * shape["block_size"]
    return [tokens / r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]


def nanogpt_rows(
    src: Path, root: Path, data: dict[str, Path], iters: int, rounds: int, shapes: list[str]
) -> None:
    work = nanogpt_workdir(src, root, data)
    default = str(pick_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    print(
        f"\nnanoGPT's train.py ({src}) beside `gpt2lab train`, same shapes and tokens, "
        f"{rounds} rounds in turns of {iters} steps; medians of the second half of all steps"
    )
    print(
        f"{'shape':<33} {'run':<22} {'tokens/s':>9} {'(spread)':>15} {'MFU':>6}  ratio to nanoGPT"
    )
    for name, shape in NANOGPT_SHAPES.items():
        if name.split()[0] not in shapes:
            continue
        d = data[shape["tokenizer"]]
        keys = ("n_layer", "n_head", "n_embd", "block_size")
        cfg = GPTConfig(
            **{k: shape[k] for k in keys}, vocab_size=int(load_meta(d)["vocab_size"]), bias=False
        )
        flops = flops_per_token(cfg, shape["block_size"])
        runs = {
            "nanoGPT float32": functools.partial(run_nanogpt, work, shape, iters),
            "gpt2lab float32": functools.partial(run_ours, d, root, shape, iters, "float32"),
        }
        if default != "float32":
            name_default = f"gpt2lab {default} (default)"
            runs[name_default] = functools.partial(run_ours, d, root, shape, iters, "auto")
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(rounds):
            for k, fn in runs.items():
                got = fn()
                times[k] += got[len(got) // 2 :]
        tokens = shape["batch_size"] * shape["block_size"]
        base = statistics.median(times["nanoGPT float32"])
        for k, t in times.items():
            rates = sorted(tokens / x for x in t)
            dtype = torch.bfloat16 if "bfloat16" in k else torch.float32
            mfu = flops * statistics.median(rates) / peak_flops(torch.device("cpu"), dtype)
            print(
                f"{name:<33} {k:<22} {statistics.median(rates):>9,.0f} "
                f"{f'{rates[0]:,.0f}-{rates[-1]:,.0f}':>15} {mfu:>6.1%}  "
                f"{base / statistics.median(t):.2f}x"
            )


def gelu_rows(repeats: int = 100) -> None:
    """GPT-2's GELU forward + backward on one MLP activation of nanoGPT's CPU recipe (12 x 64 x
    512): gelu.c (what `gpt2lab train` uses on a CPU) beside PyTorch's kernel, in turns."""
    import torch.nn.functional as F

    from gpt2lab.kernels.gelu import fast_gelu

    print("\nGELU (tanh), forward + backward of a 12x64x512 activation, median of", repeats)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(12, 64, 512) * 3).to(dtype).requires_grad_()
        gy = torch.randn(12, 64, 512).to(dtype)
        fns = {"gelu.c": fast_gelu, "PyTorch": lambda t: F.gelu(t, approximate="tanh")}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn(x).backward(gy)
                times[k].append(time.perf_counter() - t)
                x.grad = None
        us = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        print(
            f"  {str(dtype).removeprefix('torch.'):<9} gelu.c {us['gelu.c']:7.0f} us   "
            f"PyTorch {us['PyTorch']:7.0f} us   {us['PyTorch'] / us['gelu.c']:.2f}x"
        )


# (batch, T, heads, head size): nanoGPT's CPU recipe, the demo's and the gpt2 shape at T=256
ATTENTION_SHAPES = {
    "4x128 recipe": (12, 64, 4, 32),
    "demo 36x128": (36, 128, 2, 64),
    "gpt2 @ T=256": (2, 256, 12, 64),
}


def attention_rows(repeats: int = 30) -> None:
    """One layer's causal attention, forward + backward, from the c_attn output (B, T, 3C) to the
    heads' output (B, T, C): attention.c (what `gpt2lab train` uses on a CPU up to T=256) beside
    PyTorch's SDPA and the model's explicit path, split and merged as the model does, in turns."""
    from gpt2lab.kernels.attention import fused_causal_attention
    from gpt2lab.model import attention

    def torch_path(explicit: bool) -> Callable[[torch.Tensor, int], torch.Tensor]:
        def run(qkv: torch.Tensor, nh: int) -> torch.Tensor:
            B, T, C = qkv.size(0), qkv.size(1), qkv.size(2) // 3
            q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in qkv.split(C, dim=2))
            y, _ = attention(q, k, v, explicit=explicit)
            return y.transpose(1, 2).contiguous().view(B, T, C)

        return run

    fns = {
        "attention.c": fused_causal_attention,
        "SDPA": torch_path(False),
        "explicit": torch_path(True),
    }
    print(f"\ncausal attention of one layer, forward + backward, median of {repeats}")
    for name, (B, T, nh, hs) in ATTENTION_SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            qkv = torch.randn(B, T, 3 * nh * hs).to(dtype)
            dy = torch.randn(B, T, nh * hs).to(dtype)
            times: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(repeats):
                for k, fn in fns.items():
                    x = qkv.clone().requires_grad_()
                    t = time.perf_counter()
                    fn(x, nh).backward(dy)
                    times[k].append(time.perf_counter() - t)
            us = {k: statistics.median(v) * 1e6 for k, v in times.items()}
            best = min(us["SDPA"], us["explicit"])
            print(
                f"  {name:<13} {str(dtype).removeprefix('torch.'):<9} "
                + "   ".join(f"{k} {v:7.0f} us" for k, v in us.items())
                + f"   {best / us['attention.c']:.2f}x PyTorch's faster path"
            )


def loss_rows(data: Path, root: Path, steps: int, batch: int) -> None:
    """The BPE demo's training step (GPT-2's 50,257 ids) with the fused head and loss
    (`kernels.cross_entropy`, what `gpt2lab train` uses on a CPU where it pays) beside the
    model's own `logits_and_loss`, in turns in one process, at two widths."""
    from gpt2lab.model import GPT

    print(f"\nthe BPE demo's step ({batch} x 128 tokens), fused loss vs the model's, {steps} steps")
    for width in (128, 256):
        overrides = [
            "train.device=cpu", f"data.dir={data}", "model.vocab_size=50257",
            "model.pad_vocab_to=1", f"model.n_embd={width}", f"train.micro_batch_size={batch}",
        ]  # fmt: skip
        cfg = config.resolve("demo", None, overrides)
        runs = {}
        for name in ("fused", "readable"):
            tr = Trainer(cfg, Path(tempfile.mkdtemp(dir=root)))
            if name == "readable":
                tr.raw.__class__ = GPT  # the swap `gpt2lab train` made, undone
            runs[name] = tr
        out = alternate({k: trainer_step(tr) for k, tr in runs.items()}, steps, 1)
        ms = {k: statistics.median(t) * 1e3 for k, (t, _) in out.items()}
        same = max(abs(a - b) for a, b in zip(out["fused"][1], out["readable"][1]))
        print(
            f"  n_embd {width:<4} fused {ms['fused']:7.0f} ms   readable {ms['readable']:7.0f} ms"
            f"   {ms['readable'] / ms['fused']:.2f}x   (losses within {same:.1e})"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny batches, a few steps")
    p.add_argument("--steps", type=int, help="timed steps per run")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--nanogpt", type=Path, metavar="DIR", help="a clone of karpathy/nanoGPT")
    p.add_argument("--only-nanogpt", action="store_true", help="skip the transformers rows")
    p.add_argument("--rounds", type=int, default=2, help="nanoGPT/gpt2lab runs in turns")
    p.add_argument(
        "--nanogpt-shapes",
        default="nanoGPT,gpt2",
        help="which of the two nanoGPT shapes to run: nanoGPT (its CPU recipe), gpt2 (T=256)",
    )
    args = p.parse_args()
    if not TEXT.is_file():
        print(f"bench/train.py: {TEXT} is missing", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    # as `gpt2lab train` does on a CPU; process-wide, so the transformers rows get it too
    keep_freed_memory()
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
    gelu_rows()
    attention_rows()
    loss_rows(gpt2, root, steps, 8 if args.quick else 36)
    if args.nanogpt:
        iters = 6 if args.quick else 20
        data = {"char": char, "gpt2": gpt2}
        nanogpt_rows(args.nanogpt, root, data, iters, args.rounds, args.nanogpt_shapes.split(","))
    else:
        print("nanoGPT: not measured (pass --nanogpt DIR, a clone of karpathy/nanoGPT)")
    if args.only_nanogpt:
        return 0
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
