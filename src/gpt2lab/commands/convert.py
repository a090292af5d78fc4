"""`gpt2lab convert SRC DST`: a gpt2lab run or checkpoint -> a HF GPT-2 directory, or back.

The direction follows SRC: a HF directory (or hub name) becomes a gpt2lab checkpoint directory,
anything else (a run or checkpoint directory) becomes a HF directory. `--to` forces it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2lab.checkpoint.hf import is_hf_dir, save_hf
from gpt2lab.checkpoint.load import load_model
from gpt2lab.checkpoint.weights import save_model_safetensors
from gpt2lab.config import Config, to_dict
from gpt2lab.io import atomic_dir, atomic_write_json

EXAMPLES = """
gpt2lab convert runs/sc hf/sc                  # newest checkpoint of a run -> HF GPT-2 directory
gpt2lab convert runs/sc/ckpt/step_00001000 hf/sc
gpt2lab convert hf/gpt2 ckpt/gpt2              # HF directory -> gpt2lab checkpoint directory
gpt2lab convert gpt2 ckpt/gpt2                 # a hub name, from the local Hugging Face cache
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="run dir, checkpoint dir, HF GPT-2 dir or hub name")
    p.add_argument("dst", help="directory to write (replaced atomically if it exists)")
    p.add_argument(
        "--to",
        choices=("auto", "hf", "gpt2lab"),
        default="auto",
        help="output format (auto: HF for gpt2lab input, gpt2lab for HF input)",
    )


def run(args: argparse.Namespace) -> int:
    src = Path(args.src)
    to = args.to
    if to == "auto":
        to = "gpt2lab" if is_hf_dir(src) or not src.exists() else "hf"
    model, tok = load_model(args.src)
    if to == "hf":
        save_hf(model, args.dst, tokenizer=tok)
    else:
        save_native(model, tok, args.dst, source=str(args.src))
    print(f"wrote {args.dst} ({to}, {model.num_params():,} parameters)")
    return 0


def save_native(model, tokenizer, path: str | Path, source: str = "") -> None:
    """A gpt2lab checkpoint directory: model.safetensors, state.json, tokenizer/."""
    with atomic_dir(path) as tmp:
        save_model_safetensors(model, tmp / "model.safetensors")
        state = {"step": 0, "config": to_dict(Config(model=model.config)), "converted_from": source}
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
            state["tokenizer"] = "tokenizer"
        atomic_write_json(tmp / "state.json", state)
