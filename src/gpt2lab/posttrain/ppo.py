"""The arithmetic of PPO for language models (Schulman et al. 2017; Ziegler et al. 2019), and GRPO.

Every tensor is (B, L) over the L response tokens of B rollouts, right-aligned to their prompt
and right-padded; `mask` (B, L) is 1 on real response tokens. Token t of a response is an action;
its state is everything before it, so `values[:, t]` is V(state before token t).

- `token_rewards`: Ziegler et al.'s r_t = -beta * KL_t, plus the sequence's score on its last
  real token (where the rollout ended: at its end token, or where the context or max length
  cut it).
- `gae`: generalized advantage estimation (Schulman et al. 2016), delta_t = r_t + gamma V_{t+1}
  - V_t, A_t = delta_t + gamma lambda A_{t+1}; V after the last real token is 0.
- `policy_loss`: the clipped surrogate, max(-A rho, -A clip(rho, 1-eps, 1+eps)).
- `value_loss`: 0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2).
- `group_advantages`: GRPO's (Shao et al. 2024) (r - mean of the group) / (std of the group + eps).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over the entries where mask is 1 (0 if there are none)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """x scaled to unit variance over the masked entries (and centred unless shift_mean=False)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * mask.to(x.dtype)


def last_index(mask: Tensor) -> Tensor:
    """(B,) index of each row's last real token (0 for an empty row)."""
    idx = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    return (idx * mask.long()).amax(dim=1)


def token_rewards(scores: Tensor, kl: Tensor, beta: float, mask: Tensor) -> Tensor:
    """Ziegler et al.'s per-token reward: -beta kl_t on every token, + the score on the last."""
    rewards = -beta * kl * mask.to(kl.dtype)
    rows = torch.arange(scores.size(0), device=scores.device)
    rewards[rows, last_index(mask)] += scores.to(rewards.dtype)
    return rewards


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """(advantages, returns = advantages + values), both zero past each row's last real token."""
    mask = mask.to(values.dtype)
    values = values * mask
    B, L = rewards.shape
    adv = torch.zeros_like(values)
    running = torch.zeros(B, dtype=values.dtype, device=values.device)
    for t in reversed(range(L)):
        next_value = values[:, t + 1] if t + 1 < L else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        adv[:, t] = running
    return adv, (adv + values) * mask


class PolicyLoss(NamedTuple):
    loss: Tensor  # the clipped surrogate, to minimise
    clip_frac: Tensor  # share of tokens whose ratio left [1 - eps, 1 + eps]
    approx_kl: Tensor  # mean 0.5 (log rho)^2: how far this update moved from the rollout's policy


def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float
) -> PolicyLoss:
    """PPO's clipped surrogate objective, as a loss, with its diagnostics."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean(((ratio - 1.0).abs() > clip).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return PolicyLoss(loss, clip_frac, approx_kl)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float
) -> Tensor:
    """PPO's clipped value loss (as in OpenAI's baselines and Ziegler et al.'s code)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    worst = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(worst, mask)


def entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dimension, in nats."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GRPO: each reward against the others drawn for the same prompt, (r - mean) / (std + eps).

    `rewards` (N,) holds N / group_size groups of consecutive samples; std is the sample one.
    """
    groups = rewards.float().view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    return ((groups - mean) / (std + eps)).view(-1)
