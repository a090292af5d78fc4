"""Checkpoints: complete or absent after a kill mid-write, latest/best/keep-K, RNG round trip."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gpt2lab.checkpoint import native
from gpt2lab.errors import TrainingError

WRITER = textwrap.dedent(
    """
    import sys, torch
    from gpt2lab.checkpoint import native
    run = sys.argv[1]
    w = {"transformer.wte.weight": torch.randn(2048, 1024)}  # 8 MiB: each write takes a while
    step = 0
    while True:
        step += 1
        w["transformer.wte.weight"].add_(1.0)
        opt = {"state": {0: {"exp_avg": w["transformer.wte.weight"] * 2}}, "param_groups": []}
        native.save_checkpoint(run, step, w, opt, {"val_loss": float(-step)}, keep_last=2)
        print(step, flush=True)
    """
)


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.7])
def test_checkpoints_are_complete_or_absent_after_a_kill_during_writing(tmp_path, delay):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(run)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # one checkpoint is complete, more are being written
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    found = [p for p in (run / "ckpt").iterdir() if not p.name.startswith(".")]
    assert found, "the first checkpoint was reported complete"
    for ckpt in found:  # every visible checkpoint loads in full and is self-consistent
        assert native.is_complete(ckpt), sorted(os.listdir(ckpt))
        step = native.load_state(ckpt)["step"]
        w = load_file(ckpt / "model.safetensors")["transformer.wte.weight"]
        opt = native.load_optimizer_state(ckpt)
        assert torch.equal(opt["state"][0]["exp_avg"], w * 2)
        assert ckpt.name == f"step_{step:08d}"
    latest = native.find_latest(run)
    assert latest is not None and native.is_complete(latest)
    named = run / (run / "latest").read_text().strip()
    assert named.name <= latest.name and native.is_complete(named)
    native.prune(run, keep_last=2)  # what a resumed run does first: temp leftovers go
    assert not [p for p in (run / "ckpt").iterdir() if p.name.startswith(".")]


def test_keep_last_and_best_by_validation_loss(tmp_path):
    w = {"transformer.wte.weight": torch.zeros(2, 2)}
    for step, val in [(1, 3.0), (2, 1.0), (3, None), (4, 2.0), (5, 1.5)]:
        native.save_checkpoint(tmp_path, step, w, {}, {"val_loss": val}, keep_last=2)
    assert [p.name for p in native.list_checkpoints(tmp_path)] == [
        "step_00000002",  # the best (1.0) survives pruning
        "step_00000004",
        "step_00000005",
    ]
    assert native.find_best(tmp_path).name == "step_00000002"
    assert native.find_latest(tmp_path).name == "step_00000005"
    (tmp_path / "latest").unlink()  # e.g. lost: the highest complete step is found anyway
    assert native.find_latest(tmp_path).name == "step_00000005"
    w2 = {"transformer.wte.weight": torch.ones(3), "lm_head.weight": torch.ones(3)}
    w2["lm_head.weight"] = w2["transformer.wte.weight"]  # tied: stored once
    keys = load_file(native.save_checkpoint(tmp_path, 6, w2, {}, {}) / "model.safetensors").keys()
    assert list(keys) == ["transformer.wte.weight"]


def test_nothing_to_resume_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="nothing to resume"):
        native.require_latest(tmp_path)


def test_rng_state_round_trip():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    saved = native.capture_rng()
    import json

    saved = json.loads(json.dumps(saved))  # it travels as JSON
    a = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    native.restore_rng(saved)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
