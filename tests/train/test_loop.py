"""The training loop in one process: overfitting, metrics, checkpoints, the NaN guard, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from trainutil import cli_args, tiny_config, write_char_data

from gpt2lab import cli
from gpt2lab.checkpoint import native
from gpt2lab.data import prepare
from gpt2lab.errors import ConfigError, DataError, TrainingError
from gpt2lab.tokenizer import get_tokenizer
from gpt2lab.train import (
    CheckpointEvent,
    DoneEvent,
    EvalEvent,
    SampleEvent,
    StartEvent,
    StepEvent,
    WarningEvent,
    train,
)


def test_tiny_model_overfits_one_batch(tmp_path, tiny_shakespeare):
    text = tiny_shakespeare.read_text(encoding="utf-8")
    # a train split of exactly block_size + 1 tokens: every batch is the same window
    data = write_char_data(tmp_path / "d", text[:33] + text[:2000], val_fraction=2000 / 2033)
    cfg = tiny_config(
        data,
        "train.max_steps=150",
        "train.warmup_steps=10",
        "train.lr=1e-2",
        "train.min_lr=1e-3",
        "train.eval_interval=1000",
        "train.log_interval=50",
        "train.checkpoint_interval=1000",
    )
    s = train(cfg, tmp_path / "run")
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] > 3.0  # about ln(vocab) at the start
    assert s.loss < 0.05, s


def test_mfu_never_exceeds_one_when_the_cpu_probe_ran_under_load(tmp_path, char_data, monkeypatch):
    from gpt2lab.train import loop

    monkeypatch.setattr(loop, "peak_flops", lambda *a: 1.0)  # a probe that read far too low
    train(tiny_config(char_data, "train.max_steps=4", "train.peak_flops=0"), tmp_path / "run")
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["mfu"] <= 1.0 for r in rows) and rows[0]["mfu"] == pytest.approx(1.0)


def test_run_writes_metrics_checkpoints_and_pointers(tmp_path, char_data):
    evals = []
    cfg = tiny_config(char_data, "train.keep_last=1", "train.max_steps=12")
    s = train(cfg, tmp_path / "run", on_eval=evals.append)
    run = tmp_path / "run"
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens"):
        assert all(math.isfinite(r[key]) for r in rows), key
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val_rows] == [4, 8, 12] == [e["step"] for e in evals]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-5) for r in val_rows)
    assert rows[-1]["tokens"] == 12 * 4 * 32
    # keep_last=1 keeps the newest plus the best by validation loss
    best = min(val_rows, key=lambda r: r["val_loss"])
    kept = {p.name for p in native.list_checkpoints(run)}
    assert kept == {"step_00000012", f"step_{best['step']:08d}"}
    assert (run / "latest").read_text().strip() == "ckpt/step_00000012"
    assert native.find_best(run).name == f"step_{best['step']:08d}"
    state = native.load_state(native.find_latest(run))
    assert state["step"] == 12 and state["config"]["model"]["n_layer"] == 2
    assert state["tokenizer"] == "tokenizer" and (run / "tokenizer").is_dir()
    assert state["val_loss"] == pytest.approx(s.val_loss)
    assert (run / "config.toml").is_file()


def test_evaluation_over_the_whole_validation_split_matches_a_direct_computation(
    tmp_path, char_data
):
    import torch

    from gpt2lab.checkpoint.weights import load_model_safetensors
    from gpt2lab.data import load_tokens
    from gpt2lab.model import GPT

    cfg = tiny_config(
        char_data, "train.eval_steps=1", "train.final_eval_steps=0", "train.max_steps=4"
    )
    s = train(cfg, tmp_path / "run")
    state = native.load_state(native.find_latest(tmp_path / "run"))
    mcfg = cfg.model.__class__(**state["config"]["model"])
    model = GPT(mcfg)
    load_model_safetensors(model, native.find_latest(tmp_path / "run") / "model.safetensors")
    toks = load_tokens(char_data, "val").astype(np.int64)
    n = (len(toks) - 1) // 32
    x = torch.from_numpy(toks[: n * 32].reshape(n, 32))
    y = torch.from_numpy(toks[1 : n * 32 + 1].reshape(n, 32))
    with torch.no_grad():
        logits, _ = model(x)
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    assert s.val_loss == pytest.approx(ref.item(), rel=1e-5)


def test_nan_guard_stops_with_last_good_checkpoint_intact(tmp_path, char_data):
    # an absurd LR blows the weights up within a few steps: the loss becomes inf/NaN
    cfg = tiny_config(
        char_data,
        "train.lr=1e30",
        "train.min_lr=1e30",
        "train.warmup_steps=0",
        "train.checkpoint_interval=1",
        "train.max_steps=50",
    )
    with pytest.raises(TrainingError, match="non-finite loss") as e:
        train(cfg, tmp_path / "run")
    latest = native.find_latest(tmp_path / "run")
    assert latest is not None and str(latest) in str(e.value)
    assert e.value.exit_code == 1
    cfg = tiny_config(
        char_data,
        "train.lr=1e30",
        "train.min_lr=1e30",
        "train.warmup_steps=0",
        "train.skip_nonfinite=true",
        "train.max_steps=6",
    )
    s = train(cfg, tmp_path / "run2")
    assert s.step == 6 and s.skipped_steps >= 1


def test_bad_input_is_one_line_and_leaves_the_run_dir_alone(tmp_path, char_data, capsys):
    run = tmp_path / "run"
    base = cli_args(char_data, run, "--no-plot", "--train.max_steps=2")
    assert cli.main(base) == 0
    capsys.readouterr()
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    (tmp_path / "nodata").mkdir()
    cases = [
        (base, 2, "already exists"),  # no --resume / --overwrite
        (["train", "--out", str(tmp_path / "none"), "--resume"], 1, "nothing to resume"),
        ([*base, "--overwrite", "--train.lrr=1"], 2, "--train.lr"),
        ([*base[:2], str(tmp_path / "nodata"), *base[3:], "--overwrite"], 1, "meta.json"),
        ([*base[:2], str(tmp_path), *base[3:], "--overwrite"], 2, "inside the input"),
        ([*base, "--overwrite", "--train.micro_batch_size=100000000"], 1, "lower --train.micro"),
        (["train", "--out", str(run), "--resume", "--model.n_layer=3"], 2, "differs from the run"),
    ]
    for argv, code, words in cases:
        assert cli.main(argv) == code, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before
    # a data dir without shards
    empty = tmp_path / "empty"
    (empty).mkdir()
    with pytest.raises(DataError):
        train(tiny_config(empty), tmp_path / "r2")
    with pytest.raises(ConfigError):
        train(tiny_config(""), tmp_path / "r3")
    # the library names config keys; the command line shows them as flags
    with pytest.raises(TrainingError, match="lower `train.micro_batch_size`"):
        train(tiny_config(char_data, "train.micro_batch_size=100000000"), tmp_path / "r4")


def test_resume_continues_with_a_larger_max_steps(tmp_path, char_data, capsys):
    run = tmp_path / "run"
    base = cli_args(char_data, run, "--no-plot", "--train.max_steps=3")
    assert cli.main(base) == 0
    with open(run / "metrics.jsonl", "ab") as f:  # a damaged tail: bad bytes, an absurd step
        f.write(b'\xff\xfe{"step": 4\n{"step": 1e400}\n[3]\n')
    assert cli.main(["train", "--out", str(run), "--resume", "--train.max_steps=5"]) == 0
    assert native.load_state(native.find_latest(run))["step"] == 5
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 5
    assert (run / "curves.png").is_file()  # the plot is redrawn at the end of each run


def test_wall_clock_budget_stops_the_run_and_the_lr_follows_time(tmp_path, char_data):
    cfg = tiny_config(
        char_data,
        "train.max_minutes=0.02",
        "train.max_steps=1000000",
        "train.eval_interval=1000000",
        "train.checkpoint_interval=1000000",
    )
    s = train(cfg, tmp_path / "run")
    assert s.stopped_by == "max_minutes" and 2 < s.step < 1_000_000
    assert s.elapsed_s >= 1.2  # it stops only once the budget is spent
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows][2:]  # after the 2 warmup steps: cosine over wall time
    assert lrs == sorted(lrs, reverse=True)
    assert lrs[-1] == pytest.approx(cfg.train.min_lr, rel=0.05)
    assert native.find_latest(tmp_path / "run").name == f"step_{s.step:08d}"


def test_frozen_parameters_keep_their_initial_values(tmp_path, char_data):
    import torch
    from safetensors.torch import load_file

    from gpt2lab.model import GPT

    cfg = tiny_config(char_data, "train.freeze=transformer.w?e.*", "train.max_steps=3")
    train(cfg, tmp_path / "run")
    saved = load_file(native.find_latest(tmp_path / "run") / "model.safetensors")
    torch.manual_seed(cfg.train.seed)  # the run's initial weights
    init = GPT(
        cfg.model.__class__(
            **native.load_state(native.find_latest(tmp_path / "run"))["config"]["model"]
        )
    ).state_dict()
    for key in ("transformer.wte.weight", "transformer.wpe.weight"):
        assert torch.equal(saved[key], init[key]), key
    assert not torch.equal(
        saved["transformer.h.0.attn.c_attn.weight"], init["transformer.h.0.attn.c_attn.weight"]
    )


def test_train_prints_nothing_unless_asked(tmp_path, char_data, capfd):
    cfg = tiny_config(
        char_data, "train.max_steps=4", "train.sample_interval=1", "train.sample_tokens=8"
    )
    train(cfg, tmp_path / "run")
    assert capfd.readouterr() == ("", "")


def test_events_tell_the_caller_what_the_run_does(tmp_path, char_data, capfd):
    events = []
    cfg = tiny_config(
        char_data,
        "train.max_steps=8",
        "train.log_interval=2",
        "train.sample_interval=1",
        "train.sample_tokens=8",
    )
    s = train(cfg, tmp_path / "run", on_event=events.append)
    assert capfd.readouterr() == ("", "")
    start, done = events[0], events[-1]
    assert isinstance(start, StartEvent) and (start.step, start.max_steps) == (0, 8)
    assert start.params > 0 and start.tokens_per_step == 4 * 32 and "GiB" in start.memory
    assert isinstance(done, DoneEvent) and done.summary == s
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert [e.step for e in steps] == list(range(1, 9))
    logged = [e.step for e in steps if e.metrics is not None]
    assert logged == [1, 2, 4, 6, 8]  # the first step, every 2nd, and each evaluation
    evals = [e for e in events if isinstance(e, EvalEvent)]
    assert [e.step for e in evals] == [4, 8] and evals[-1].metrics["val_loss"] == s.val_loss
    samples = [e for e in events if isinstance(e, SampleEvent)]
    assert [e.step for e in samples] == [4, 8] and all(e.text for e in samples)
    # each sample comes before its evaluation's row, each checkpoint after it
    kinds = [type(e).__name__ for e in events if not isinstance(e, StepEvent)]
    assert kinds == ["StartEvent"] + ["SampleEvent", "EvalEvent", "CheckpointEvent"] * 2 + [
        "DoneEvent"
    ]
    ckpts = [e for e in events if isinstance(e, CheckpointEvent)]
    assert ckpts[-1].path == s.checkpoint
    assert not any(isinstance(e, WarningEvent) for e in events)


def test_a_stop_request_ends_the_run_with_a_checkpoint(tmp_path, char_data):
    steps = []
    cfg = tiny_config(char_data, "train.max_steps=50")
    s = train(
        cfg,
        tmp_path / "run",
        on_event=lambda e: steps.append(e.step) if isinstance(e, StepEvent) else None,
        should_stop=lambda: len(steps) >= 3,
    )
    assert s.stopped_by == "signal" and s.step == 4
    assert native.find_latest(tmp_path / "run").name == "step_00000004"


def test_added_special_tokens_size_the_model(tmp_path, tiny_shakespeare):
    text = tiny_shakespeare.read_text(encoding="utf-8")[:20_000]
    (tmp_path / "t.txt").write_text(text)
    tok = get_tokenizer("gpt2", special_tokens=["<|startoftext|>", "<|pad|>", "<|unk|>"])
    prepare(str(tmp_path / "t.txt"), tmp_path / "d", tok, val_tail=0.1, workers=1)
    cfg = tiny_config(tmp_path / "d", "train.max_steps=1", "model.pad_vocab_to=1")
    train(cfg, tmp_path / "run")
    state = native.load_state(native.find_latest(tmp_path / "run"))
    assert state["config"]["model"]["vocab_size"] == 50260  # GPT-2's 50257 + the 3 added
    saved = get_tokenizer(tmp_path / "run" / "tokenizer")
    assert saved.special_tokens["<|unk|>"] == 50259


@pytest.mark.parametrize("limit", [1.0, 0.5, 1e-3, 0.0])
def test_clipping_is_skipped_exactly_where_clip_grad_norm_would_multiply_by_one(limit):
    """train_step scales gradients only where `clips` says so; torch's clip_grad_norm_ must then
    leave every other case unchanged, bit for bit."""
    import torch

    from gpt2lab.train.loop import clips

    torch.manual_seed(0)
    base = torch.randn(1000)
    ref = limit or 1.0
    scales = [0.5, 1 - 1e-5, 1 - 1e-6, 1 - 1e-7, 1.0, 1 + 1e-7, 1 + 1e-6, 2.0]
    for target in [ref * s for s in scales] + [math.nan]:
        p = torch.zeros(1000, requires_grad=True)
        p.grad = base / base.norm() * target if not math.isnan(target) else base * math.nan
        before = p.grad.clone()
        norm = torch.nn.utils.clip_grad_norm_([p], limit if limit > 0 else math.inf)
        changed = not torch.allclose(p.grad, before, rtol=0, atol=0, equal_nan=True)
        if not clips(float(norm), limit):
            assert not changed, (limit, target)  # skipping it loses nothing
        if limit > 0 and float(norm) > limit * (1 + 1e-5):
            assert clips(float(norm), limit)


def test_clipping_in_one_go_where_torch_has_no_get_total_norm(tmp_path, char_data, monkeypatch):
    """torch < 2.6 has no get_total_norm: the step clips with clip_grad_norm_ whole, and trains
    exactly as the split path does (the clip active on some steps: limit 0.5)."""
    import torch
    from safetensors.torch import load_file

    cfg = tiny_config(char_data, "train.max_steps=4", "train.grad_clip=0.5")
    train(cfg, tmp_path / "split")
    monkeypatch.delattr(torch.nn.utils, "get_total_norm")
    train(cfg, tmp_path / "whole")
    runs = [tmp_path / "split", tmp_path / "whole"]
    a, b = (load_file(native.find_latest(r) / "model.safetensors") for r in runs)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    rows = [json.loads(ln) for ln in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    assert any(r["grad_norm"] > 0.5 for r in rows)  # the clip did act
