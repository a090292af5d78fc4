"""What a model will cost before it exists: parameters, inference memory, and the check against the
memory that is free, so a command refuses what cannot fit before it allocates anything.

Everything here reads the config alone (no model is built, not even on the meta device), so a
config.json claiming a billion-token vocabulary or a `--max-new-tokens 1e12` is refused in
microseconds. `train/memory.py` adds the training step's gradients, optimizer state and
activations on top of `param_count`. Commands call `require_inference` (sample, eval, serve,
chat) and `require_model` (any load, convert) - see docs/reliability.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError, ResourceError

# bytes that `complete()` keeps per generated token and row: a Python int in a list (8-byte
# pointer, ints past 256 are 28-byte objects), the token in the sequence buffer, its text
KEPT_PER_TOKEN = 48


def param_count(cfg: GPTConfig) -> int:
    """Parameters of GPT(cfg) as allocated (padded vocabulary rows included; the head is tied)."""
    C, L = cfg.n_embd, cfg.n_layer
    b = 1 if cfg.bias else 0
    per_layer = (
        2 * (C + b * C)  # ln_1, ln_2
        + C * 3 * C
        + b * 3 * C  # attention: c_attn
        + C * C
        + b * C  # attention: c_proj
        + C * 4 * C
        + b * 4 * C  # MLP: c_fc
        + 4 * C * C
        + b * C  # MLP: c_proj
    )
    return cfg.padded_vocab_size * C + cfg.block_size * C + L * per_layer + C + b * C


def dtype_bytes(dtype: torch.dtype | str | None) -> int:
    if dtype is None:
        return 4
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, torch.float32)
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class InferenceEstimate:
    """Bytes a forward-only job needs at its peak, by kind."""

    weights: int
    kv_cache: int  # keys and values of every layer for the rows and the context they keep
    logits: int  # float32 logits of the widest forward pass (a prompt's prefill or a window)
    activations: int  # the widest forward pass's hidden states (a few copies of B x T x C)
    outputs: int  # what is kept of the results (generated ids and text)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.logits + self.activations + self.outputs

    def __str__(self) -> str:
        parts = [f"{k} {_gib(getattr(self, k))}" for k in self.__dataclass_fields__]
        return f"{_gib(self.total)} GiB (" + ", ".join(parts) + ")"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def estimate_inference(
    cfg: GPTConfig,
    batch: int,
    prompt_tokens: int,
    new_tokens: int = 0,
    dtype: torch.dtype | str | None = torch.float32,
    *,
    kv_cache: bool = True,
    keep_outputs: bool = True,
) -> InferenceEstimate:
    """Memory for `batch` rows of `prompt_tokens` (scored, or prefilled) and `new_tokens` sampled.

    The context a row keeps is at most the model's block: past it the window slides (generate.py),
    so the KV cache and the forward passes never grow beyond `block_size` however many tokens are
    asked for; what is kept of the output does (`KEPT_PER_TOKEN` per token and row).
    """
    w = dtype_bytes(dtype)
    T = min(prompt_tokens + new_tokens, cfg.block_size) if kv_cache else prompt_tokens
    T = max(1, min(T, cfg.block_size))
    window = max(1, min(max(prompt_tokens, 1), cfg.block_size))
    if new_tokens > 0:  # a slide re-runs the last 3/4 of the block at once
        window = max(window, min(T, cfg.block_size - cfg.block_size // 4))
    C, V = cfg.n_embd, cfg.padded_vocab_size
    kv = 2 * cfg.n_layer * batch * T * C * w if kv_cache else 0
    logits = batch * window * V * 4
    acts = batch * window * C * 4 * 8 + batch * cfg.n_head * window * window * 4  # MLP x4, scores
    outputs = batch * new_tokens * KEPT_PER_TOKEN if keep_outputs else 0
    return InferenceEstimate(param_count(cfg) * w, kv, logits, acts, outputs)


def free_memory(device: torch.device | str | None = None) -> int | None:
    """Bytes free for a new allocation on `device` (CPU: MemAvailable, capped by the address-space
    limit); None where it cannot be told."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    have = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                have = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        have = None
    if resource is not None:
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            have = soft if have is None else min(have, soft)
    return have


def require(
    need: int,
    device: torch.device | str | None,
    what: str,
    fix: str,
    error: type[GPT2LabError] = ResourceError,
) -> None:
    """Refuse (`error`, one line) when `need` bytes exceed the free memory of `device`."""
    have = free_memory(device)
    if have is not None and need > have:
        raise error(
            f"{what} needs about {need / 2**30:.2f} GiB but {device or 'cpu'} has "
            f"{have / 2**30:.2f} GiB free; nothing was allocated",
            "a job that fits in memory",
            fix,
        )


def require_model(
    cfg: GPTConfig, device: torch.device | str | None, dtype=None, source: str = "the model"
) -> None:
    """Refuse to build a model whose weights alone cannot fit (a config.json may claim anything)."""
    need = param_count(cfg) * 4  # built in float32, then cast
    require(
        need,
        "cpu",
        f"{source}'s config (n_layer {cfg.n_layer}, n_embd {cfg.n_embd}, vocab_size "
        f"{cfg.vocab_size}, block_size {cfg.block_size}) describes {param_count(cfg):,} "
        "parameters, which",
        "check that config (a damaged or hostile file), or use a machine with more memory",
    )
    if device is not None and torch.device(device).type != "cpu":
        require(
            param_count(cfg) * dtype_bytes(dtype),
            device,
            f"{source}'s weights",
            "use a smaller model or dtype",
        )


def require_inference(
    cfg: GPTConfig,
    batch: int,
    prompt_tokens: int,
    new_tokens: int,
    dtype: torch.dtype | str | None,
    device: torch.device | str | None,
    what: str,
    fix: str,
    *,
    loaded: bool = True,
    kv_cache: bool = True,
    keep_outputs: bool = True,
) -> InferenceEstimate:
    """Estimate a forward-only job and refuse it if it cannot fit; `loaded=True` when the weights
    are already in memory (their bytes are then not counted again). Returns the estimate."""
    est = estimate_inference(
        cfg, batch, prompt_tokens, new_tokens, dtype, kv_cache=kv_cache, keep_outputs=keep_outputs
    )
    need = est.total - (est.weights if loaded else 0)
    if new_tokens > 0 and keep_outputs:
        # the results live on the host whatever the device
        require(est.outputs, "cpu", f"{what}: keeping {batch} x {new_tokens:,} tokens", fix)
        need -= est.outputs
    require(need, device, f"{what} ({est})", fix)
    return est
