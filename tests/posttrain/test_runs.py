"""`gpt2lab sft` and `gpt2lab dpo` end to end: run directories, resume, bad data, the cache."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from trainutil import torchrun

from conftest import RUN_FLAGS
from gpt2lab import GPT, cli
from gpt2lab.checkpoint import native
from gpt2lab.checkpoint.load import load_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def rows(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def sft_argv(base, data, out, *extra):
    return [
        "sft",
        "--init-from",
        str(base),
        "--data",
        str(data),
        "--out",
        str(out),
        *RUN_FLAGS,
        *extra,
    ]


def test_sft_run_dir_carries_chat_tokens_and_loads_everywhere(
    tmp_path, base_run, chat_file, capsys
):
    out = tmp_path / "sft"
    argv = sft_argv(base_run, chat_file, out, "--template", "chat", "--train.max_steps=8")
    assert cli.main(argv) == 0
    done = capsys.readouterr().out
    assert "train completion loss" in done
    r = rows(out)
    assert [x["step"] for x in r] == list(range(1, 9))
    assert all(0 < x["loss"] < 10 for x in r) and "val_loss" in r[-1]
    assert r[-1]["val_ppl"] == pytest.approx(math.exp(r[-1]["val_loss"]))  # a per-token NLL
    model, tok = load_model(out)
    base, base_tok = load_model(base_run)
    assert model.config.vocab_size == base_tok.n_vocab + 4 == tok.n_vocab  # 4 chat tokens
    assert tok.chat_template.name == "chat"
    assert tok.special_tokens["<|end|>"] == tok.n_vocab - 1
    assert GPT.from_pretrained(str(out)).config.vocab_size == tok.n_vocab
    assert cli.main(["sample", "--model", str(out), "-p", "Ham.", "-m", "5"]) == 0
    assert cli.main(["convert", str(out), str(tmp_path / "hf")]) == 0
    # a character vocabulary has no Hugging Face tokenizer: ours travels beside the weights
    assert (tmp_path / "hf" / "gpt2lab_tokenizer" / "chat_template.json").is_file()
    back, back_tok = load_model(tmp_path / "hf")
    assert back_tok.chat_template is not None and back.config.vocab_size == tok.n_vocab


def test_packed_sft_trains_and_counts_real_tokens(tmp_path, base_run, chat_file):
    out = tmp_path / "packed"
    argv = sft_argv(
        base_run, chat_file, out, "--template", "chat", "--packing", "--train.max_steps=4"
    )
    assert cli.main(argv) == 0
    r = rows(out)
    assert all(x["tokens"] <= x["step"] * 4 * 128 for x in r)  # no padding counted
    assert r[-1]["tokens"] > 0.5 * 4 * 4 * 128  # rows are mostly full


def _last_step(run) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError):
        return 0


def test_sft_resumes_exactly_after_a_real_interruption(tmp_path, base_run, chat_file):
    steps = 60
    flags = [
        "--template",
        "chat",
        f"--train.max_steps={steps}",
        "--train.eval_interval=1000",
        "--train.checkpoint_interval=1000",
        "--model.dropout=0.1",
    ]
    ref = tmp_path / "ref"
    assert cli.main(sft_argv(base_run, chat_file, ref, *flags)) == 0
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "gpt2lab", *sft_argv(base_run, chat_file, run, *flags)]
    proc = subprocess.Popen(argv, env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _last_step(run) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    stopped = native.load_state(native.find_latest(run))["step"]
    assert 3 <= stopped < steps
    assert cli.main(["sft", "--out", str(run), "--resume", "--no-plot", "--no-progress"]) == 0
    a = load_file(native.find_latest(ref) / "model.safetensors")
    b = load_file(native.find_latest(run) / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [x["step"] for x in rows(run)] == list(range(1, steps + 1))


@pytest.mark.parametrize(
    "line, field",
    [
        ('{"prompt": "Ham.\\nWho?"}', "completion"),
        ('{"prompt": "Ham.\\nWho?", "completion": ""}', "completion"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
            "messages",
        ),
    ],
)
def test_a_bad_record_is_one_line_naming_file_line_and_field(
    tmp_path, base_run, chat_file, capsys, line, field
):
    data = tmp_path / "bad.jsonl"
    good = chat_file.read_text().splitlines()[:5]
    data.write_text("\n".join([*good[:2], line, *good[2:]]) + "\n")
    out = tmp_path / "run"
    assert cli.main(sft_argv(base_run, data, out, "--train.max_steps=2")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gpt2lab: error:")
    assert f"{data}:3" in err or f"{data} line 3" in err, err
    assert field in err and "Traceback" not in err
    assert not out.exists()  # nothing half-written
    # --errors skip counts it and trains on the rest
    assert cli.main(sft_argv(base_run, data, out, "--train.max_steps=2", "--errors", "skip")) == 0
    assert "skipped 1" in capsys.readouterr().err


def test_dpo_caches_the_reference_and_reports_its_metrics(
    tmp_path, base_run, chat_file, pairs_file, capsys
):
    sft_run = tmp_path / "sft"
    argv = sft_argv(base_run, chat_file, sft_run, "--template", "chat", "--train.max_steps=4")
    assert cli.main(argv) == 0
    out = tmp_path / "dpo"
    argv = [
        "dpo",
        "--init-from",
        str(sft_run),
        "--data",
        str(pairs_file),
        "--out",
        str(out),
        *RUN_FLAGS,
        "--train.max_steps=4",
    ]
    assert cli.main(argv) == 0
    assert "preference loss" in capsys.readouterr().out
    r = rows(out)
    for key in (
        "loss",
        "reward_accuracy",
        "reward_chosen",
        "reward_rejected",
        "reward_margin",
        "kl",
    ):
        assert all(key in x for x in r), key
    for key in ("val_loss", "val_reward_accuracy", "val_reward_margin", "val_kl"):
        assert key in r[-1], key
    assert not any("val_ppl" in x for x in r)  # a preference loss has no perplexity
    assert r[0]["loss"] == pytest.approx(0.693, abs=0.01)  # policy == reference at step 1
    meta = json.loads((out / "reference" / "reference.json").read_text())
    cache = out / "reference" / meta["file"]
    assert meta["train_pairs"] + meta["val_pairs"] == 120
    assert load_file(cache)["train"].shape == (meta["train_pairs"], 2)
    # a resumed run reads the cache: its file is not rewritten
    before = cache.stat().st_mtime_ns
    assert (
        cli.main(
            [
                "dpo",
                "--out",
                str(out),
                "--resume",
                "--train.max_steps=6",
                "--no-plot",
                "--no-progress",
            ]
        )
        == 0
    )
    assert cache.stat().st_mtime_ns == before
    assert [x["step"] for x in rows(out)] == list(range(1, 7))
    # without the cache, a frozen copy gives the same first step
    out2 = tmp_path / "nocache"
    argv = [
        "dpo",
        "--init-from",
        str(sft_run),
        "--data",
        str(pairs_file),
        "--out",
        str(out2),
        *RUN_FLAGS,
        "--train.max_steps=1",
        "--dpo.cache_reference=false",
    ]
    assert cli.main(argv) == 0
    assert rows(out2)[0]["loss"] == pytest.approx(r[0]["loss"], abs=1e-5)
    assert not (out2 / "reference").exists()


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_two_gloo_ranks_equal_one_process_with_twice_the_accumulation(
    tmp_path, base_run, chat_file, pairs_file, command
):
    """torchrun --nproc_per_node 2 against one process accumulating 2 micro-batches: the same
    weights, and the same logged loss, gradient norm and held-out scores (the whole split)."""
    data = chat_file if command == "sft" else pairs_file
    flags = ["--train.max_steps=2", "--train.eval_steps=0", "--train.eval_interval=2"]
    base = [command, "--init-from", str(base_run), "--data", str(data), *RUN_FLAGS, *flags]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main([*base, "--out", str(one), "--train.grad_accum_steps=2"]) == 0
    cmd = torchrun(2, *base, "--out", str(two), "--train.grad_accum_steps=1")
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(native.find_latest(one) / "model.safetensors")
    b = load_file(native.find_latest(two) / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    ra, rb = rows(one), rows(two)
    assert [x["step"] for x in rb] == [1, 2]  # rank 0 alone logs
    for x, y in zip(ra, rb):
        for key in ("loss", "grad_norm", *(k for k in x if k.startswith("val_"))):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), key


def test_sft_weighs_every_learned_token_of_a_step_alike(tmp_path, base_run, chat_file):
    """A step's loss is the mean over all its learned tokens, however they are split into
    micro-batches (as transformers' Trainer does since its October 2024 fix): 2 micro-batches
    of 4 train as 1 of 8. A mean of the micro-batches' means weighs a short reply's tokens more."""
    flags = ["--train.max_steps=3", "--train.eval_steps=1", "--train.eval_interval=100"]
    runs = {}
    for name, micro, accum in (("split", 4, 2), ("whole", 8, 1)):
        runs[name] = tmp_path / name
        argv = sft_argv(base_run, chat_file, runs[name], *flags)
        argv += [f"--train.micro_batch_size={micro}", f"--train.grad_accum_steps={accum}"]
        assert cli.main(argv) == 0
    a = load_file(native.find_latest(runs["split"]) / "model.safetensors")
    b = load_file(native.find_latest(runs["whole"]) / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    for x, y in zip(rows(runs["split"]), rows(runs["whole"])):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
