"""bench/gpu.py, the GPU check: its plumbing runs on the CPU (--dry-run), and without a GPU the
real check refuses in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
ENV = dict(os.environ, PYTHONPATH=str(BENCH.parents[1] / "src"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run")
def test_refuses_on_a_cpu_in_one_line():
    r = subprocess.run(
        [sys.executable, str(BENCH)], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "no CUDA GPU" in r.stderr and "--dry-run" in r.stderr
    assert r.stdout == ""


def test_dry_run_writes_the_report_and_the_table(tmp_path):
    out = tmp_path / "report.json"
    r = subprocess.run(
        [sys.executable, str(BENCH), "--dry-run", "--out", str(out)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["device"] == "cpu"
    train = report["training_124m"]
    assert train["tokens_per_s"] > 0 and 0 < train["mfu"] < 1 and train["steps"] == 6
    ddp = report["ddp"]
    assert ddp["ranks"] == 2 and ddp["steps"] == 4 and ddp["same_weights"] is True
    assert ddp["max_weight_difference_vs_one_process"] < 1e-5
    assert ddp["max_relative_difference_vs_one_process"] < 1e-5
    assert ddp["max_loss_difference_vs_one_process"] < 1e-5
    fsdp = report["fsdp_medium"]
    assert fsdp["ranks"] == 2 and fsdp["steps"] == 4 and fsdp["tokens_per_s"] > 0
    for b in ("batch_1", "batch_8"):
        s = report["sampling"][b]
        assert s["gpt2lab_tokens_per_s"] > 0 and s["transformers_tokens_per_s"] > 0
    wiki = report["eval"]["wikitext2_slice"]
    assert wiki["tokens"] > 0 and wiki["perplexity"] > 1
    for line in ("124M train step", "DDP x2, 4 steps", "same weights", "FSDP gpt2-medium x2"):
        assert line in r.stdout
    assert "sampling batch 1" in r.stdout and "WikiText-2 slice" in r.stdout
