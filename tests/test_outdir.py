"""Ownership and locking of outputs (gpt2lab.outdir), paths from files, sizes from configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpt2lab.errors import BusyError, DataError, OutputError
from gpt2lab.io import path_inside, read_line_bounded, sane_workers
from gpt2lab.outdir import (
    LOCK,
    MARKER,
    check_not_overlapping,
    claim_output_dir,
    claim_output_file,
    owned_file,
    owns_file,
    read_marker,
)

ROOT = Path(__file__).resolve().parents[1]


def test_a_new_directory_is_marked_and_force_removes_only_what_the_marker_lists(tmp_path):
    out = tmp_path / "out"
    with claim_output_dir(out, "prepare") as claim:
        assert claim.created
        (claim.claim_file("meta.json")).write_text("{}")
        claim.record("tokenizer")
        (out / "tokenizer").mkdir()
        (out / "tokenizer" / "x").write_text("x")
        (out / ".meta.json.abc.tmp").write_text("a temp file of an interrupted write")
    (out / "notes.txt").write_text("the user's")
    marker = read_marker(out)
    assert marker["tool"] == "gpt2lab" and marker["command"] == "prepare"
    assert marker["files"] == ["meta.json", "tokenizer"]
    with claim_output_dir(out, "prepare", force=True):
        pass
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, LOCK, "notes.txt"])


def test_an_unmarked_non_empty_directory_is_refused_and_untouched(tmp_path):
    (tmp_path / "meta.json").write_text("mine")
    with pytest.raises(OutputError, match="did not create"):
        claim_output_dir(tmp_path, "prepare", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]  # no marker, no lock


def test_a_marker_cannot_point_outside_its_directory(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    marker = {"tool": "gpt2lab", "command": "train", "files": ["../victim.txt", str(victim), "ok"]}
    (out / MARKER).write_text(json.dumps(marker))
    with claim_output_dir(out, "train") as claim:
        assert claim.files == ["ok"]
        claim.remove_ours()
    assert victim.read_text() == "keep me"


def test_claiming_twice_in_one_process_is_reentrant(tmp_path):
    a = claim_output_dir(tmp_path / "o", "train")
    b = claim_output_dir(tmp_path / "o", "train")
    assert a is b
    b.release()
    assert a.lock is not None  # still held by the outer claim
    a.release()
    assert a.lock is None


@pytest.mark.parametrize(
    ("out", "how"),
    [("in", "is the input"), ("in/sub", "inside the input"), (".", "contains the input")],
)
def test_outputs_overlapping_inputs_are_refused(tmp_path, out, how):
    (tmp_path / "in").mkdir()
    with pytest.raises(OutputError, match=how):
        check_not_overlapping(tmp_path / out, [tmp_path / "in", "gpt2", None])


def test_a_second_process_gets_the_holders_pid_and_a_dead_holder_blocks_nothing(tmp_path):
    code = textwrap.dedent(
        f"""
        import time
        from gpt2lab.outdir import claim_output_dir
        claim_output_dir({str(tmp_path / "o")!r}, "train")
        print("held", flush=True)
        time.sleep(60)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    holder = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(BusyError, match=f"PID {holder.pid}"):
            claim_output_dir(tmp_path / "o", "train")
    finally:
        holder.kill()
        holder.wait()
    claim_output_dir(tmp_path / "o", "train").release()  # the OS dropped the dead one's lock


def test_an_output_file_is_replaced_only_while_it_is_gpt2labs(tmp_path):
    f = tmp_path / "m.gguf"
    with owned_file(f, "convert") as path:
        path.write_bytes(b"ours")
    assert owns_file(f)
    with owned_file(f, "convert") as path:  # ours: may be replaced
        path.write_bytes(b"ours again")
    f.write_bytes(b"edited by the user")  # changed since: the user's now
    with pytest.raises(OutputError, match="did not write it"):
        claim_output_file(f, "convert")
    other = tmp_path / "notes.png"
    other.write_bytes(b"mine")
    with pytest.raises(OutputError):
        claim_output_file(other, "plot")
    assert not (tmp_path / ".notes.png.gpt2lab").exists()


def test_paths_read_from_files_stay_inside(tmp_path):
    (tmp_path / "ckpt" / "step_1").mkdir(parents=True)
    assert path_inside(tmp_path, "ckpt/step_1", "latest", "checkpoint").is_dir()
    os.symlink("/etc", tmp_path / "link")
    for bad in ("../x", "/etc", "link", "", None, 5, "ckpt/../../x"):
        with pytest.raises(DataError, match="outside"):
            path_inside(tmp_path, bad, "latest", "checkpoint")


def test_bounded_lines_and_workers(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes(b"short\n" + b"x" * 100 + b"\n")
    with open(f, "rb") as fh:
        assert read_line_bounded(fh, 10, f, 1) == b"short\n"
        with pytest.raises(DataError, match="line 2 is longer than 10 bytes"):
            read_line_bounded(fh, 10, f, 2)
    assert sane_workers(None) >= 1 and sane_workers(1) == 1
    with pytest.raises(Exception, match="workers"):
        sane_workers(10**6)


def test_sizes_come_from_the_config_alone():
    import torch

    from gpt2lab.budget import estimate_inference, param_count
    from gpt2lab.config import MODEL_PRESETS, GPTConfig
    from gpt2lab.model import GPT

    for cfg in [*MODEL_PRESETS.values(), GPTConfig(n_layer=1, n_head=1, n_embd=8, bias=False)]:
        with torch.device("meta"):
            model = GPT(cfg)
        assert param_count(cfg) == sum(p.numel() for p in model.parameters())
    huge = GPTConfig(vocab_size=2_000_000_000, n_layer=2, n_head=2, n_embd=16)
    assert param_count(huge) > 3e10  # computed at once, nothing built
    cfg = MODEL_PRESETS["gpt2"]
    short = estimate_inference(cfg, 4, 10, 100)
    long = estimate_inference(cfg, 4, 10, 10**9)
    assert long.kv_cache == short.kv_cache * cfg.block_size // 110  # the window caps the cache
    assert long.outputs == 4 * 10**9 * 48  # what a sample keeps grows with its length
