"""`gpt2lab reward` trains a reward model on pairs (on the Trainer) and `reward score` uses it."""

from __future__ import annotations

import json
import random

import pytest
import torch
from rlutil import prompts_file, tiny_policy

from gpt2lab import cli
from gpt2lab.posttrain.reward import load_reward_model


def write_pairs(path, n=96, seed=0):
    """Chosen replies are full of the letter a, rejected ones of z: learnable in a few steps."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(["hello", "well", "now", "say"]) for _ in range(2))
            good = "".join(rng.choice("aab ") for _ in range(6))
            bad = "".join(rng.choice("zzy ") for _ in range(6))
            f.write(json.dumps({"prompt": prompt, "chosen": good, "rejected": bad}) + "\n")
    return path


def test_reward_model_learns_pairs_and_scores_texts(tmp_path, capsys, monkeypatch):
    policy = tiny_policy(tmp_path / "policy")
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    rm_dir = tmp_path / "rm"
    argv = ["reward", "--init-from", str(policy), "--data", str(pairs), "--out", str(rm_dir)]
    argv += ["--no-plot", "--no-progress", "--train.max_steps=30", "--train.lr=3e-3"]
    argv += ["--train.min_lr=3e-3", "--train.eval_interval=10", "--train.micro_batch_size=8"]
    assert cli.main(argv) == 0
    rows = [json.loads(ln) for ln in (rm_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_accuracy" in r]
    assert {"loss", "accuracy", "margin", "val_loss", "val_accuracy", "val_margin"} <= set(
        evals[-1]
    )
    assert evals[-1]["val_accuracy"] > 0.9 and evals[-1]["val_loss"] < evals[0]["val_loss"]
    capsys.readouterr()

    rm = load_reward_model(rm_dir)
    good, bad = "User: hello now\n\nAssistant: aab aab", "User: hello now\n\nAssistant: zzy zzy"
    text_file = tmp_path / "texts.txt"
    text_file.write_text(
        good.replace("\n", "\\n") + "\n" + bad.replace("\n", "\\n") + "\n", encoding="utf-8"
    )
    assert cli.main(["reward", "score", "--model", str(rm_dir), str(text_file), "--json"]) == 0
    out = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [o["text"] for o in out] == [good, bad]
    assert out[0]["score"] > out[1]["score"]
    want = rm.score_texts([good, bad])
    assert abs(out[0]["score"] - want[0]) < 1e-6 and abs(out[1]["score"] - want[1]) < 1e-6
    # stdin, plain numbers
    monkeypatch.setattr("sys.stdin", open(text_file, encoding="utf-8"))
    assert cli.main(["reward", "score", "--model", str(rm_dir)]) == 0
    plain = capsys.readouterr().out.split()
    assert [float(x) for x in plain] == [round(o["score"], 6) for o in out]
    assert cli.main(["reward", "score", "--model", str(rm_dir), "--input", str(text_file)]) == 0
    assert capsys.readouterr().out.split() == plain

    # the trained directory exports to transformers and scores the same there
    transformers = pytest.importorskip("transformers")
    assert cli.main(["convert", str(rm_dir), str(tmp_path / "hf")]) == 0
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    ids = rm.tokenizer.encode(good, allowed_special="all")
    with torch.no_grad():
        assert abs(hf(torch.tensor([ids])).logits[0, 0].item() - want[0]) < 1e-5

    # and PPO runs against it
    run = tmp_path / "ppo"
    argv = ["rlhf", "--policy", str(policy), "--reward", str(rm_dir), "--out", str(run)]
    argv += ["--prompts", str(prompts_file(tmp_path / "p.txt")), "--no-plot"]
    argv += ["--train.max_steps=2", "--rl.batch_size=4", "--rl.max_new_tokens=6"]
    assert cli.main(argv) == 0
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["reward"], float) for r in rows)
