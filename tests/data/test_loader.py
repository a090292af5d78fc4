"""BatchLoader: windows are real slices, ranks x accumulation invariance, epochs, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpt2lab.data import load_tokens
from gpt2lab.data.loader import BatchLoader
from gpt2lab.errors import DataError


def _positions(tokens: np.ndarray, x: torch.Tensor, y: torch.Tensor) -> list[int]:
    """Where each row's T+1 tokens start in `tokens` (the rows must be contiguous slices)."""
    T = x.shape[1]
    windows = np.lib.stride_tricks.sliding_window_view(tokens.astype(np.int64), T + 1)
    out = []
    for xr, yr in zip(x.numpy(), y.numpy()):
        assert np.array_equal(xr[1:], yr[:-1])  # y is x shifted by one
        row = np.concatenate([xr, yr[-1:]])
        hits = np.flatnonzero((windows == row).all(axis=1))
        assert len(hits) >= 1
        out.append(int(hits[0]))
    return out


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_batches_are_slices_of_the_split_across_shard_boundaries(data_dir, sampling):
    tokens = load_tokens(data_dir, "train")
    loader = BatchLoader(data_dir, block_size=64, batch_size=4, sampling=sampling, seed=3)
    for _ in range(10):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        pos = _positions(tokens, x, y)
        assert all(0 <= p <= len(tokens) - 65 for p in pos)
        if sampling == "sequential":
            assert all(p % 64 == 0 for p in pos)


def _step_data(loader: BatchLoader, steps: int) -> list[list[np.ndarray]]:
    return [[loader.next_batch()[0].numpy() for _ in range(loader.A)] for _ in range(steps)]


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_two_ranks_see_exactly_the_data_of_one_rank_with_twice_the_accumulation(data_dir, sampling):
    kw = dict(block_size=32, batch_size=3, seed=11, sampling=sampling)
    one = _step_data(BatchLoader(data_dir, grad_accum_steps=4, **kw), 6)
    r0 = _step_data(BatchLoader(data_dir, grad_accum_steps=2, rank=0, world_size=2, **kw), 6)
    r1 = _step_data(BatchLoader(data_dir, grad_accum_steps=2, rank=1, world_size=2, **kw), 6)
    for s in range(6):
        a = sorted(map(bytes, np.concatenate(one[s])))
        b = sorted(map(bytes, np.concatenate(r0[s] + r1[s])))
        assert a == b
        # and the two ranks never read the same window within a step (sequential mode)
        if sampling == "sequential":
            assert not set(map(bytes, np.concatenate(r0[s]))) & set(
                map(bytes, np.concatenate(r1[s]))
            )
    # a different seed gives different data
    other = _step_data(BatchLoader(data_dir, grad_accum_steps=4, **{**kw, "seed": 12}), 1)
    assert not all(np.array_equal(p, q) for p, q in zip(one[0], other[0]))


def test_sequential_epoch_visits_every_window_once_in_shuffled_order(data_dir):
    tokens = load_tokens(data_dir, "train")
    loader = BatchLoader(data_dir, block_size=50, batch_size=1, sampling="sequential", seed=5)
    n = (len(tokens) - 1) // 50
    first = [_positions(tokens, *loader.next_batch())[0] for _ in range(n)]
    assert sorted(first) == [i * 50 for i in range(n)]
    assert first != sorted(first)  # shuffled
    second = [_positions(tokens, *loader.next_batch())[0] for _ in range(n)]
    assert sorted(second) == sorted(first) and second != first  # a new order each epoch
    assert loader.epoch == pytest.approx(2 * n * 50 / len(tokens))


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_state_dict_resumes_exactly_mid_step(data_dir, sampling):
    kw = dict(block_size=16, batch_size=2, grad_accum_steps=3, seed=7, sampling=sampling)
    a = BatchLoader(data_dir, **kw)
    for _ in range(7):  # 2 steps and one micro-step
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next_batch()[0] for _ in range(40)]
    b = BatchLoader(data_dir, **kw)
    b.load_state_dict(state)
    got = [b.next_batch()[0] for _ in range(40)]
    assert all(torch.equal(p, q) for p, q in zip(expected, got))


def test_resume_with_other_tokens_per_step_fails(data_dir):
    a = BatchLoader(data_dir, block_size=16, batch_size=2, grad_accum_steps=2)
    b = BatchLoader(data_dir, block_size=16, batch_size=2, grad_accum_steps=3)
    with pytest.raises(DataError, match="tokens_per_step"):
        b.load_state_dict(a.state_dict())
    # 2 ranks x 2 micro-steps = 1 rank x 4: allowed
    c = BatchLoader(data_dir, block_size=16, batch_size=2, grad_accum_steps=2, world_size=2)
    BatchLoader(data_dir, block_size=16, batch_size=2, grad_accum_steps=4).load_state_dict(
        c.state_dict()
    )


def test_val_split_and_too_short_split(tmp_path, data_dir):
    x, y = BatchLoader(data_dir, split="val", block_size=64, batch_size=2).next_batch()
    _positions(load_tokens(data_dir, "val"), x, y)
    with pytest.raises(DataError, match="fewer than block_size"):
        BatchLoader(data_dir, split="val", block_size=700)
    with pytest.raises(DataError, match="does not exist"):
        BatchLoader(tmp_path / "nope")


def test_vocab_size_mismatch_between_shards_and_model(tmp_path, write_data_dir):
    d = write_data_dir(
        tmp_path / "v", {"train": np.arange(300) % 97}, vocab_size=97, shard_tokens=100
    )
    with pytest.raises(DataError, match="vocabulary of 97 tokens but the model expects 50257"):
        BatchLoader(d, block_size=8, batch_size=1, vocab_size=50257)
    BatchLoader(d, block_size=8, batch_size=1, vocab_size=97).next_batch()
