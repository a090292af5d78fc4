"""Training by epochs: the steps of N shuffled passes, the LR over them, epoch reports, resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from trainutil import tiny_config, write_char_data

from gpt2lab import cli
from gpt2lab.checkpoint import native
from gpt2lab.train import EpochEvent, StartEvent, train
from gpt2lab.train.build import resume_config
from gpt2lab.train.epochs import EpochPlan


def test_plan_counts_steps_and_epoch_ends():
    plan = EpochPlan(max_epochs=3, windows_per_epoch=10, windows_per_step=4)
    assert plan.max_steps == 8  # 30 windows in steps of 4: the last step runs 2 into a 4th pass
    assert [plan.epoch_of(s) for s in range(1, 9)] == [1, 1, 1, 2, 2, 3, 3, 3]
    assert [s for s in range(1, 9) if plan.ends_epoch(s)] == [3, 5, 8]


@pytest.fixture
def small_data(tmp_path, tiny_shakespeare):
    """2,700 train characters: 84 windows of 32, 21 steps of 4 windows an epoch."""
    text = tiny_shakespeare.read_text(encoding="utf-8")[:3000]
    return write_char_data(tmp_path / "d", text)


def _epoch_config(data, *overrides):
    return tiny_config(
        data,
        "train.max_epochs=3",
        "train.sample_every_epoch=true",
        "train.sample_tokens=8",
        "train.eval_interval=1000",
        "train.checkpoint_interval=1000",
        "model.dropout=0.1",
        *overrides,
    )


def test_epochs_set_steps_lr_and_report_each_epoch(tmp_path, small_data):
    seen = []
    summary = train(_epoch_config(small_data), tmp_path / "run", on_event=seen.append)
    assert summary.step == 63 and summary.stopped_by == "max_steps"  # 3 x 84 windows / 4
    start = next(e for e in seen if isinstance(e, StartEvent))
    assert (start.max_steps, start.max_epochs) == (63, 3)
    epochs = [e for e in seen if isinstance(e, EpochEvent)]
    assert [(e.epoch, e.step) for e in epochs] == [(1, 21), (2, 42), (3, 63)]
    assert all(e.val_loss is not None and e.sample is not None for e in epochs)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows[:22:21]] == [1, 2] and rows[-1]["epoch"] == 3
    mean1 = sum(r["loss"] for r in rows[:21]) / 21
    assert epochs[0].train_loss == pytest.approx(mean1)
    assert rows[-1]["lr"] == pytest.approx(3e-4, rel=0.01)  # the cosine ends with the epochs
    saved = native.load_state(native.find_latest(tmp_path / "run"))["config"]
    assert saved["data"]["sampling"] == "sequential" and saved["train"]["max_steps"] == 63


def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path, small_data):
    cfg = _epoch_config(small_data)
    ref_events, events = [], []
    train(cfg, tmp_path / "ref", on_event=ref_events.append)
    run = tmp_path / "run"
    train(cfg, run, on_log=lambda row: row["step"] == 30, on_event=events.append)  # in epoch 2
    assert native.load_state(native.find_latest(run))["step"] == 30
    again, _ = resume_config(run, [])
    train(again, run, resume=True, on_event=events.append)
    ref_w = load_file(native.find_latest(tmp_path / "ref") / "model.safetensors")
    got_w = load_file(native.find_latest(run) / "model.safetensors")
    for k in ref_w:
        assert torch.equal(ref_w[k], got_w[k]), k

    def epoch_reports(evs):
        return [(e.epoch, e.step, e.train_loss, e.sample) for e in evs if isinstance(e, EpochEvent)]

    assert epoch_reports(events) == epoch_reports(ref_events)


def test_console_prints_the_epoch_lines(tmp_path, small_data, capsys):
    argv = ["train", "--data", str(small_data), "--out", str(tmp_path / "r"), "--no-plot"]
    small = ["--model.n_layer=1", "--model.n_embd=16", "--model.n_head=1", "--train.device=cpu"]
    flags = ["--model.block_size=32", "--train.micro_batch_size=4", "--train.max_epochs=2"]
    flags += ["--train.sample_tokens=8"]
    assert cli.main([*argv, *small, *flags, "--train.sample_every_epoch=true"]) == 0
    err = capsys.readouterr().err
    assert "epoch 1/2 done at step 21 | train loss" in err and "| val loss" in err
    assert "--- sample after epoch 2 ---" in err


def test_progress_bar_shows_the_epoch(tmp_path, small_data, capfd):
    cfg = _epoch_config(small_data, "train.sample_every_epoch=false")
    train(cfg, tmp_path / "run", progress=True)
    assert "epoch 3/3" in capfd.readouterr().err
