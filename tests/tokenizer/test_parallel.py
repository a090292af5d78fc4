"""start_pool: worker processes that hold the caller's tokenizer and encode as it does."""

from __future__ import annotations

import os

from gpt2lab.tokenizer import get_tokenizer
from gpt2lab.tokenizer.parallel import start_pool, worker_tokenizer


def _encode(text: str) -> tuple[int, list[int]]:
    return os.getpid(), worker_tokenizer().encode_ordinary(text)


def _mark_worker() -> None:
    os.environ["GPT2LAB_TEST_WORKER"] = "1"


def _is_marked(_: object) -> str | None:
    return os.environ.get("GPT2LAB_TEST_WORKER")


def test_workers_hold_the_tokenizer_and_run_the_initializer(tiny_shakespeare):
    text = tiny_shakespeare.read_text("utf-8")[:20_000]
    texts = text.split("\n\n")
    for tok in (get_tokenizer("gpt2", backend="python"), get_tokenizer("char", text=text)):
        with start_pool(tok, 2, _mark_worker) as pool:
            results = pool.map(_encode, texts, chunksize=1)
            assert pool.map(_is_marked, range(4)) == ["1"] * 4
        assert [ids for _, ids in results] == [tok.encode_ordinary(t) for t in texts]
        assert os.getpid() not in {pid for pid, _ in results}
