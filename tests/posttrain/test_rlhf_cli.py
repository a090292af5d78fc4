"""`gpt2lab rlhf` end to end on a tiny model: PPO and GRPO learn a checkable reward, metrics have
exactly their keys, a run stopped by a real SIGINT resumes exactly, and --reward-fn is only ever
the file named on the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from rlutil import count_fn, prompts_file, tiny_policy
from safetensors.torch import load_file

from gpt2lab import cli
from gpt2lab.checkpoint import native
from gpt2lab.checkpoint.load import load_model

KEYS = {
    "step",
    "reward",
    "kl",
    "beta",
    "entropy",
    "clip_frac",
    "value_loss",
    "approx_kl",
    "tokens_per_s",
}
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl")
    return tiny_policy(d / "policy"), prompts_file(d / "prompts.txt"), count_fn(d / "fn.py")


def argv(setup, out, *extra):
    policy, prompts, fn = setup
    return [
        "rlhf",
        "--policy",
        str(policy),
        "--reward-fn",
        f"{fn}:score",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--no-plot",
        "--train.lr=1e-2",
        "--train.min_lr=1e-2",
        "--rl.max_new_tokens=8",
        "--rl.batch_size=8",
        "--rl.epochs=2",
        *extra,
    ]


def rows(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_rl_raises_a_checkable_reward_in_a_few_steps(setup, tmp_path, algorithm):
    # reward: how many vowels the reply writes (about 5 characters in 70 at the start)
    run = tmp_path / algorithm
    extra = ["--train.max_steps=10", f"--rl.algorithm={algorithm}", "--rl.group_size=4"]
    assert cli.main(argv(setup, run, *extra)) == 0
    got = rows(run)
    assert [r["step"] for r in got] == list(range(1, 11))
    assert all(set(r) == KEYS for r in got)
    first = sum(r["reward"] for r in got[:3]) / 3
    last = sum(r["reward"] for r in got[-3:]) / 3
    assert last > 2 * first + 0.5, [r["reward"] for r in got]
    assert (got[0]["value_loss"] is None) == (algorithm == "grpo")
    # gpt2lab plot draws reward and KL against steps, and reward against KL
    assert cli.main(["plot", str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the run directory loads like any run: the policy is a plain GPT
    model, tok = load_model(run)
    assert tok is not None and model.config.vocab_size == tok.n_vocab


def _last_step(run) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError):
        return 0


@pytest.mark.xfail(
    strict=False,
    reason="issue 15 open: on a loaded machine a SIGINT that lands at some points of a PPO step "
    "resumes to weights that differ from the uninterrupted run's",
)
def test_run_stopped_by_sigint_resumes_exactly(setup, tmp_path):
    steps = 6
    extra = [f"--train.max_steps={steps}", "--train.checkpoint_interval=1000"]
    assert cli.main(argv(setup, tmp_path / "ref", *extra)) == 0
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "gpt2lab", *argv(setup, run, *extra)]
    proc = subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _last_step(run) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 130, err
    assert "stopped by a signal" in err
    stopped = native.load_state(native.find_latest(run))["step"]
    assert 2 <= stopped < steps
    # the reward function is never taken from the saved config: it must be named again
    assert cli.main(["rlhf", "--out", str(run), "--resume"]) == 2
    _, fn = setup[0], setup[2]
    assert cli.main(["rlhf", "--out", str(run), "--resume", "--reward-fn", f"{fn}:score"]) == 0
    ref_ckpt, got_ckpt = native.find_latest(tmp_path / "ref"), native.find_latest(run)
    ref, got = load_file(ref_ckpt / "model.safetensors"), load_file(got_ckpt / "model.safetensors")
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    ref_extra = native.load_optimizer_state(ref_ckpt)
    got_extra = native.load_optimizer_state(got_ckpt)
    for k, v in ref_extra["value_head"].items():
        assert torch.equal(v, got_extra["value_head"][k]), k
    a, b = rows(tmp_path / "ref"), rows(run)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):
        ra.pop("tokens_per_s"), rb.pop("tokens_per_s")
        assert ra == rb
    state_a = native.load_state(ref_ckpt)["rl"]
    state_b = native.load_state(got_ckpt)["rl"]
    state_a.pop("elapsed_s"), state_b.pop("elapsed_s")
    assert state_a == state_b  # beta, prompt position, reward normalisation


def test_help_says_only_the_named_file_runs(capsys):
    with pytest.raises(SystemExit):
        cli.main(["rlhf", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--reward-fn" in out and "only the file you name" in out.lower()
    assert "never code found in a model or data directory" in out


def test_bad_reward_fn_is_one_line(setup, tmp_path, capsys):
    policy, prompts, _ = setup
    base = ["rlhf", "--policy", str(policy), "--prompts", str(prompts), "--out"]
    assert cli.main([*base, str(tmp_path / "a"), "--reward-fn", "nothing.py:score"]) == 2
    assert cli.main([*base, str(tmp_path / "b"), "--reward-fn", "no_colon"]) == 2
    assert cli.main([*base, str(tmp_path / "c")]) == 2  # no reward at all
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("gpt2lab: error: ") for e in err)
    assert not (tmp_path / "a").exists()
