"""GAE, PPO's losses, GRPO's advantages, the KL estimators and controller, worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2lab.posttrain.kl import KLController, exact_kl, kl_k1, kl_k3
from gpt2lab.posttrain.ppo import (
    entropy,
    gae,
    group_advantages,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)


def close(got: torch.Tensor, want: list, tol: float = 1e-6) -> None:
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.double), atol=tol), got


def test_gae_by_hand():
    # gamma 0.9, lambda 0.8, so gamma * lambda = 0.72
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.8], [0.1, 0.3, 9.0]])  # 9.0 sits on padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: delta_2 = 1 - 0.8 = 0.2; delta_1 = 0.9*0.8 - 0.4 = 0.32; delta_0 = 0.9*0.4 - 0.5
    #        A_2 = 0.2, A_1 = 0.32 + 0.72*0.2 = 0.464, A_0 = -0.14 + 0.72*0.464 = 0.19408
    # row 1 ends at t=1 (V after it is 0, not the 9.0 on the padding):
    #        A_1 = 2 - 0.3 = 1.7, A_0 = (0.27 - 0.1) + 0.72*1.7 = 1.394
    close(adv, [[0.19408, 0.464, 0.2], [1.394, 1.7, 0.0]])
    close(ret, [[0.69408, 0.864, 1.0], [1.494, 2.0, 0.0]])


def test_token_rewards_put_the_score_on_the_last_real_token():
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, -0.1, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # -0.5 * kl on real tokens, the score added where each row ends (t=2 and t=1)
    close(token_rewards(scores, kl, 0.5, mask), [[-0.05, -0.1, 0.85], [-0.25, 2.05, 0.0]])


def test_clipped_policy_loss_by_hand():
    ratios = [1.5, 0.7, 1.1, 0.5]
    old = torch.zeros(1, 4)
    logp = torch.tensor([[math.log(r) for r in ratios]])
    adv = torch.tensor([[1.0, 1.0, -2.0, -1.0]])
    out = policy_loss(logp, old, adv, torch.ones(1, 4), clip=0.2)
    # max(-A rho, -A clip(rho, 0.8, 1.2)) per token:
    # 1.5, A=1: max(-1.5, -1.2) = -1.2 | 0.7, A=1: max(-0.7, -0.8) = -0.7
    # 1.1, A=-2: max(2.2, 2.2) = 2.2   | 0.5, A=-1: max(0.5, 0.8) = 0.8
    assert out.loss.item() == pytest.approx((-1.2 - 0.7 + 2.2 + 0.8) / 4)
    assert out.clip_frac.item() == pytest.approx(0.75)  # all but 1.1 left [0.8, 1.2]
    want_kl = sum(0.5 * math.log(r) ** 2 for r in ratios) / 4
    assert out.approx_kl.item() == pytest.approx(want_kl, rel=1e-6)


def test_policy_loss_ignores_padding_and_its_gradient_is_the_surrogates():
    logp = torch.tensor([[0.1, 5.0]], requires_grad=True)
    out = policy_loss(
        logp, torch.zeros(1, 2), torch.tensor([[2.0, 3.0]]), torch.tensor([[1, 0]]), 0.2
    )
    out.loss.backward()
    # one real token, ratio e^0.1 = 1.105 inside the clip range: loss = -A rho, d/dlogp = -A rho
    assert out.loss.item() == pytest.approx(-2.0 * math.exp(0.1))
    close(logp.grad, [[-2.0 * math.exp(0.1), 0.0]], 1e-6)


def test_clipped_value_loss_by_hand():
    values, old = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])
    returns = torch.tensor([[2.0, 0.6]])
    # t0: (1-2)^2 = 1 vs clipped 0.5+0.2=0.7: (0.7-2)^2 = 1.69 -> 1.69
    # t1: (0-0.6)^2 = 0.36 vs clipped 0.5-0.2=0.3: (0.3-0.6)^2 = 0.09 -> 0.36
    got = value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    assert got.item() == pytest.approx(0.5 * (1.69 + 0.36) / 2)


def test_group_advantages_by_hand():
    got = group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), group_size=3, eps=0.0)
    # group 1: mean 2, sample std 1; group 2: all equal -> 0 (eps keeps it finite)
    close(got[:3], [-1.0, 0.0, 1.0])
    close(group_advantages(torch.tensor([5.0, 5.0]), 2), [0.0, 0.0])


def test_whiten_and_entropy():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    w = whiten(x, torch.tensor([[1, 1, 0]]))
    close(w, [[-1.0, 1.0, 0.0]], 1e-4)  # mean 2, variance 1 over the two real entries
    uniform = torch.zeros(4)
    assert entropy(uniform).item() == pytest.approx(math.log(4))


def test_kl_estimators_against_the_exact_kl_of_a_small_vocabulary():
    p = [0.5, 0.2, 0.15, 0.1, 0.05]
    q = [0.2, 0.2, 0.2, 0.2, 0.2]
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))  # the definition, by hand
    logits_p, logits_q = torch.tensor(p).log(), torch.tensor(q).log() + 3.0  # shift-invariant
    assert exact_kl(logits_p, logits_q).item() == pytest.approx(exact, rel=1e-5)
    logp, logq = torch.log_softmax(logits_p, -1), torch.log_softmax(logits_q, -1)
    # both estimators are unbiased: their expectation under p, enumerated, is the KL
    for k in (kl_k1, kl_k3):
        assert (torch.tensor(p) * k(logp, logq)).sum().item() == pytest.approx(exact, rel=1e-5)
    assert (kl_k3(logp, logq) >= 0).all()
    # and sampled, the mean is within 4 standard errors
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(torch.tensor(p), 200_000, replacement=True, generator=g)
    for k in (kl_k1, kl_k3):
        draws = k(logp[x], logq[x])
        assert abs(draws.mean().item() - exact) < 4 * draws.std().item() / math.sqrt(len(x))


def test_kl_controller_follows_ziegler():
    ctl = KLController(beta=0.1, target=6.0, horizon=100)
    # error clip(12/6 - 1) = 0.2, K_beta = 16/100: beta * (1 + 0.2 * 0.16)
    assert ctl.update(12.0, 16) == pytest.approx(0.1 * 1.032)
    assert ctl.update(6.0, 16) == pytest.approx(0.1 * 1.032)  # on target: unchanged
    ctl = KLController(beta=0.1, target=6.0, horizon=100)
    assert ctl.update(5.4, 16) == pytest.approx(0.1 * (1 - 0.1 * 0.16))  # error -0.1
    ctl = KLController(beta=0.1, target=6.0, horizon=100)
    assert ctl.update(1.0, 16) == pytest.approx(0.1 * (1 - 0.2 * 0.16))  # -0.83, clipped
    fixed = KLController(beta=0.1, target=None)
    assert fixed.update(100.0, 16) == 0.1
    again = KLController(beta=1.0, target=6.0)
    again.load_state_dict(ctl.state_dict())
    assert again.beta == ctl.beta
