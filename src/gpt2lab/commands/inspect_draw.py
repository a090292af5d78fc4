"""Pictures for `gpt2lab inspect`: a PNG per view (matplotlib) and a self-contained HTML page
(inline data and script, no network) where hovering over a cell or token shows its numbers.

Both take the JSON-ready dict that the command builds; `data["start"]` is the first token shown.
"""

from __future__ import annotations

import html as html_lib
import json
from pathlib import Path
from typing import Any

from gpt2lab.io import atomic_open


def png(view: str, data: dict[str, Any], out: str | Path) -> Path:
    """Draw `view` into a PNG at `out`."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig = _DRAW[view](plt, data)
    title = f"{data['view']} | {Path(data['model']).name}"
    if data["start"]:
        title += (
            f" | tokens {data['start']}..{data['start'] + len(data['tokens']) - 1} only (--window)"
        )
    fig.suptitle(title, fontsize=9)
    if view != "surprise":  # its axes are placed by hand, so that characters line up
        fig.tight_layout()
    with atomic_open(out, "wb") as fh:
        fig.savefig(fh, format="png", dpi=80)
    plt.close(fig)
    return Path(out)


def _ticks(ax, tokens: list[str], start: int, x: bool = True, y: bool = True) -> None:
    names = [f"{t} {start + i}" if len(tokens) <= 24 else t for i, t in enumerate(tokens)]
    size = 8 if len(tokens) <= 32 else 5
    if x:
        ax.set_xticks(range(len(tokens)), names, rotation=90, fontsize=size)
    if y:
        ax.set_yticks(range(len(tokens)), names, fontsize=size)


def _draw_attention(plt, data: dict[str, Any]):
    att, tokens = data["attention"], data["tokens"]
    if data["head"] is not None:  # one head at full size, tokens on both axes
        fig, ax = plt.subplots(figsize=(7, 6.5))
        ax.imshow(att[0][0], cmap="Blues", vmin=0, vmax=1)
        _ticks(ax, tokens, data["start"])
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query")
        ax.set_title(f"layer {data['layer']} head {data['head']}", fontsize=9)
        return fig
    first = data["layer"] or 0
    rows, cols = len(att), len(att[0]) + (1 if data["layer"] is None else 0)
    size = 1.6 if data["layer"] is None else 3.0
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for li, heads in enumerate(att):
        layer = first + li
        panels = list(heads) + ([data["mean"][layer]] if data["layer"] is None else [])
        for h, matrix in enumerate(panels):
            ax = axes[li][h]
            ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            name = "mean" if h == len(heads) else f"L{layer} H{h}"
            if h < len(heads):
                entropy, prev = data["entropy"][layer][h], data["previous_token"][layer][h]
                name += f"\nH={entropy:.2f} prev={prev:.2f}"
            ax.set_title(name, fontsize=6)
    return fig


def _draw_next(plt, data: dict[str, Any]):
    tokens, probs, top = data["tokens"], data["top_probs"], data["top_tokens"]
    T, k = len(tokens), len(probs[0])
    fig, ax = plt.subplots(figsize=(1.3 * k + 2.5, 0.28 * T + 1.2))
    ax.imshow(probs, cmap="Greens", vmin=0, vmax=1, aspect="auto")
    for i in range(T):
        for j in range(k):
            ax.text(j, i, f"{top[i][j]} {probs[i][j]:.2f}", ha="center", va="center", fontsize=6)
    actual = data["actual_rank"]
    ax.set_yticks(
        range(T),
        [f"{t}  (next: #{actual[i]})" if i < len(actual) else t for i, t in enumerate(tokens)],
        fontsize=6,
    )
    ax.set_xticks(range(k), [f"#{j + 1}" for j in range(k)], fontsize=7)
    ax.set_xlabel("likeliest next tokens (probability); #n: rank of the token that came next")
    return fig


def _draw_surprise(plt, data: dict[str, Any]):
    """The text as monospaced lines, each token's background coloured by its bits."""
    cmap = plt.get_cmap("Reds")
    cols, x, y, spans = 100, 0, 0, []
    for token, bits in zip(data["tokens"], data["bits"]):
        if x + len(token) > cols and x:
            x, y = 0, y + 1
        spans.append((x, y, token, bits))
        x += len(token)
        if token.endswith("\u21b5"):  # a newline ends the line, as in the text
            x, y = 0, y + 1
    top = max((b for b in data["bits"] if b is not None), default=1.0) or 1.0
    width, font, line = 9.0, 9, 0.2  # DejaVu Sans Mono is 0.6 em wide: x counts characters
    height = line * (y + 1) + 0.7
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0.01, 0.05 / height, 0.98, line * (y + 1) / height))
    for x, y, token, bits in spans:
        colour = "#dddddd" if bits is None else cmap(0.85 * bits / top)
        box = dict(boxstyle="square,pad=0.05", fc=colour, ec="none")
        ax.text(x, -y, token, family="DejaVu Sans Mono", fontsize=font, va="top", bbox=box)
    ax.set_xlim(0, 0.98 * width * 72 / (0.6 * font))
    ax.set_ylim(-(y + 1), 0.2)
    ax.axis("off")
    fig.text(
        0.5,
        1 - 0.45 / height,
        f"loss per token, darker = more surprising (max {top:.1f} bits); "
        f"{data['total_bits']:.1f} bits in all, {data['bits_per_byte']:.3f} bits per byte",
        fontsize=8,
        ha="center",
    )
    return fig


def _draw_lens(plt, data: dict[str, Any]):
    probs, top, tokens = data["top_probs"], data["top_tokens"], data["tokens"]
    L, T = len(probs), len(tokens)
    fig, ax = plt.subplots(figsize=(min(14.0, 0.3 * T + 1.5), 0.35 * L + 1.5))
    font = 6 if T <= 40 else 4
    ax.imshow(probs, cmap="viridis", vmin=0, vmax=1, aspect="auto", origin="lower")
    for li in range(L):
        for t in range(T):
            colour = "black" if probs[li][t] > 0.6 else "white"
            ax.text(t, li, top[li][t][:5], ha="center", va="center", fontsize=font, color=colour)
    _ticks(ax, tokens, data["start"], y=False)
    ax.set_yticks(range(L), ["embed"] + [f"block {i}" for i in range(L - 1)], fontsize=7)
    ax.set_title(
        "top token of each layer's residual through ln_f and the head (colour: p)", fontsize=8
    )
    return fig


def _draw_norms(plt, data: dict[str, Any]):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    im = left.imshow(data["residual"], aspect="auto", origin="lower", cmap="magma")
    fig.colorbar(im, ax=left, label="|residual|")
    _ticks(left, data["tokens"], data["start"], y=False)
    L = len(data["residual"])
    left.set_yticks(range(L), ["embed"] + [f"block {i}" for i in range(L - 1)], fontsize=7)
    for key in ("attn", "mlp"):
        rows = data[key]
        right.plot([sum(r) / len(r) for r in rows], marker="o", label=f"{key} output")
    res = data["residual"]
    right.plot([sum(r) / len(r) for r in res[1:]], marker="s", label="residual after block")
    right.set_xticks(range(L - 1))
    right.set_xlabel("block")
    right.set_ylabel("mean L2 norm over positions")
    right.legend(fontsize=7)
    return fig


_DRAW = {
    "attention": _draw_attention,
    "next": _draw_next,
    "surprise": _draw_surprise,
    "lens": _draw_lens,
    "norms": _draw_norms,
}

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>gpt2lab inspect {view}</title>
<style>
body {{ font: 13px system-ui, sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
td {{ width: 14px; height: 14px; padding: 0; border: 1px solid #f4f4f4; }}
th {{ font: 11px monospace; font-weight: normal; white-space: pre; padding: 0 3px; }}
th.col {{ writing-mode: vertical-rl; }}
.tok {{ font: 14px monospace; white-space: pre; border-radius: 2px; }}
#info {{ position: sticky; top: 0; background: #fff; padding: 4px 0; min-height: 1.4em;
        font: 13px monospace; }}
td.wide {{ width: auto; padding: 1px 4px; font: 11px monospace; white-space: pre; }}
</style></head><body>
<h3>gpt2lab inspect {view}: {model}</h3>
<p>{note}</p>
<div id="controls"></div><div id="info">hover over a cell or a token</div><div id="view"></div>
<script>
const data = {data};
{script}
</script></body></html>
"""

# the page's script: one small renderer per view, reading `data` (kept as a .js file to read)
_SCRIPT = Path(__file__).with_name("inspect_page.js")


def html(view: str, data: dict[str, Any]) -> str:
    """A self-contained page for `view`: the data inline as JSON, a small script draws it."""
    note = ""
    if data["start"]:
        last = data["start"] + len(data["tokens"]) - 1
        note = f"tokens {data['start']}..{last} only (--window); --json has them all"
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")  # never ends the script
    return _PAGE.format(
        view=html_lib.escape(view),
        model=html_lib.escape(data["model"]),
        note=html_lib.escape(note),
        data=payload,
        script=_SCRIPT.read_text(encoding="utf-8"),
    )
