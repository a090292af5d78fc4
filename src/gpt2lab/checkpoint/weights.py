"""Model weights in safetensors files: written atomically, read without executing anything.

Every problem (missing or unexpected keys, shapes, a truncated file) is reported in one error
that lists what disagrees and, where it can tell, the config field behind it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from gpt2lab.config import to_dict
from gpt2lab.errors import CheckpointError, mark_key
from gpt2lab.io import atomic_path

TIED = "lm_head.weight"  # the head shares transformer.wte.weight; files store it once


def require_float_weights(model: nn.Module, writer: str) -> None:
    """Writers store float matrices: a model from `gpt2lab.quantize` is refused in one line."""
    method = getattr(model, "quantization", None)
    if method:
        raise CheckpointError(
            f"{writer} got a model with {method} weights (from gpt2lab.quantize)",
            "a float model",
            "save or export the model you quantized: quantize() leaves it as it was",
        )


def save_model_safetensors(
    model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write the model's weights (our key names, without the tied `lm_head.weight`) atomically."""
    require_float_weights(model, "saving weights")
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != TIED}
    meta = dict(metadata or {})
    config = getattr(model, "config", None)
    if config is not None and "gpt2lab_config" not in meta:
        meta["gpt2lab_config"] = json.dumps(to_dict(config))
    save_tensors(tensors, path, meta)


def save_tensors(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict) -> None:
    """safetensors file written to a temp name, fsynced and renamed: never seen half-written.

    A failed write (a full disk) is the OSError it was, not the writer's own error type."""
    with atomic_path(path) as tmp:
        cpu = {k: v.cpu() for k, v in tensors.items()}
        try:
            save_file(cpu, str(tmp), metadata={"format": "pt", **metadata})
        except SafetensorError as e:
            if (err := as_os_error(e, tmp)) is None:
                raise
            raise err from e


def save_pickle(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a file we opened, so a failed write surfaces as its OSError (torch
    reports every write failure as 'enforce fail ... unexpected pos')."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as e:
        if (err := as_os_error(e, path)) is None:
            raise
        raise err from e


_OS_ERROR = re.compile(r"os error (\d+)")


def as_os_error(e: BaseException, path: str | os.PathLike) -> OSError | None:
    """The OSError behind a writer's own error type (safetensors, torch), if there was one."""
    if isinstance(e.__context__, OSError):
        inner = e.__context__
        return OSError(inner.errno, inner.strerror, os.fspath(path))
    m = _OS_ERROR.search(str(e))
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code), os.fspath(path))
    return None


def read_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of a safetensors file on the CPU; a missing or corrupt file names itself."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"weights file {path} does not exist",
            "a model.safetensors file",
            "check the path, or that the checkpoint finished writing",
        )
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"weights file {path} is truncated or corrupt ({e})",
            "a complete safetensors file",
            "re-create or re-download it, or load an earlier checkpoint",
        ) from e


def load_model_safetensors(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a `save_model_safetensors` file into `model`, checking every key and shape."""
    assign_state(model, read_tensors(path), source=str(path))


def assign_state(model: nn.Module, tensors: Mapping[str, Tensor], source: str) -> None:
    """Copy `tensors` (our key names) into `model`; any mismatch is one error that lists it all."""
    own = {k: v for k, v in model.state_dict().items() if k != TIED}
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own) - {TIED})
    wrong = [k for k in own if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"missing keys {_short(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_short(unexpected)}")
        if wrong:
            shapes = [f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in wrong]
            problems.append(f"shape mismatches (file vs model) {_short(shapes)}")
        hint = _config_disagreement(getattr(model, "config", None), tensors)
        raise CheckpointError(
            f"{source} does not fit the model: "
            + "; ".join(problems)
            + (f" ({hint})" if hint else ""),
            "the weights of a model with the same config",
            f"load it with the config it was saved with (or fix {mark_key('model.*')})",
        )
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(tensors[k])


def check_config_fits(cfg: Any, tensors: Mapping[str, Tensor], source: str) -> None:
    """Refuse a config whose shapes disagree with the weights, before a model is built from it."""
    hint = _config_disagreement(cfg, tensors)
    if not hint:
        return
    problems = []
    if cfg.n_layer <= 10_000:  # the key names the config implies, without building anything
        want = set(expected_keys(cfg))
        missing = sorted(want - set(tensors))
        unexpected = sorted(set(tensors) - want - {TIED})
        if missing:
            problems.append(f"missing keys {_short(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_short(unexpected)}")
    raise CheckpointError(
        f"{source} does not fit the weights beside it: " + "; ".join([*problems, hint]),
        "a config and weights saved together",
        "use the config the weights were saved with (the file may be damaged or edited)",
    )


def expected_keys(cfg: Any) -> list[str]:
    """The state-dict keys (ours, tied head left out) of GPT(cfg), from the config alone."""
    weights_and_biases = ("weight", "bias") if cfg.bias else ("weight",)
    keys = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(cfg.n_layer):
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            keys += [f"transformer.h.{i}.{part}.{w}" for w in weights_and_biases]
    return keys + [f"transformer.ln_f.{w}" for w in weights_and_biases]


def infer_shape_config(tensors: Mapping[str, Tensor]) -> dict[str, int]:
    """The config fields a GPT-2 state dict (our key names) implies: n_layer, n_embd, ..."""
    out: dict[str, int] = {}
    if "transformer.wte.weight" in tensors:
        out["vocab_rows"], out["n_embd"] = tensors["transformer.wte.weight"].shape
    if "transformer.wpe.weight" in tensors:
        out["block_size"] = tensors["transformer.wpe.weight"].shape[0]
    layers = {int(k.split(".")[2]) for k in tensors if k.startswith("transformer.h.")}
    out["n_layer"] = max(layers) + 1 if layers else 0
    out["bias"] = int(any(k.endswith("ln_1.bias") for k in tensors))
    return out


def _config_disagreement(cfg, tensors: Mapping[str, Tensor]) -> str:
    """Name the config fields whose values differ between `cfg` and the file's shapes."""
    if cfg is None:
        return ""
    found = infer_shape_config(tensors)
    diffs = []
    for name in ("n_layer", "n_embd", "block_size"):
        if name in found and found[name] != getattr(cfg, name):
            diffs.append(f"model.{name}: file {found[name]}, config {getattr(cfg, name)}")
    if "vocab_rows" in found and found["vocab_rows"] != cfg.padded_vocab_size:
        diffs.append(
            f"model.vocab_size/pad_vocab_to: file has {found['vocab_rows']} embedding rows, "
            f"config {cfg.padded_vocab_size}"
        )
    if found.get("n_layer") and bool(found["bias"]) != cfg.bias:
        diffs.append(f"model.bias: file {bool(found['bias'])}, config {cfg.bias}")
    return "; ".join(diffs)


def _short(items: list[str], n: int = 6) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_pickle_safely(path: Path, what: str, fix: str) -> Any:
    """`torch.load` of a pickle (pytorch_model.bin, optimizer.pt) that may not run code.

    torch refuses a pickle holding anything but tensors and plain containers, with a long
    multi-line explanation; the error here is one line in our words.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = "it holds Python objects besides tensors, and unpickling them could run code"
        raise CheckpointError(f"{what} {path} was refused: {why}", "plain tensors", fix) from e
    except Exception as e:  # noqa: BLE001 - torn or foreign files raise many types
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        why = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise CheckpointError(f"{what} {path} cannot be read ({why})", "a PyTorch file", fix) from e
