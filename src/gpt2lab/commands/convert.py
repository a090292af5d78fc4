"""`gpt2lab convert SRC DST`: a gpt2lab run or checkpoint -> a HF GPT-2 directory, or back; or a
model file for another runtime.

A DST ending in .gguf is a llama.cpp file (`--outtype` picks the weights' type), one ending in
.onnx an onnxruntime graph (`--past` adds key/value inputs and outputs). Otherwise the
direction follows SRC: a HF directory (or hub name) becomes a gpt2lab checkpoint directory,
anything else (a run or checkpoint directory) becomes a HF directory. `--to` forces it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2lab.budget import param_count, require
from gpt2lab.checkpoint.gguf import OUTTYPES, save_gguf
from gpt2lab.checkpoint.hf import is_hf_dir, save_hf
from gpt2lab.checkpoint.load import load_model, peek_config
from gpt2lab.checkpoint.onnx import save_onnx
from gpt2lab.checkpoint.weights import save_model_safetensors
from gpt2lab.config import Config, to_dict
from gpt2lab.errors import UsageError
from gpt2lab.io import atomic_dir, atomic_write_json
from gpt2lab.outdir import check_not_overlapping, claim_output_dir, claim_output_file
from gpt2lab.posttrain.reward import is_reward_dir, load_reward_model

EXAMPLES = """
gpt2lab convert runs/sc hf/sc                  # newest checkpoint of a run -> HF GPT-2 directory
gpt2lab convert runs/sc/ckpt/step_00001000 hf/sc
gpt2lab convert hf/gpt2 ckpt/gpt2              # HF directory -> gpt2lab checkpoint directory
gpt2lab convert gpt2 ckpt/gpt2                 # a hub name, from the local Hugging Face cache
gpt2lab convert runs/sc sc.gguf                # llama.cpp file, float32 weights
gpt2lab convert hf/gpt2 gpt2-q8.gguf --outtype q8_0
gpt2lab convert runs/sc sc.onnx                # onnxruntime graph: input_ids -> logits
gpt2lab convert runs/sc sc-past.onnx --past    # ... with past keys/values for decoding
gpt2lab convert runs/rm hf/rm                  # reward model -> GPT2ForSequenceClassification
"""
# DST suffix -> the file format written; directories (HF, gpt2lab) have no suffix of their own
FILE_FORMATS = {".gguf": "gguf", ".onnx": "onnx"}
# suffixes of model files that convert does not write: a likely slip, not a directory name
_OTHER_FILES = {".bin", ".pt", ".pth", ".ckpt", ".safetensors", ".ggml", ".h5", ".pb", ".tflite"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="run dir, checkpoint dir, HF GPT-2 dir or hub name")
    p.add_argument(
        "dst",
        help="directory to write, or a file ending in .gguf or .onnx (replaced atomically)",
    )
    p.add_argument(
        "--to",
        choices=("auto", "hf", "gpt2lab"),
        default="auto",
        help="directory format (auto: HF for gpt2lab input, gpt2lab for HF input)",
    )
    p.add_argument(
        "--outtype",
        choices=OUTTYPES,
        default=None,
        help="GGUF weight type (default f32; vectors stay f32, q8_0 is llama.cpp's 8-bit)",
    )
    p.add_argument(
        "--past",
        action="store_true",
        help="ONNX: also take and return every layer's keys and values (incremental decoding)",
    )


def output_format(dst: str, to: str, outtype: str | None, past: bool = False) -> str | None:
    """The file format DST names (None: a directory); an error for one convert cannot write."""
    suffix = Path(dst).suffix.lower()
    fmt = FILE_FORMATS.get(suffix)
    if fmt is None and suffix in _OTHER_FILES:
        raise UsageError(
            f"{dst} ends in {suffix}, a file format convert does not write",
            f"a directory, or a file ending in {', '.join(FILE_FORMATS)}",
            "name a directory for HF/gpt2lab weights, .gguf for llama.cpp or .onnx",
        )
    if fmt is not None and to != "auto":
        raise UsageError(
            f"--to {to} asks for a directory but {dst} is a .{fmt} file", fix="drop --to"
        )
    if outtype is not None and fmt != "gguf":
        raise UsageError(
            f"--outtype {outtype} applies to GGUF files only",
            fix="end DST in .gguf, or drop --outtype",
        )
    if past and fmt != "onnx":
        raise UsageError(
            "--past applies to ONNX files only", fix="end DST in .onnx, or drop --past"
        )
    return fmt


def run(args: argparse.Namespace) -> int:
    src = Path(args.src)
    fmt = output_format(args.dst, args.to, args.outtype, args.past)
    check_not_overlapping(args.dst, [args.src], flag="dst")  # before anything is read
    if fmt is not None:  # one file: refused if it exists and gpt2lab did not write it
        with claim_output_file(args.dst, "convert", inputs=[args.src], flag="dst") as out:
            model, tok = _load(args.src)
            if fmt == "gguf":
                outtype = args.outtype or "f32"
                name = src.name or "gpt2lab"
                save_gguf(model, args.dst, tokenizer=tok, outtype=outtype, name=name)
                kind = f"gguf {outtype}"
            else:
                save_onnx(model, args.dst, past=args.past)
                kind = "onnx with past keys/values" if args.past else "onnx"
            out.commit()
        print(f"wrote {args.dst} ({kind}, {model.num_params():,} parameters)")
        return 0
    if is_reward_dir(src) and args.to != "gpt2lab":  # a reward model: GPT2ForSequenceClassification
        rm = load_reward_model(src)
        save_hf(rm, args.dst, rm.tokenizer, score=rm.score.weight, pad_token_id=rm.pad_token_id)
        print(
            f"wrote {args.dst} (hf GPT2ForSequenceClassification, pad_token_id {rm.pad_token_id})"
        )
        return 0
    to = args.to
    if to == "auto":
        to = "gpt2lab" if is_hf_dir(src) or not src.exists() else "hf"
    # a directory: new, empty or gpt2lab's; locked while written; removed again on failure if new
    with claim_output_dir(args.dst, "convert", inputs=[args.src], flag="dst") as out:
        try:
            model, tok = _load(args.src)
            if to == "hf":
                save_hf(model, out.path, tokenizer=tok)
            else:
                save_native(model, tok, out.path, source=str(args.src))
        except BaseException:
            if out.created:
                out.discard()
            raise
    print(f"wrote {args.dst} ({to}, {model.num_params():,} parameters)")
    return 0


def _load(src: str):
    """The model and its tokenizer, after checking that converting it fits in memory."""
    cfg = peek_config(src)
    if cfg is not None:  # the weights, a converted copy, and the writer's buffers
        require(
            3 * param_count(cfg) * 4,
            "cpu",
            f"converting {src} ({param_count(cfg):,} parameters)",
            "convert on a machine with more memory",
        )
    return load_model(src)


NATIVE_FILES = ("state.json", "tokenizer", "model.safetensors")  # model.safetensors: the keystone


def save_native(model, tokenizer, path: str | Path, source: str = "") -> None:
    """A gpt2lab checkpoint directory: model.safetensors, state.json, tokenizer/.

    `path` must be new, empty or gpt2lab's; its old files go first and model.safetensors, which
    makes the directory a checkpoint, comes last: an interrupted write never looks whole."""
    with claim_output_dir(path, "convert", flag="dst") as out:
        out.remove_ours()
        out.record(*NATIVE_FILES)
        state = {"step": 0, "config": to_dict(Config(model=model.config)), "converted_from": source}
        if tokenizer is not None:
            with atomic_dir(out.path / "tokenizer") as tmp:
                tokenizer.save(tmp)
            state["tokenizer"] = "tokenizer"
        atomic_write_json(out.path / "state.json", state)
        save_model_safetensors(model, out.path / "model.safetensors")
