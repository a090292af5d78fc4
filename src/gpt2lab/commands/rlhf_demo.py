"""`gpt2lab rlhf-demo`: make the Shakespeare chatbot cheerful, as Ziegler et al. (2019) did with
GPT-2 (a reward model from comparisons, then PPO with a KL penalty), on a CPU, with no download.

(1) The chat model of `gpt2lab posttrain-demo` (base 5-minute model + SFT; trained first unless
--sft names one). (2) 5,000 comparisons: two sampled replies per held-in prompt, labelled by VADER
in place of human labellers. (3) A reward model on them (`gpt2lab reward`). (4) PPO against the
reward model (`gpt2lab rlhf`: the policy never sees VADER). (5) DPO on the same comparisons.
(6) On held-out prompts (speeches of held-out plays): mean VADER score (the true reward), reward
model score, KL to the SFT model, distinct n-grams, for SFT, DPO and PPO; PPO's checkpoints
along the way; a table, a plot and samples side by side. Writes OUT/{base,sft,rm,ppo,dpo},
OUT/comparisons.jsonl, OUT/rlhf_demo.json and OUT/rlhf_demo.png. Without --overwrite, a stage
whose run directory OUT/rm, OUT/ppo or OUT/dpo is already complete is reused.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from gpt2lab.checkpoint import native
from gpt2lab.checkpoint.load import load_model
from gpt2lab.commands.rlhf import print_event
from gpt2lab.commands.train_console import (
    StopSignal,
    TrainConsole,
    demo_dir,
    require_positive,
)
from gpt2lab.demo import run_demo
from gpt2lab.errors import TrainingError
from gpt2lab.generate import ContextWarning
from gpt2lab.io import atomic_open, atomic_write_json, atomic_write_text, read_utf8
from gpt2lab.posttrain.cheerful import (
    LABEL_RULE,
    Comparisons,
    label_comparisons,
    measure,
    ppo_config,
    reward_config,
    sentiment,
)
from gpt2lab.posttrain.reward import load_reward_model
from gpt2lab.posttrain.reward_task import reward_model
from gpt2lab.posttrain.rlhf import rlhf
from gpt2lab.posttrain.run import dpo
from gpt2lab.posttrain.shakespeare import chat_set, corpus_text, dpo_config, train_sft_model
from gpt2lab.train.events import broadcast
from gpt2lab.train.metrics import read_metrics

ACCEPTS_OVERRIDES = False
EXAMPLES = """
gpt2lab rlhf-demo                                   # base, SFT, RM, PPO, DPO: ~15 min on a CPU
gpt2lab rlhf-demo --sft runs/posttrain-demo/sft     # start from the post-training demo's SFT
gpt2lab rlhf-demo --sft runs/posttrain-demo/sft --ppo-minutes 6 --out runs/cheer-long
"""
MODELS = ("sft", "dpo", "ppo")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sft", metavar="RUN_DIR", help="the chat model (default: train base + SFT)")
    p.add_argument("-o", "--out", metavar="DIR", default="runs/rlhf-demo", help="output folder")
    p.add_argument(
        "-i", "--input", metavar="FILE|DIR", help="the corpus (default: gpt2lab demo's cache)"
    )
    p.add_argument("--base-minutes", type=float, default=4.0, help="base model training (4)")
    p.add_argument("--sft-minutes", type=float, default=2.0, help="SFT training (2)")
    p.add_argument("--comparisons", type=int, default=5000, help="VADER-labelled pairs (5000)")
    p.add_argument(
        "--reuse-comparisons",
        metavar="FILE",
        help="the comparisons.jsonl of an earlier run instead of sampling and labelling anew",
    )
    p.add_argument("--rm-minutes", type=float, default=1.5, help="reward model training (1.5)")
    p.add_argument("--ppo-minutes", type=float, default=3.0, help="PPO (3)")
    p.add_argument("--dpo-minutes", type=float, default=1.5, help="DPO (1.5)")
    p.add_argument("--samples", type=int, default=400, help="held-out prompts measured (400)")
    for stage in ("rm", "ppo", "dpo"):
        p.add_argument(
            f"--{stage}-steps",
            type=int,
            default=0,
            help=f"end the {stage.upper()} run after this many steps instead of its minutes "
            "(for a busy machine; 0: the minutes)",
        )
    p.add_argument("--overwrite", action="store_true", help="start OUT's runs over")


ENTRIES = (
    "base",
    "sft",
    "comparisons.jsonl",
    "rm",
    "ppo",
    "dpo",
    "rlhf_demo.json",
    "rlhf_demo.png",
    "rlhf_demo.txt",
)  # what it writes in --out


def run(args: argparse.Namespace) -> int:
    with demo_dir(args.out, "rlhf-demo", ENTRIES, [args.sft, args.input, args.reuse_comparisons]):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    require_positive(
        args, ("base_minutes", "sft_minutes", "comparisons", "rm_minutes", "ppo_minutes")
    )
    score = sentiment()  # fail before any training if VADER is missing
    out = Path(args.out)
    t_start = time.perf_counter()
    say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    warnings.simplefilter("ignore", ContextWarning)
    console = TrainConsole(progress=sys.stderr.isatty())
    times: dict[str, float] = {}
    with StopSignal() as stop:
        handle = broadcast(stop.follow, console)
        sft_dir = Path(args.sft) if args.sft else out / "sft"
        chat = chat_set(corpus_text(args.input))
        if not args.sft:
            say(f"== 1/6 base model: gpt2lab demo, {args.base_minutes:g} min -> {out / 'base'}")
            t = time.perf_counter()
            run_demo(
                out / "base",
                args.input if args.input and Path(args.input).is_file() else None,
                minutes=args.base_minutes,
                num_samples=0,
                overwrite=args.overwrite,
                on_event=handle,
                should_stop=stop.requested,
            )
            say(f"   SFT on {len(chat.train):,} exchanges, {args.sft_minutes:g} min -> {sft_dir}")
            train_sft_model(
                out / "base",
                sft_dir,
                chat,
                minutes=args.sft_minutes,
                overwrite=args.overwrite,
                on_event=handle,
                should_stop=stop.requested,
            )
            times["base_and_sft"] = time.perf_counter() - t
        sft, tok = load_model(sft_dir, device="cpu", dtype=torch.float32)
        template = tok.chat_template
        if template is None:
            raise TrainingError(
                f"{sft_dir} has no chat template", "an SFT run of `gpt2lab posttrain-demo`"
            )
        held_in = [r["messages"][0]["content"] for r in chat.train]
        random.Random(0).shuffle(held_in)
        held_out = [r["messages"][0]["content"] for r in chat.test][: args.samples]

        say(f"== 2/6 {args.comparisons:,} comparisons: {LABEL_RULE}")
        t = time.perf_counter()
        comps = Comparisons([], 0, 0, 0)
        if args.reuse_comparisons:  # an earlier run's, topped up with new samples if short
            lines = read_utf8(args.reuse_comparisons).splitlines()
            comps.records = [json.loads(ln) for ln in lines][: args.comparisons]
        missing = args.comparisons - len(comps.records)
        if missing > 0:
            more = label_comparisons(
                sft, tok, template, held_in, missing, score, seed=10**7 if comps.records else 0
            )
            comps.records += more.records
            comps.prompts_used, comps.ties, comps.unended = (
                more.prompts_used,
                more.ties,
                more.unended,
            )
        times["comparisons"] = time.perf_counter() - t
        with atomic_open(out / "comparisons.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in comps.records)
        say(
            f"   {len(comps.records):,} comparisons from {comps.prompts_used:,} prompts "
            f"({comps.ties:,} ties, {comps.unended:,} unfinished replies skipped) "
            f"-> {out / 'comparisons.jsonl'}"
        )
        if len(comps.records) < 100:
            raise TrainingError(
                f"only {len(comps.records)} comparisons", "a chat model that closes its replies"
            )

        say(f"== 3/6 reward model, {budget(args.rm_minutes, args.rm_steps)} -> {out / 'rm'}")
        t = time.perf_counter()
        done(out / "rm", args.overwrite, say) or reward_model(
            reward_config(sft_dir, args.rm_minutes, by_steps(args.rm_steps)),
            out / "rm",
            records=comps.records,
            overwrite=args.overwrite,
            on_event=handle,
            should_stop=stop.requested,
        )
        times["reward_model"] = time.perf_counter() - t
        rm_rows = [r for r in read_metrics(out / "rm") if "val_accuracy" in r]
        if stop.requested():
            say("stopped by a signal: run the same command again to go on from the stages done")
            return 130

        say(
            f"== 4/6 PPO against the reward model, {budget(args.ppo_minutes, args.ppo_steps)} "
            f"-> {out / 'ppo'}"
        )
        t = time.perf_counter()

        def ppo_events(event: Any) -> None:
            stop.follow(event)
            print_event(event)

        done(out / "ppo", args.overwrite, say) or rlhf(
            ppo_config(sft_dir, out / "rm", args.ppo_minutes, by_steps(args.ppo_steps)),
            out / "ppo",
            prompts=held_in,
            overwrite=args.overwrite,
            on_event=ppo_events,
            should_stop=stop.requested,
        )
        times["ppo"] = time.perf_counter() - t
        if stop.requested():
            say("stopped by a signal: run the same command again to go on from the stages done")
            return 130

        say(
            f"== 5/6 DPO on the same comparisons, {budget(args.dpo_minutes, args.dpo_steps)} "
            f"-> {out / 'dpo'}"
        )
        t = time.perf_counter()
        done(out / "dpo", args.overwrite, say) or dpo(
            dpo_config(sft_dir, args.dpo_minutes, by_steps(args.dpo_steps)),
            out / "dpo",
            records=comps.records,
            overwrite=args.overwrite,
            on_event=handle,
            should_stop=stop.requested,
        )
        times["dpo"] = time.perf_counter() - t
        if stop.requested():
            say("stopped by a signal: run the same command again to go on from the stages done")
            return 130

    say(f"== 6/6 measuring on {len(held_out)} held-out prompts ({', '.join(chat.held_out)})")
    t = time.perf_counter()
    rm = load_reward_model(out / "rm")
    models = {
        "sft": sft,
        "dpo": load_model(out / "dpo", device="cpu", dtype=torch.float32)[0],
        "ppo": load_model(out / "ppo", device="cpu", dtype=torch.float32)[0],
    }
    table, replies = {}, {}
    for name, model in models.items():
        m, r = measure(model, sft, rm, tok, template, held_out, score)
        table[name], replies[name] = m.to_dict(), r.texts
    m0, _ = measure(sft, sft, rm, tok, template, held_out[:128], score, seed=2)
    curve = [{"step": 0, **m0.to_dict()}]  # the SFT model is PPO's step 0
    for ckpt in native.list_checkpoints(out / "ppo"):
        model, _ = load_model(ckpt, device="cpu", dtype=torch.float32)
        m, _ = measure(model, sft, rm, tok, template, held_out[:128], score, seed=2)
        curve.append({"step": native.load_state(ckpt)["step"], **m.to_dict()})
    times["measure"] = time.perf_counter() - t
    ppo_rows = read_metrics(out / "ppo")
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "sft": str(sft_dir),
        "held_out_plays": list(chat.held_out),
        "held_out_prompts": len(held_out),
        "rule": LABEL_RULE,
        "comparisons": len(comps.records),
        "comparison_prompts": comps.prompts_used,
        "rm_val_accuracy": rm_rows[-1]["val_accuracy"] if rm_rows else None,
        "rm_val_loss": rm_rows[-1]["val_loss"] if rm_rows else None,
        "rm_steps": rm_rows[-1]["step"] if rm_rows else 0,
        "ppo_steps": ppo_rows[-1]["step"] if ppo_rows else 0,
        "ppo_final_beta": ppo_rows[-1]["beta"] if ppo_rows else None,
        "dpo_steps": native.load_state(native.require_latest(out / "dpo"))["step"],
        "table": table,
        "ppo_checkpoints": curve,
        "seconds": {**times, "total": time.perf_counter() - t_start},
        "examples": [
            {"user": held_out[i], **{k: replies[k][i] for k in MODELS}}
            for i in range(min(6, len(held_out)))
        ],
    }
    atomic_write_json(out / "rlhf_demo.json", result)
    result["plot"] = str(plot(result, ppo_rows, out / "rlhf_demo.png"))
    text = summary_text(result)
    atomic_write_text(out / "rlhf_demo.txt", text + "\n")
    print(text)
    return 0


def done(run_dir: Path, overwrite: bool, say: Any) -> bool:
    """A stage whose run directory is complete from an earlier call is reused (not with
    --overwrite): delete its directory to run it again."""
    if overwrite or native.find_latest(run_dir) is None:
        return False
    say(f"   reusing {run_dir} (delete it, or pass --overwrite, to run this stage again)")
    return True


def budget(minutes: float, steps: int) -> str:
    return f"{steps} steps" if steps > 0 else f"{minutes:g} min"


def by_steps(steps: int) -> list[str]:
    """Overrides that end a stage after `steps` steps rather than on the clock (0: none)."""
    return [f"train.max_steps={steps}", "train.max_minutes=0"] if steps > 0 else []


def summary_text(r: dict[str, Any]) -> str:
    """The demo's table, its figures and a few samples side by side."""
    lines = [
        f"RLHF demo ({r['date']}): {r['comparisons']:,} VADER-labelled comparisons; reward model "
        f"held-out accuracy {r['rm_val_accuracy']:.3f} (loss {r['rm_val_loss']:.3f}, "
        f"{r['rm_steps']} steps); PPO {r['ppo_steps']} steps (final beta "
        f"{r['ppo_final_beta']:.4f}); DPO {r['dpo_steps']} steps",
        f"held-out prompts: {r['held_out_prompts']} speeches of {', '.join(r['held_out_plays'])}",
        "",
        "| model | VADER (true reward) | RM score | KL to SFT (nats/reply) | distinct-1 | "
        "distinct-2 | closed by <|end|> | chars |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in MODELS:
        m = r["table"][name]
        lines.append(
            f"| {name.upper()} | {m['vader']:+.3f} | {m['rm_score']:+.3f} | {m['kl_to_sft']:.2f} "
            f"| {m['distinct_1']:.3f} | {m['distinct_2']:.3f} | {m['ended']:.1%} "
            f"| {m['mean_chars']:.0f} |"
        )
    if r["ppo_checkpoints"]:
        lines += ["", "PPO along the way (128 held-out prompts): step, VADER, KL to SFT"]
        lines += [
            f"  {c['step']:>5}  {c['vader']:+.3f}  {c['kl_to_sft']:.2f}"
            for c in r["ppo_checkpoints"]
        ]
    secs = ", ".join(f"{k} {v / 60:.1f} min" for k, v in r["seconds"].items())
    lines += ["", f"time: {secs}", "", "samples on held-out prompts:"]
    for ex in r["examples"]:
        lines.append(f"> {ex['user']!r}")
        for name in MODELS:
            lines.append(f"  {name.upper():>3}: {ex[name]!r}")
    return "\n".join(lines)


def plot(r: dict[str, Any], ppo_rows: list[dict], path: Path) -> Path:
    """PPO's training curve, true reward against KL, and the table as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    ax = axes[0]
    steps = [row["step"] for row in ppo_rows]
    ax.plot(steps, [row["reward"] for row in ppo_rows], color="C2", label="RM score (rollouts)")
    ax.set(xlabel="PPO step", ylabel="mean reward-model score", title="PPO: reward and KL")
    twin = ax.twinx()
    twin.plot(steps, [row["kl"] for row in ppo_rows], color="C3", alpha=0.7, label="KL")
    twin.set_ylabel("KL to SFT, nats per reply")
    ax.legend(loc="upper left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    ax = axes[1]
    curve = r["ppo_checkpoints"]
    ax.plot(
        [c["kl_to_sft"] for c in curve],
        [c["vader"] for c in curve],
        "o-",
        color="C2",
        alpha=0.5,
        label="PPO checkpoints (128 prompts)",
    )
    for name, color in (("sft", "C0"), ("dpo", "C1"), ("ppo", "C2")):
        m = r["table"][name]
        ax.scatter([m["kl_to_sft"]], [m["vader"]], s=80, color=color, label=name.upper(), zorder=3)
    ax.set(
        xlabel="KL to SFT (nats per reply)",
        ylabel="mean VADER compound (true reward)",
        title="held-out prompts: true reward vs KL",
    )
    ax.legend(fontsize=8)
    ax = axes[2]
    keys = ("vader", "rm_score", "distinct_2")
    width = 0.25
    for j, name in enumerate(MODELS):
        values = [r["table"][name][k] for k in keys]
        ax.bar([i + (j - 1) * width for i in range(len(keys))], values, width, label=name.upper())
    ax.set_xticks(range(len(keys)), ["VADER", "RM score", "distinct-2"])
    ax.axhline(0, color="black", lw=0.5)
    ax.set_title("held-out prompts")
    ax.legend(fontsize=8)
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(
        f"Make the Shakespeare chatbot cheerful: {r['comparisons']:,} VADER comparisons, "
        f"RM held-out accuracy {r['rm_val_accuracy']:.2f}"
    )
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)
    return path
