"""Muon: Newton-Schulz against the SVD's polar factor, its update rule, AdamW groups against torch's
AdamW, the parameter split, and an exact resume of a Muon run."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from trainutil import tiny_config

from gpt2lab.checkpoint import native
from gpt2lab.config import TrainConfig
from gpt2lab.errors import ConfigError
from gpt2lab.model import GPT
from gpt2lab.train import build, train
from gpt2lab.train.muon import Muon, orthogonalize
from gpt2lab.train.recipe import _muon, configure_optimizer

MUON = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1)


def polar(g: torch.Tensor) -> torch.Tensor:
    """U V^T of g = U S V^T, in float64: the exact answer Newton-Schulz approximates."""
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return u @ vh


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("bf16", [True, False], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("shape", [(48, 48), (32, 96), (96, 32), (3, 40, 24)])
def test_newton_schulz_approximates_the_polar_factor(shape, bf16):
    torch.manual_seed(0)
    g = torch.randn(shape) * 1e-3  # gradients are small; the result must not depend on scale
    o = orthogonalize(g, dtype=torch.bfloat16 if bf16 else torch.float32)
    assert o.dtype == (torch.bfloat16 if bf16 else torch.float32)
    o = o.double()
    assert o.shape == g.shape
    exact = polar(g)
    for got, want in zip(o.reshape(-1, *shape[-2:]), exact.reshape(-1, *shape[-2:])):
        assert cosine(got, want) > 0.97
        s = torch.linalg.svdvals(got)
        assert s.min() > 0.5 and s.max() < 1.3  # every direction moves by about the same amount


def test_a_muon_step_moves_a_matrix_along_its_orthogonalized_nesterov_momentum():
    torch.manual_seed(0)
    tall = torch.nn.Parameter(torch.randn(64, 16))  # more outputs than inputs: scaled by 2
    opt = Muon([{"params": [tall], "muon": True}], lr=0.1, momentum=0.9)
    g1, g2 = torch.randn(64, 16), torch.randn(64, 16)
    before = tall.detach().clone()
    tall.grad = g1
    opt.step()
    step1 = tall.detach() - before
    assert cosine(step1, -polar(g1)) > 0.97
    # a semi-orthogonal 64 x 16 matrix has RMS 1/sqrt(64); the tall one steps sqrt(64/16) = 2x
    assert step1.pow(2).mean().sqrt() == pytest.approx(0.1 * 2 / 64**0.5, rel=0.15)
    tall.grad = g2
    before = tall.detach().clone()
    opt.step()
    buf = 0.9 * g1 + g2
    assert cosine(tall.detach() - before, -polar(g2 + 0.9 * buf)) > 0.97


def test_fused_qkv_is_orthogonalized_as_three_matrices():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(3 * 16, 16))
    opt = Muon([{"params": [w], "muon": True, "split": 3}], lr=1.0, momentum=0.0)
    g = torch.randn(48, 16)
    g[:16] *= 100  # q's gradient dominates: one joint orthogonalization would all but drop k, v
    w.grad = g
    opt.step()
    for block, gb in zip(w.detach().split(16), g.split(16)):
        assert cosine(block, -polar(gb)) > 0.97
        assert block.pow(2).mean().sqrt() == pytest.approx(1 / 16**0.5, rel=0.15)  # orthogonal


def test_the_adamw_groups_follow_torch_adamw():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = Muon(
        [{"params": [a[0]], "weight_decay": 0.1}, {"params": [a[1]], "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.9, 0.95),
    )
    ref = torch.optim.AdamW(
        [{"params": [b[0]], "weight_decay": 0.1}, {"params": [b[1]], "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.9, 0.95),
        foreach=False,
    )
    for _ in range(6):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tiny_cfg):
    model = GPT(tiny_cfg)
    opt = configure_optimizer(model, MUON, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    adam = {names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if p.dim() == 2 and ".h." in n}
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= adam
    assert muon | adam == set(names.values()) and not muon & adam
    assert all(g["lr_scale"] == pytest.approx(20.0) for g in opt.param_groups if g["muon"])
    qkv = [g for g in opt.param_groups if g["split"] == 3]
    assert len(qkv) == 1 and all(names[id(p)].endswith("c_attn.weight") for p in qkv[0]["params"])


def test_muon_refuses_sharded_parameters():
    class DTensor(torch.nn.Parameter):  # what FSDP2 hands the optimizer
        pass

    with pytest.raises(ConfigError, match="fsdp"):
        _muon([("transformer.h.0.mlp.c_fc.weight", DTensor(torch.zeros(4, 4)))], MUON)


def test_a_muon_run_learns_and_resumes_exactly(tmp_path, char_data):
    cfg = tiny_config(char_data, "train.optimizer=muon", "train.max_steps=8")
    full = train(cfg, tmp_path / "full")
    # stopped by a hook after step 4 (as a signal would): same config, so the same LR schedule
    first = train(cfg, tmp_path / "split", on_log=lambda row: row["step"] >= 4)
    assert first.step == 4 and first.stopped_by == "hook"
    resumed, _ = build.resume_config(tmp_path / "split", ["train.max_steps=8"])
    assert resumed.train.optimizer == "muon"
    train(resumed, tmp_path / "split", resume=True)
    got = load_file(native.find_latest(tmp_path / "split") / "model.safetensors")
    want = load_file(native.find_latest(tmp_path / "full") / "model.safetensors")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    assert full.loss < math.log(64) - 0.2  # 64 characters: ln(64) = 4.16 is knowing nothing
    with pytest.raises(ConfigError, match="optimizer"):
        build.resume_config(tmp_path / "split", ["train.optimizer=adamw"])


def test_a_resumed_run_takes_a_new_muon_lr(tmp_path, char_data):
    train(tiny_config(char_data, "train.optimizer=muon", "train.max_steps=2"), tmp_path)
    again, _ = build.resume_config(tmp_path, ["train.max_steps=3", "train.muon_lr=0.01"])
    train(again, tmp_path, resume=True)
    saved = native.load_optimizer_state(native.find_latest(tmp_path))["param_groups"]
    scales = [g["lr_scale"] for g in saved if g["muon"]]
    assert scales == [pytest.approx(0.01 / 3e-3)] * 2  # not the 0.02 / 3e-3 it was saved with
