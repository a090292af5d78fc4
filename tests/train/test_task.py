"""The Trainer's Task seam: a task's objective, metrics, token count and hooks reach the run."""

from __future__ import annotations

import json

import pytest
import torch
from trainutil import tiny_config

from gpt2lab.train import build, train
from gpt2lab.train.task import LMObjective, PretrainTask


class HalfTokens(LMObjective):
    """Pretraining's loss plus a metric, and counting every other token."""

    def loss(self, model, batch):
        loss, _ = super().loss(model, batch)
        x, _ = batch
        return loss, {"share_even": (x % 2 == 0).float().mean()}

    def count_tokens(self, batch):
        return batch[0].numel() // 2

    def evaluate(self, model, max_batches):
        return {**super().evaluate(model, max_batches), "val_extra": 1.5}


class Probe(PretrainTask):
    name = "probe"

    def __init__(self):
        self.calls = []

    def objective(self, cfg, world, device, dtype):
        from gpt2lab.data import load_tokens

        return HalfTokens(cfg, load_tokens(cfg.data.dir, "val"), world, device, dtype)

    def begin(self, model, run_dir, world, resumed):
        self.calls.append(("begin", resumed, model.training))

    def write_run_dir(self, run_dir):
        (run_dir / "probe.txt").write_text("ours")


def test_a_task_sets_the_loss_metrics_tokens_and_hooks(tmp_path, char_data):
    task = Probe()
    cfg = tiny_config(char_data, "train.max_steps=4", "train.grad_accum_steps=2")
    s = train(cfg, tmp_path / "run", task=task)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["tokens"] == s.tokens == 4 * 2 * 4 * 32 // 2
    assert all(0.0 < r["share_even"] < 1.0 for r in rows)
    assert rows[-1]["val_extra"] == 1.5 and "val_loss" in rows[-1]
    assert (tmp_path / "run" / "probe.txt").read_text() == "ours"
    assert task.calls == [("begin", False, True)]
    task2 = Probe()
    cfg, _ = build.resume_config(tmp_path / "run", ["train.max_steps=6"])
    train(cfg, tmp_path / "run", task=task2, resume=True)
    assert task2.calls == [("begin", True, True)]


def test_the_default_task_is_pretraining(tmp_path, char_data):
    a = train(tiny_config(char_data, "train.max_steps=3"), tmp_path / "a")
    b = train(tiny_config(char_data, "train.max_steps=3"), tmp_path / "b", task=PretrainTask())
    assert a.loss == pytest.approx(b.loss, abs=0) and a.tokens == b.tokens == 3 * 4 * 32
    assert torch.isfinite(torch.tensor(a.loss))
