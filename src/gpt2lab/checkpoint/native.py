"""Training checkpoints in a run directory: weights, optimizer, state; atomic; latest/best/keep-K.

Layout: RUN_DIR/ckpt/step_00001000/{model.safetensors, optimizer.pt, state.json}, written as a
temp dir, fsynced and renamed; RUN_DIR/latest and RUN_DIR/best hold the relative path of one.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2lab.checkpoint.weights import load_pickle_safely, save_pickle, save_tensors
from gpt2lab.errors import CheckpointError, TrainingError, mark_key
from gpt2lab.io import atomic_dir, atomic_write_text, path_inside

CKPT_DIR = "ckpt"
FILES = ("model.safetensors", "optimizer.pt", "state.json")
_STEP_RE = re.compile(r"^step_(\d{8,})$")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """RUN_DIR/ckpt/step_00001000 for step 1000."""
    return Path(run_dir) / CKPT_DIR / f"step_{step:08d}"


def is_complete(ckpt: str | Path) -> bool:
    """True when a checkpoint dir holds every file (renamed ones always do; this guards hands)."""
    return all((Path(ckpt) / name).is_file() for name in FILES)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp dirs of interrupted writes are ignored)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_RE.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _pointer(run_dir: Path, name: str) -> Path | None:
    """The checkpoint a `latest`/`best` file names, if that checkpoint is complete."""
    f = run_dir / name
    if not f.is_file():
        return None
    try:
        with open(f, "rb") as fh:
            text = fh.read(4096).decode("utf-8", errors="replace").strip()
    except OSError:
        return None
    path_inside(run_dir, text, str(f), "checkpoint")  # a path from a file is not trusted
    target = run_dir / text
    return target if is_complete(target) else None


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint: what `latest` names, else the highest step found."""
    run_dir = Path(run_dir)
    found = list_checkpoints(run_dir)
    pointed = _pointer(run_dir, "latest")
    if pointed is not None and (not found or int(pointed.name[5:]) >= int(found[-1].name[5:])):
        return pointed
    return found[-1] if found else None


def find_best(run_dir: str | Path) -> Path | None:
    """The checkpoint with the lowest validation loss (what `best` names)."""
    return _pointer(Path(run_dir), "best")


def require_latest(run_dir: str | Path) -> Path:
    """find_latest, or a clear error that there is nothing to resume."""
    ckpt = find_latest(run_dir)
    if ckpt is None:
        raise TrainingError(
            f"nothing to resume in {run_dir}: no complete checkpoint in {Path(run_dir) / CKPT_DIR}",
            "a run directory written by `gpt2lab train`",
            f"check {mark_key('out')}, or start a new run without {mark_key('resume')}",
        )
    return ckpt


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write one checkpoint atomically, point `latest` (and `best` if it improves) at it, prune.

    `model_state` uses our key names; a tied `lm_head.weight` is left out. `state` must be
    JSON-serialisable and may hold `val_loss`, which decides `best`.
    """
    run_dir = Path(run_dir)
    final = checkpoint_path(run_dir, step)
    tensors = {
        k: v.detach().to("cpu").contiguous()
        for k, v in model_state.items()
        if not (k == "lm_head.weight" and _tied(model_state))
    }
    with atomic_dir(final) as tmp:
        model_cfg = json.dumps(state.get("config", {}).get("model", {}))
        save_tensors(tensors, tmp / "model.safetensors", {"gpt2lab_config": model_cfg})
        save_pickle(optimizer_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1) + "\n")
    rel = final.relative_to(run_dir).as_posix()
    atomic_write_text(run_dir / "latest", rel + "\n")
    val = state.get("val_loss")
    best = find_best(run_dir)
    best_val = load_state(best).get("val_loss") if best is not None else None
    if val is not None and (best_val is None or val < best_val):
        atomic_write_text(run_dir / "best", rel + "\n")
    prune(run_dir, keep_last)
    return final


def _tied(sd: dict[str, torch.Tensor]) -> bool:
    head, wte = sd.get("lm_head.weight"), sd.get("transformer.wte.weight")
    if head is None or wte is None:
        return False
    return head.data_ptr() == wte.data_ptr() or (head.shape == wte.shape and torch.equal(head, wte))


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (0 keeps all), never `best` or `latest`."""
    run_dir = Path(run_dir)
    keep = {find_best(run_dir), find_latest(run_dir)}
    found = list_checkpoints(run_dir)
    if keep_last > 0:
        for old in found[:-keep_last]:
            if old not in keep:
                # rename first: a kill during rmtree must not leave a half-deleted step_* behind
                doomed = old.with_name(f".{old.name}.deleting")
                os.replace(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
    # leftovers of writes killed half-way (atomic_dir names them .step_X.*.tmp)
    for tmp in (run_dir / CKPT_DIR).glob(".step_*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_state(ckpt: str | Path) -> dict[str, Any]:
    """The state.json of a checkpoint (step, config, rng, data position, ...)."""
    f = Path(ckpt) / "state.json"
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"cannot read {f} ({e})",
            "a state.json written by `gpt2lab train`",
            "resume from another checkpoint (delete this one)",
        ) from e


def load_optimizer_state(ckpt: str | Path) -> dict[str, Any]:
    """optimizer.pt, loaded without executing code (weights_only=True)."""
    fix = "resume from another checkpoint (delete this one)"
    return load_pickle_safely(Path(ckpt) / "optimizer.pt", "optimizer state", fix)


# ---- random number generators: saved per rank so a resumed run draws the same numbers ----


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as JSON-ready values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo capture_rng."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])
