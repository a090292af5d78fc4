"""`gpt2lab inspect`: attention maps, next-token choices, surprise, the logit lens and norms of a
model on one prompt, as a PNG, a self-contained HTML page (hover for values) or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gpt2lab import inspect
from gpt2lab.commands import inspect_draw
from gpt2lab.commands.sample import load_model_for, read_prompt_file
from gpt2lab.config import SampleConfig
from gpt2lab.errors import UsageError
from gpt2lab.generate import prompt_ids
from gpt2lab.io import atomic_write_text
from gpt2lab.outdir import owned_file

EXAMPLES = """
gpt2lab inspect attention --model runs/demo -p 'ROMEO: But soft' # all heads: inspect-attention.png
gpt2lab inspect attention --model runs/demo -p 'ROMEO: But soft' --layer 1 --head 2 --html a.html
gpt2lab inspect next --model gpt2 -p 'The capital of France is' --top-k 10
gpt2lab inspect surprise --model runs/demo --prompt-file scene.txt --html surprise.html
gpt2lab inspect lens --model hf/gpt2 -p 'The Eiffel Tower is in the city of' --json > lens.json
gpt2lab inspect norms --model runs/demo -p 'To be, or not to be' --out norms.png
"""

VIEWS = {
    "attention": "attention probabilities of every layer and head (--layer L --head H: one head)",
    "next": "the top-k next tokens at each position, and the rank of the one that came",
    "surprise": "each token's loss in bits, the text coloured by it; total bits, bits per byte",
    "lens": "the logit lens: each layer's residual decoded through ln_f and the head",
    "norms": "residual-stream norms, and what attention and MLP add, per layer and position",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "view", choices=list(VIEWS), help="; ".join(f"{k}: {v}" for k, v in VIEWS.items())
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="a gpt2lab run or checkpoint directory, a Hugging Face GPT-2 directory, or a hub "
        "name already in the local cache (gpt2)",
    )
    g = p.add_argument_group("prompt (one of)")
    g.add_argument("-p", "--prompt", metavar="TEXT", help="the text to look at")
    g.add_argument(
        "--prompt-file", metavar="FILE", help="a file whose text is the prompt ('-' = stdin)"
    )
    g = p.add_argument_group("output (default: a PNG named after the view, in this directory)")
    g.add_argument("--out", metavar="PATH.png", help="where to write the PNG")
    g.add_argument("--html", metavar="PATH.html", help="also write a self-contained HTML page")
    g.add_argument(
        "--json", action="store_true", help="print the raw numbers as JSON (no PNG unless --out)"
    )
    g = p.add_argument_group("what to show")
    g.add_argument("--layer", type=int, metavar="L", help="attention: one layer's heads (from 0)")
    g.add_argument(
        "--head", type=int, metavar="H", help="attention: one head of --layer, full size"
    )
    g.add_argument(
        "--window",
        type=int,
        default=64,
        metavar="N",
        help="pictures show the last N tokens of a longer prompt, and say so (default 64)",
    )
    g.add_argument("--top-k", type=int, default=5, metavar="K", help="next: tokens per position")
    g = p.add_argument_group("speed")
    g.add_argument("--device", default="auto", metavar="DEVICE", help="auto, cpu, cuda, mps")
    g.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and compute dtype (default float32: exact numbers)",
    )


def run(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.prompt_file is None):
        raise UsageError(
            "give the prompt with -p TEXT or --prompt-file FILE", fix="use exactly one"
        )
    if args.window < 1:
        raise UsageError(f"--window {args.window} is not positive", "N >= 1")
    if args.view != "attention" and (args.layer is not None or args.head is not None):
        raise UsageError(f"--layer and --head are for `attention`, not `{args.view}`")
    text = args.prompt if args.prompt is not None else read_prompt_file(args.prompt_file)
    model, tok = load_model_for(args.model, SampleConfig(device=args.device, dtype=args.dtype))
    inspect.check_head(model, args.layer, args.head)
    ids = prompt_ids(tok, text) if text else []  # an empty prompt is an error, not <|endoftext|>
    idx = inspect.as_ids(model, ids)[0].cpu()
    data = _compute(args, model, tok, idx)
    if args.json:
        print(json.dumps(data, ensure_ascii=False))
    start = max(0, len(idx) - args.window)
    shown = _window(data, start)
    if args.out or not args.json:
        out = Path(args.out or _default_name(args))
        with owned_file(out, "inspect", inputs=[args.model]) as path:
            inspect_draw.png(args.view, shown, path)
        note = f" (tokens {start}..{len(idx) - 1} of {len(idx)}: --window)" if start else ""
        _say(args, f"wrote {out}{note}")
    if args.html:
        with owned_file(args.html, "inspect", inputs=[args.model], flag="html") as path:
            atomic_write_text(path, inspect_draw.html(args.view, shown))
        _say(args, f"wrote {args.html}")
    if not args.json:
        _say(args, _summary(args.view, data))
    return 0


def _say(args: argparse.Namespace, line: str) -> None:
    if line:  # with --json, stdout is the JSON only
        print(line, file=sys.stderr if args.json else sys.stdout)


def _default_name(args: argparse.Namespace) -> str:
    if args.head is not None:
        return f"inspect-attention-L{args.layer}H{args.head}.png"
    if args.layer is not None:
        return f"inspect-attention-L{args.layer}.png"
    return f"inspect-{args.view}.png"


def _rounded(t: Any, digits: int = 6) -> Any:
    if hasattr(t, "tolist"):
        t = t.tolist()
    if isinstance(t, list):
        return [_rounded(x, digits) for x in t]
    return round(t, digits) if isinstance(t, float) else t


def _compute(args: argparse.Namespace, model, tok, idx) -> dict[str, Any]:
    """The view's numbers as plain JSON-ready lists; per-position lists are indexed by token."""
    data: dict[str, Any] = {
        "view": args.view,
        "model": str(args.model),
        "ids": idx.tolist(),
        "tokens": inspect.labels(tok, idx),
        "start": 0,
    }
    if args.view == "attention":
        att = inspect.attention(model, idx)
        heads = inspect.summarize_heads(att)
        data |= {
            "layer": args.layer,
            "head": args.head,
            "entropy": _rounded(heads.entropy),
            "previous_token": _rounded(heads.previous_token),
            "first_token": _rounded(heads.first_token),
        }
        if args.layer is None:
            data["mean"] = _rounded(heads.mean)
        att = att if args.layer is None else att[args.layer : args.layer + 1]
        att = att if args.head is None else att[:, args.head : args.head + 1]
        data["attention"] = _rounded(att)  # [layer][head][query][key]
    elif args.view == "next":
        nt = inspect.next_tokens(model, idx, args.top_k)
        data |= {
            "top_ids": nt.top_ids.tolist(),
            "top_tokens": [inspect.labels(tok, row) for row in nt.top_ids],
            "top_probs": _rounded(nt.top_probs),
            "actual_rank": nt.actual_rank.tolist(),
            "actual_prob": _rounded(nt.actual_prob),
        }
    elif args.view == "surprise":
        s = inspect.surprise(model, idx, tok)
        data |= {
            "nats": [None] + _rounded(s.nats),  # indexed by token: the first has no loss
            "bits": [None] + _rounded(s.bits),
            "total_bits": round(s.total_bits, 4),
            "bytes": s.n_bytes,
            "bits_per_byte": round(s.bits_per_byte, 4),
        }
    elif args.view == "lens":
        ln = inspect.lens(model, idx)
        data |= {
            "top_ids": ln.top_ids.tolist(),
            "top_tokens": [inspect.labels(tok, row) for row in ln.top_ids],
            "top_probs": _rounded(ln.top_probs),
            "final_rank": ln.final_rank.tolist(),
        }
    else:
        nm = inspect.norms(model, idx)
        data |= {
            "residual": _rounded(nm.residual),
            "attn": _rounded(nm.attn),
            "mlp": _rounded(nm.mlp),
        }
    return data


# keys whose last axis (or last two, for attention matrices) runs over token positions
_BY_POSITION = {"ids", "tokens", "top_ids", "top_tokens", "top_probs", "nats", "bits"}
_BY_POSITION |= {"residual", "attn", "mlp", "final_rank", "actual_rank", "actual_prob"}


def _window(data: dict[str, Any], start: int) -> dict[str, Any]:
    """The data of tokens start.. only, for pictures of long prompts."""
    if not start:
        return data
    shown = dict(data, start=start)
    view = data["view"]
    for key, value in data.items():
        if view == "attention" and key in ("attention", "mean"):
            shown[key] = _crop_square(value, start)
        elif key in _BY_POSITION:
            shown[key] = _crop_last(value, start, per_row=view in ("lens", "norms"))
    return shown


def _crop_last(value: list, start: int, per_row: bool) -> list:
    if per_row and value and isinstance(value[0], list):
        return [row[start:] for row in value]
    return value[start:]


def _crop_square(value: list, start: int) -> list:
    if value and isinstance(value[0][0], list):  # (..., T, T) with more leading axes
        return [_crop_square(v, start) for v in value]
    return [row[start:] for row in value[start:]]


def _summary(view: str, data: dict[str, Any]) -> str:
    if view == "surprise":
        return (
            f"{data['total_bits']:.1f} bits for {len(data['bits']) - 1} tokens after the first "
            f"({data['bytes']} bytes): {data['bits_per_byte']:.3f} bits per byte"
        )
    if view == "attention":
        lines = []
        for name, key in (("previous-token", "previous_token"), ("first-token", "first_token")):
            scores = data[key]
            L, H = max(
                ((li, h) for li in range(len(scores)) for h in range(len(scores[0]))),
                key=lambda lh: scores[lh[0]][lh[1]],
            )
            lines.append(f"most {name} head: layer {L} head {H} ({scores[L][H]:.2f})")
        return "\n".join(lines)
    return ""
