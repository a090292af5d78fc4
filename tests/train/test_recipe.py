"""The LR schedule's values, AdamW's parameter groups and freezing."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2lab.config import TrainConfig
from gpt2lab.errors import ConfigError
from gpt2lab.model import GPT
from gpt2lab.train.recipe import apply_freeze, configure_optimizer, lr_at

TC = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 1e-4),  # warmup: lr * (step + 1) / warmup_steps
        (4, 5e-4),
        (9, 1e-3),  # the last warmup step runs at the full rate
        (10, 1e-3),  # cosine starts at its top
        (60, 1e-4 + 0.5 * 9e-4),  # half way: cos(pi/2) = 0
        (35, 1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4),
        (110, 1e-4),
        (500, 1e-4),  # past max_steps: stays at min_lr
    ],
)
def test_warmup_then_cosine_values(step, expected):
    assert lr_at(step, TC) == pytest.approx(expected, rel=1e-12)


def test_wsd_holds_the_peak_then_decays_linearly_over_the_cooldown():
    wsd = TrainConfig(
        lr=1e-3, min_lr=0.0, warmup_steps=10, max_steps=110, lr_schedule="wsd", cooldown_frac=0.4
    )
    assert lr_at(9, wsd) == pytest.approx(1e-3)
    assert lr_at(70, wsd) == pytest.approx(1e-3)  # 60% of the 100 steps after warmup: still flat
    assert lr_at(90, wsd) == pytest.approx(5e-4)  # half way through the cooldown
    assert lr_at(110, wsd) == 0.0 and lr_at(200, wsd) == 0.0
    assert lr_at(50, wsd, time_frac=0.8) == pytest.approx(5e-4)  # over wall time, the same shape
    lrs = [lr_at(s, wsd) for s in range(10, 111)]
    assert lrs == sorted(lrs, reverse=True)


def test_wall_clock_schedule_follows_the_time_fraction():
    assert lr_at(50, TC, time_frac=0.0) == pytest.approx(1e-3)
    assert lr_at(50, TC, time_frac=0.5) == pytest.approx(5.5e-4)
    assert lr_at(50, TC, time_frac=1.7) == pytest.approx(1e-4)
    assert lr_at(3, TC, time_frac=0.9) == pytest.approx(4e-4)  # warmup still counts steps


def test_weight_decay_only_on_matrices_and_embeddings(tiny_cfg):
    model = GPT(tiny_cfg)
    opt = configure_optimizer(model, TC, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == TC.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(
        p.dim() == 1 for p in no_decay["params"]
    )
    names = {id(p): n for n, p in model.named_parameters()}
    assert "transformer.wte.weight" in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (TC.beta1, TC.beta2)


def test_freeze_patterns_leave_parameters_out_and_bad_patterns_fail(tiny_cfg):
    model = GPT(tiny_cfg)
    frozen = apply_freeze(model, ("transformer.w?e.*",))
    assert frozen == ["transformer.wpe.weight", "transformer.wte.weight"]
    assert not model.lm_head.weight.requires_grad  # tied to wte
    opt = configure_optimizer(model, TC, torch.device("cpu"))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.transformer.wte.weight) not in in_opt
    with pytest.raises(ConfigError, match="matches no parameter"):
        apply_freeze(GPT(tiny_cfg), ("transformer.nope.*",))
    with pytest.raises(ConfigError, match="freezes every parameter"):
        apply_freeze(GPT(tiny_cfg), ("*",))
