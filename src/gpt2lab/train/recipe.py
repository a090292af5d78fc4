"""The optimisation recipe: the LR schedule (warmup, then cosine or warmup-stable-decay), the
optimizer (AdamW groups, or Muon for the blocks' matrices), frozen parameters."""

from __future__ import annotations

import fnmatch
import inspect
import math

import torch
from torch import nn

from gpt2lab.config import TrainConfig
from gpt2lab.errors import ConfigError, mark_key
from gpt2lab.train.muon import Muon


def lr_at(step: int, cfg: TrainConfig, time_frac: float | None = None) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then a decay to `min_lr`.

    Warmup rises as lr * (step + 1) / warmup_steps, so the last warmup step uses the full lr
    (GPT-3 paper, sec. B). The decay then runs from step warmup_steps to max_steps, or, with a
    wall-clock budget, over `time_frac` (the share of the budget spent after warmup, 0..1):
    `lr_schedule="cosine"` is GPT-3's half cosine; `"wsd"` (warmup-stable-decay) holds the peak
    and decays linearly over the last `cooldown_frac` of the run (Hu et al. 2024, MiniCPM).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if time_frac is not None:
        ratio = time_frac
    else:
        span = cfg.max_steps - cfg.warmup_steps
        ratio = (step - cfg.warmup_steps) / span if span > 0 else 1.0
    ratio = min(max(ratio, 0.0), 1.0)
    if cfg.lr_schedule == "wsd":
        left = (1.0 - ratio) / cfg.cooldown_frac if cfg.cooldown_frac > 0 else float(ratio < 1)
        return cfg.min_lr + min(1.0, left) * (cfg.lr - cfg.min_lr)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def budget_fraction(
    step: int, cfg: TrainConfig, clock_s: float, warmup_end_s: float | None
) -> float | None:
    """The share of the wall-clock budget spent since warmup ended (None: no budget, or warming)."""
    budget = cfg.max_minutes * 60
    if budget <= 0 or step < cfg.warmup_steps:
        return None
    w = warmup_end_s or 0.0
    return (clock_s - w) / max(budget - w, 1e-9)


def apply_freeze(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Set requires_grad=False on parameters whose name matches a glob; returns the names frozen."""
    frozen: list[str] = []
    for pattern in patterns:
        hits = [n for n, _ in model.named_parameters() if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            names = sorted({n.rsplit(".", 1)[0] for n, _ in model.named_parameters()})[:6]
            raise ConfigError(
                f"{mark_key('train.freeze')} pattern {pattern!r} matches no parameter",
                f"a glob over parameter names such as {', '.join(names)}",
                f"fix the pattern, e.g. {mark_key('train.freeze', repr('transformer.w?e.*'))}",
            )
        frozen += hits
    params = dict(model.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    if frozen and len(set(frozen)) == len(params):
        raise ConfigError(
            f"{mark_key('train.freeze', ','.join(patterns))} freezes every parameter",
            "at least one trainable parameter",
            "narrow the patterns",
        )
    return sorted(set(frozen))


def configure_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """`train.optimizer`: AdamW (the default), or Muon on the blocks' weight matrices with AdamW
    on the rest (see train/muon.py).

    AdamW decays 2-D weights only (matmuls, embeddings); biases and norms get none. It uses the
    fused kernel where this PyTorch has one for the device, else foreach.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer == "muon":
        return _muon(params, cfg)
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs: dict = {}
    is_dtensor = any(type(p).__name__ == "DTensor" for _, p in params)
    if "fused" in inspect.signature(torch.optim.AdamW).parameters and not is_dtensor:
        kwargs["fused"] = device.type in ("cuda", "cpu")
    if not kwargs.get("fused"):
        kwargs["foreach"] = True
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **kwargs)


def _muon(params: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.Optimizer:
    if any(type(p).__name__ == "DTensor" for _, p in params):
        raise ConfigError(
            f"{mark_key('train.optimizer', 'muon')} with {mark_key('train.strategy', 'fsdp')}",
            "Muon orthogonalizes whole matrices, which FSDP shards",
            f"use {mark_key('train.strategy', 'ddp')} or {mark_key('train.optimizer', 'adamw')}",
        )
    # the matrices inside the blocks; nn.Linear in a GPT's blocks is the only 2-D kind there
    hidden = [(n, p) for n, p in params if p.dim() == 2 and ".h." in f".{n}"]
    fused_qkv = [p for n, p in hidden if n.endswith("attn.c_attn.weight")]
    others = [p for n, p in hidden if not n.endswith("attn.c_attn.weight")]
    ids = {id(p) for _, p in hidden}
    rest = [p for _, p in params if id(p) not in ids]
    scale, wd = cfg.muon_lr / cfg.lr, cfg.weight_decay
    groups = [
        {"params": others, "muon": True, "lr_scale": scale, "weight_decay": wd},
        {"params": fused_qkv, "muon": True, "split": 3, "lr_scale": scale, "weight_decay": wd},
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": wd},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    return Muon(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        momentum=cfg.muon_momentum,
        betas=(cfg.beta1, cfg.beta2),
    )
