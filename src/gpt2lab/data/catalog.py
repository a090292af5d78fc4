"""Named datasets for `gpt2lab prepare`: where each corpus comes from, its tokenizer, its split.

Not to be confused with `config.PRESETS`, the model and training presets.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from gpt2lab.corpus import cache_dir
from gpt2lab.errors import DataError
from gpt2lab.io import atomic_write_bytes

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)

# source: a URL (downloaded once into the cache) or a Hugging Face dataset (streamed, its `split`,
# its text `field`); `local` is the shape of a local copy, for the offline error; val split as in
# nanoGPT for the classic corpora, a seeded fraction of whole documents otherwise
DATASETS: dict[str, dict[str, Any]] = {
    "shakespeare-char": {"url": TINY_SHAKESPEARE_URL, "tokenizer": "char", "val_tail": 0.1},
    "shakespeare": {"url": TINY_SHAKESPEARE_URL, "tokenizer": "gpt2", "val_tail": 0.1},
    "openwebtext": {
        "dataset": "Skylion007/openwebtext",
        "tokenizer": "gpt2",
        "val_fraction": 0.0005,  # nanoGPT's data/openwebtext/prepare.py test_size
    },
    "fineweb-edu-10B": {
        "dataset": "HuggingFaceFW/fineweb-edu",
        "dataset_config": "sample-10BT",
        "tokenizer": "gpt2",
        "val_fraction": 0.005,
    },
    "paul-graham-essays": {  # one CSV: title, date, text (~220 essays, ~3 MB)
        "dataset": "sgoel9/paul_graham_essays",
        "field": "text",
        "tokenizer": "gpt2",
        "val_fraction": 0.05,  # ~10 essays
        "local": "paul_graham_essays.csv",
    },
    "openwebtext-10k": {  # the first 10,000 OpenWebText documents, field text
        "dataset": "stas/openwebtext-10k",
        "field": "text",
        "tokenizer": "gpt2",
        "val_fraction": 0.01,
    },
    "pile-10k": {  # the first 10,000 documents of the Pile: text, meta
        "dataset": "NeelNanda/pile-10k",
        "field": "text",
        "tokenizer": "gpt2",
        "val_fraction": 0.01,
        "local": "'DIR/*.parquet'",
    },
    "tinystories": {  # ~2.1M short stories, field text (the train split; its own val is 22K)
        "dataset": "roneneldan/TinyStories",
        "field": "text",
        "tokenizer": "gpt2",
        "val_fraction": 0.005,
        "local": "'DIR/*.parquet'",
    },
    **{
        f"wikipedia-{lang}": {  # one article a row: id, url, title, text; slice with --max-docs
            "dataset": "wikimedia/wikipedia",
            "dataset_config": f"20231101.{lang}",
            "field": "text",
            "tokenizer": "gpt2",
            "val_fraction": 0.005,
            "local": f"'{lang}/*.parquet' --max-docs 100000",
        }
        for lang in ("de", "en")
    },
}


def local_example(name: str) -> str:
    """The command that prepares dataset `name` from local files."""
    if "shakespeare" in name:
        return f"`gpt2lab prepare {name} --input input.txt --out data/{name}`"
    if "local" in DATASETS.get(name, {}):
        return f"`gpt2lab prepare {name} --input {DATASETS[name]['local']} --out data/{name}`"
    return f"`gpt2lab prepare {name} --input 'DIR/*.jsonl' --out data/{name}` (or .parquet, .txt)"


def download(name: str, url: str, timeout: float = 20.0) -> Path:
    """Fetch `url` into the cache once; without network, a one-line error showing --input."""
    dest = cache_dir() / Path(url).name.replace("input.txt", f"{name.split('-')[0]}.txt")
    if dest.is_file():
        return dest
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = r.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(
            f"preset {name} downloads {url}, which needs the network ({reason})",
            None,
            f"point the same preset at a local copy: {local_example(name)}",
        ) from None
    atomic_write_bytes(dest, data)
    return dest
