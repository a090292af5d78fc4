"""Post-training speed and memory: gpt2lab sft / dpo beside trl's SFTTrainer / DPOTrainer.

Same model (a transformers GPT-2 of the gpt2-10m shape: 6 x 160, 5 heads, context 256, GPT-2's
50257 tokens, random weights saved once and loaded by both), same data (Shakespeare exchanges
from ../shared/data/shakespeare_okf as text prompt/completion and preference pairs, GPT-2 BPE,
the end-of-text token closing each reply), same batch (8 examples / 8 pairs), same optimizer
(AdamW, lr 1e-5, no warmup), CPU, float32. Each configuration runs in its own process, in turns
(ours, trl, ours, trl, ...), so that a busy machine slows them alike and each process's peak
resident memory (ru_maxrss) is its own.

Reported per configuration: median examples/s over the timed steps (after 2 warm-up steps),
tokens/s (examples/s x the data's mean tokens per example, the same for both), peak RSS; and
ours / trl ratios. DPO runs with the reference log-probabilities cached (gpt2lab's default,
trl's precompute_ref_log_probs=True) and without (a second, frozen model in memory).

    .venv/bin/python bench/post_training.py            # ~10 min on 2 idle cores
    .venv/bin/python bench/post_training.py --steps 4 --reps 1   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare_okf"
BATCH, WARMUP, LR = 8, 2, 1e-5
CONFIGS = ("ours-sft", "trl-sft", "ours-dpo", "trl-dpo", "ours-dpo-nocache", "trl-dpo-nocache")


def data(n: int = 600) -> tuple[list[dict], list[dict]]:
    """(prompt/completion records, preference pairs) of Shakespeare exchanges, as text."""
    from gpt2lab.posttrain.shakespeare import chat_set, corpus_text

    chats = chat_set(corpus_text(SHARED), max_chars=400).train[:n]
    sft = [
        {"prompt": r["messages"][0]["content"] + "\n\n", "completion": r["messages"][1]["content"]}
        for r in chats
    ]
    pairs = [
        {**sft[i], "chosen": sft[i]["completion"], "rejected": sft[(i + 7) % n]["completion"]}
        for i in range(n)
    ]
    for p in pairs:
        del p["completion"]
    return sft, pairs


def make_model(root: Path) -> Path:
    """A random transformers GPT-2 (gpt2-10m shape) with GPT-2's tokenizer files, saved once."""
    import torch
    import transformers

    from gpt2lab.checkpoint.hf import write_hf_tokenizer
    from gpt2lab.tokenizer import get_tokenizer

    out = root / "model"
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=6,
        n_head=5,
        n_embd=160,
        n_positions=256,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    transformers.GPT2LMHeadModel(cfg).save_pretrained(out)
    write_hf_tokenizer(get_tokenizer("gpt2"), out)
    return out


def ours(kind: str, model: Path, steps: int, work: Path) -> list[float]:
    """Seconds per step of gpt2lab's Trainer with the SFT or DPO task."""
    import torch

    from gpt2lab.config import resolve
    from gpt2lab.posttrain.dpo import DPOTask
    from gpt2lab.posttrain.sft import SFTTask
    from gpt2lab.train.loop import Trainer

    sft, pairs = data()
    section = "sft" if kind == "sft" else "dpo"
    cfg = resolve(
        section,
        None,
        [
            f"train.init_from={model}",
            f"train.micro_batch_size={BATCH}",
            f"train.lr={LR}",
            "train.warmup_steps=0",
            "train.dtype=float32",
            "train.device=cpu",
            f"{section}.template=plain",
            f"{section}.val_fraction=0.01",
            f"{section}.max_length=256",
        ]
        + (["dpo.cache_reference=false"] if kind == "dpo-nocache" else []),
    )
    task = SFTTask(sft) if kind == "sft" else DPOTask(pairs)
    tr = Trainer(cfg, work / f"ours-{kind}-{os.getpid()}", task=task)  # one per run, in turns
    times = []
    for _ in range(WARMUP + steps):
        t = time.perf_counter()
        tr.train_step()
        tr.state.step += 1
        times.append(time.perf_counter() - t)
    del torch
    return times[WARMUP:]


def trl_run(kind: str, model: Path, steps: int, work: Path) -> list[float]:
    """Seconds per step of trl's SFTTrainer / DPOTrainer (a callback times each step)."""
    import datasets
    import transformers
    import trl

    sft, pairs = data()
    tok = transformers.AutoTokenizer.from_pretrained(model)
    tok.pad_token = tok.eos_token
    hf = transformers.GPT2LMHeadModel.from_pretrained(model)
    times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    common = dict(
        output_dir=str(work / f"trl-{kind}-{os.getpid()}"),
        per_device_train_batch_size=BATCH,
        max_steps=WARMUP + steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        max_length=256,
        dataloader_num_workers=0,
        seed=0,
    )
    if kind == "sft":
        args = trl.SFTConfig(**common, completion_only_loss=True)
        trainer = trl.SFTTrainer(
            model=hf,
            args=args,
            train_dataset=datasets.Dataset.from_list(sft),
            processing_class=tok,
            callbacks=[Clock()],
        )
    else:
        args = trl.DPOConfig(
            **common, beta=0.1, precompute_ref_log_probs=kind == "dpo", loss_type=["sigmoid"]
        )
        trainer = trl.DPOTrainer(
            model=hf,
            args=args,
            train_dataset=datasets.Dataset.from_list(pairs),
            processing_class=tok,
            callbacks=[Clock()],
        )
    trainer.train()
    return times[WARMUP:]


def tokens_per_example(kind: str) -> float:
    """Mean tokens one example (SFT) or pair (both replies with the prompt) puts through."""
    from gpt2lab.tokenizer import get_tokenizer

    tok = get_tokenizer("gpt2")
    sft, pairs = data()
    n = lambda s: len(tok.encode_ordinary(s))  # noqa: E731
    if kind == "sft":
        return statistics.mean(n(r["prompt"]) + n(r["completion"]) + 1 for r in sft)
    return statistics.mean(
        2 * n(p["prompt"]) + n(p["chosen"]) + n(p["rejected"]) + 2 for p in pairs
    )


def child(name: str, steps: int, work: Path) -> None:
    """One configuration in this process; prints a JSON line."""
    import torch

    torch.manual_seed(0)
    model = make_model(work)
    who, kind = name.split("-", 1)
    times = (ours if who == "ours" else trl_run)(kind, model, steps, work)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    print(json.dumps({"name": name, "times": times, "peak_mib": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run (10)")
    ap.add_argument("--reps", type=int, default=2, help="runs of each configuration, in turns")
    ap.add_argument("--only", nargs="*", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.steps, Path(args.work))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-post-"))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, list[dict]] = {}
    for rep in range(args.reps):
        for name in args.only:
            cmd = [sys.executable, __file__, "--child", name, "--work", str(work)]
            cmd += ["--steps", str(args.steps)]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{name} failed:\n{r.stderr[-3000:]}")
            row = json.loads(r.stdout.strip().splitlines()[-1])
            results.setdefault(name, []).append(row)
            med = statistics.median(row["times"])
            print(
                f"rep {rep + 1} {name:18} {BATCH / med:7.2f} examples/s  "
                f"peak {row['peak_mib']:7.0f} MiB",
                file=sys.stderr,
            )
    print(
        f"\npost-training on CPU, float32, batch {BATCH}, gpt2-10m shape, torch threads "
        f"{os.environ.get('OMP_NUM_THREADS', 'default')}; machine load {os.getloadavg()[0]:.1f}"
    )
    print(f"{'configuration':20} {'examples/s':>11} {'spread':>13} {'tokens/s':>9} {'peak MiB':>9}")
    speed = {}
    for name, runs in results.items():
        kind = "sft" if name.endswith("sft") else "dpo"
        per = [BATCH / t for row in runs for t in row["times"]]
        med = statistics.median(per)
        speed[name] = med
        tps = med * tokens_per_example(kind)
        peak = max(row["peak_mib"] for row in runs)
        print(f"{name:20} {med:11.2f} {min(per):6.2f}-{max(per):6.2f} {tps:9.0f} {peak:9.0f}")
    for a, b in (
        ("ours-sft", "trl-sft"),
        ("ours-dpo", "trl-dpo"),
        ("ours-dpo-nocache", "trl-dpo-nocache"),
    ):
        if a in speed and b in speed:
            print(f"ratio {a} / {b}: {speed[a] / speed[b]:.2f}x")


if __name__ == "__main__":
    main()
