"""KL divergence between a policy and its frozen reference, and the controllers that weigh it.

Per-token estimators from samples of the policy (Schulman, "Approximating KL divergence", 2020):
with r = pi_ref(x) / pi(x) for x ~ pi, `k1 = -log r` is unbiased (Ziegler et al. 2019 put it in
the reward), `k3 = (r - 1) - log r` is unbiased and never negative (GRPO puts it in the loss).
`exact_kl` sums over the vocabulary instead, for measuring and testing.

The adaptive controller is Ziegler et al.'s proportional one (sec. 2.2):
    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2),  beta_{t+1} = beta_t (1 + K_beta e_t),
with K_beta = (samples in the batch) / horizon, as in their code (lm-human-preferences).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """log pi(x) - log pi_ref(x) of sampled tokens: unbiased, per token, may be negative."""
    return logp - ref_logp


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """(r - 1) - log r with r = pi_ref / pi of sampled tokens: unbiased, >= 0, lower variance."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


def exact_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """KL(softmax(logits) || softmax(ref_logits)) over the last dimension, summed exactly."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref = torch.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - ref)).sum(-1)


@dataclass
class KLController:
    """beta, the weight of the KL penalty: fixed, or steered to `target` nats per sample.

    `horizon` sets how fast beta moves: K_beta = n_samples / horizon.
    """

    beta: float
    target: float | None = None  # None: a fixed beta
    horizon: float = 10000.0

    def update(self, kl: float, n_samples: int) -> float:
        """Move beta after a batch whose mean KL per sample was `kl`; returns the new beta."""
        if self.target is not None and self.target > 0:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.beta *= 1.0 + error * n_samples / self.horizon
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])
