"""The real CLI against hostile and unlucky inputs: every failure is one line, nothing is lost.

Each case runs `python -m gpt2lab ...` in a subprocess and asserts its exit code (1 or 2), exactly
one `gpt2lab: error:` line on stderr and no traceback; where it applies, that the user's files
are byte for byte what they were, that nothing half-written looks whole, and that nothing ran
from a file. The cases are set up first, then run a few at a time (most import torch, ~2 s
each), then checked one test each. docs/reliability.md lists which case holds which promise.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "GPT2LAB_DEBUG": "0",
}
Starter = Callable[[], Callable[[], None]]  # starts a helper process/thread, returns its stop
WORDS = "the king shall speak of love and death to his fair lady in the night while we".split()


def gpt2lab(*args: str, stdin=None, preexec_fn=None, timeout: float = 120, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "gpt2lab", *map(str, args)],
        env=ENV,
        capture_output=True,
        text=True,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        preexec_fn=preexec_fn,
        timeout=timeout,
        cwd=cwd,
    )


# The CLI's process, started once: it imports torch and every command, then forks one child per
# command line, which sets its limits and standard streams and runs `cli.main(argv)` - what
# `python -m gpt2lab` runs - as a process of its own (its own PID, locks, limits and exit code).
ZYGOTE = r"""
import importlib, json, os, resource, signal, sys, traceback
import torch
from gpt2lab import cli
for module, _, _ in cli.COMMANDS.values():
    importlib.import_module(module)

def child(job):
    code = 99
    try:
        signal.alarm(job.get("timeout", 120))
        if job.get("fsize"):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
        if job.get("as"):
            resource.setrlimit(resource.RLIMIT_AS, (job["as"], job["as"]))
        os.dup2(os.open(job.get("stdin") or os.devnull, os.O_RDONLY), 0)
        for fd, key in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(job[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        code = cli.main(job["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)

for line in sys.stdin:
    jobs, running, codes = json.loads(line), {}, {}
    queue = list(jobs)
    while queue or running:
        while queue and len(running) < 3:
            job = queue.pop(0)
            pid = os.fork()
            if pid == 0:
                child(job)
            running[pid] = job["name"]
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    print(json.dumps(codes), flush=True)
"""


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


class CLI:
    """Runs command lines through the zygote: `run_many({name: job})`, `run(*argv)`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=ENV, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        self.count = 0

    def run_many(self, jobs: dict[str, dict]) -> dict[str, Ran]:
        batch = []
        for name, job in jobs.items():
            self.count += 1
            out = self.workdir / f"{self.count}"
            batch.append({**job, "name": name, "argv": [str(a) for a in job["argv"]],
                          "stdout": f"{out}.out", "stderr": f"{out}.err"})  # fmt: skip
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(batch) + "\n")
        self.proc.stdin.flush()
        codes = json.loads(self.proc.stdout.readline())
        return {
            j["name"]: Ran(codes[j["name"]], Path(j["stdout"]).read_text(errors="replace"),
                           Path(j["stderr"]).read_text(errors="replace"))
            for j in batch
        }  # fmt: skip

    def run(self, *argv, **job) -> Ran:
        return self.run_many({"one": {"argv": list(argv), **job}})["one"]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cli_proc(tmp_path_factory):
    runner = CLI(tmp_path_factory.mktemp("cli"))
    yield runner
    runner.close()


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file below `path` (or of `path`), by relative name."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path) if p != path else p.name): _sha(p) for p in files}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


class Payload:
    """Unpickling this would create a file: the proof that nothing ran from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---- a world of small real artefacts: text, a data directory, a run, a HF directory ----------


@dataclass
class World:
    root: Path
    text: Path
    data: Path
    run: Path
    hf: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from gpt2lab.checkpoint.hf import save_hf
    from gpt2lab.checkpoint.load import load_model
    from gpt2lab.config import resolve
    from gpt2lab.data import prepare
    from gpt2lab.train import train

    root = tmp_path_factory.mktemp("hostile")
    rng = random.Random(0)
    text = root / "input.txt"
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(600)]
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = root / "data"
    prepare(str(text), data, "char", val_tail=0.1, workers=1)
    cfg = resolve(
        overrides=[
            f"data.dir={data}",
            *"model.block_size=16 model.n_layer=1 model.n_head=2 model.n_embd=16".split(),
            *"train.max_steps=2 train.micro_batch_size=2 train.eval_steps=1".split(),
            *"train.eval_interval=2 train.checkpoint_interval=2 train.log_interval=1".split(),
            *"train.device=cpu train.dtype=float32 train.warmup_steps=0".split(),
        ]
    )
    run = root / "run"
    train(cfg, run)
    model, tok = load_model(run)
    hf = root / "hf"
    save_hf(model, hf, tokenizer=tok)
    return World(root, text, data, run, hf)


# ---- the cases ----------------------------------------------------------------------------------


@dataclass
class Case:
    """One hostile input: the command, the codes and words expected, and what must hold after."""

    argv: list[str]
    codes: tuple[int, ...] = (1, 2)
    words: tuple[str, ...] = ()
    keep: list[Path] = field(default_factory=list)  # user files that must survive byte for byte
    check: Callable[[Ran], None] | None = None
    stdin: str | None = None  # a file for standard input
    fsize: int | None = None  # a real file-size limit (RLIMIT_FSIZE; SIGXFSZ ignored: EFBIG)
    address_space: int | None = None  # RLIMIT_AS
    background: Starter | None = None  # starts a helper, returns stop


CASES: dict[str, Callable[[World, Path], Case]] = {}


def case(fn: Callable[[World, Path], Case]) -> Callable[[World, Path], Case]:
    CASES[fn.__name__] = fn
    return fn


def user_dir(path: Path) -> Path:
    """A project's own directory: files named like gpt2lab's, which gpt2lab did not write."""
    path.mkdir(parents=True)
    (path / "meta.json").write_text('{"project": "mine"}\n')
    (path / "tokenizer").mkdir()
    (path / "tokenizer" / "notes.txt").write_text("my notes\n")
    (path / "train_000000.bin").write_bytes(b"my binary")
    return path


# ownership of output directories and files


@case
def prepare_into_a_users_directory(w: World, t: Path) -> Case:
    out = user_dir(t / "project")
    return Case(["prepare", w.text, "--tokenizer", "char", "--out", out], (2,), ("no .gpt2lab",),
                keep=[out])  # fmt: skip


@case
def prepare_force_into_a_users_directory(w: World, t: Path) -> Case:
    out = user_dir(t / "project")
    argv = ["prepare", w.text, "--tokenizer", "char", "--out", out, "--force"]
    return Case(argv, (2,), ("did not create",), keep=[out])


@case
def prepare_out_inside_the_input(w: World, t: Path) -> Case:
    src = t / "books"
    src.mkdir()
    (src / "a.txt").write_text("some text\n" * 50)
    return Case(["prepare", "--input", src, "--tokenizer", "char", "--out", src / "data"], (2,),
                ("inside the input",), keep=[src],
                check=lambda r: _absent(src / "data"))  # fmt: skip


@case
def prepare_out_containing_the_input(w: World, t: Path) -> Case:
    src = t / "d"
    src.mkdir()
    (src / "a.txt").write_text("some text\n" * 50)
    argv = ["prepare", src / "a.txt", "--tokenizer", "char", "--out", src]
    return Case(argv, (2,), ("contains the input",), keep=[src])


@case
def prepare_force_over_a_training_run(w: World, t: Path) -> Case:
    """gpt2lab wrote the run, but a prepare --force may not clear another command's output."""
    run = t / "run"
    shutil.copytree(w.run, run)
    argv = ["prepare", w.text, "--tokenizer", "char", "--out", run, "--force"]
    return Case(argv, (2,), ("output of `gpt2lab train`",), keep=[run])


@case
def prepare_too_many_workers(w: World, t: Path) -> Case:
    argv = ["prepare", w.text, "--tokenizer", "char", "--out", t / "o", "--workers", "100000"]
    return Case(argv, (2,), ("--workers",), check=lambda r: _absent(t / "o"))


@case
def prepare_a_jsonl_record_over_the_limit(w: World, t: Path) -> Case:
    src = t / "big.jsonl"
    src.write_text('{"text": "ok"}\n{"text": "' + "x" * 5000 + '"}\n')
    argv = ["prepare", src, "--out", t / "o", "--tokenizer", "char", "--max-record-bytes", "1K"]
    return Case(argv, (1,), ("line 2", "--max-record-bytes"), keep=[src],
                check=lambda r: _absent(t / "o"))  # fmt: skip


@case
def prepare_deeply_nested_json(w: World, t: Path) -> Case:
    src = t / "deep.jsonl"
    src.write_text('{"text": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    return Case(["prepare", src, "--out", t / "o", "--tokenizer", "char"], (1,), ("line 1",))


@case
def prepare_full_disk(w: World, t: Path) -> Case:
    """A real file-size limit: the write fails with EFBIG; nothing looks whole; a rerun resumes."""
    out = t / "o"
    argv = ["prepare", w.text, "--tokenizer", "char", "--out", out, "--shard-size", "2K"]

    def check(r):
        assert "file too large" in r.stderr and "resum" in r.stderr
        assert not (out / "meta.json").exists()  # a directory without meta.json is never data
        again = gpt2lab(*argv)
        assert again.returncode == 0, again.stderr
        assert "resuming" in again.stderr
        assert json.loads((out / "meta.json").read_text())["tokens"]["train"] > 0

    return Case(argv, (1,), ("writing token shards",), check=check, fsize=3000)


@case
def train_out_is_a_file(w: World, t: Path) -> Case:
    f = t / "notes.txt"
    f.write_text("precious\n")
    return Case(["train", "--data", w.data, "--out", f], (2,), ("is a file",), keep=[f])


@case
def train_overwrite_a_users_directory(w: World, t: Path) -> Case:
    out = user_dir(t / "project")
    argv = ["train", "--data", w.data, "--out", out, "--overwrite"]
    return Case(argv, (2,), ("did not create",), keep=[out])


@case
def train_out_inside_the_data(w: World, t: Path) -> Case:
    data = t / "data"
    shutil.copytree(w.data, data)
    argv = ["train", "--data", data, "--out", data / "run"]
    return Case(argv, (2,), ("inside the input",), keep=[data])


@case
def convert_into_a_users_directory(w: World, t: Path) -> Case:
    out = user_dir(t / "project")
    return Case(["convert", w.run, out], (2,), ("did not create",), keep=[out])


@case
def convert_over_a_users_gguf(w: World, t: Path) -> Case:
    f = t / "model.gguf"
    f.write_bytes(b"GGUF my own model")
    return Case(["convert", w.run, f], (2,), ("gpt2lab did not write it",), keep=[f])


@case
def convert_into_its_own_input(w: World, t: Path) -> Case:
    run = t / "run"
    shutil.copytree(w.run, run)
    return Case(["convert", run, run / "m.onnx"], (2,), ("inside the input",), keep=[run])


@case
def sample_out_into_a_users_directory(w: World, t: Path) -> Case:
    out = user_dir(t / "project")
    (out / "sample_00000.txt").write_text("my sample\n")
    argv = ["sample", "--model", w.run, "-m", "2", "--out", out]
    return Case(argv, (2,), ("did not create",), keep=[out])


@case
def tokenizer_train_into_a_users_directory(w: World, t: Path) -> Case:
    out = user_dir(t / "project")
    argv = ["tokenizer", "train", w.text, "--vocab-size", "300", "--out", out]
    return Case(argv, (2,), ("did not create",), keep=[out])


@case
def plot_over_a_users_file(w: World, t: Path) -> Case:
    f = t / "figure.png"
    f.write_bytes(b"\x89PNG my drawing")
    return Case(["plot", w.run, "--out", f], (2,), ("gpt2lab did not write it",), keep=[f])


@case
def inspect_over_a_users_file(w: World, t: Path) -> Case:
    f = t / "figure.png"
    f.write_bytes(b"\x89PNG my drawing")
    argv = ["inspect", "next", "--model", w.run, "-p", "the king", "--out", f]
    return Case(argv, (2,), ("gpt2lab did not write it",), keep=[f])


# one writer at a time


def _holder(
    directory: Path, command: str = "train"
) -> tuple[Callable[[], Callable[[], None]], list]:
    """A second real process holding `directory`'s lock (as a command would) until stopped."""
    pid: list[int] = []

    def start() -> Callable[[], None]:
        code = textwrap.dedent(
            f"""
            import sys, time
            from gpt2lab.outdir import claim_output_dir
            claim_output_dir({str(directory)!r}, {command!r})
            print("held", flush=True)
            time.sleep(120)
            """
        )
        p = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE,
                             text=True)  # fmt: skip
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        pid.append(p.pid)

        def stop() -> None:
            p.kill()
            p.wait()

        return stop

    return start, pid


def _busy(directory: Path, command: str, argv: list) -> Case:
    """`argv` writes `directory` while another real process holds it as `command` would."""
    start, pid = _holder(directory, command)
    return Case(argv, (1,), ("another gpt2lab process",), background=start,
                check=lambda r: _names_pid(r, pid))  # fmt: skip


@case
def train_while_another_process_writes_the_run(w: World, t: Path) -> Case:
    run = t / "run"
    shutil.copytree(w.run, run)
    return _busy(run, "train", ["train", "--out", run, "--resume", "--train.max_steps=4"])


@case
def prepare_while_another_process_writes_the_data(w: World, t: Path) -> Case:
    argv = ["prepare", w.text, "--tokenizer", "char", "--out", t / "o"]
    return _busy(t / "o", "prepare", argv)


@case
def convert_while_another_process_writes_the_directory(w: World, t: Path) -> Case:
    return _busy(t / "hf", "convert", ["convert", w.run, t / "hf"])


def _names_pid(r: Ran, pid: list[int]) -> None:
    assert f"PID {pid[0]}" in r.stderr, r.stderr


# causes: configs, model files, token ids


@case
def config_int_of_1e999(w: World, t: Path) -> Case:
    return Case(["config", "--train.max_steps=1e999"], (2,), ("--train.max_steps",))


@case
def train_checkpoint_interval_zero(w: World, t: Path) -> Case:
    argv = ["train", "--data", w.data, "--out", t / "r", "--train.checkpoint_interval=0"]
    return Case(argv, (2,), ("--train.checkpoint_interval",), check=lambda r: _absent(t / "r"))


@case
def config_file_with_wrong_types(w: World, t: Path) -> Case:
    f = t / "bad.toml"
    f.write_text("[train]\nfreeze = 5\nmax_steps = inf\n")
    return Case(["config", "--config", f], (2,), ("train.",), keep=[f])


@case
def eval_config_with_an_infinite_value(w: World, t: Path) -> Case:
    argv = ["eval", "perplexity", "--model", w.run, "--data", w.text, "--eval.batch_size=1e999"]
    return Case(argv, (2,), ("eval.batch_size",))


@case
def hf_config_with_a_string_n_head(w: World, t: Path) -> Case:
    hf = t / "hf"
    shutil.copytree(w.hf, hf)
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "n_head": "1"}))
    return Case(["convert", hf, t / "out"], (1,), ("n_head='1'",), keep=[hf],
                check=lambda r: _absent(t / "out"))  # fmt: skip


@case
def hf_config_with_a_huge_vocabulary(w: World, t: Path) -> Case:
    hf = t / "hf"
    shutil.copytree(w.hf, hf)
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "vocab_size": 2_000_000_000}))
    argv = ["sample", "--model", hf, "-p", "the", "-m", "2"]
    # refused from the config and the weights' shapes, before a 2e9-row table is allocated
    return Case(argv, (1,), ("vocab_size",), keep=[hf], address_space=24 << 30)


@case
def pickle_that_would_run_code(w: World, t: Path) -> Case:
    hf = t / "hf"
    shutil.copytree(w.hf, hf)
    (hf / "model.safetensors").unlink()
    marker = t / "pwned"
    with open(hf / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model": Payload(marker)}, f)
    return Case(["convert", hf, t / "out"], (1,), ("refused",), keep=[hf],
                check=lambda r: _absent(marker))  # fmt: skip


@case
def optimizer_pickle_that_would_run_code(w: World, t: Path) -> Case:
    run = t / "run"
    shutil.copytree(w.run, run)
    marker = t / "pwned"
    (ckpt,) = sorted((run / "ckpt").iterdir())
    with open(ckpt / "optimizer.pt", "wb") as f:
        pickle.dump(Payload(marker), f)
    argv = ["train", "--out", run, "--resume", "--train.max_steps=4"]
    return Case(argv, (1,), ("refused",), check=lambda r: _absent(marker))


@case
def shard_with_token_ids_beyond_the_vocabulary(w: World, t: Path) -> Case:
    import numpy as np

    from gpt2lab.data import shards

    data = t / "data"
    shutil.copytree(w.data, data)
    shard = data / "train_000000.bin"
    header = shards.read_header(shard)
    tokens = np.fromfile(shard, dtype=header["dtype"], offset=shards.HEADER_BYTES)
    tokens[5] = 60000
    shard.write_bytes(shards.pack_header(header["dtype"], header["vocab_size"], len(tokens))
                      + tokens.tobytes())  # fmt: skip
    argv = ["train", "--data", data, "--out", t / "r", "--train.max_steps=1"]
    words = ("token id 60000", f"{header['vocab_size']} tokens")
    return Case(argv, (1,), words, check=lambda r: _absent(t / "r"))


@case
def tokenizer_larger_than_the_model(w: World, t: Path) -> Case:
    from gpt2lab.tokenizer import get_tokenizer

    run = t / "run"
    shutil.copytree(w.run, run)
    shutil.rmtree(run / "tokenizer")
    get_tokenizer("char", text="".join(map(chr, range(32, 400)))).save(run / "tokenizer")
    return Case(["sample", "--model", run, "-p", "the"], (1,), ("tokens but the model",))


@case
def train_full_disk(w: World, t: Path) -> Case:
    run = t / "run"
    shutil.copytree(w.run, run)
    before = sorted((run / "ckpt").iterdir())

    def check(r):
        assert "checkpoint" in r.stderr and "intact" in r.stderr and "--resume" in r.stderr
        after = sorted(p.name for p in (run / "ckpt").iterdir())
        assert after == [p.name for p in before]  # no half-written step_* beside it
        assert (run / "latest").read_text().strip() == f"ckpt/{before[-1].name}"

    argv = ["train", "--out", run, "--resume", "--train.max_steps=4", "--no-plot"]
    size = max(p.stat().st_size for p in before[-1].iterdir())
    return Case(argv, (1,), ("stopped",), check=check, fsize=size // 2)


# size before allocation, bounded reads


@case
def sample_a_trillion_tokens(w: World, t: Path) -> Case:
    return Case(["sample", "--model", w.run, "-m", "1000000000000"], (1,), ("--max-new-tokens",))


@case
def eval_a_huge_batch(w: World, t: Path) -> Case:
    argv = ["eval", "perplexity", "--model", w.run, "--data", w.text, "--batch-size", "10000000000"]
    return Case(argv, (1,), ("eval.batch_size",))


@case
def sample_a_prompt_file_that_never_ends(w: World, t: Path) -> Case:
    return Case(["sample", "--model", w.run, "--prompt-file", "/dev/zero"], (1,), ("never ends",))


@case
def sample_a_fifo_that_never_ends(w: World, t: Path) -> Case:
    fifo = t / "fifo"
    os.mkfifo(fifo)

    def start() -> Callable[[], None]:
        stop = threading.Event()

        def feed() -> None:
            try:
                with open(fifo, "wb") as f:
                    while not stop.is_set():
                        f.write(b"the king " * 4096)
            except OSError:  # the reader went away
                pass

        th = threading.Thread(target=feed, daemon=True)
        th.start()
        return stop.set

    argv = ["sample", "--model", w.run, "--prompt-file", fifo]
    return Case(argv, (1,), ("never ends",), background=start)


# paths from files


@case
def latest_pointing_outside_the_run(w: World, t: Path) -> Case:
    run = t / "run"
    shutil.copytree(w.run, run)
    (run / "latest").write_text("../../../../etc\n")
    return Case(["sample", "--model", run, "-m", "2"], (1,), ("outside",))


@case
def state_json_tokenizer_outside_the_run(w: World, t: Path) -> Case:
    run = t / "run"
    shutil.copytree(w.run, run)
    (ckpt,) = sorted((run / "ckpt").iterdir())
    state = json.loads((ckpt / "state.json").read_text())
    outside = t / "elsewhere"
    shutil.copytree(run / "tokenizer", outside)
    (ckpt / "state.json").write_text(json.dumps({**state, "tokenizer": str(outside)}))
    return Case(["sample", "--model", run, "-m", "2"], (1,), ("outside",))


# everything else escaping the library


@case
def demo_input_missing(w: World, t: Path) -> Case:
    argv = ["demo", "--input", t / "missing.txt", "--out", t / "d", "--minutes", "0.01"]
    return Case(argv, (1, 2), ("missing.txt",), check=lambda r: _absent(t / "d"))


@case
def config_file_not_utf8(w: World, t: Path) -> Case:
    f = t / "bad.toml"
    f.write_bytes(b"[train]\nlr = 1\n# \xff\xfe\n")
    return Case(["config", "--config", f], (2,), ("bad.toml",), keep=[f])


@case
def tokenizer_encode_a_missing_file(w: World, t: Path) -> Case:
    return Case(["tokenizer", "encode", t / "nope.txt"], (1,), ("nope.txt",))


@case
def inspect_an_empty_model_directory(w: World, t: Path) -> Case:
    (t / "empty").mkdir()
    return Case(["inspect", "next", "--model", t / "empty", "-p", "x"], (1,), ("empty",))


@case
def plot_a_directory_without_metrics(w: World, t: Path) -> Case:
    (t / "nothing").mkdir()
    return Case(["plot", t / "nothing"], (1,), ("metrics.jsonl",))


@case
def data_meta_json_of_the_wrong_shape(w: World, t: Path) -> Case:
    data = t / "data"
    shutil.copytree(w.data, data)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "shards": "train_000000.bin"}))
    return Case(["train", "--data", data, "--out", t / "r"], (1,), ("meta.json",))


# post-training, chat and serving (sft, dpo, reward, rlhf, the demos, chat, serve)

SFT_RECORD = {"prompt": "the king", "completion": " shall speak"}
PAIR_RECORD = {"prompt": "the king", "chosen": " shall speak", "rejected": " of death"}


def _jsonl(path: Path, record: dict, n: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for _ in range(n)), encoding="utf-8")
    return path


def _policy(w: World) -> Path:
    """A tiny character model whose vocabulary holds letters and punctuation (the plain chat
    template's "User:" / "Assistant:" included), made once."""
    path = w.root / "policy"
    if not path.exists():
        import string

        import torch

        from gpt2lab.commands.convert import save_native
        from gpt2lab.config import GPTConfig
        from gpt2lab.model import GPT
        from gpt2lab.tokenizer.char import CharTokenizer

        tok = CharTokenizer.from_text(string.ascii_letters + string.digits + " .,:;!?'\n")
        torch.manual_seed(0)
        cfg = GPTConfig(block_size=32, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16,
                        pad_vocab_to=1)  # fmt: skip
        save_native(GPT(cfg).eval(), tok, path)
    return path


def _reward_fn(t: Path) -> tuple[Path, Path]:
    """A reward-function file that leaves a mark if it is ever imported, and the mark."""
    mark = t / "reward_fn_ran"
    fn = t / "fn.py"
    fn.write_text(f"open({str(mark)!r}, 'w').close()\ndef score(p, c):\n    return 1.0\n")
    return fn, mark


def _rlhf_argv(w: World, t: Path, out: Path, prompts: Path | None = None) -> tuple[list, Path]:
    fn, mark = _reward_fn(t)
    if prompts is None:
        prompts = t / "prompts.txt"
        prompts.write_text("the king\nof love\n", encoding="utf-8")
    argv = ["rlhf", "--policy", _policy(w), "--reward-fn", f"{fn}:score", "--prompts", prompts,
            "--out", out, "--no-plot", "--rl.max_new_tokens=4", "--rl.batch_size=2"]  # fmt: skip
    return argv, mark


@case
def sft_into_a_users_directory(w: World, t: Path) -> Case:
    out, data = user_dir(t / "project"), _jsonl(t / "pc.jsonl", SFT_RECORD)
    argv = ["sft", "--init-from", w.run, "--data", data, "--out", out, "--template", "plain"]
    return Case(argv, (2,), ("did not create",), keep=[out, data])


@case
def sft_out_containing_the_data(w: World, t: Path) -> Case:
    data = _jsonl(t / "o" / "pc.jsonl", SFT_RECORD)
    argv = ["sft", "--init-from", w.run, "--data", data, "--out", t / "o", "--template", "plain"]
    return Case(argv, (2,), ("contains the input",), keep=[t / "o"])


@case
def sft_a_jsonl_record_nested_too_deep(w: World, t: Path) -> Case:
    data = t / "deep.jsonl"
    data.write_text('{"prompt": ' + "[" * 200_000 + "]" * 200_000 + ', "completion": "x"}\n')
    argv = ["sft", "--init-from", w.run, "--data", data, "--out", t / "r", "--template", "plain"]
    return Case(argv, (1, 2), ("deep.jsonl",), keep=[data], check=lambda r: _absent(t / "r"))


@case
def dpo_overwrite_a_users_directory(w: World, t: Path) -> Case:
    out, data = user_dir(t / "project"), _jsonl(t / "pairs.jsonl", PAIR_RECORD)
    argv = ["dpo", "--init-from", w.run, "--data", data, "--out", out, "--overwrite"]
    return Case(argv, (2,), ("did not create",), keep=[out, data])


@case
def dpo_out_is_the_data(w: World, t: Path) -> Case:
    data = _jsonl(t / "pairs.jsonl", PAIR_RECORD)
    argv = ["dpo", "--init-from", w.run, "--data", data, "--out", data]
    return Case(argv, (2,), ("is the input",), keep=[data])


@case
def reward_out_containing_the_data(w: World, t: Path) -> Case:
    data = _jsonl(t / "o" / "pairs.jsonl", PAIR_RECORD)
    argv = ["reward", "--init-from", w.run, "--data", data, "--out", t / "o"]
    return Case(argv, (2,), ("contains the input",), keep=[t / "o"])


@case
def reward_into_a_users_directory(w: World, t: Path) -> Case:
    out, data = user_dir(t / "project"), _jsonl(t / "pairs.jsonl", PAIR_RECORD)
    argv = ["reward", "--init-from", w.run, "--data", data, "--out", out]
    return Case(argv, (2,), ("did not create",), keep=[out, data])


@case
def rlhf_overwrite_a_users_directory(w: World, t: Path) -> Case:
    out = user_dir(t / "project")
    argv, mark = _rlhf_argv(w, t, out)
    return Case([*argv, "--overwrite"], (2,), ("did not create",), keep=[out],
                check=lambda r: _absent(mark))  # fmt: skip


@case
def rlhf_out_containing_the_prompts(w: World, t: Path) -> Case:
    (t / "o").mkdir()
    prompts = t / "o" / "prompts.txt"
    prompts.write_text("the king\n", encoding="utf-8")
    argv, mark = _rlhf_argv(w, t, t / "o", prompts)
    return Case(argv, (2,), ("contains the input",), keep=[t / "o"],
                check=lambda r: _absent(mark))  # fmt: skip


@case
def rlhf_out_inside_the_policy(w: World, t: Path) -> Case:
    policy = t / "policy"
    shutil.copytree(w.run, policy)
    argv, _ = _rlhf_argv(w, t, policy / "rl")
    argv[argv.index("--policy") + 1] = policy
    return Case(argv, (2,), ("inside the input",), keep=[policy])


@case
def rlhf_while_another_process_writes_the_run(w: World, t: Path) -> Case:
    argv, _ = _rlhf_argv(w, t, t / "r")
    return _busy(t / "r", "rlhf", argv)


@case
def rlhf_with_no_prompts_leaves_nothing(w: World, t: Path) -> Case:
    (t / "empty.txt").write_text("")
    argv, _ = _rlhf_argv(w, t, t / "r", t / "empty.txt")
    return Case(argv, (1, 2), ("prompt",), check=lambda r: _absent(t / "r"))


@case
def posttrain_demo_into_a_users_directory(w: World, t: Path) -> Case:
    out = user_dir(t / "project")
    argv = ["posttrain-demo", "--model", w.run, "--out", out, "--overwrite"]
    return Case(argv, (2,), ("did not create",), keep=[out])


@case
def rlhf_demo_over_a_users_sft_directory(w: World, t: Path) -> Case:
    """A marked demo directory whose `sft` entry is the user's: not gpt2lab's to replace."""
    out = t / "demo"
    claimed = subprocess.run([sys.executable, "-c", "from gpt2lab.outdir import claim_output_dir; "
                              f"claim_output_dir({str(out)!r}, 'rlhf-demo')"], env=ENV)  # fmt: skip
    assert claimed.returncode == 0
    user_dir(out / "sft")
    return Case(["rlhf-demo", "--out", out], (2,), ("did not write",), keep=[out / "sft"])


@case
def serve_a_config_with_a_huge_vocabulary(w: World, t: Path) -> Case:
    hf = t / "hf"
    shutil.copytree(w.hf, hf)
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "vocab_size": 2_000_000_000}))
    # sized from config.json before anything is loaded, under a 24 GiB address-space limit
    argv = ["serve", "--model", hf, "--port", "0"]
    return Case(argv, (1,), ("vocab_size",), keep=[hf], address_space=24 << 30)


@case
def serve_a_batch_whose_cache_cannot_fit(w: World, t: Path) -> Case:
    argv = ["serve", "--model", w.run, "--port", "0", "--max-batch", "100000000000"]
    return Case(argv, (1,), ("--max-batch",))


@case
def reward_score_with_a_model_that_is_not_one(w: World, t: Path) -> Case:
    texts = t / "texts.txt"
    texts.write_text("a joyful day\n")
    return Case(["reward", "score", "--model", w.run, texts], (1,), ("reward-model",),
                keep=[texts])  # fmt: skip


@case
def reward_score_a_garbage_state_json(w: World, t: Path) -> Case:
    rm = _reward_dir(w, t)
    latest = (rm / "latest").read_text().strip()
    (rm / latest / "state.json").write_text("[1, 2")
    texts = t / "texts.txt"
    texts.write_text("a joyful day\n")
    return Case(["reward", "score", "--model", rm, texts], (1,), ("rm",), keep=[rm])


def _reward_dir(w: World, t: Path) -> Path:
    """A copy of the run whose weights carry a reward head (`score.weight`)."""
    from safetensors.torch import load_file, save_file

    rm = t / "rm"
    shutil.copytree(w.run, rm)
    weights = rm / (rm / "latest").read_text().strip() / "model.safetensors"
    tensors = load_file(weights)
    tensors["score.weight"] = tensors["transformer.wte.weight"][:1].clone()
    save_file(tensors, weights)
    return rm


@case
def reward_score_stdin_that_never_ends(w: World, t: Path) -> Case:
    argv = ["reward", "score", "--model", _reward_dir(w, t)]
    return Case(argv, (1,), ("never ends",), stdin="/dev/zero")


@case
def chat_with_a_model_without_a_template(w: World, t: Path) -> Case:
    return Case(["chat", "--model", w.run], (2,), ("no chat template",))


@case
def chat_a_line_that_never_ends(w: World, t: Path) -> Case:
    argv = ["chat", "--model", _policy(w), "--template", "plain"]
    return Case(argv, (1,), ("never ends",), stdin="/dev/zero")


@case
def chat_a_missing_model(w: World, t: Path) -> Case:
    return Case(["chat", "--model", t / "nowhere"], (1, 2), ("nowhere",))


@case
def sample_chat_file_that_never_ends(w: World, t: Path) -> Case:
    argv = ["sample", "--model", w.run, "--template", "plain", "--chat", "/dev/zero"]
    return Case(argv, (1,), ("--chat",))


def _absent(path: Path) -> None:
    assert not path.exists(), f"{path} exists"


# ---- running them ------------------------------------------------------------------------------


@dataclass
class Outcome:
    case: Case
    result: Ran
    before: dict[Path, dict[str, str]]


@pytest.fixture(scope="module")
def outcomes(world: World, cli_proc: CLI, tmp_path_factory) -> dict[str, Outcome]:
    """Set every case up (helpers holding locks or feeding FIFOs started), run the command lines
    three at a time, stop the helpers, and keep what each case left."""
    prepared = {}
    for name, make in CASES.items():
        c = make(world, tmp_path_factory.mktemp(name[:40]))
        prepared[name] = (c, {p: digest(p) for p in c.keep})
    stops = [c.background() for c, _ in prepared.values() if c.background]
    try:
        jobs = {
            name: {"argv": c.argv, "stdin": c.stdin, "fsize": c.fsize, "as": c.address_space}
            for name, (c, _) in prepared.items()
        }
        results = cli_proc.run_many(jobs)
    finally:
        for stop in stops:
            stop()
    return {n: Outcome(c, results[n], before) for n, (c, before) in prepared.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_one_line_and_harmless(outcomes, name):
    o = outcomes[name]
    r, c = o.result, o.case
    lines = r.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("gpt2lab: error:")]
    assert "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1, r.stderr
    assert r.returncode in c.codes, (r.returncode, r.stderr)
    for word in c.words:
        assert word in errors[0], (word, errors[0])
    for path, before in o.before.items():
        assert digest(path) == before, f"{path} changed"
    if c.check is not None:
        c.check(r)


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


# ---- what must work: the same mechanisms do not get in the way ---------------------------------


def test_force_removes_only_what_gpt2lab_wrote(world, tmp_path):
    out = tmp_path / "data"
    base = ["prepare", world.text, "--tokenizer", "char", "--out", out, "--no-progress"]
    assert gpt2lab(*base).returncode == 0
    (out / "notes.txt").write_text("mine\n")  # the user adds a file to gpt2lab's directory
    r = gpt2lab(*base, "--val-tail", "0.2", "--force")
    assert r.returncode == 0, r.stderr
    assert (out / "notes.txt").read_text() == "mine\n"
    assert json.loads((out / ".gpt2lab").read_text())["tool"] == "gpt2lab"


def test_a_stale_lock_of_a_killed_process_does_not_block(world, cli_proc, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    start, _ = _holder(run)
    stop = start()
    stop()  # SIGKILL: the OS drops its lock; the lock file stays behind
    assert (run / ".gpt2lab.lock").exists()
    r = cli_proc.run("train", "--out", run, "--resume", "--train.max_steps=3", "--no-plot")
    assert r.returncode == 0, r.stderr


def test_two_real_trainings_on_one_directory(world, tmp_path):
    """The second `gpt2lab train` on the same run directory is refused while the first runs."""
    run = tmp_path / "run"
    argv = ["train", "--data", world.data, "--out", run, "--no-plot", "--train.device=cpu",
            *"--model.block_size=16 --model.n_layer=1 --model.n_head=2 --model.n_embd=16".split(),
            "--train.max_steps=100000", "--train.micro_batch_size=2", "--train.eval_interval=50",
            "--train.eval_steps=1", "--train.checkpoint_interval=50", "--no-progress"]  # fmt: skip
    cmd = [sys.executable, "-m", "gpt2lab", *map(str, argv)]
    first = subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (run / "metrics.jsonl").exists():
            time.sleep(0.2)
        second = gpt2lab("train", "--out", run, "--resume", "--train.max_steps=5")  # real, too
        assert second.returncode == 1, second.stderr
        assert f"PID {first.pid}" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGINT)  # stops with a checkpoint
        first.wait(timeout=60)
    assert any((run / "ckpt").iterdir())


def test_a_wrapped_pytorch_state_dict_is_unwrapped(world, cli_proc, tmp_path):
    import torch
    from safetensors.torch import load_file

    hf = tmp_path / "hf"
    shutil.copytree(world.hf, hf)
    state = load_file(hf / "model.safetensors")
    (hf / "model.safetensors").unlink()
    torch.save({"model": state, "step": 3}, hf / "pytorch_model.bin")
    r = cli_proc.run("sample", "--model", hf, "-p", "the", "-m", "3", "--seed", "1")
    assert r.returncode == 0, r.stderr


def test_max_new_tokens_past_the_context_slides_within_memory(world, cli_proc):
    argv = ["--model", world.run, "-m", "200", "--seed", "1", "--json", "--ignore-eos"]
    r = cli_proc.run("sample", *argv)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["ids"]) == 200  # block_size is 16


def test_overwrite_keeps_the_users_files_in_a_run_directory(world, cli_proc, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    (run / "notes.txt").write_text("mine\n")
    tiny = "--model.block_size=16 --model.n_layer=1 --model.n_head=2 --model.n_embd=16".split()
    steps = ["--train.max_steps=1", "--train.micro_batch_size=2", "--train.eval_steps=1"]
    r = cli_proc.run("train", "--data", world.data, "--out", run, "--overwrite", *tiny, *steps)
    assert r.returncode == 0, r.stderr
    assert (run / "notes.txt").read_text() == "mine\n"
    assert [p.name for p in (run / "ckpt").iterdir()] == ["step_00000001"]  # the old run went


def test_rlhf_overwrite_keeps_the_users_files_and_resumes(world, cli_proc, tmp_path):
    """rlhf's run directory: --overwrite removes only what gpt2lab wrote; --resume continues it."""
    run = tmp_path / "r"
    argv, _ = _rlhf_argv(world, tmp_path, run)
    assert cli_proc.run(*argv, "--train.max_steps=1").returncode == 0
    (run / "notes.txt").write_text("mine\n")
    r = cli_proc.run(*argv, "--train.max_steps=1", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (run / "notes.txt").read_text() == "mine\n"
    assert json.loads((run / ".gpt2lab").read_text())["command"] == "rlhf"
    fn = argv[argv.index("--reward-fn") + 1]
    r = cli_proc.run("rlhf", "--out", run, "--resume", "--reward-fn", fn, "--train.max_steps=2",
                     "--no-plot", "--rl.max_new_tokens=4", "--rl.batch_size=2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["step_00000001", "step_00000002"]
