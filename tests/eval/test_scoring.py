"""Sliding-window perplexity and continuation scores against transformers' own loss."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gpt2lab.errors import ConfigError, DataError
from gpt2lab.eval.scoring import as_logits_fn, score_continuations, score_ids, sliding_windows
from gpt2lab.kernels.cpu_decode import onednn_can_multiply

TEXT = (
    "The lobster is a species of crustacean from the eastern Atlantic Ocean. It may grow to a "
    "length of 60 cm and a mass of 6 kilograms, and bears a conspicuous pair of claws."
)


@given(n=st.integers(0, 300), context=st.integers(1, 64), data=st.data())
def test_windows_score_every_token_once_with_enough_context(n, context, data):
    stride = data.draw(st.integers(1, context))
    windows = sliding_windows(n, context, stride)
    scored = []
    for k, w in enumerate(windows):
        assert 0 <= w.start < w.end <= n - 1 and w.end - w.start <= context
        targets = list(range(w.end - w.scored + 1, w.end + 1))
        scored += targets
        if k:  # after the first window: a full window, >= context - stride tokens before each
            assert w.end - w.start == min(context, n - 1)
            assert targets[0] - w.start >= min(context, n - 1) - stride
    assert scored == list(range(1, n))


def test_bad_stride_is_a_config_error():
    with pytest.raises(ConfigError, match="stride"):
        sliding_windows(10, context=4, stride=5)


@pytest.mark.parametrize("context,stride,n", [(32, 32, 99), (32, 12, 99), (7, 1, 20)])
def test_perplexity_matches_transformers_over_the_same_windows(
    hf_model, hf_window_nll, gpt2_enc, context, stride, n
):
    ids = [gpt2_enc.eot_token, *gpt2_enc.encode_ordinary(TEXT)][:n]
    # reference windows written out independently: window k ends at min(context + k*stride, n-1)
    ref_nll, prev_end, n = 0.0, 0, len(ids)
    while prev_end < n - 1:
        end = min(context if prev_end == 0 else prev_end + stride, n - 1)
        ref_nll += hf_window_nll(ids, max(0, end - context), end, end - prev_end)
        prev_end = end
    got = score_ids(as_logits_fn(hf_model), ids, context, stride, batch_size=5)
    assert got.tokens == n - 1
    assert math.exp(got.loss) == pytest.approx(math.exp(ref_nll / (n - 1)), rel=1e-4)
    assert got.nll == pytest.approx(ref_nll, rel=1e-5)


def test_batch_size_and_a_short_last_batch_do_not_change_the_loss(
    hf_model, hf_window_nll, gpt2_enc
):
    ids = gpt2_enc.encode_ordinary(TEXT)
    fn = as_logits_fn(hf_model)
    one = score_ids(fn, ids, context=16, stride=5, batch_size=1)
    many = score_ids(fn, ids, context=16, stride=5, batch_size=3)
    short = score_ids(fn, ids[:9], context=16, stride=5, batch_size=3)  # one 8-token window
    assert one.nll == pytest.approx(many.nll, rel=1e-6)
    assert short.tokens == 8 and short.nll == pytest.approx(hf_window_nll(ids, 0, 8, 8), rel=1e-5)


def test_continuations_match_full_forward_and_keep_their_order(hf_model, gpt2_enc):
    enc = gpt2_enc.encode_ordinary
    pairs = [
        ([gpt2_enc.eot_token, *enc("The lobster is")], enc(" a species")),
        ([gpt2_enc.eot_token, *enc("It may grow to a length of")], enc(" 60 cm")),
        ([gpt2_enc.eot_token], enc(" claws")),
    ]
    got = score_continuations(as_logits_fn(hf_model), pairs, context=64, batch_size=2)
    for (ctx, cont), sc in zip(pairs, got):
        x = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(input_ids=x).logits[0, :-1], -1)
        picked = [logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)]
        assert sc.tokens == len(cont) and sc.logprob == pytest.approx(sum(picked), abs=1e-4)


def test_greedy_flag_and_left_truncation(hf_model, gpt2_enc):
    fn = as_logits_fn(hf_model)
    ctx = [gpt2_enc.eot_token, *gpt2_enc.encode_ordinary(TEXT)][:40]
    x = torch.tensor([ctx])
    greedy = []
    with torch.no_grad():  # three greedy steps, by transformers itself
        for _ in range(3):
            nxt = hf_model(input_ids=x).logits[0, -1].argmax().item()
            greedy.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
    wrong = [*greedy[:2], (greedy[2] + 1) % 50257]
    a, b = score_continuations(fn, [(ctx, greedy), (ctx, wrong)], context=64)
    assert a.greedy and not b.greedy
    # a context longer than the window loses its start: same score as the truncated request
    long_ctx = [11] * 100 + ctx
    (c,) = score_continuations(fn, [(long_ctx, greedy)], context=30)
    (d,) = score_continuations(fn, [((long_ctx + greedy)[-31:-3], greedy)], context=30)
    assert c.logprob == pytest.approx(d.logprob, abs=1e-5)


def test_empty_or_too_long_continuation_is_a_data_error(hf_model):
    fn = as_logits_fn(hf_model)
    with pytest.raises(DataError, match="empty"):
        score_continuations(fn, [([1, 2], [])], context=8)
    with pytest.raises(DataError, match="longer than the context"):
        score_continuations(fn, [([1], list(range(9)))], context=8)


def test_logits_of_the_last_positions_only(hf_model):
    fn = as_logits_fn(hf_model)
    x = torch.randint(0, 50257, (2, 10))
    with torch.no_grad():
        full = hf_model(input_ids=x).logits
    assert fn(x, 3).shape == (2, 3, 50257)
    torch.testing.assert_close(fn(x, 3), full[:, -3:], rtol=1e-5, atol=1e-5)
    assert fn(x, 10).shape == full.shape


def test_our_gpt_computes_only_the_scored_positions_and_scores_as_transformers(hf_model):
    """The vocabulary-padded GPT-2 head (every GPT-2-vocabulary model) runs on the kept
    positions only, through the model's `logits_to_keep`, and the scores still match."""
    from gpt2lab.checkpoint.hf import config_from_hf, from_hf_state
    from gpt2lab.checkpoint.weights import assign_state
    from gpt2lab.model import GPT

    cfg = config_from_hf(hf_model.config.to_dict(), source="hf", pad_vocab_to=64)
    assert cfg.padded_vocab_size > cfg.vocab_size
    ours = GPT(cfg)
    assign_state(ours, from_hf_state(hf_model.state_dict(), cfg), source="hf")
    rows: list[int] = []
    ours.lm_head.register_forward_hook(lambda m, args, out: rows.append(out.shape[1]))
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    got = as_logits_fn(ours, kernels=False)(idx, 3)
    assert rows == [3] and got.shape == (2, 3, cfg.vocab_size)
    want = as_logits_fn(hf_model)(idx, 3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # the fused CPU path (the default) computes the same
    fused = as_logits_fn(ours)(idx, 3)
    assert rows == [3] and fused.shape == (2, 3, cfg.vocab_size)
    torch.testing.assert_close(fused, want, atol=1e-4, rtol=0)
    if onednn_can_multiply(torch.bfloat16):  # in bfloat16: within its rounding
        bf16 = as_logits_fn(ours, torch.bfloat16)(idx, 3)
        assert (bf16 - want).abs().max() < 0.05 * want.std()


def test_candidates_of_one_context_share_its_kv_cache_and_score_as_transformers(hf_model):
    """Our GPT runs a context once and scores every candidate after it from the KV cache; the
    scores equal transformers' full forward of each (context + candidate), candidate by
    candidate. Runs that would not fit in the window take the plain path."""
    from gpt2lab.checkpoint.hf import config_from_hf, from_hf_state
    from gpt2lab.checkpoint.weights import assign_state
    from gpt2lab.model import GPT

    cfg = config_from_hf(hf_model.config.to_dict(), source="hf", pad_vocab_to=64)
    ours = GPT(cfg)
    assign_state(ours, from_hf_state(hf_model.state_dict(), cfg), source="hf")
    fn = as_logits_fn(ours)
    g = torch.Generator().manual_seed(3)
    story = torch.randint(0, 50257, (30,), generator=g).tolist()
    cands = [torch.randint(0, 50257, (k,), generator=g).tolist() for k in (1, 4, 2, 6)]
    lone = (story[:5], cands[1])
    long = (story * 2, cands[3])  # 60 + 6 > 64 + 1 with its twin: the plain path
    requests = [(story, c) for c in cands] + [lone] + [long, long]
    calls = []
    fn.after_prefix = lambda p, c, real=fn.after_prefix: calls.append(len(c)) or real(p, c)
    got = score_continuations(fn, requests, context=64, batch_size=3)
    assert calls == [4]  # one shared run, for the four candidates of the story
    for (ctx, cont), sc in zip(requests, got):
        seq = (ctx + cont)[-65:]  # what fits in the 64-token window, plus the last target
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(input_ids=torch.tensor([seq[:-1]])).logits[0], -1)
        k = len(cont)
        picked = [logp[len(seq) - 1 - k + i, t].item() for i, t in enumerate(cont)]
        assert sc.tokens == k and sc.logprob == pytest.approx(sum(picked), abs=1e-4)


def test_nll_sum_is_cross_entropy_in_blocks():
    from gpt2lab.eval.scoring import nll_sum

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(150, 1000, generator=g) * 4  # 150: two full blocks and a part
    targets = torch.randint(0, 1000, (150,), generator=g)
    want = torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
    assert abs(nll_sum(logits, targets) - want) <= 1e-5 * abs(want)
    assert abs(nll_sum(logits, targets, rows=7) - want) <= 1e-5 * abs(want)
    # bfloat16 logits: each block converted to float32, the same sum as a float32 copy's
    low = logits.bfloat16()
    want = torch.nn.functional.cross_entropy(low.float(), targets, reduction="sum").item()
    assert abs(nll_sum(low, targets) - want) <= 1e-5 * abs(want)


@given(n=st.integers(2, 400), context=st.integers(1, 64), batch=st.integers(1, 6), data=st.data())
def test_windows_are_batched_only_with_windows_of_their_shape(n, context, batch, data):
    """The first window (scoring all it sees) and a short last one are not batched with the
    others, whose logits would otherwise all be widened to theirs."""
    from gpt2lab.eval.scoring import _alike

    windows = sliding_windows(n, context, data.draw(st.integers(1, context)))
    groups = _alike(windows, batch)
    assert [w for g in groups for w in g] == windows
    for g in groups:
        assert 1 <= len(g) <= batch
        assert len({(w.end - w.start, w.scored) for w in g}) == 1
    for a, b in zip(groups, groups[1:]):  # a batch ends early only where the shape changes
        if len(a) < batch:
            assert (a[-1].end - a[-1].start, a[-1].scored) != (b[0].end - b[0].start, b[0].scored)


@pytest.mark.skipif(not onednn_can_multiply(torch.bfloat16), reason="no oneDNN bfloat16 here")
def test_bfloat16_scoring_keeps_its_logits_in_bfloat16():
    from gpt2lab.config import GPTConfig
    from gpt2lab.kernels.cpu_decode import decode_step
    from gpt2lab.model import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=97)).eval()
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    step = decode_step(model, 20, torch.bfloat16)
    with torch.no_grad():
        low, full = step.score(idx, 5, out_dtype=None), step.score(idx, 5)
        assert low.dtype == torch.bfloat16 and full.dtype == torch.float32
        assert torch.equal(low.float(), full)
        assert as_logits_fn(model, torch.bfloat16)(idx, 5).dtype == torch.bfloat16
