"""prepare(): shards equal tiktoken's encoding of the documents, the split, resume, bad input."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest

from gpt2lab import cli
from gpt2lab.data import (
    SourceSpec,
    catalog,
    events,
    load_data_tokenizer,
    load_meta,
    load_tokens,
    pipeline,
    prepare,
    sources,
)
from gpt2lab.data.shards import read_header
from gpt2lab.errors import DataError

EOT = 50256


def _split_docs(tokens: np.ndarray, eot: int) -> list[list[int]]:
    """Documents of a split: the runs that follow each <|endoftext|>."""
    ids = tokens.tolist()
    assert not ids or ids[0] == eot
    docs: list[list[int]] = []
    for t in ids:
        if t == eot:
            docs.append([])
        else:
            docs[-1].append(t)
    return docs


def _assign(expected: list, train: np.ndarray, val: np.ndarray, eot: int = EOT) -> list[int]:
    """Check train and val are the documents in order, each in one split; returns val indices."""
    tr, va = _split_docs(train, eot), _split_docs(val, eot)
    i = j = 0
    val_idx = []
    for k, doc in enumerate(expected):
        if i < len(tr) and tr[i] == doc:
            i += 1
        else:
            assert j < len(va) and va[j] == doc, f"document {k} is in neither split"
            val_idx.append(k)
            j += 1
    assert i == len(tr) and j == len(va)
    return val_idx


@pytest.fixture(scope="module")
def speeches(shared_data):
    files = sorted((shared_data / "us_speeches" / "state_union").glob("19[89]*.txt"))
    return files


def test_shards_equal_tiktoken_encoding_of_documents(speeches, gpt2_ref, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_CHARS", 5000)  # long documents come in many pieces
    monkeypatch.setattr(pipeline, "TASK_CHARS", 20000)
    inputs = [str(f) for f in speeches]
    meta = prepare(inputs, tmp_path / "d", "gpt2", val_docs=3, shard_tokens=20000, workers=2)
    expected = [gpt2_ref.encode_ordinary(f.read_text(encoding="utf-8")) for f in speeches]
    train, val = load_tokens(tmp_path / "d", "train"), load_tokens(tmp_path / "d", "val")
    assert train.dtype == np.uint16
    val_idx = _assign(expected, train, val)
    assert len(val_idx) == 3 and meta["documents"] == {"train": len(speeches) - 3, "val": 3}
    assert meta["tokens"] == {"train": len(train), "val": len(val)}
    assert len(meta["shards"]["train"]) == -(-len(train) // 20000) > 3
    assert meta["vocab_size"] == 50257 and meta["tokenizer"] == {"kind": "gpt2"}
    tok = load_data_tokenizer(tmp_path / "d")
    assert tok.encode_ordinary("Hello world") == gpt2_ref.encode_ordinary("Hello world")
    # one worker writes byte-identical shards
    prepare(inputs, tmp_path / "e", "gpt2", val_docs=3, shard_tokens=20000, workers=1)
    for name in meta["shards"]["train"] + meta["shards"]["val"]:
        assert (tmp_path / "d" / name).read_bytes() == (tmp_path / "e" / name).read_bytes()


def test_split_is_deterministic_disjoint_and_seeded(tmp_path):
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdef"), 8)) for _ in range(600)]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(f'{{"text": "{d}"}}\n' for d in docs))
    expected = [[ord(c) - ord("a") for c in d] for d in docs]  # the char vocabulary is a..f

    def val_of(out, **kw):
        prepare(str(src), tmp_path / out, "char", workers=1, **kw)
        train, val = load_tokens(tmp_path / out), load_tokens(tmp_path / out, "val")
        return _assign(expected, train, val, eot=6)

    a = val_of("a", val_fraction=0.1, seed=1)
    assert a == val_of("b", val_fraction=0.1, seed=1)
    assert 30 < len(a) < 90  # ~60 of 600
    c = val_of("c", val_fraction=0.1, seed=2)
    assert c != a
    assert len(val_of("d", val_docs=17, seed=1)) == 17
    assert load_meta(tmp_path / "d")["split"] == {"method": "val_docs", "val_docs": 17, "seed": 1}


def test_val_tail_char_matches_nanogpt_split(tiny_shakespeare, tmp_path):
    prepare(str(tiny_shakespeare), tmp_path / "sc", "char", val_tail=0.1, workers=1)
    data = tiny_shakespeare.read_text(encoding="utf-8")
    chars = sorted(set(data))  # nanoGPT's shakespeare_char vocabulary, plus <|endoftext|> after it
    stoi = {c: i for i, c in enumerate(chars)}
    n = len(data)
    eot = len(chars)
    want_train = [eot] + [stoi[c] for c in data[: int(n * 0.9)]]
    want_val = [eot] + [stoi[c] for c in data[int(n * 0.9) :]]
    assert load_tokens(tmp_path / "sc").tolist() == want_train
    assert load_tokens(tmp_path / "sc", "val").tolist() == want_val
    assert load_meta(tmp_path / "sc")["vocab_size"] == 66
    assert load_data_tokenizer(tmp_path / "sc").decode(want_val[1:50]) == data[int(n * 0.9) :][:49]


# prepare() that kills itself (SIGKILL: no clean-up runs) the moment a second train shard is done
_KILLED_PREPARE = """
import os, signal, sys
from pathlib import Path
from gpt2lab.data import pipeline

out = Path(sys.argv[-1])

def die_after_two_shards(event):
    if (out / "train_000001.bin").exists():
        os.kill(os.getpid(), signal.SIGKILL)

pipeline.TASK_CHARS = 20000
pipeline.prepare(sys.argv[1:-1], out, "gpt2", val_fraction=0.05, shard_tokens=30000, workers=1,
                 on_event=die_after_two_shards)
"""


def test_killed_prepare_leaves_no_whole_looking_shard_and_resumes(
    speeches, tmp_path, gpt2_ref, monkeypatch
):
    out = tmp_path / "k"
    args = [sys.executable, "-c", _KILLED_PREPARE, *map(str, speeches), str(out)]
    assert subprocess.run(args).returncode == -signal.SIGKILL
    assert (out / "train_000001.bin").exists()
    assert not (out / "meta.json").exists()
    with pytest.raises(DataError, match="meta.json is missing"):
        load_tokens(out)
    for shard in out.glob("*.bin"):  # every name that looks like a shard is whole
        assert read_header(shard)["count"] == 30000
    assert list(out.glob(".*.tmp"))  # the unfinished one is a hidden temp file
    seen: list[events.PrepareEvent] = []
    monkeypatch.setattr(pipeline, "TASK_CHARS", 20000)  # the same settings resume
    prepare(
        [str(f) for f in speeches],
        out,
        "gpt2",
        val_fraction=0.05,
        shard_tokens=30000,
        workers=1,
        on_event=seen.append,
    )
    resumed = seen[0]
    assert isinstance(resumed, events.Resumed) and resumed.task > 0
    assert resumed.tokens["train"] >= 60000  # the two whole shards were kept
    expected = [gpt2_ref.encode_ordinary(f.read_text(encoding="utf-8")) for f in speeches]
    _assign(expected, load_tokens(out), load_tokens(out, "val"))
    assert not list(out.glob(".*.tmp")) and not (out / ".prepare.journal").exists()


def test_rerun_says_complete_and_changed_settings_start_clean(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello there\n")
    seen: list[events.PrepareEvent] = []
    prepare(str(src), tmp_path / "o", "gpt2", workers=1, on_event=seen.append)
    prepare(str(src), tmp_path / "o", "gpt2", workers=1, on_event=seen.append)
    prepare(str(src), tmp_path / "o", "char", workers=1, on_event=seen.append)
    starts = [e for e in seen if not isinstance(e, (events.TaskWritten, events.ValSplitEmpty))]
    assert [type(e).__name__ for e in starts] == [
        "StartedClean", "Finished", "AlreadyComplete", "StartedClean", "Finished"
    ]  # fmt: skip
    assert not starts[0].removed_earlier and starts[3].removed_earlier
    assert starts[4].meta == load_meta(tmp_path / "o")
    assert load_meta(tmp_path / "o")["tokenizer"]["kind"] == "char"


def test_cli_prints_the_events_as_lines(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("hello there\n")
    argv = ["prepare", "-i", str(src), "-o", str(tmp_path / "o"), "--workers", "1"]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0
    assert cli.main([*argv, "--tokenizer", "char"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"starting clean in {tmp_path / 'o'}",
        "warning: the val split is empty; use --val-docs N or --val-tail F for small inputs",
        f"wrote {tmp_path / 'o'}: 4 train tokens (1 documents, 1 shards), 0 val tokens "
        "(0 documents)",
        f"{tmp_path / 'o'} is already complete for these settings; nothing to do "
        "(--force redoes it)",
        f"starting clean in {tmp_path / 'o'} (removed the output of an earlier, different run)",
        "warning: the val split is empty; use --val-docs N or --val-tail F for small inputs",
        f"wrote {tmp_path / 'o'}: 13 train tokens (1 documents, 1 shards), 0 val tokens "
        "(0 documents)",
    ]


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "good.txt").write_text("fine text\n")
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01\x02")
    (tmp_path / "x.jsonl").write_text('{"body": "hi"}\n')
    cases = [
        (["empty.txt"], [], "the input has no text"),
        (["good.txt", "bin.dat"], [], "bin.dat looks binary"),
        (["x.jsonl"], [], "x.jsonl line 1: no field 'text' (has ['body'])"),
        (
            ["good.txt"],
            ["--tokenizer", "char", "--dtype", "uint16", "--val-docs", "5"],
            "--val-docs 5 asks for all 1 documents",
        ),
        (["nope*.txt"], [], "matches no files"),
    ]
    for inputs, extra, message in cases:
        argv = ["prepare", "-i", *[str(tmp_path / i) for i in inputs], "-o", str(tmp_path / "o")]
        assert cli.main(argv + extra) == 1
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("gpt2lab:")]
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "o").exists()


def test_presets_without_network_show_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(
        sources, "_hub_reachable", lambda *a, **kw: False
    )  # offline even with a net
    monkeypatch.setitem(catalog.DATASETS["shakespeare"], "url", "http://127.0.0.1:9/input.txt")
    for name in ("shakespeare", "openwebtext"):
        assert cli.main(["prepare", name, "--out", str(tmp_path / name)]) == 1
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("gpt2lab:")]
        assert len(err) == 1 and "network" in err[0] and f"prepare {name} --input" in err[0], err
        assert not (tmp_path / name).exists()


def test_cli_preset_with_local_input_and_hf_local_files(tiny_shakespeare, tmp_path, capsys):
    part = tmp_path / "input.txt"
    part.write_bytes(tiny_shakespeare.read_bytes()[:200_000])
    out = tmp_path / "s"
    argv = ["prepare", "shakespeare", "-i", str(part), "-o", str(out), "--workers", "2"]
    assert cli.main([*argv, "--shard-size", "20K"]) == 0
    meta = load_meta(out)
    assert meta["split"]["method"] == "val_tail" and len(meta["shards"]["train"]) == 3
    assert (
        meta["command"]
        == f"gpt2lab prepare shakespeare --input {part} --shard-size 20000 --out {out}"
    )
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "one doc"}\n{"text": "two docs"}\n')
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(["prepare", "-i", str(jsonl), "-o", str(a), "--val-docs", "1"]) == 0
    assert (
        cli.main(
            [
                "prepare",
                "--dataset",
                "json",
                "--data-files",
                str(jsonl),
                "-o",
                str(b),
                "--val-docs",
                "1",
            ]
        )
        == 0
    )
    for split in ("train", "val"):
        assert np.array_equal(load_tokens(a, split), load_tokens(b, split))


def test_source_spec_api(tmp_path):
    (tmp_path / "f.txt").write_text("a\n\nb\n\nc\n")
    meta = prepare(
        SourceSpec([str(tmp_path / "f.txt")], split_on_blank_lines=True),
        tmp_path / "o",
        "char",
        val_docs=1,
        workers=1,
    )
    assert meta["documents"] == {"train": 2, "val": 1}


def test_cli_takes_a_path_in_place_of_a_preset(tmp_path):
    (tmp_path / "n.txt").write_text("hello\n\nworld\n")
    argv = ["prepare", str(tmp_path / "n.txt"), "-o", str(tmp_path / "o"), "--tokenizer", "char"]
    assert cli.main([*argv, "--split-on-blank-lines", "--val-docs", "1"]) == 0
    assert load_meta(tmp_path / "o")["documents"] == {"train": 1, "val": 1}


def test_prepare_prints_nothing_and_reports_through_events(tmp_path, capfd):
    (tmp_path / "p.txt").write_text("some text\n" * 100)
    seen: list[events.PrepareEvent] = []
    meta = prepare(str(tmp_path / "p.txt"), tmp_path / "o", "char", workers=2, on_event=seen.append)
    assert capfd.readouterr() == ("", "")  # worker processes included
    assert isinstance(seen[0], events.StartedClean) and seen[-1] == events.Finished(
        tmp_path / "o", meta
    )
    written = [e for e in seen if isinstance(e, events.TaskWritten)]
    assert written[-1] == events.TaskWritten(bytes_read=1000, documents=1, tokens=1001)


def test_progress_bar_only_when_asked(tmp_path, capfd):
    (tmp_path / "p.txt").write_text("some text\n" * 100)
    prepare(str(tmp_path / "p.txt"), tmp_path / "o", "char", workers=1, progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "prepare" in err and "1,001" in err  # the bar: its label, the tokens


def test_a_vocabulary_over_65536_ids_needs_uint32(tmp_path, capsys):
    chars = "".join(chr(0x10000 + i) for i in range(70000))  # 70,000 distinct characters
    (tmp_path / "big.txt").write_text(chars[::-1], encoding="utf-8")
    argv = ["prepare", "-i", str(tmp_path / "big.txt"), "-o", str(tmp_path / "o"), "--tokenizer"]
    assert cli.main([*argv, "char", "--dtype", "uint16"]) == 1
    err = capsys.readouterr().err
    assert "vocabulary of 70001 tokens does not fit --dtype uint16" in err
    assert not (tmp_path / "o").exists()
    assert cli.main([*argv, "char", "--val-fraction", "0"]) == 0
    tokens = load_tokens(tmp_path / "o")
    assert tokens.dtype == np.uint32
    assert tokens.tolist() == [70000, *range(69999, -1, -1)]  # <|endoftext|>, then the text


def test_cli_add_special_saves_gpt2_with_new_ids_beside_the_shards(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("one chat\n\nanother chat\n")
    out = tmp_path / "o"
    argv = ["prepare", str(tmp_path / "c.txt"), "-o", str(out), "--val-docs", "1"]
    assert (
        cli.main([*argv, "--split-on-blank-lines", "--add-special", "<|startoftext|>,<|pad|>"]) == 0
    )
    meta = load_meta(out)
    assert (
        meta["vocab_size"] == 50259 and "--add-special '<|startoftext|>,<|pad|>'" in meta["command"]
    )
    tok = load_data_tokenizer(out)
    assert tok.special_tokens == {
        "<|endoftext|>": 50256,
        "<|startoftext|>": 50257,
        "<|pad|>": 50258,
    }
    argv = ["prepare", str(tmp_path / "c.txt"), "-o", str(tmp_path / "x"), "--tokenizer", "char"]
    assert cli.main([*argv, "--add-special", "<|pad|>"]) == 2
    assert "--tokenizer gpt2" in capsys.readouterr().err
