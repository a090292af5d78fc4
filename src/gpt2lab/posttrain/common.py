"""What SFT and DPO share: the starting model grown for its chat template, records, splits.

`start_model(cfg, template)` loads train.init_from, picks the chat template (`auto`: the one the
model carries, else `plain`), adds the template's special tokens the tokenizer lacks (the model
grows: new embedding rows at the mean of the others, `checkpoint.vocab`), and returns the config
whose `model` section fits the grown weights. `resume_tokenizer(run_dir)` reads them back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2lab.checkpoint.load import load_model
from gpt2lab.checkpoint.vocab import add_special_tokens
from gpt2lab.config import Config
from gpt2lab.errors import ConfigError, TokenizerError, mark_key
from gpt2lab.posttrain.records import read_records
from gpt2lab.tokenizer import get_tokenizer
from gpt2lab.tokenizer.chat import PLAIN, ChatTemplate, get_chat_template


@dataclasses.dataclass
class StartModel:
    """A post-training run's starting point."""

    cfg: Config  # with the grown model section
    tokenizer: Any  # with the template's special tokens and `chat_template` set
    template: ChatTemplate
    weights: dict[str, torch.Tensor]
    grown_from: int  # the vocabulary size before the template's tokens were added


def pick_template(name: str, tokenizer: Any) -> ChatTemplate:
    """`auto`: the tokenizer's own template, else the plain-text one; or a name / file."""
    if name == "auto":
        return getattr(tokenizer, "chat_template", None) or PLAIN
    return get_chat_template(name)


def start_model(cfg: Config, template_name: str, section: str) -> StartModel:
    """train.init_from with the template's tokens added (see the module docstring)."""
    src = cfg.train.init_from
    if not src:
        raise ConfigError(
            f"`gpt2lab {section}` needs a model to start from",
            f"{mark_key('init_from', 'MODEL')}: a run directory, a Hugging Face GPT-2 directory "
            "or gpt2",
            f"add {mark_key('init_from', 'runs/demo')}",
        )
    model, tok = load_model(src, device="cpu", dtype=torch.float32)
    if tok is None:
        raise TokenizerError(
            f"{src} carries no tokenizer",
            "a model directory with its tokenizer",
            "point --init-from at a gpt2lab run directory or a Hugging Face GPT-2 directory",
        )
    template = pick_template(template_name, tok)
    before = model.config.vocab_size
    tok = add_special_tokens(model, tok, template.special_tokens)
    tok.chat_template = template
    model.tokenizer = tok
    # the architecture comes from the weights; dropout is a training choice of this run
    mcfg = dataclasses.replace(model.config, dropout=cfg.model.dropout)
    weights = dict(model.state_dict())
    return StartModel(dataclasses.replace(cfg, model=mcfg), tok, template, weights, before)


def resume_tokenizer(run_dir: Path) -> tuple[Any, ChatTemplate]:
    """The tokenizer (with its chat template) a run directory was started with."""
    tok = get_tokenizer(run_dir / "tokenizer")
    return tok, tok.chat_template or PLAIN


def split_records(
    records: Sequence[Any], fraction: float, seed: int
) -> tuple[list[Any], list[Any]]:
    """(train, held out): a seeded `fraction` of the records (at least one when there are two)."""
    n = len(records)
    k = int(round(n * fraction))
    if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    held = set(np.random.Generator(np.random.PCG64([seed, 7])).permutation(n)[:k].tolist())
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]


def end_id(tokenizer: Any, template: ChatTemplate) -> int:
    """The id of the template's end-of-turn token."""
    return tokenizer.special_tokens[template.end_token]


def weights_hash(weights: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_hash(*parts: Any) -> str:
    """sha256 of JSON-serialisable parts (token ids, settings)."""
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


def record_inputs(task: Any, cfg: Config) -> list[str | None]:
    """`Task.inputs` of a task reading cfg.<task.name>.data / .val_data (unless given records)."""
    section = getattr(cfg, task.name)
    return [
        None if task.given is not None else section.data,
        None if task.given_val is not None else section.val_data,
    ]


def task_records(task: Any, cfg: Config, kind: str) -> tuple[list[dict], list[dict]]:
    """(train, held out) records of a task reading cfg.<task.name>.data / .val_data (`kind`:
    "sft" or "pairs"), or the records it was given; without held-out records, a seeded split."""
    section = getattr(cfg, task.name)
    if task.given is not None:
        train = list(task.given)
        val = list(task.given_val) if task.given_val is not None else []
    else:
        key = f"{task.name}.data"
        train = read_records(section.data, kind, section.errors, key=key, notes=task.notes)
        val = (
            read_records(
                section.val_data, kind, section.errors, key=f"{key[:-4]}val_data", notes=task.notes
            )
            if section.val_data
            else []
        )
    if not val:
        train, val = split_records(train, section.val_fraction, cfg.train.seed)
    return train, val
