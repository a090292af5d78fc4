"""`gpt2lab train`: pretrain or fine-tune a GPT into a run directory; `--resume` continues one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt2lab.checkpoint import native
from gpt2lab.commands.train_console import run_in_console
from gpt2lab.config import PRESETS, resolve
from gpt2lab.errors import UsageError
from gpt2lab.outdir import OutputDir, check_not_overlapping
from gpt2lab.plot import plot_runs
from gpt2lab.train import build, train
from gpt2lab.train.dist import launched_rank

ACCEPTS_OVERRIDES = True
EXAMPLES = """
gpt2lab prepare shakespeare-char --input input.txt --out data/sc
gpt2lab train --data data/sc --out runs/sc --preset shakespeare-char
gpt2lab train --data data/sc --out runs/small --preset shakespeare-char --train.max_steps=500 \\
    --model.n_layer=4 --train.dtype=float32
gpt2lab train --data data/sc --out runs/muon --preset shakespeare-char --train.optimizer=muon \\
    --train.muon_lr=0.02 --train.lr_schedule=wsd --train.min_lr=0   # Muon + warmup-stable-decay
gpt2lab train --out runs/sc --resume --train.max_steps=8000     # continue, with more steps
gpt2lab train --init-from gpt2 --data my.txt --out runs/ft --preset finetune   # fine-tune
gpt2lab train --init-from gpt2 --data data/mine --out runs/ft --train.freeze='transformer.w?e.*'
torchrun --nproc_per_node=8 -m gpt2lab train --data data/owt --out runs/gpt2 --preset gpt2
torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=8 \\
    -m gpt2lab train --data data/owt --out runs/gpt2 --preset gpt2 --train.strategy=fsdp
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        metavar="DIR|FILE",
        help="a directory from `gpt2lab prepare`, or one text file (prepared into "
        "RUN_DIR/data with the model's tokenizer)",
    )
    p.add_argument("--out", metavar="RUN_DIR", required=True, help="the run directory")
    p.add_argument("--preset", help=f"start from a preset: {', '.join(PRESETS)}")
    p.add_argument("--config", metavar="FILE", help="a TOML file with [model], [train] tables")
    p.add_argument(
        "--init-from",
        metavar="SRC",
        help="start from pretrained weights: gpt2, a Hugging Face GPT-2 dir or a "
        "gpt2lab run dir (sets train.init_from)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer for a text-file --data without --init-from: gpt2 (default), char or a "
        "saved tokenizer directory",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue RUN_DIR from its latest checkpoint with its saved config",
    )
    p.add_argument("--overwrite", action="store_true", help="start RUN_DIR over if it exists")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a bar")
    p.add_argument("--no-plot", action="store_true", help="skip writing RUN_DIR/curves.png")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    claim = None
    if launched_rank() == 0:  # under torchrun only rank 0 takes the lock
        inputs = [args.data, args.init_from, args.config]
        check_not_overlapping(out, inputs)  # before anything is read or written
        claim = build.claim_run_dir(out, inputs)
    try:
        return _run(args, out, claim)
    except BaseException:
        if claim is not None and claim.created and not native.list_checkpoints(out):
            claim.discard()
        raise
    finally:
        if claim is not None:
            claim.release()


def _run(args: argparse.Namespace, out: Path, claim: OutputDir | None) -> int:
    overrides = list(args.overrides)
    if args.init_from:
        overrides.insert(0, f"train.init_from={args.init_from}")
    if args.resume:
        if args.preset or args.config or args.init_from or args.overwrite:
            raise UsageError(
                "--resume continues with the saved config",
                "only --out, --data and overrides such as --train.max_steps",
                "drop --preset/--config/--init-from/--overwrite",
            )
        if args.data:
            overrides.insert(0, f"data.dir={args.data}")
        cfg, _ = build.resume_config(out, overrides)
    else:
        if args.data:
            overrides.insert(0, f"data.dir={_data_dir(args, out)}")
        cfg = resolve(args.preset, args.config, overrides)
    summary = run_in_console(train, cfg, out, args)
    if summary.rank == 0:
        if not args.no_plot and summary.step > 0:
            if claim is not None:
                claim.claim_file("curves.png")
            print(f"plot: {plot_runs([out])}", file=sys.stderr)
        val = f"{summary.val_loss:.4f}" if summary.val_loss is not None else "-"
        print(
            f"done: step {summary.step}, train loss {summary.loss:.4f}, val loss {val}, "
            f"{summary.tokens_per_s:,.0f} tokens/s, checkpoint {summary.checkpoint}"
        )
    return 130 if summary.stopped_by == "signal" else 0


def _data_dir(args: argparse.Namespace, out: Path) -> str:
    """--data as given, or for one text file the directory it is prepared into first."""
    src = Path(args.data)
    if not src.is_file():
        return str(src)
    return str(build.prepare_text(src, out, args.init_from, args.tokenizer, args.overwrite))
