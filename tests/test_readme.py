"""README.md's commands, run at a tiny size so that the documentation cannot rot.

Convention: every fenced block in README.md is followed by a marker line, either
`<!-- test: NAME -->` (run its commands, in README order, in one scratch directory) or
`<!-- test: skip (reason) -->`. Commands run in-process through `gpt2lab.cli.main` with the
substitutions below: one-layer models, a few steps, sliced texts, and `gpt2` (a hub name) replaced
by a small random GPT-2 that `transformers` makes; `torchrun ... -m gpt2lab` runs as one process.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from gpt2lab import cli

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```\s*\n(?:\s*\n)*(<!-- test: ([^>]*?) -->)?", re.M | re.S)

TINY_MODEL = ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32"]
TINY_TRAIN = [
    "--train.max_steps=4",
    "--train.micro_batch_size=4",
    "--train.grad_accum_steps=1",
    "--train.warmup_steps=2",
    "--train.eval_interval=2",
    "--train.eval_steps=1",
    "--train.checkpoint_interval=2",
    "--train.compile=false",
]
BUDGET = "0.02"  # minutes, for --minutes and --train.max_minutes


def blocks() -> list[tuple[str, str]]:
    """(marker, body) of every fenced block of README.md, in order; marker None when missing."""
    return [(m.group(3), m.group(1)) for m in FENCE.finditer(README.read_text(encoding="utf-8"))]


def commands(body: str) -> list[list[str]]:
    """The block's commands as argv lists (line continuations joined, comments dropped)."""
    return [argv for line in body.replace("\\\n", " ").splitlines() if (argv := _split(line))]


def _split(line: str) -> list[str]:
    return shlex.split(line, comments=True)


RUN = [(name, body) for name, body in blocks() if name and not name.startswith("skip")]


def test_every_block_says_whether_it_is_tested():
    found = blocks()
    assert len(RUN) >= 8
    missing = [body.splitlines()[0] for name, body in found if not name]
    assert not missing, f"README blocks without a <!-- test: ... --> marker: {missing}"
    names = [name for name, _ in RUN]
    assert len(names) == len(set(names)), "block names must be unique"


def tiny(argv: list[str], hf_gpt2: str) -> list[str]:
    """The README's argv at a tiny size (see the module docstring)."""
    if argv[0] == "torchrun":
        argv = ["gpt2lab", *argv[argv.index("-m") + 2 :]]
    assert argv[0] == "gpt2lab", f"README commands start with gpt2lab or torchrun: {argv}"
    out: list[str] = []
    it = iter(argv[1:])
    for a in it:
        if a in ("--init-from", "--model") and (value := next(it)) == "gpt2":
            out += [a, hf_gpt2]
        elif a in ("--init-from", "--model"):
            out += [a, value]
        elif a == "--minutes":
            out += [a, BUDGET]
            next(it)
        elif a.startswith("--train.max_minutes="):
            out.append(f"--train.max_minutes={BUDGET}")
        elif a in ("-m", "--limit") and out and out[0] in ("sample", "eval"):
            out += [a, "10" if a == "-m" else "2"]
            next(it)
        else:
            out.append(a)
    cmd = out[0]
    if cmd in ("train", "demo"):
        out += ["--train.max_steps=6"] if "--resume" in out else TINY_MODEL + TINY_TRAIN
    if cmd == "demo":
        out += ["--samples", "1", "--sample-tokens", "10"]
    if cmd == "prepare" and out[1] in ("fineweb-edu-10B", "openwebtext") and "--input" not in out:
        out += ["--input", "fineweb/part-0.parquet", "--val-docs", "3"]
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shared_data: Path) -> Path:
    """A scratch directory holding the files the README's commands name, at tiny sizes."""
    pytest.importorskip("transformers")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("readme")
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:8_000]
    (d / "notes.txt").write_text(text, encoding="utf-8")
    (d / "tinyshakespeare.txt").write_text(text, encoding="utf-8")
    wiki = (shared_data / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")
    (d / "wikitext-2").mkdir()
    (d / "wikitext-2" / "wiki.valid.tokens").write_text(
        "".join(wiki.splitlines(keepends=True)[:20]), encoding="utf-8"
    )
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.split()) > 8]
    with open(d / "lambada_test.jsonl", "w", encoding="utf-8") as f:
        for p in paragraphs[:3]:
            f.write(json.dumps({"text": " ".join(p.split())}) + "\n")
    with open(d / "hellaswag_val.jsonl", "w", encoding="utf-8") as f:
        for i in range(2):
            ends = [" ".join(paragraphs[i + k].split()[:6]) for k in range(4)]
            f.write(json.dumps({"ctx": paragraphs[i].split("\n")[0], "endings": ends, "label": 0}))
            f.write("\n")
    (d / "fineweb").mkdir()
    docs = [ln for ln in text.splitlines() if ln.strip()] * 3
    pq.write_table(pa.table({"text": docs}), d / "fineweb" / "part-0.parquet")
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    GPT2LMHeadModel(cfg).save_pretrained(d / "hf-gpt2")
    return d


@pytest.mark.parametrize("name,body", RUN, ids=[name for name, _ in RUN])
def test_readme_block_runs(name, body, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    for argv in commands(body):
        args = tiny(argv, str(workdir / "hf-gpt2"))
        code = cli.main(args)
        err = capsys.readouterr().err
        assert code == 0, f"`{shlex.join(argv)}` (run as `gpt2lab {shlex.join(args)}`): {err}"
