"""`gpt2lab eval TASK --model M --data FILE`: the paper's zero-shot table, HellaSwag, perplexity."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gpt2lab import config
from gpt2lab.budget import require_inference
from gpt2lab.checkpoint.load import load_model, peek_config
from gpt2lab.config import GPTConfig
from gpt2lab.device import keep_freed_memory, pick_device, pick_dtype
from gpt2lab.errors import CheckpointError, ConfigError, DataError, mark_key
from gpt2lab.eval import paper
from gpt2lab.eval.datasets import DOWNLOADS
from gpt2lab.eval.scoring import as_logits_fn
from gpt2lab.eval.tasks import TASKS, Settings
from gpt2lab.quantize import METHODS as QUANTIZE_METHODS
from gpt2lab.quantize import quantize

ACCEPTS_OVERRIDES = True
EXAMPLES = """
gpt2lab eval perplexity --model runs/sc --data input.txt
gpt2lab eval perplexity --model hf/gpt2 --data notes.txt --context 512 --stride 256 --json
gpt2lab eval wikitext2 --model hf/gpt2 --data wikitext-2/wiki.test.tokens
gpt2lab eval lambada --model hf/gpt2 --data lambada_test.jsonl --eval.batch_size=16
gpt2lab eval hellaswag --model runs/gpt2 --data hellaswag_val.jsonl --limit 1000 --dtype bfloat16
gpt2lab eval perplexity --model runs/sc --data val.txt --quantize int8   # what int8 weights cost
"""
_TASK_HELP = {
    "perplexity": "loss, perplexity, bits per byte/char of any UTF-8 text",
    "wikitext2": "word-level perplexity on wiki.test.tokens (de-tokenized)",
    "wikitext103": "word-level perplexity on wiki.test.tokens of WikiText-103",
    "ptb": "word-level perplexity on ptb.test.txt (de-tokenized)",
    "lambada": "last-word accuracy and perplexity on lambada_test.jsonl",
    "cbt-cn": "Children's Book Test, common nouns: accuracy",
    "cbt-ne": "Children's Book Test, named entities: accuracy",
    "enwik8": "bits per byte on the last 5M bytes of enwik8",
    "text8": "bits per character on the last 5M characters of text8",
    "hellaswag": "accuracy and length-normalised accuracy on hellaswag_val.jsonl",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    tasks = "\n".join(f"  {name:<12} {_TASK_HELP[name]}" for name in TASKS)
    p.description = (p.description or "") + "\n\ntasks:\n" + tasks
    p.add_argument("task", choices=list(TASKS), metavar="TASK", help="one of the tasks below")
    p.add_argument("--model", "-m", required=True, help="run, checkpoint or HF GPT-2 directory")
    p.add_argument("--data", required=True, help="the dataset file (docs/eval.md: downloads)")
    p.add_argument("--context", type=int, help="tokens per window (default: the model's block)")
    p.add_argument("--stride", type=int, help="new tokens scored per window (default: context/2)")
    p.add_argument("--batch-size", type=int, help="sequences per forward pass (eval.batch_size)")
    p.add_argument("--limit", type=int, help="first N examples only (lambada, cbt, hellaswag)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (eval.device)")
    p.add_argument("--dtype", help="float32 (default) or bfloat16/float16 autocast")
    p.add_argument(
        "--quantize",
        choices=list(QUANTIZE_METHODS),
        help="score the model with int8 weights (gpt2lab.quantize; it computes in float32), to "
        "see what quantizing costs beside the same command without it (docs/quantize.md)",
    )
    p.add_argument("--config", help="a TOML file with an [eval] section")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    names = ("context", "stride", "batch_size", "limit", "device", "dtype")
    flags = {f"eval.{name}": getattr(args, name) for name in names}
    cfg = config.resolve(config_file=args.config, overrides=args.overrides, flags=flags).eval
    if not Path(args.data).is_file():
        raise DataError(
            f"--data {args.data} is not a file",
            f"the {args.task} file",
            f"download it from {DOWNLOADS[args.task]}"
            if args.task in DOWNLOADS
            else "fix the path",
        )
    device = pick_device(cfg.device, key="device")
    dtype = pick_dtype(cfg.dtype, device, key="dtype")
    if device.type == "cpu":  # each batch's logits and activations reused, not page-faulted anew
        keep_freed_memory()
    _check_memory(peek_config(args.model), cfg, device, dtype, loaded=False)
    model, tok = _load(args.model, device)
    if isinstance(model.config, GPTConfig):
        _check_memory(model.config, cfg, device, dtype, loaded=True)
    if args.quantize:
        model = quantize(model, args.quantize)
        dtype = torch.float32  # the int8 model's products and float parts compute in float32
    n_layer, n_embd, block_size = _shape(model)
    context = cfg.context or block_size
    if context > block_size:
        raise ConfigError(
            f"--context {context} is longer than the model's block_size {block_size}",
            f"at most {block_size}",
            f"drop --context or pass --context {block_size}",
        )
    settings = Settings(
        context=context,
        stride=cfg.stride or max(1, context // 2),
        batch_size=cfg.batch_size,
        progress=not args.no_progress,
        limit=cfg.limit,
    )
    started = time.perf_counter()
    metrics = TASKS[args.task](as_logits_fn(model, dtype), tok, args.data, settings)
    seconds = time.perf_counter() - started
    size = paper.model_size(n_layer, n_embd)
    _print_table(args, metrics, size, settings, seconds)
    if args.json:
        published = {label: theirs for label, _, theirs in paper.compare(args.task, metrics, size)}
        row = {"task": args.task, "model": args.model, **metrics, "seconds": round(seconds, 3)}
        row |= {
            "context": settings.context,
            "stride": settings.stride,
            "dtype": str(dtype).removeprefix("torch."),
            "quantize": args.quantize,
        }
        print(json.dumps({**row, "paper_size": size, "paper": published}))
    return 0


def _check_memory(mcfg: GPTConfig | None, cfg, device, dtype, loaded: bool) -> None:
    """Refuse a batch of windows whose logits and activations cannot fit, before allocating."""
    if mcfg is None:
        return
    context = min(cfg.context or mcfg.block_size, mcfg.block_size)
    require_inference(
        mcfg,
        cfg.batch_size,
        context,
        0,
        dtype,
        device,
        f"scoring {cfg.batch_size} windows of {context} tokens",
        f"lower {mark_key('eval.batch_size')} or {mark_key('eval.context')}",
        loaded=loaded,
        kv_cache=False,
    )


def _load(path: str, device):
    model, tok = load_model(path, device=device)
    if tok is None:
        raise CheckpointError(
            f"model {path} has no tokenizer beside it",
            "a run directory with tokenizer/, or a HF directory with vocab.json + merges.txt",
            "copy the tokenizer files into the model directory",
        )
    return model, tok


def _shape(model) -> tuple[int, int, int]:
    """(n_layer, n_embd, block_size) of our GPT (`config.block_size`) or a transformers GPT-2."""
    cfg = model.config
    return cfg.n_layer, cfg.n_embd, getattr(cfg, "block_size", None) or cfg.n_positions


def _print_table(args, metrics: dict, size: str | None, s, seconds: float) -> None:
    rows = paper.compare(args.task, metrics, size)
    theirs = f"paper ({size})" if size else "paper"
    counts = ", ".join(
        f"{metrics[k]:,} {k}" for k in ("examples", "words", "tokens", "bytes") if k in metrics
    )
    weights = f" | {args.quantize} weights" if args.quantize else ""
    print(f"{args.task} | {args.model}{weights} | {counts} | context {s.context} | {seconds:.1f} s")
    width = max(len(r[0]) for r in rows)
    has_paper = any(column for *_, column, _ in paper.ROWS[args.task])  # perplexity has none
    print(f"{'metric':<{width}}  {'ours':>10}" + (f"  {theirs:>12}" if has_paper else ""))
    for label, ours, published in rows:
        shown = "-" if published is None else f"{published:g}"
        print(f"{label:<{width}}  {ours:>10.4g}" + (f"  {shown:>12}" if has_paper else ""))
    if has_paper and not size:
        print("(the paper's figures are for GPT-2's shapes: 117M, 345M, 762M, 1542M)")
