"""`gpt2lab rlhf` end to end on a tiny model: PPO and GRPO learn a checkable reward, metrics have
exactly their keys, a run stopped by a real SIGINT resumes exactly, and --reward-fn is only ever
the file named on the command line."""

from __future__ import annotations

import importlib
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
from trainutil import torchrun

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
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}


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


def assert_same_run(ref, run, steps):
    """`run` (stopped and resumed) ended exactly where the uninterrupted `ref` did: weights,
    value head, optimizer state, every metrics row but tokens/s, beta, prompt position."""
    ref_ckpt, got_ckpt = native.find_latest(ref), native.find_latest(run)
    a, b = load_file(ref_ckpt / "model.safetensors"), load_file(got_ckpt / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    extra_a, extra_b = native.load_optimizer_state(ref_ckpt), native.load_optimizer_state(got_ckpt)
    assert extra_a.keys() == extra_b.keys()
    for k, v in extra_a.get("value_head", {}).items():
        assert torch.equal(v, extra_b["value_head"][k]), k
    opt_a, opt_b = extra_a["optimizer"]["state"], extra_b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        for k, v in opt_a[i].items():
            assert torch.equal(v, opt_b[i][k]), (i, k)
    ra, rb = rows(ref), rows(run)
    assert [r["step"] for r in rb] == list(range(1, steps + 1))
    for x, y in zip(ra, rb):
        x.pop("tokens_per_s"), y.pop("tokens_per_s")
        assert x == y
    state_a, state_b = native.load_state(ref_ckpt)["rl"], native.load_state(got_ckpt)["rl"]
    state_a.pop("elapsed_s"), state_b.pop("elapsed_s")
    assert state_a == state_b  # beta, prompt pass and position, reward normalisation


RESUME = ["--train.max_steps=6", "--train.checkpoint_interval=1000", "--rl.minibatch_size=4"]


def test_run_stopped_by_sigint_resumes_exactly(setup, tmp_path):
    """A real SIGINT from outside, whenever it lands in step 2 or later. Both processes run one
    torch thread: a float sum over other threads rounds differently (not a resume matter)."""
    steps = 6
    assert cli.main(argv(setup, tmp_path / "ref", *RESUME)) == 0
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "gpt2lab", *argv(setup, run, *RESUME)]
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
    assert_same_run(tmp_path / "ref", run, steps)


# where in step 3 the signal lands: (module, function, its call that sends it, after how many
# of the tokens it yields). Per step the sampler runs once (one length group); PPO calls
# score_tokens 6 times (policy and reference, then 2 epochs x 2 minibatches of 4) and
# policy_loss 4 times; GRPO (8 prompts x 4 samples) policy_loss 2 x 8 times.
POINTS = {
    "mid-rollout": ("gpt2lab.posttrain.rollout", "iter_tokens", 3, 2),
    "after-rollout": ("gpt2lab.posttrain.rlhf", "score_tokens", 2 * 6 + 2, 0),
    "mid-update": ("gpt2lab.posttrain.rlhf", "policy_loss", 2 * 4 + 2, 0),
    "mid-update-grpo": ("gpt2lab.posttrain.rlhf", "policy_loss", 2 * 16 + 5, 0),
}


@pytest.fixture(scope="module")
def references(setup, tmp_path_factory):
    """The uninterrupted runs, one per algorithm, on one thread as the tests (a module fixture
    runs before the function-scoped `one_thread`)."""
    out, before = {}, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for algorithm in ("ppo", "grpo"):
            run = tmp_path_factory.mktemp("ref") / algorithm
            assert cli.main(argv(setup, run, *RESUME, f"--rl.algorithm={algorithm}")) == 0
            out[algorithm] = run
    finally:
        torch.set_num_threads(before)
    return out


@pytest.mark.parametrize(
    "algorithm, point",
    [
        ("ppo", "mid-rollout"),
        ("ppo", "after-rollout"),
        ("ppo", "mid-update"),
        ("grpo", "mid-update-grpo"),
    ],
)
def test_sigint_at_a_chosen_point_of_a_step_resumes_exactly(
    setup, tmp_path, monkeypatch, references, algorithm, point
):
    """A real SIGINT (os.kill of this process) sent from inside step 3 at a chosen point: the
    step finishes, a checkpoint of step 3 is written, and the resumed run is the reference."""
    module_name, name, at, after = POINTS[point]
    module = importlib.import_module(module_name)
    original, calls = getattr(module, name), [0]

    def signal_self():
        os.kill(os.getpid(), signal.SIGINT)  # StopSignal's handler is installed by now

    def tokens_then_signal(tokens):
        for i, token in enumerate(tokens):
            if i == after:
                signal_self()
            yield token

    def hooked(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at and not after:
            signal_self()
        out = original(*args, **kwargs)
        return tokens_then_signal(out) if calls[0] == at and after else out

    run, alg = tmp_path / "run", f"--rl.algorithm={algorithm}"
    with monkeypatch.context() as m:
        m.setattr(module, name, hooked)
        assert cli.main(argv(setup, run, *RESUME, alg)) == 130
    assert calls[0] >= at
    assert native.load_state(native.find_latest(run))["step"] == 3
    assert _last_step(run) == 3
    fn = setup[2]
    assert cli.main(["rlhf", "--out", str(run), "--resume", "--reward-fn", f"{fn}:score"]) == 0
    assert_same_run(references[algorithm], run, 6)


def test_a_run_killed_mid_step_resumes_exactly_from_its_last_checkpoint(
    setup, tmp_path, references
):
    """SIGKILL in step 4 (nothing of it is saved): the resume goes on from step 2's checkpoint,
    drops the rows logged after it and ends where the uninterrupted run did."""
    run = tmp_path / "run"
    flags = [*RESUME, "--train.checkpoint_interval=2"]
    cmd = [sys.executable, "-m", "gpt2lab", *argv(setup, run, *flags)]
    proc = subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _last_step(run) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.communicate(timeout=300)
    resumed_from = native.load_state(native.find_latest(run))["step"]
    assert resumed_from % 2 == 0 and resumed_from < 6
    fn = setup[2]
    assert cli.main(["rlhf", "--out", str(run), "--resume", "--reward-fn", f"{fn}:score"]) == 0
    assert_same_run(references["ppo"], run, 6)


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


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_two_gloo_ranks_end_where_one_process_with_the_same_batch_does(setup, tmp_path, algorithm):
    """torchrun --nproc_per_node 2: each rank samples and scores half of every batch and takes
    half of every minibatch, DDP all-reduces the gradients, rank 0 alone writes."""
    flags = [
        "--train.max_steps=3",
        "--train.lr=1e-3",
        "--train.min_lr=1e-3",
        "--rl.minibatch_size=8",
        f"--rl.algorithm={algorithm}",
    ]
    one = tmp_path / "one"
    assert cli.main(argv(setup, one, *flags)) == 0
    two = tmp_path / "two"
    cmd = torchrun(2, *argv(setup, two, *flags))
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done: step 3") == 1  # rank 0 alone reports
    a = load_file(native.find_latest(one) / "model.safetensors")
    b = load_file(native.find_latest(two) / "model.safetensors")
    assert a.keys() == b.keys()
    # float sums over 2 ranks round differently; AdamW scales such noise up where a gradient
    # is ~0 (the key bias: softmax ignores it) to ~lr/10 a step, hence a modest lr here
    moved = load_file(setup[0] / "model.safetensors")
    assert max((a[k] - moved[k]).abs().max().item() for k in a) > 1e-3  # the runs learned
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    if algorithm == "ppo":
        va = native.load_optimizer_state(native.find_latest(one))["value_head"]
        vb = native.load_optimizer_state(native.find_latest(two))["value_head"]
        for k in va:
            torch.testing.assert_close(vb[k], va[k], rtol=0, atol=1e-5, msg=k)
    ra, rb = rows(one), rows(two)
    assert [x["step"] for x in rb] == [1, 2, 3]  # one metrics.jsonl, rank 0's
    for x, y in zip(ra, rb):
        for key in ("reward", "kl", "beta", "entropy", "clip_frac", "approx_kl"):
            assert y[key] == pytest.approx(x[key], abs=1e-4), key
    state = native.load_state(native.find_latest(two))
    assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    assert sorted(p.name for p in two.iterdir() if p.name.startswith(".")) == sorted(
        p.name for p in one.iterdir() if p.name.startswith(".")
    )


def test_resuming_on_other_threads_says_it_is_not_bit_exact(setup, tmp_path, capsys):
    run, fn = tmp_path / "run", setup[2]
    assert cli.main(argv(setup, run, "--train.max_steps=1")) == 0
    assert native.load_state(native.find_latest(run))["rl"]["threads"] == 1
    torch.set_num_threads(2)  # the one_thread fixture puts 1 back
    resume = ["rlhf", "--out", str(run), "--resume", "--reward-fn", f"{fn}:score"]
    assert cli.main([*resume, "--train.max_steps=2"]) == 0
    assert "resuming on 2 torch threads, saved on 1" in capsys.readouterr().err
    assert native.load_state(native.find_latest(run))["rl"]["threads"] == 2
