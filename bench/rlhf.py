"""RL speed: gpt2lab's GRPO step beside trl's GRPOTrainer, same weights, prompts and settings, CPU.

One step = rollouts (P prompts x G samples of N new tokens, sampled at temperature 1), the frozen
reference's log-probabilities (beta > 0), rewards, group-relative advantages and one optimizer
step over all of them (one epoch, one minibatch): the same work in both, in float32. Reported:
rollout tokens/s (generated tokens over the time spent generating), update tokens/s (prompt +
reply tokens through the forward/backward passes over the time of the rest of the step) and
end-to-end generated tokens/s, medians of the timed steps with their range, and the ratios.

The model is GPT-2 with GPT-2's vocabulary at a CPU-sized depth and width (random weights); trl
gets transformers' GPT2LMHeadModel with the very same weights and GPT-2's tokenizer. The reward
(the number of 'e' in a reply) is a plain function in both.

Needs trl (`pip install 'gpt2lab[post]'`).

    .venv/bin/python bench/rlhf.py            # ~5 minutes on 2 cores
    .venv/bin/python bench/rlhf.py --quick    # a short run that checks everything works
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import gpt2lab.posttrain.rlhf as rl
from gpt2lab.checkpoint.hf import save_hf
from gpt2lab.commands.convert import save_native
from gpt2lab.config import GPTConfig, resolve
from gpt2lab.model import GPT
from gpt2lab.posttrain.rlhf import PromptSet, RLOptions, RLTrainer, Scorer
from gpt2lab.tokenizer import get_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def reward(prompt: str, completion: str) -> float:
    return float(completion.count("e"))


def trl_reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    """The same reward in trl's form: a batch of completions in, a list of floats out."""
    return [reward(p, c) for p, c in zip(prompts, completions)]


def prompts(n: int) -> list[str]:
    """n short prompts: lines of tiny Shakespeare, or made-up ones when it is absent."""
    if SHAKESPEARE.is_file():
        lines = [ln.strip() for ln in SHAKESPEARE.read_text().splitlines() if len(ln) > 20]
        return lines[:n]
    return [f"Tell me about the number {i}, friend." for i in range(n)]


def timed_ours(policy_dir: Path, texts: list[str], args, steps: int) -> list[dict]:
    """gpt2lab's GRPO steps, with the time spent in the sampler and in the updates split out."""
    tok = get_tokenizer("gpt2")
    cfg = resolve(
        "grpo",
        None,
        [
            f"train.init_from={policy_dir}",
            f"train.max_steps={steps}",
            "train.lr=1e-5",
            "train.dtype=float32",
            "train.device=cpu",
            "train.checkpoint_interval=1000000",
            f"rl.batch_size={args.prompts}",
            f"rl.group_size={args.group}",
            f"rl.minibatch_size={args.prompts * args.group}",
            "rl.epochs=1",
            f"rl.max_new_tokens={args.new_tokens}",
            "rl.kl_coef=0.04",
            "rl.normalize_reward=false",
        ],
    )
    times: dict[str, float] = {}
    counts: dict[str, int] = {}

    def wrap(name, fn):
        def timed(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            times[name] = times.get(name, 0.0) + time.perf_counter() - t
            return out

        return timed

    sample, update = rl.sample, RLTrainer.update
    rl.sample = wrap("rollout", sample)
    RLTrainer.update = wrap("update", update)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as d:
            scorer = Scorer(fn=reward, name="count e")
            ids = [tok.encode_ordinary(t) for t in texts]  # plain-text prompts
            trainer = RLTrainer(
                cfg,
                Path(d) / "run",
                scorer,
                PromptSet(texts, ids),
                [tok.eot_token],
                RLOptions(),
            )
            for _ in range(steps):
                times.clear()
                t0 = time.perf_counter()
                row = trainer.rl_step()
                total = time.perf_counter() - t0
                trainer.step += 1
                generated = round(row["tokens_per_s"] * total)
                counts["prompt"] = args.prompts * args.group * args.prompt_len
                rows.append(
                    {
                        "generated": generated,
                        "rollout_s": times["rollout"],
                        "update_s": total - times["rollout"],
                        "total_s": total,
                        "update_tokens": generated + counts["prompt"],
                    }
                )
    finally:
        rl.sample, RLTrainer.update = sample, update
    return rows


def timed_trl(hf_dir: Path, texts: list[str], args, steps: int) -> list[dict]:
    """trl's GRPOTrainer steps on transformers' GPT-2, generate() timed apart."""
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    tok.pad_token = tok.eos_token
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, torch_dtype=torch.float32)
    gen_times: list[float] = []
    gen_tokens: list[int] = []
    generate = model.generate

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        out = generate(*a, **kw)
        gen_times.append(time.perf_counter() - t)
        prompt_len = (kw.get("input_ids") if "input_ids" in kw else a[0]).shape[1]
        new = out[:, prompt_len:]
        gen_tokens.append(int((new != tok.pad_token_id).sum()) or new.numel())
        return out

    model.generate = timed_generate
    n = args.prompts * args.group
    with tempfile.TemporaryDirectory() as d:
        config = GRPOConfig(
            output_dir=d,
            per_device_train_batch_size=n,
            gradient_accumulation_steps=1,
            num_generations=args.group,
            steps_per_generation=1,
            num_iterations=1,
            max_completion_length=args.new_tokens,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=0.04,
            learning_rate=1e-5,
            max_steps=steps,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=False,
            fp16=False,
            seed=0,
            dataloader_num_workers=0,
            disable_dropout=True,
        )
        data = Dataset.from_dict({"prompt": texts})
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=trl_reward,
            args=config,
            train_dataset=data,
            processing_class=tok,
        )
        step_times: list[float] = []

        class Clock(transformers.TrainerCallback):
            def on_step_begin(self, *a, **kw):
                self.t = time.perf_counter()

            def on_step_end(self, *a, **kw):
                step_times.append(time.perf_counter() - self.t)

        trainer.add_callback(Clock())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
    rows = []
    for total, g_s, g_n in zip(step_times, gen_times, gen_tokens):
        rows.append(
            {
                "generated": g_n,
                "rollout_s": g_s,
                "update_s": total - g_s,
                "total_s": total,
                "update_tokens": g_n + n * args.prompt_len,
            }
        )
    return rows


def summarize(rows: list[dict]) -> dict[str, tuple[float, float, float]]:
    """median (min, max) of rollout, update and end-to-end tokens/s over the timed steps."""
    series = {
        "rollout": [r["generated"] / r["rollout_s"] for r in rows],
        "update": [r["update_tokens"] / r["update_s"] for r in rows],
        "end-to-end": [r["generated"] / r["total_s"] for r in rows],
    }
    return {k: (statistics.median(v), min(v), max(v)) for k, v in series.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 timed step each, a tiny model")
    p.add_argument("--steps", type=int, default=4, help="timed steps (after 1 warm-up)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads for both (0: as is)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.layers, args.width, args.new_tokens = 1, 2, 64, 8
    torch.manual_seed(0)
    tok = get_tokenizer("gpt2")
    cfg = GPTConfig(block_size=256, n_layer=args.layers, n_head=4, n_embd=args.width)
    texts = prompts(args.prompts * (args.steps + 1))
    args.prompt_len = round(sum(len(tok.encode_ordinary(t)) for t in texts) / len(texts))
    model = GPT(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        save_native(model, tok, Path(d) / "ours")
        save_hf(model, Path(d) / "hf", tokenizer=tok)
        print(
            f"GPT-2 {args.layers}x{args.width} ({model.num_params() / 1e6:.1f}M params, GPT-2 "
            f"vocabulary), float32, {torch.get_num_threads()} threads; a step: {args.prompts} "
            f"prompts x {args.group} samples x {args.new_tokens} new tokens, beta 0.04, one "
            f"optimizer step; {args.steps} timed steps after 1 warm-up"
        )
        ours = timed_ours(Path(d) / "ours", texts, args, args.steps + 1)[1:]
        theirs = timed_trl(Path(d) / "hf", texts, args, args.steps + 1)[1:]
    a, b = summarize(ours), summarize(theirs)
    print(f"{'tokens/s':<12} {'gpt2lab':>26} {'trl GRPOTrainer':>26} {'ratio':>7}")
    for key in a:
        ma, lo_a, hi_a = a[key]
        mb, lo_b, hi_b = b[key]
        print(
            f"{key:<12} {ma:>10,.0f} ({lo_a:>6,.0f}-{hi_a:<6,.0f}) "
            f"{mb:>10,.0f} ({lo_b:>6,.0f}-{hi_b:<6,.0f}) {ma / mb:>6.2f}x"
        )


if __name__ == "__main__":
    main()
