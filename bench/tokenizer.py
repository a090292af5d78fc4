"""Tokenizer benchmark: encode throughput beside tiktoken and HF `tokenizers`, training time beside
HF's BpeTrainer and the brute-force trainer of the tests. Medians of repeated runs.

    .venv/bin/python bench/tokenizer.py            # full: ~5 MB encode, 5 MB / 8192 training
    .venv/bin/python bench/tokenizer.py --quick    # a short run that checks everything works
    .venv/bin/python bench/tokenizer.py --big 100  # also train 32768 ids on 100 MB (minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CORPORA = [
    "gutenberg_books/pg1342.txt",
    "gutenberg_books/pg1661.txt",
    "gutenberg_books/pg84.txt",
    "gutenberg_books/pg11.txt",
    "wikitext2/wiki.valid.tokens",
    "tinyshakespeare.txt",
    "ptb/ptb.train.txt",
    "dictd_texts/jargon.dict",
    "gutenberg_nltk/melville-moby_dick.txt",
    "gutenberg_nltk/austen-emma.txt",
]


def corpus(n_bytes: int, names: list[str] = CORPORA) -> str:
    """About n_bytes of real UTF-8 text from ../shared/data (repeated if it runs out)."""
    parts, size = [], 0
    while size < n_bytes:
        for name in names:
            text = (DATA / name).read_text("utf-8", errors="replace")
            parts.append(text)
            size += len(text.encode())
            if size >= n_bytes:
                break
    data = "".join(parts).encode()[:n_bytes]
    return data.decode("utf-8", errors="ignore")


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def references(gpt2_dir: Path):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str
    from tokenizers import Tokenizer, models, pre_tokenizers

    from gpt2lab.tokenizer.files import GPT2_SHA256

    os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")  # "" = no cache; files are local anyway
    ranks = data_gym_to_mergeable_bpe_ranks(
        str(gpt2_dir / "vocab.bpe"),
        str(gpt2_dir / "encoder.json"),
        GPT2_SHA256["vocab.bpe"],
        GPT2_SHA256["encoder.json"],
    )
    tt = tiktoken.Encoding(
        "gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: 50256}
    )
    hf = Tokenizer(
        models.BPE.from_file(str(gpt2_dir / "encoder.json"), str(gpt2_dir / "vocab.bpe"))
    )
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tt, hf


def bench_encode(n_bytes: int, repeats: int, rows: list) -> None:
    from gpt2lab.tokenizer import get_tokenizer
    from gpt2lab.tokenizer.files import gpt2_files_dir

    text = corpus(n_bytes)
    mb = len(text.encode()) / 1e6
    docs = [d for d in text.split("\n\n") if d]
    tt, hf = references(gpt2_files_dir())
    fast, py = get_tokenizer("gpt2"), get_tokenizer("gpt2", backend="python")
    want = tt.encode_ordinary(text)
    assert fast.encode_ordinary(text) == want and py.encode_ordinary(text) == want
    threads = os.cpu_count() or 1

    def py_cold():
        py._cache.clear()
        py.encode_ordinary(text)

    single = {
        "gpt2lab tiktoken backend": lambda: fast.encode_ordinary(text),
        "gpt2lab python backend (cold cache)": py_cold,
        "gpt2lab python backend (warm cache)": lambda: py.encode_ordinary(text),
        "tiktoken": lambda: tt.encode_ordinary(text),
        "HF tokenizers": lambda: hf.encode(text),
    }
    batch = {
        "gpt2lab tiktoken backend": lambda: fast.encode_batch(docs, num_threads=threads),
        "gpt2lab python backend": lambda: py.encode_batch(docs, num_threads=threads),
        "tiktoken": lambda: tt.encode_ordinary_batch(docs, num_threads=threads),
        "HF tokenizers": lambda: hf.encode_batch(docs),
    }
    res = {}
    for kind, fns in (("1 thread", single), (f"batch, {threads} threads", batch)):
        for name, fn in fns.items():
            res[kind, name] = mb / median_time(fn, repeats)
            print(f"encode {kind:<18} {name:<38} {res[kind, name]:7.2f} MB/s", flush=True)
    for kind in ("1 thread", f"batch, {threads} threads"):
        ours = res[kind, "gpt2lab tiktoken backend"]
        for peer in ("tiktoken", "HF tokenizers"):
            rows.append(
                (
                    f"encode {mb:.1f} MB, {kind}: gpt2lab (tiktoken backend) vs {peer}",
                    f"{ours:.2f} MB/s",
                    f"{res[kind, peer]:.2f} MB/s",
                    ours / res[kind, peer],
                )
            )
    py_cold_mbs = res["1 thread", "gpt2lab python backend (cold cache)"]
    rows.append(
        (
            f"encode {mb:.1f} MB, 1 thread: gpt2lab python backend (cold) vs tiktoken",
            f"{py_cold_mbs:.2f} MB/s",
            f"{res['1 thread', 'tiktoken']:.2f} MB/s",
            py_cold_mbs / res["1 thread", "tiktoken"],
        )
    )


def hf_train(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train([str(path)], trainer)
    assert tok.get_vocab_size() == vocab_size


def bench_train(
    n_bytes: int, vocab: int, bf_bytes: int, bf_vocab: int, repeats: int, rows: list
) -> None:
    from gpt2lab.tokenizer import GPT2_PATTERN, train_bpe

    sys.path.insert(0, str(REPO / "tests" / "tokenizer"))
    from test_trainer import brute_force_merges  # the plain trainer the tests compare with

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.txt"
        path.write_text(corpus(n_bytes), encoding="utf-8")
        mb = path.stat().st_size / 1e6
        ours = median_time(lambda: train_bpe([path], vocab, progress=False), repeats)
        print(f"train {mb:.1f} MB, vocab {vocab}: gpt2lab {ours:.2f} s", flush=True)
        hf = median_time(lambda: hf_train(path, vocab), repeats)
        print(f"train {mb:.1f} MB, vocab {vocab}: HF BpeTrainer {hf:.2f} s", flush=True)
        rows.append(
            (
                f"train {mb:.1f} MB to {vocab} ids: gpt2lab vs HF BpeTrainer",
                f"{ours:.2f} s",
                f"{hf:.2f} s",
                hf / ours,
            )
        )
    text = corpus(bf_bytes)
    n_merges = bf_vocab - 257
    # Both are single-threaded: CPU time is the figure a loaded machine distorts least.
    ours_wall, ours_cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        tok = train_bpe(text, bf_vocab, progress=False)
        ours_wall.append(time.perf_counter() - t0)
        ours_cpu.append(time.process_time() - c0)
    t0, c0 = time.perf_counter(), time.process_time()
    brute = brute_force_merges(text, GPT2_PATTERN, n_merges)
    bf, bf_cpu = time.perf_counter() - t0, time.process_time() - c0
    assert brute == [(tok.ranks[a], tok.ranks[b]) for a, b in tok.merges], "merges differ"
    ours, ours_c = statistics.median(ours_wall), statistics.median(ours_cpu)
    print(
        f"train {bf_bytes / 1e6:.1f} MB, vocab {bf_vocab}: gpt2lab {ours:.2f} s "
        f"({ours_c:.2f} s CPU), brute force {bf:.2f} s ({bf_cpu:.2f} s CPU), identical merges",
        flush=True,
    )
    rows.append(
        (
            f"train {bf_bytes / 1e6:.1f} MB to {bf_vocab} ids: gpt2lab vs brute force",
            f"{ours:.2f} s",
            f"{bf:.2f} s",
            bf / ours,
        )
    )
    rows.append(
        (
            f"train {bf_bytes / 1e6:.1f} MB to {bf_vocab} ids: same, CPU time",
            f"{ours_c:.2f} s",
            f"{bf_cpu:.2f} s",
            bf_cpu / ours_c,
        )
    )


def bench_big(n_mb: int, vocab: int, rows: list) -> None:
    from gpt2lab.tokenizer import train_bpe

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.txt"
        # every plain-text file of ../shared/data (about 40 MB), repeated up to the size
        names = sorted(
            str(f.relative_to(DATA))
            for f in DATA.rglob("*")
            if f.is_file() and f.suffix not in (".gz", ".tgz", ".md")
        )
        path.write_text(corpus(n_mb * 1_000_000, names), encoding="utf-8")
        t0 = time.perf_counter()
        train_bpe([path], vocab, progress=None)
        dt = time.perf_counter() - t0
        print(f"train {n_mb} MB to {vocab} ids: gpt2lab {dt:.1f} s", flush=True)
        rows.append((f"train {n_mb} MB to {vocab} ids: gpt2lab", f"{dt:.1f} s", "-", None))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    p.add_argument("--big", type=int, metavar="MB", help="also train 32768 ids on this many MB")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args()
    rows: list = []
    if args.quick:
        bench_encode(500_000, 1, rows)
        bench_train(500_000, 1024, 100_000, 320, 1, rows)
    else:
        bench_encode(5_000_000, 3, rows)
        bench_train(5_000_000, 8192, 1_000_000, 512, 3, rows)
    if args.big:
        bench_big(args.big, 32768, rows)
    print("\n| measurement | gpt2lab | peer | gpt2lab speed / peer speed |\n|---|---:|---:|---:|")
    for name, ours, peer, ratio in rows:
        print(f"| {name} | {ours} | {peer} | {'-' if ratio is None else f'{ratio:.2f}x'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
