"""One loader for every place a model comes from: a run, a checkpoint, a HF directory or hub name.

`load_model(path)` returns the model and the tokenizer that travels with it (or None), so
sample, eval and convert never guess which vocabulary a model was trained on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from gpt2lab.budget import require_model
from gpt2lab.checkpoint.hf import GPT2_VOCAB, WEIGHT_FILES, is_hf_dir, load_hf, read_hf_config
from gpt2lab.checkpoint.native import find_latest
from gpt2lab.checkpoint.weights import assign_state, check_config_fits, read_tensors
from gpt2lab.config import GPTConfig, from_dict
from gpt2lab.device import DTYPES
from gpt2lab.errors import CheckpointError, TokenizerError, mark_key
from gpt2lab.io import path_inside
from gpt2lab.model import GPT
from gpt2lab.tokenizer import get_tokenizer

_TOKENIZER_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


def load_model(
    path: str | os.PathLike, device: Any = None, dtype: torch.dtype | str | None = None
) -> tuple[Any, Any]:
    """(GPT in eval mode, tokenizer or None) from a run dir, checkpoint dir, HF dir or hub name."""
    p = Path(path)
    if p.is_file():  # e.g. .../model.safetensors: its directory says what it is
        p = p.parent
    if p.is_dir():
        if is_hf_dir(p):
            model, tok = load_hf(p, pad_vocab_to=GPTConfig.pad_vocab_to), hf_tokenizer(p)
        else:
            model, tok = _load_native(find_checkpoint(p))
    else:
        hub = hub_snapshot(str(path))
        model, tok = load_hf(hub, pad_vocab_to=GPTConfig.pad_vocab_to), hf_tokenizer(hub)
    if tok is None and model.config.vocab_size == GPT2_VOCAB:
        tok = get_tokenizer("gpt2")
    if tok is not None and tok.n_vocab > model.config.vocab_size:
        raise CheckpointError(
            f"the tokenizer that comes with {path} has {tok.n_vocab} tokens but the model knows "
            f"only {model.config.vocab_size}: ids past {model.config.vocab_size - 1} would fail",
            "the tokenizer the model was trained with",
            "put the model's own tokenizer beside it (tokenizer/, or vocab.json + merges.txt)",
        )
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    model.to(device=device, dtype=dtype)
    model.tokenizer = tok  # so that save_pretrained() keeps it
    return model.eval(), tok


def peek_config(path: str | os.PathLike) -> GPTConfig | None:
    """The model config at `path` (run, checkpoint or HF directory) without loading weights, or
    None where it cannot be read that cheaply (a hub name, a bare weights file)."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not p.is_dir():
        return None
    if is_hf_dir(p):
        return read_hf_config(p, pad_vocab_to=GPTConfig.pad_vocab_to)
    ckpt = find_checkpoint(p)
    cfg_dict = (_read_state(ckpt).get("config") or {}).get("model")
    return from_dict(GPTConfig, cfg_dict, source=str(ckpt / "state.json")) if cfg_dict else None


def find_checkpoint(path: Path) -> Path:
    """The checkpoint directory `path` names: itself, or a run directory's newest checkpoint."""
    if (path / "model.safetensors").is_file():
        return path
    if (path / "latest").is_file() or (path / "ckpt").is_dir():
        found = find_latest(path)
        if found is not None:
            return found
        raise CheckpointError(
            f"run directory {path} holds no complete checkpoint under {path / 'ckpt'}",
            "ckpt/step_*/ with model.safetensors, optimizer.pt and state.json",
            "train longer than one checkpoint interval, or point at another run",
        )
    raise CheckpointError(
        f"{path} is not a model directory: it has no model.safetensors, config.json or latest",
        "a gpt2lab run or checkpoint directory, or a Hugging Face GPT-2 directory "
        f"(config.json with one of {', '.join(WEIGHT_FILES)})",
        f"point {mark_key('model')} at a run directory such as runs/sc",
    )


def _load_native(ckpt: Path) -> tuple[Any, Any]:
    state = _read_state(ckpt)
    cfg_dict = (state.get("config") or {}).get("model")
    source = ckpt / "state.json"
    if cfg_dict is None:  # a bare weights file: the config rides in its metadata
        cfg_dict, source = _metadata_config(ckpt / "model.safetensors"), ckpt / "model.safetensors"
    if not isinstance(cfg_dict, dict):
        raise CheckpointError(
            f"{source} has a model config of type {type(cfg_dict).__name__}",
            "a table of model settings",
            "load an earlier checkpoint of the run",
        )
    cfg = from_dict(GPTConfig, cfg_dict, source=str(source))
    tok = native_tokenizer(ckpt, state.get("tokenizer", "tokenizer"))  # checked before building
    tensors = read_tensors(ckpt / "model.safetensors")
    check_config_fits(cfg, tensors, str(source))
    require_model(cfg, None, source=str(ckpt))
    model = GPT(cfg)
    assign_state(model, tensors, source=str(ckpt / "model.safetensors"))
    return model, tok


def _read_state(ckpt: Path) -> dict[str, Any]:
    f = ckpt / "state.json"
    if not f.is_file():
        return {}
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{f} cannot be read as JSON ({e})",
            "the state.json written with the checkpoint",
            "load an earlier checkpoint of the run",
        ) from e
    return state if isinstance(state, dict) else {}


def _metadata_config(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["gpt2lab_config"])
    except Exception as e:  # noqa: BLE001 - corrupt headers raise several types
        raise CheckpointError(
            f"{path} has no model config (no state.json beside it, no gpt2lab_config metadata)",
            "a checkpoint written by gpt2lab, with its state.json",
            "copy the checkpoint's state.json next to it",
        ) from e


def native_tokenizer(ckpt: Path, spec: Any) -> Any:
    if isinstance(spec, dict):
        return get_tokenizer(spec)
    if isinstance(spec, str):  # relative to the checkpoint, or to its run directory
        source = str(ckpt / "state.json")
        run_dir = ckpt.parent.parent if ckpt.parent.name == "ckpt" else ckpt
        path_inside(run_dir, spec, source, "tokenizer directory")  # never outside the run
        for base in (ckpt, ckpt.parent.parent):
            if (base / spec).is_dir():
                rel = os.path.relpath(base / spec, run_dir)
                return get_tokenizer(path_inside(run_dir, rel, source, "tokenizer directory"))
    return None


def hf_tokenizer(path: Path) -> Any:
    """The tokenizer of a HF directory: ours saved beside it, else vocab.json + merges.txt."""
    if (path / "gpt2lab_tokenizer").is_dir():
        return get_tokenizer(path / "gpt2lab_tokenizer")
    if any((path / a).is_file() and (path / b).is_file() for a, b in _TOKENIZER_PAIRS):
        return get_tokenizer(path)
    if (path / "tokenizer.json").is_file():  # transformers 5 saves tokenizers' file alone
        try:
            return get_tokenizer(path)
        except TokenizerError:  # not a GPT-2 style BPE: the model comes without a tokenizer
            return None
    return None


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = (
        os.environ.get("HF_HOME")
        or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    )
    return Path(home).expanduser() / "hub"


def hub_snapshot(name: str) -> Path:
    """A hub model such as `gpt2`: the local cache's copy, else a download where allowed."""
    repo = hub_cache_dir() / f"models--{name.replace('/', '--')}"
    ref = repo / "refs" / "main"
    snapshots = []
    if ref.is_file():
        snapshots.append(repo / "snapshots" / ref.read_text(encoding="utf-8").strip())
    if (repo / "snapshots").is_dir():
        snapshots += sorted((repo / "snapshots").iterdir())
    for snap in snapshots:
        if is_hf_dir(snap):
            return snap
    offline = any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    why = "HF_HUB_OFFLINE is set"
    if not offline:
        try:
            from huggingface_hub import snapshot_download

            patterns = ["config.json", "*.safetensors", "*.json", "merges.txt", "vocab.json"]
            return Path(snapshot_download(name, allow_patterns=patterns))
        except ImportError:
            why = "huggingface_hub is not installed"
        except Exception as e:  # noqa: BLE001 - network and hub errors come in many types
            why = f"downloading failed ({type(e).__name__})"
    raise CheckpointError(
        f"{name!r} is neither a directory nor in the Hugging Face cache: looked for config.json "
        f"with {' or '.join(WEIGHT_FILES)} in {repo / 'snapshots'}/*/, and {why}",
        "a local path, or a hub name already downloaded",
        f"check the path, or run `huggingface-cli download {name}` where the network allows",
    )
