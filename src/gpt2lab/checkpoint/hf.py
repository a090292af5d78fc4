"""Hugging Face GPT-2 directories in and out: config.json <-> GPTConfig, Conv1D weights transposed.

HF's GPT-2 stores its projections as Conv1D, weight (in, out); ours are nn.Linear, weight (out, in).
Reading never executes code from a file: safetensors, or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gpt2lab.budget import require_model
from gpt2lab.checkpoint.weights import (
    TIED,
    assign_state,
    check_config_fits,
    load_pickle_safely,
    read_tensors,
    require_float_weights,
    save_tensors,
)
from gpt2lab.config import GPTConfig
from gpt2lab.errors import CheckpointError
from gpt2lab.io import atomic_write_json
from gpt2lab.model import GPT
from gpt2lab.outdir import claim_output_dir
from gpt2lab.tokenizer import GPT2_PATTERN, BPETokenizer, get_tokenizer

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_VOCAB = 50257  # a model of this vocabulary without a tokenizer of its own speaks GPT-2's
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# config.json fields that change the function computed; GPT-2's values are the only ones we build
_FIXED = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "add_cross_attention": (False,),
}


def is_hf_dir(path: str | Path) -> bool:
    """True for a directory holding a config.json and weights (a transformers save_pretrained)."""
    p = Path(path)
    return (p / "config.json").is_file() and any((p / f).is_file() for f in WEIGHT_FILES)


def config_from_hf(
    hf_config: dict[str, Any], source: str = "config.json", pad_vocab_to: int = 1
) -> GPTConfig:
    """GPTConfig from a HF GPT-2 config.json; fields we cannot reproduce are a clear error."""
    if hf_config.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(
            f"{source} has model_type={hf_config.get('model_type')!r}",
            "model_type 'gpt2'",
            "convert only GPT-2 checkpoints (GPT2LMHeadModel)",
        )
    for key, allowed in _FIXED.items():
        if key in hf_config and hf_config[key] not in allowed:
            raise CheckpointError(
                f"{source} has {key}={hf_config[key]!r}, which gpt2lab's GPT-2 does not implement",
                f"{key}={allowed[0]!r}",
                "use a standard GPT-2 checkpoint",
            )
    ints = {key: _int_field(hf_config, key, default, source) for key, default in _INTS.items()}
    for key in ("layer_norm_epsilon", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        value = hf_config.get(key)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise CheckpointError(f"{source} has {key}={value!r}", "a finite number", _DAMAGED)
    n_embd = ints["n_embd"]
    if hf_config.get("n_inner") not in (None, 4 * n_embd):
        raise CheckpointError(
            f"{source} has n_inner={hf_config['n_inner']}",
            f"n_inner null or 4*n_embd={4 * n_embd} (GPT-2's 4x MLP)",
            "use a standard GPT-2 checkpoint",
        )
    eps = hf_config.get("layer_norm_epsilon", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise CheckpointError(
            f"{source} has layer_norm_epsilon={eps}", "1e-05 (GPT-2's)", "use a GPT-2 checkpoint"
        )
    if hf_config.get("tie_word_embeddings", True) is False:
        raise CheckpointError(
            f"{source} has tie_word_embeddings=false",
            "the head tied to the token embedding, as in GPT-2",
            "use a GPT-2 checkpoint with tied embeddings",
        )
    dropout = max(
        float(hf_config.get(k, 0.0) or 0.0) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")
    )
    if n_embd % ints["n_head"]:
        raise CheckpointError(
            f"{source} has n_embd={n_embd} and n_head={ints['n_head']}, which does not divide it",
            "n_embd = n_head x head size",
            _DAMAGED,
        )
    if not 0.0 <= dropout < 1.0:
        raise CheckpointError(f"{source} has a dropout of {dropout}", "0 <= p < 1", _DAMAGED)
    return GPTConfig(
        block_size=ints["n_positions"],
        vocab_size=ints["vocab_size"],
        n_layer=ints["n_layer"],
        n_head=ints["n_head"],
        n_embd=n_embd,
        dropout=dropout,
        bias=True,
        pad_vocab_to=pad_vocab_to,
    )


_INTS = {"n_positions": 1024, "vocab_size": 50257, "n_layer": 12, "n_head": 12, "n_embd": 768}
_DAMAGED = "fix the config.json (a damaged or hand-edited file?) or re-save the model"


def _int_field(hf_config: dict[str, Any], key: str, default: int, source: str) -> int:
    """A config.json integer, checked by type and range before anything is built from it."""
    value = hf_config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31:
        raise CheckpointError(
            f"{source} has {key}={value!r}", "a positive integer (a number, not text)", _DAMAGED
        )
    return value


def config_to_hf(cfg: GPTConfig, eot_token: int | None = None) -> dict[str, Any]:
    """A transformers GPT2Config dict for `cfg` (one dropout rate for all three kinds)."""
    eot = eot_token if eot_token is not None and eot_token < cfg.vocab_size else None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": "float32",
    }


def from_hf_state(tensors: dict[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    """HF keys -> ours: add the `transformer.` prefix where missing, transpose Conv1D, pad the
    vocabulary rows to `cfg.padded_vocab_size`, drop the attention-mask buffers and tied head."""
    out = {}
    for key, t in tensors.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")) and t.dim() != 1:
            continue  # causal-mask buffers of older transformers, not weights
        if key == TIED:
            continue
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key  # saved from GPT2Model rather than GPT2LMHeadModel
        if key.endswith(CONV1D) and t.dim() == 2:
            t = t.t()
        out[key] = t.contiguous()
    wte = out.get("transformer.wte.weight")
    if wte is not None and wte.shape[0] == cfg.vocab_size < cfg.padded_vocab_size:
        pad = wte.new_zeros(cfg.padded_vocab_size - cfg.vocab_size, wte.shape[1])
        out["transformer.wte.weight"] = torch.cat([wte, pad])
    return out


def to_hf_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """Our weights under HF keys: Conv1D transposed, padding rows cut, zero biases if bias=False."""
    require_float_weights(model, "writing Hugging Face weights")
    cfg: GPTConfig = model.config  # type: ignore[assignment]
    out = {}
    for key, t in model.state_dict().items():
        if key == TIED:
            continue
        t = t.detach().float().cpu()
        if key == "transformer.wte.weight":
            t = t[: cfg.vocab_size]
        if key.endswith(CONV1D):
            t = t.t()
        out[key] = t.contiguous()
    if not cfg.bias:  # HF's GPT-2 always has biases; zeros compute the same function
        for name, p in model.named_parameters():
            if name.endswith("weight") and (name.startswith("transformer.h.") or "ln_f" in name):
                out.setdefault(name[: -len("weight")] + "bias", torch.zeros(p.shape[0]))
    return out


def read_hf_tensors(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a HF directory: model.safetensors (sharded too) or pytorch_model.bin."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        return read_tensors(p / "model.safetensors")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(
                set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            )
        except (ValueError, KeyError) as e:
            raise CheckpointError(
                f"{index} is not a valid safetensors index ({e})",
                "a JSON object with a weight_map",
                "re-save the model with save_pretrained",
            ) from e
        tensors: dict[str, Tensor] = {}
        for shard in shards:
            if Path(shard).name != shard:  # a shard outside the directory is not this model's
                raise CheckpointError(
                    f"{index} names shard {shard!r} outside {p}",
                    "file names in the same directory",
                    "re-save the model with save_pretrained",
                )
            tensors.update(read_tensors(p / shard))
        return tensors
    if (p / "pytorch_model.bin").is_file():
        f = p / "pytorch_model.bin"
        fix = "convert it to model.safetensors where it came from, or re-download it"
        return unwrap_state_dict(load_pickle_safely(f, "weights file", fix), f)
    raise CheckpointError(
        f"no weights in {p}",
        f"one of {', '.join(WEIGHT_FILES)} beside config.json",
        "point at a directory written by save_pretrained",
    )


# keys under which training scripts wrap a state dict ({"model": state_dict, "step": ...})
_WRAPPERS = ("model", "state_dict", "model_state_dict", "module")


def unwrap_state_dict(obj: Any, source: str | Path) -> dict[str, Tensor]:
    """A name -> tensor dict: `obj` itself, or the one a training script wrapped it in."""

    def is_state(d: Any) -> bool:
        return (
            isinstance(d, dict)
            and bool(d)
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in d.items())
        )

    if is_state(obj):
        return obj
    if isinstance(obj, dict):
        for key in _WRAPPERS:
            if is_state(obj.get(key)):
                return obj[key]
    what = (
        f"a dict with keys {sorted(map(str, obj))[:6]}"
        if isinstance(obj, dict)
        else f"a {type(obj).__name__}"
    )
    raise CheckpointError(
        f"{source} holds {what}, not a state dict of tensors",
        f"a dict of parameter name -> tensor (or one under {', '.join(_WRAPPERS)})",
        "save model.state_dict() itself, or re-download the model",
    )


def read_hf_config(path: str | Path, pad_vocab_to: int = 1) -> GPTConfig:
    """GPTConfig of a HF GPT-2 directory (every field checked by type and range)."""
    f = Path(path) / "config.json"
    try:
        if f.stat().st_size > 1 << 20:
            raise ValueError("larger than 1 MiB")
        hf_config = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(
            f"{f} cannot be read as JSON ({e})", "a transformers config.json", "re-save the model"
        ) from e
    if not isinstance(hf_config, dict):
        raise CheckpointError(
            f"{f} holds a {type(hf_config).__name__}", "a JSON object", "re-save the model"
        )
    return config_from_hf(hf_config, source=str(f), pad_vocab_to=pad_vocab_to)


def load_hf(path: str | Path, pad_vocab_to: int = 1):
    """A GPT (eval mode) from a HF GPT-2 directory; `pad_vocab_to=64` pads for training speed.

    The config is checked against the weights' shapes and the free memory before the model is
    built: a config.json cannot make gpt2lab allocate more than its weights file holds."""
    cfg = read_hf_config(path, pad_vocab_to=pad_vocab_to)
    state = from_hf_state(read_hf_tensors(path), cfg)
    check_config_fits(cfg, state, str(Path(path) / "config.json"))
    require_model(cfg, None, source=str(path))
    model = GPT(cfg)
    assign_state(model, state, source=str(path))
    return model.eval()


# what save_hf writes; config.json, written last, is what makes the directory a model
HF_FILES = (
    "generation_config.json",
    "model.safetensors",
    "gpt2lab_tokenizer",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "config.json",
)


def save_hf(
    model: torch.nn.Module,
    path: str | Path,
    tokenizer: Any = None,
    score: Tensor | None = None,
    pad_token_id: int | None = None,
) -> None:
    """Write a HF GPT-2 directory (config.json, model.safetensors, tokenizer files).

    `path` must be new, empty or gpt2lab's (gpt2lab.outdir); only gpt2lab's files there are
    replaced, each atomically, config.json last, so an interrupted save never looks whole.

    Without `tokenizer`: the one `load_model` attached to the model, else GPT-2's when the model
    has its 50257 tokens, else none (weights and config only). With `score` (1, n_embd), a reward
    model's head, it is a `GPT2ForSequenceClassification` with `num_labels=1` whose
    `pad_token_id` tells transformers which token is the last real one.
    """
    cfg: GPTConfig = model.config  # type: ignore[assignment]
    if tokenizer is None:  # the one load_model found with the model, else GPT-2's if it fits
        tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None and cfg.vocab_size == GPT2_VOCAB:
        tokenizer = get_tokenizer("gpt2")
    eot = getattr(tokenizer, "eot_token", None)
    hf_config, tensors = config_to_hf(cfg, eot), to_hf_state(model)
    if score is not None:
        hf_config.update(
            architectures=["GPT2ForSequenceClassification"],
            id2label={"0": "LABEL_0"},
            label2id={"LABEL_0": 0},
            pad_token_id=pad_token_id,
        )
        tensors["score.weight"] = score.detach().float().cpu().reshape(1, cfg.n_embd)
    with claim_output_dir(path, "convert", flag="dst") as out:
        out.remove_ours()  # the keystone (config.json) first: a crash leaves no "whole" model
        out.record(*HF_FILES)
        gen = {"bos_token_id": eot, "eos_token_id": eot} if eot is not None else {}
        atomic_write_json(out.path / "generation_config.json", gen)
        save_tensors(tensors, out.path / "model.safetensors", {})
        if tokenizer is not None:
            write_hf_tokenizer(tokenizer, out.path, cfg.block_size)
        atomic_write_json(out.path / "config.json", hf_config)  # last


def write_hf_tokenizer(tokenizer: Any, path: Path, max_length: int = 1024) -> None:
    """GPT-2 style vocabularies become vocab.json + merges.txt + tokenizer_config.json (with the
    chat template as Jinja), what AutoTokenizer reads; every tokenizer is also saved as itself
    under gpt2lab_tokenizer/ so round trips keep it (and its chat_template.json)."""
    tokenizer.save(path / "gpt2lab_tokenizer")
    if not isinstance(tokenizer, BPETokenizer) or tokenizer.pattern != GPT2_PATTERN:
        return  # transformers' GPT2Tokenizer would split the text otherwise and give other ids
    tokenizer.save_hf(path, max_length)
