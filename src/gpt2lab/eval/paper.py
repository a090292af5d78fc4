"""Published GPT-2 figures to print beside ours: the paper's Table 3 and HellaSwag.

Radford et al. 2019, Table 3 (zero-shot). HellaSwag: llm.c's completion-style scoring of the
released weights (karpathy/llm.c dev/data/hellaswag.py), the scoring `gpt2lab eval hellaswag` uses.
"""

from __future__ import annotations

from typing import Any

COLUMNS = (
    "lambada_ppl",
    "lambada_acc",
    "cbt_cn",
    "cbt_ne",
    "wikitext2",
    "ptb",
    "enwik8",
    "text8",
    "wikitext103",
    "1bw",
)
TABLE3: dict[str, dict[str, float]] = {
    size: dict(zip(COLUMNS, row))
    for size, row in {
        "117M": (35.13, 45.99, 87.65, 83.4, 29.41, 65.85, 1.16, 1.17, 37.50, 75.20),
        "345M": (15.60, 55.48, 92.35, 87.1, 22.76, 47.33, 1.01, 1.06, 26.37, 55.72),
        "762M": (10.87, 60.12, 93.45, 88.0, 19.93, 40.31, 0.97, 1.02, 22.05, 44.575),
        "1542M": (8.63, 63.24, 93.30, 89.05, 18.34, 35.76, 0.93, 0.98, 17.48, 42.16),
    }.items()
}
# acc and acc normalised by token count (%), 10,042 validation items; none given for 345M/762M
HELLASWAG: dict[str, dict[str, float]] = {
    "117M": {"hellaswag_acc": 28.59, "hellaswag_acc_norm": 29.55},
    "1542M": {"hellaswag_acc": 38.42, "hellaswag_acc_norm": 48.93},
}

# (n_layer, n_embd) of the released checkpoints -> the size the paper calls them
SIZES = {(12, 768): "117M", (24, 1024): "345M", (36, 1280): "762M", (48, 1600): "1542M"}

# task -> rows of (label, metric key, paper column, scale from our metric to the paper's unit)
ROWS: dict[str, list[tuple[str, str, str | None, float]]] = {
    "perplexity": [
        ("loss (nats/token)", "loss", None, 1),
        ("perplexity (per token)", "perplexity", None, 1),
        ("bits per byte", "bits_per_byte", None, 1),
        ("bits per character", "bits_per_char", None, 1),
    ],
    "wikitext2": [("perplexity (per word)", "word_perplexity", "wikitext2", 1)],
    "wikitext103": [("perplexity (per word)", "word_perplexity", "wikitext103", 1)],
    "ptb": [("perplexity (per word)", "word_perplexity", "ptb", 1)],
    "lambada": [
        ("last-word perplexity", "perplexity", "lambada_ppl", 1),
        ("last-word accuracy (%)", "accuracy", "lambada_acc", 100),
    ],
    "cbt-cn": [("accuracy (%)", "accuracy", "cbt_cn", 100)],
    "cbt-ne": [("accuracy (%)", "accuracy", "cbt_ne", 100)],
    "enwik8": [("bits per byte", "bits_per_byte", "enwik8", 1)],
    "text8": [("bits per character", "bits_per_char", "text8", 1)],
    "hellaswag": [
        ("accuracy (%)", "acc", "hellaswag_acc", 100),
        ("length-normalised accuracy (%)", "acc_norm", "hellaswag_acc_norm", 100),
    ],
}


def model_size(n_layer: int, n_embd: int) -> str | None:
    """The paper's name for a GPT-2 shape ("117M" ...), or None for any other shape."""
    return SIZES.get((n_layer, n_embd))


def compare(task: str, metrics: dict[str, Any], size: str | None) -> list[tuple[str, float, Any]]:
    """Rows (label, our figure, the published one or None) for `task` at model `size`."""
    published = {**TABLE3.get(size or "", {}), **HELLASWAG.get(size or "", {})}
    return [
        (label, metrics[key] * scale, published.get(column) if column else None)
        for label, key, column, scale in ROWS[task]
    ]
