"""FLOPs and memory per training step: the formulas' values, and the activation estimate against
what autograd really saves in a forward pass of today's model."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from gpt2lab.config import MODEL_PRESETS, GPTConfig
from gpt2lab.device import autocast
from gpt2lab.errors import ConfigError
from gpt2lab.model import GPT
from gpt2lab.train.memory import estimate_memory, flops_per_token


def test_flops_and_memory_estimates():
    with torch.device("meta"):
        model = GPT(MODEL_PRESETS["gpt2"])
    n = model.num_params() - 1024 * 768
    assert flops_per_token(model) == 6 * n + 12 * 12 * 768 * 1024
    assert flops_per_token(MODEL_PRESETS["gpt2"], 512) == 6 * n + 12 * 12 * 768 * 512
    est = estimate_memory(model, 8, 1024, torch.bfloat16, "adamw")
    assert est.params == est.grads == 4 * 124_475_904 and est.optimizer == 2 * est.params
    assert est.logits == 8 * 1024 * 50304 * 8  # float32 logits and gradient, padding included
    assert est.total == est.params + est.grads + est.optimizer + est.activations
    assert est.activations > est.logits
    assert "GiB" in str(est)
    assert estimate_memory(MODEL_PRESETS["gpt2"], 8, 1024, "bfloat16") == est  # a config works too
    with pytest.raises(ConfigError, match="train.optimizer"):
        estimate_memory(model, 8, optimizer="lion")


def saved_for_backward(model: GPT, idx: Tensor, dtype: torch.dtype) -> tuple[int, list]:
    """Bytes autograd keeps for backward (parameters themselves left out), measured by hooks,
    each storage counted once; and the shapes of the tensors saved."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    shapes = []

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast(torch.device("cpu"), dtype):
            model(idx, idx)
    return sum(seen.values()), shapes


# the second shape has long contexts in a narrow model: attention's T x T tensors dominate, so a
# change to what the attention keeps for backward moves the total far past the tolerance
SHAPES = {
    "balanced": dict(block_size=64, vocab_size=300, n_layer=3, n_head=2, n_embd=64),
    "attention-heavy": dict(block_size=256, vocab_size=100, n_layer=2, n_head=4, n_embd=32),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_activation_estimate_matches_what_autograd_saves(shape, dtype, dropout):
    cfg = GPTConfig(**SHAPES[shape], dropout=dropout)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    B, T = 2, cfg.block_size
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    measured, shapes = saved_for_backward(model, idx, dtype)
    if dropout == 0:  # T <= 256 on the CPU in bfloat16: the explicit attention, which keeps its
        # softmax; float32 takes SDPA's flash kernel, which keeps none
        assert ((B, cfg.n_head, T, T) in shapes) == (dtype == torch.bfloat16)
    est = estimate_memory(model, B, T, dtype)
    estimate = est.activations - est.logits  # what autograd keeps; the logits are the caller's
    assert abs(estimate - measured) / measured < 0.1, (estimate, measured)
