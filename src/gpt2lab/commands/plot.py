"""`gpt2lab plot`: loss and perplexity curves of one or more runs, as a PNG; for RL runs
(`gpt2lab rlhf`), reward and KL against steps and reward against KL."""

from __future__ import annotations

import argparse

from gpt2lab.outdir import owned_file
from gpt2lab.plot import default_plot_path, plot_runs

EXAMPLES = """
gpt2lab plot runs/sc                              # writes runs/sc/curves.png
gpt2lab plot runs/sc runs/sc-bf16 --out cmp.png   # several runs on one figure
gpt2lab plot runs/ppo runs/grpo --out rl.png      # RL runs: reward, KL, reward vs KL
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories with metrics.jsonl")
    p.add_argument("--out", metavar="PNG", help="output file (default RUN_DIR/curves.png)")


def run(args: argparse.Namespace) -> int:
    out = default_plot_path(args.runs, args.out)
    with owned_file(out, "plot", flag="out") as path:  # never over a file gpt2lab did not write
        print(plot_runs(args.runs, path))
    return 0
