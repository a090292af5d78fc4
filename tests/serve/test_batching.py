"""The continuously batched KV cache: sequences that join at different steps, leave from the
middle, and outlive a compaction decode exactly as each does alone through the plain model."""

from __future__ import annotations

import pytest
import torch

from gpt2lab.batching import Prefill, SlotCache, cache_bytes
from gpt2lab.config import GPTConfig
from gpt2lab.model import GPT


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=32)
    m = GPT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(8)  # sharp distributions: greedy choices are far from ties
    return m


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding (logits of these sharp models reach ~20)."""
    return torch.allclose(a, b, rtol=1e-4, atol=1e-3)


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """The next-token logits after `ids`, from one uncached forward over the whole sequence."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0, -1]


@pytest.mark.parametrize("kernels", [True, False])
def test_staggered_sequences_match_the_uncached_model(model, kernels):
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4] * 20, [9, 8], [3, 1, 4, 1, 5]]
    lengths = [10, 6, 9, 12, 3]  # tokens each generates; the rows leave in a mixed order
    cache = SlotCache(model, slots=4, max_len=30, kernels=kernels)  # compacts along the way
    moves = []
    move = cache._move
    cache._move = lambda first, shift: (moves.append(shift), move(first, shift))
    seqs = {i: list(p) for i, p in enumerate(prompts)}
    row_of: list[int] = []  # sequence in each live row
    waiting = list(range(len(prompts)))
    for step in range(200):
        if waiting and step % 2 == 0 and cache.free:
            i = waiting.pop(0)
            pf = Prefill(model, [prompts[i]], cache.kernels)
            while not pf.done:
                pf.run(4)  # chunked prefill
            assert close(pf.last_logits[0], full_logits(model, prompts[i]))
            seqs[i].append(int(pf.last_logits[0].argmax()))
            cache.join(pf, 0)
            row_of.append(i)
        if cache.rows:
            logits = cache.step(torch.tensor([seqs[i][-1] for i in row_of]))
            for r, i in enumerate(row_of):
                assert close(logits[r], full_logits(model, seqs[i])), (step, i)
                seqs[i].append(int(logits[r].argmax()))
            for r in reversed(range(len(row_of))):
                i = row_of[r]
                if len(seqs[i]) - len(prompts[i]) >= lengths[i]:
                    moved = cache.remove(r)
                    if moved is not None:
                        row_of[r] = row_of[moved]
                    row_of.pop()
        if not waiting and not cache.rows:
            break
    assert not waiting and cache.rows == 0 and cache.pos == 0
    # the shared write column ran past max_len and was compacted, and a long prompt shifted it
    assert any(m < 0 for m in moves) and any(m > 0 for m in moves), moves


def test_a_group_of_padded_prompts_and_copies_decode_like_each_alone(model):
    prompts = [[7, 7, 7, 7, 7, 7], [2], [30, 40, 50]]
    pf = Prefill(model, prompts)
    pf.run(2)
    pf.run(100)
    assert pf.done
    cache = SlotCache(model, slots=5)
    rows = [cache.join(pf, i, copies=c) for i, c in enumerate([1, 2, 2])]
    assert rows == [[0], [1, 2], [3, 4]]
    owner = [0, 1, 1, 2, 2]
    seqs = [list(prompts[o]) for o in owner]
    for r, o in enumerate(owner):
        assert close(pf.last_logits[o], full_logits(model, prompts[o]))
        seqs[r].append(int(pf.last_logits[o].argmax()))
    for _ in range(5):
        logits = cache.step(torch.tensor([s[-1] for s in seqs]))
        for r, s in enumerate(seqs):
            assert close(logits[r], full_logits(model, s))
            s.append(int(logits[r].argmax()))


def test_all_logits_of_a_prefill_are_the_models(model):
    ids = [5, 6, 7, 8, 9, 10, 11]
    pf = Prefill(model, [ids])
    chunks = [pf.run(3, all_logits=True) for _ in range(3)]
    got = torch.cat([logits[0] for _, logits in chunks])
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0][0]
    assert [start for start, _ in chunks] == [0, 3, 6]
    assert close(got, want)


def test_joining_more_rows_than_are_free_is_refused(model):
    pf = Prefill(model, [[1, 2]])
    pf.run(8)
    cache = SlotCache(model, slots=2)
    cache.join(pf, 0, copies=2)
    with pytest.raises(ValueError, match="free"):
        cache.join(pf, 0)
    assert cache.remove(0) == 1 and cache.rows == 1


def test_cache_bytes_counts_keys_and_values_of_every_layer():
    cfg = GPTConfig()  # the 124M shape
    assert cache_bytes(cfg, 1, 1024, torch.float32) == 2 * 12 * 1024 * 768 * 4
    assert cache_bytes(cfg, 8, 1024, torch.bfloat16) == 8 * 2 * 12 * 1024 * 768 * 2
