"""What one training step costs: its FLOPs per token (for MFU) and its peak memory, by kind.

Both read only the model's config and parameter count: given a GPTConfig they compute it
(`budget.param_count`) without building anything, before a run commits to a batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2lab.budget import param_count
from gpt2lab.config import GPTConfig
from gpt2lab.errors import ConfigError, mark_key
from gpt2lab.model import GPT

# float32 optimizer states per parameter (AdamW keeps two; Muon one or two: counted as two)
_OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "muon": 2, "sgd": 1, "none": 0}

# The explicit softmax(QK^T)V attention that CPU training in bfloat16 uses keeps its T x T
# probabilities; SDPA's fused kernels keep none. Mirrors model.py's choice of attention path in
# training (explicit_attention_is_faster).
EXPLICIT_ATTENTION_MAX_T = 256


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per training step, by kind (see `estimate_memory`)."""

    params: int
    grads: int
    optimizer: int
    activations: int  # everything that grows with batch x seq, logits included
    logits: int  # of which: the float32 logits and their gradient

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    def __str__(self) -> str:
        parts = [f"{k} {getattr(self, k) / 2**30:.2f}" for k in self.__dataclass_fields__]
        return f"{self.total / 2**30:.2f} GiB (" + ", ".join(parts) + ")"


def flops_per_token(model: GPT | GPTConfig, seq_len: int | None = None) -> int:
    """Training FLOPs (forward + backward) per token: 6N + 12*L*C*T (PaLM paper, app. B).

    N leaves out the position table (a lookup, not a matmul) and the vocabulary padding.
    """
    cfg = model if isinstance(model, GPTConfig) else model.config
    T = seq_len or cfg.block_size
    pad_rows = cfg.padded_vocab_size - cfg.vocab_size
    n = _num_params(model) - pad_rows * cfg.n_embd - cfg.block_size * cfg.n_embd
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * T


def estimate_memory(
    model: GPT | GPTConfig,
    batch: int,
    seq: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    optimizer: str = "adamw",
) -> MemoryEstimate:
    """Bytes one training step needs at its peak, by kind (`str()` gives GiB).

    Parameters, gradients and optimizer state are float32 (autocast keeps master weights);
    `dtype` is the compute dtype. Activations count what autograd saves, per layer, token
    and channel: the two LayerNorm inputs on the float32 residual stream plus 14 values in
    `dtype` (LN outputs, q/k/v, attention output, 4x MLP input and GELU output), as the
    fused SDPA kernels keep no T x T scores. With dropout, SDPA on the CPU uses its math
    kernel (float32 q/k/v, three T x T tensors per head) and each dropout keeps a mask;
    without, bfloat16 at contexts up to 256 keeps one T x T softmax per head (the CPU training
    path).
    Then the final LayerNorm, the float32 log-softmax and autocast's `dtype` weight copies.
    `logits`, a part of `activations`, is the float32 logits the caller holds and their
    gradient. tests/train/test_memory.py holds this to what autograd really saves.
    """
    cfg = model if isinstance(model, GPTConfig) else model.config
    T = seq or cfg.block_size
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    w = torch.empty((), dtype=dtype).element_size()
    n = _num_params(model)
    if optimizer not in _OPTIMIZER_STATES:
        raise ConfigError(
            f"unknown optimizer {optimizer!r}",
            f"one of {', '.join(_OPTIMIZER_STATES)}",
            f"fix {mark_key('train.optimizer')}",
        )
    B, C, L, V = batch, cfg.n_embd, cfg.n_layer, cfg.padded_vocab_size
    if cfg.dropout > 0:
        per_layer = B * T * C * (20 + 13 * w) + B * cfg.n_head * T * T * 12
        acts = L * per_layer + B * T * C * 4  # plus the embedding dropout's mask
    else:
        acts = L * B * T * C * (8 + 14 * w)
        if T <= EXPLICIT_ATTENTION_MAX_T and w < 4:  # the explicit attention keeps its softmax
            acts += L * B * cfg.n_head * T * T * w
    acts += B * T * C * (4 + w) + B * T * V * 4  # final LayerNorm, log-softmax
    acts += n * w if w < 4 else 0  # autocast's low-precision weight copies
    logits = B * T * V * 8
    states = _OPTIMIZER_STATES[optimizer]
    return MemoryEstimate(4 * n, 4 * n, 4 * n * states, acts + logits, logits)


def _num_params(model: GPT | GPTConfig) -> int:
    """Parameters as allocated (padding rows included): counted, or for a config computed."""
    if isinstance(model, GPTConfig):
        return param_count(model)
    return sum(p.numel() for p in model.parameters())
