"""Growing a model's vocabulary for new special tokens (`<|pad|>`, `<|user|>`, `<|end|>`, ...).

    tok = add_special_tokens(model, tok, ["<|user|>", "<|assistant|>", "<|end|>"])

New rows of the token embedding (and so of the tied head) start at the mean of the existing
real rows: a new token then looks like an average token rather than a random direction, and the
model's outputs for text without it do not change (Hewitt 2021, "Initializing new word
embeddings for pretrained language models"). The table stays padded to `pad_vocab_to`; padding
rows are zero and the head gives them a -inf bias, as `GPT` builds them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from gpt2lab.config import GPTConfig
from gpt2lab.errors import ConfigError, TokenizerError
from gpt2lab.model import GPT, LMHead

_PROBE = "Hello, world! The quick brown fox jumps over 13 lazy dogs.\n\tÉtude naïve."


def grow_vocab(model: GPT, new_vocab_size: int) -> GPT:
    """Grow `model` (in place, returned) to `new_vocab_size` tokens: rows
    [old vocab_size, new_vocab_size) of `transformer.wte` (tied to `lm_head`) become the mean of
    rows [0, old vocab_size); old rows are unchanged. A size equal to the current one is a no-op.
    """
    cfg: GPTConfig = model.config
    old = cfg.vocab_size
    if new_vocab_size < old:
        raise ConfigError(
            f"cannot shrink the vocabulary from {old} to {new_vocab_size} tokens",
            f"a size of at least {old}",
        )
    if new_vocab_size == old:
        return model
    new_cfg = dataclasses.replace(cfg, vocab_size=new_vocab_size)
    weight = model.transformer.wte.weight
    with torch.no_grad():
        table = weight.new_zeros(new_cfg.padded_vocab_size, cfg.n_embd)
        table[:old] = weight[:old]
        table[old:new_vocab_size] = weight[:old].double().mean(0).to(weight.dtype)
    wte = nn.Embedding(new_cfg.padded_vocab_size, cfg.n_embd, device=weight.device)
    wte.weight = nn.Parameter(table, requires_grad=weight.requires_grad)
    head = LMHead(new_cfg).to(device=weight.device, dtype=weight.dtype)
    head.weight = wte.weight  # tied, as GPT ties them
    model.transformer.wte, model.lm_head, model.config = wte, head, new_cfg
    return model


def tokenizer_extends(base: Any, grown: Any) -> bool:
    """True if `grown` is `base` plus special tokens: the same ids for ordinary text and for
    every special token of `base`, and at least as many ids."""
    if grown.n_vocab < base.n_vocab:
        return False
    if any(grown.special_tokens.get(s) != i for s, i in base.special_tokens.items()):
        return False
    try:
        return base.encode_ordinary(_PROBE) == grown.encode_ordinary(_PROBE)
    except Exception:  # noqa: BLE001 - a char vocabulary cannot encode the probe
        return base.spec().get("chars") == grown.spec().get("chars") is not None


def add_special_tokens(model: GPT, tokenizer: Any, names: Iterable[str]) -> Any:
    """`tokenizer` with the special tokens `names` it lacks (next free ids), and `model` grown
    in place to fit them (new rows at the mean). Returns the new tokenizer, whose chat template
    (if any) is kept; the model's `tokenizer` attribute is set to it."""
    missing = [n for n in names if n not in tokenizer.special_tokens]
    if not missing:
        return tokenizer
    if not hasattr(tokenizer, "with_special_tokens"):
        raise TokenizerError(
            f"a {type(tokenizer).__name__} cannot take new special tokens {missing}",
            "a byte-level BPE tokenizer (GPT-2's or a trained one)",
        )
    grown = tokenizer.with_special_tokens(missing)
    if grown.n_vocab > model.config.vocab_size:
        grow_vocab(model, grown.n_vocab)
    model.tokenizer = grown
    return grown
