"""Muon for the blocks' weight matrices, AdamW for everything else, in one optimizer.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks") keeps SGD
momentum for each 2-D weight and replaces the update by its nearest semi-orthogonal matrix,
computed with a few Newton-Schulz iterations. Every direction of the update then moves the weight
by the same amount, which learns more per step than Adam at small scales; it is what lets the CPU
demo reach a lower loss in the same five minutes. Embeddings, the (tied) head, LayerNorms and
biases are not hidden matrices and keep AdamW.

Groups carry `muon=True/False`; `lr_scale` multiplies the scheduled LR (the loop sets one LR for
all groups), so Muon's larger LR follows the same warmup and decay.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

from gpt2lab.device import cpu_has_native_bf16

# quintic Newton-Schulz coefficients from the Muon write-up: they push every singular value of a
# norm-1 matrix into roughly [0.7, 1.2] in five iterations, which is as good as exact for training
NS_COEFFS = (3.4445, -4.7750, 2.0315)


@functools.cache
def newton_schulz_dtype(device_type: str) -> torch.dtype:
    """bfloat16 is accurate enough for Newton-Schulz and 2x faster where the hardware has it."""
    fast = device_type == "cuda" or (device_type == "cpu" and cpu_has_native_bf16())
    return torch.bfloat16 if fast else torch.float32


def orthogonalize(
    g: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """About U V^T for each matrix U S V^T in g, shaped (m, n) or (batch, m, n), computed in
    `dtype` (default: `newton_schulz_dtype` of g's device)."""
    a, b, c = NS_COEFFS
    x = g.to(dtype or newton_schulz_dtype(g.device.type))
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide side: X X^T is then the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values <= 1
    batched = x.dim() == 3
    for _ in range(steps):
        gram = x @ x.mT
        if batched:
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b*A + c*A^2
            x = torch.baddbmm(x, poly, x, beta=a)  # a*X + (b*A + c*A^2) X
        else:
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, poly, x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon (Nesterov momentum + orthogonalized update) on `muon=True` groups, AdamW on the rest.

    A Muon group may set `split=k`: its weights stack k matrices along dim 0 (GPT-2's fused
    q|k|v projection), which are orthogonalized one by one. Updates are scaled by
    sqrt(max(1, rows / cols)) so tall and wide matrices move at the same RMS rate.
    """

    def __init__(
        self,
        groups: Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
    ) -> None:
        defaults = dict(
            lr=lr,
            lr_scale=1.0,
            momentum=momentum,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            muon=False,
            split=1,
        )
        super().__init__(list(groups), defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102 (torch.optim.Optimizer.step)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # every Muon matrix, laid wide (rows <= cols), bucketed by shape: one batched
        # Newton-Schulz per shape is a few large kernels instead of many small ones
        work: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, bool, float]]] = defaultdict(list)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if not group["muon"]:
                self._adamw(params, group)
                continue
            lr = group["lr"] * group["lr_scale"]
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            k = group["split"]
            for p, u in zip(params, self._nesterov(params, group["momentum"])):
                mats = u.view(k, p.size(0) // k, *p.shape[1:])
                tall = mats.size(1) > mats.size(2)
                mats = mats.mT if tall else mats
                # tall matrices (more outputs than inputs) step sqrt(rows / cols) further
                alpha = -lr * math.sqrt(max(1.0, mats.size(2) / mats.size(1)) if tall else 1.0)
                work[(*mats.shape[1:], group["ns_steps"])].append((p, mats, tall, alpha))
        for (*_, ns_steps), items in work.items():
            ortho = orthogonalize(torch.cat([m for _, m, _, _ in items]), ns_steps)
            for (p, _, tall, alpha), o in zip(
                items, ortho.split([m.size(0) for _, m, _, _ in items])
            ):
                p.add_((o.mT if tall else o).reshape(p.shape), alpha=alpha)
        return loss

    def _nesterov(self, params: list[torch.Tensor], momentum: float) -> list[torch.Tensor]:
        """Nesterov momentum: buf = mu*buf + g; the step direction is g + mu*buf."""
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        grads = [p.grad for p in params]
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads)
        return torch._foreach_add(grads, bufs, alpha=momentum)

    def _adamw(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        """Decoupled-weight-decay Adam (Loshchilov & Hutter 2019) over a group, foreach ops."""
        beta1, beta2 = group["betas"]
        lr = group["lr"] * group["lr_scale"]
        grads, avgs, sqs = [], [], []
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            grads.append(p.grad)
            avgs.append(state["exp_avg"])
            sqs.append(state["exp_avg_sq"])
        t = float(self.state[params[0]]["step"])
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_lerp_(avgs, grads, 1 - beta1)
        torch._foreach_mul_(sqs, beta2)
        torch._foreach_addcmul_(sqs, grads, grads, value=1 - beta2)
        bias1, bias2 = 1 - beta1**t, 1 - beta2**t
        denom = torch._foreach_sqrt(sqs)
        torch._foreach_div_(denom, math.sqrt(bias2))
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, avgs, denom, value=-lr / bias1)
