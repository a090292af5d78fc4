"""Exact resume after a real SIGINT, and 2 gloo ranks == 1 rank with twice the accumulation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from trainutil import tiny_config, torchrun

from gpt2lab import cli
from gpt2lab.checkpoint import native
from gpt2lab.config import to_toml

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _config_file(tmp_path, data, *overrides):
    path = tmp_path / "run.toml"
    path.write_text(to_toml(tiny_config(data, *overrides)))
    return path


def _weights(run):
    return load_file(native.find_latest(run) / "model.safetensors")


def _last_step(run) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError):
        return 0


def test_run_interrupted_by_sigint_then_resumed_equals_uninterrupted_run(tmp_path, char_data):
    steps = 120
    cfg = _config_file(
        tmp_path,
        char_data,
        f"train.max_steps={steps}",
        "model.dropout=0.1",
        "train.checkpoint_interval=1000",
        "train.eval_interval=1000",
    )
    assert (
        cli.main(["train", "--config", str(cfg), "--out", str(tmp_path / "ref"), "--no-plot"]) == 0
    )
    run = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "gpt2lab",
        "train",
        "--config",
        str(cfg),
        "--out",
        str(run),
        "--no-plot",
    ]
    proc = subprocess.Popen(argv, env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _last_step(run) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "stopped by a signal" in err
    stopped = native.load_state(native.find_latest(run))["step"]
    assert 3 <= stopped < steps
    assert cli.main(["train", "--out", str(run), "--resume", "--no-plot"]) == 0
    ref, got = _weights(tmp_path / "ref"), _weights(run)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))


@pytest.mark.parametrize(
    "strategy, optimizer", [("ddp", "adamw"), ("fsdp", "adamw"), ("ddp", "muon")]
)
def test_two_gloo_ranks_equal_one_rank_with_twice_the_accumulation(
    tmp_path, char_data, strategy, optimizer
):
    cfg = _config_file(
        tmp_path,
        char_data,
        "train.max_steps=4",
        "train.micro_batch_size=4",
        f"train.strategy={strategy}",
        f"train.optimizer={optimizer}",
        "train.eval_steps=0",
    )
    one = tmp_path / "one"
    assert (
        cli.main(
            [
                "train",
                "--config",
                str(cfg),
                "--out",
                str(one),
                "--no-plot",
                "--train.grad_accum_steps=2",
            ]
        )
        == 0
    )
    two = tmp_path / "two"
    argv = torchrun(
        2,
        "train",
        "--config",
        str(cfg),
        "--out",
        str(two),
        "--no-plot",
        "--train.grad_accum_steps=1",
    )
    r = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    # Muon rounds its update to bfloat16 (on this CPU): a last-bit difference in the summed
    # gradients may move an element by one bf16 step of a ~4e-3 update; a missing sync, by far more
    atol = 1e-4 if optimizer == "muon" else 1e-5
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol, msg=k)
    rows = [json.loads(ln) for ln in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 5))  # rank 0 alone logs
    ref = [json.loads(ln) for ln in (one / "metrics.jsonl").read_text().splitlines()]
    # both evaluate the whole validation split, ranks sharing it: the same loss
    assert rows[-1]["val_loss"] == pytest.approx(ref[-1]["val_loss"], abs=1e-5)
    assert rows[-1]["tokens"] == ref[-1]["tokens"]
    for got, want in zip(rows, ref):  # the logged loss and gradient norm: the whole model's
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
