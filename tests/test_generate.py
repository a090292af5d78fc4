"""Sampling: token choice on fixed distributions, the cached loop vs transformers, streaming."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2lab.cli import as_flag
from gpt2lab.errors import ConfigError
from gpt2lab.generate import (
    TextStream,
    apply_repetition_penalty,
    check_sampling,
    sample_next,
    top_k_mask,
    top_p_mask,
)
from gpt2lab.generate import (
    draw as sample_draw,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster, and immune to other jobs on the machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# A fixed distribution over 8 tokens, most likely first after sorting: 0.4 0.25 0.15 0.1 ...
PROBS = torch.tensor([0.05, 0.25, 0.015, 0.4, 0.1, 0.15, 0.025, 0.01])
LOGITS = PROBS.log()
DRAWS = 4000


def draw(n: int = DRAWS, seed: int = 0, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return sample_next(LOGITS.expand(n, -1), generator=g, **kw)


def freq(ids: torch.Tensor) -> torch.Tensor:
    return torch.bincount(ids, minlength=len(PROBS)).float() / len(ids)


def test_temperature_zero_is_argmax_and_ignores_the_generator():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(draw(temperature=0, top_k=3), torch.full((DRAWS,), 3))


def test_plain_sampling_follows_the_distribution():
    # 4000 draws: the standard error of each frequency is below 0.008, so 0.03 is ~4 sigma
    assert torch.allclose(freq(draw()), PROBS, atol=0.03)


def test_one_generator_per_row_draws_each_row_as_alone():
    gens = [torch.Generator().manual_seed(i) for i in range(DRAWS)]
    ids = sample_next(LOGITS.expand(DRAWS, -1), generator=gens)
    assert torch.allclose(freq(ids), PROBS, atol=0.03)
    alone = [
        int(sample_next(LOGITS[None], generator=[torch.Generator().manual_seed(i)])[0])
        for i in (0, 1, 2, 3)
    ]
    assert ids[:4].tolist() == alone
    assert len(set(ids[:50].tolist())) > 1
    with pytest.raises(ValueError, match="generators"):
        sample_next(LOGITS.expand(3, -1), generator=gens[:2])


def test_a_token_of_probability_zero_is_never_drawn():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(DRAWS, -1)
    ids = sample_draw(probs, generator=torch.Generator().manual_seed(0))
    assert set(ids.tolist()) == {1, 3}


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_rescales_the_distribution(temperature):
    expected = PROBS ** (1 / temperature)
    assert torch.allclose(freq(draw(temperature=temperature)), expected / expected.sum(), atol=0.03)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_never_leaves_the_k_most_likely(k):
    allowed = set(PROBS.argsort(descending=True)[:k].tolist())
    ids = draw(top_k=k)
    assert set(ids.tolist()) == allowed  # never outside, and every allowed token shows up
    kept = torch.zeros_like(PROBS)
    kept[list(allowed)] = PROBS[list(allowed)]
    assert torch.allclose(freq(ids), kept / kept.sum(), atol=0.03)


@pytest.mark.parametrize(
    ("p", "nucleus"),
    [
        (0.3, {3}),
        (0.39, {3}),
        (0.41, {3, 1}),
        (0.64, {3, 1}),
        (0.66, {3, 1, 5}),
        (0.81, {3, 1, 5, 4}),
    ],
)
def test_top_p_never_leaves_the_nucleus(p, nucleus):
    # nucleus by hand from PROBS: 0.4 (id 3), +0.25 (id 1) = 0.65, +0.15 (id 5) = 0.8, +0.1 = 0.9;
    # p sits off those sums, where float rounding decides either way
    assert set(draw(top_p=p).tolist()) == nucleus


def test_top_k_then_top_p_and_temperature_combine():
    # temperature 2 flattens to sqrt-probs; top-k 4 keeps ids 3, 1, 5, 4; top-p 0.5 of those
    ids = draw(temperature=2.0, top_k=4, top_p=0.5)
    w = PROBS[[3, 1, 5, 4]].sqrt()
    w = w / w.sum()  # 0.32, 0.25, 0.19, 0.16 -> the first two reach 0.5? 0.57 >= 0.5
    assert w[0] < 0.5 <= w[0] + w[1]
    assert set(ids.tolist()) == {3, 1}


def test_seeded_sampling_is_reproducible():
    assert torch.equal(draw(seed=7, top_p=0.9), draw(seed=7, top_p=0.9))
    assert not torch.equal(draw(seed=7), draw(seed=8))


def test_masks_match_transformers_warpers():
    tl = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1000, generator=g) * 3
    ids = torch.randint(0, 1000, (4, 30), generator=g)
    for k in (1, 10, 999):
        assert torch.equal(top_k_mask(logits, k), tl.TopKLogitsWarper(k)(ids, logits.clone()))
    for p in (0.1, 0.5, 0.95):
        assert torch.equal(top_p_mask(logits, p), tl.TopPLogitsWarper(p)(ids, logits.clone()))
    seen = torch.zeros(4, 1000, dtype=torch.bool).scatter_(1, ids, True)
    for penalty in (0.8, 1.3):
        ref = tl.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        assert torch.allclose(apply_repetition_penalty(logits, seen, penalty), ref)


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    seen = torch.tensor([[True, False, False]])
    assert sample_next(logits, temperature=0).item() == 0
    assert sample_next(logits, temperature=0, repetition_penalty=1.2, seen=seen).item() == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": -0.1},
        {"max_new_tokens": -1},
        {"temperature": -0.5},
        {"top_k": 0},
        {"repetition_penalty": 0.0},
    ],
)
def test_out_of_range_settings_are_one_line_config_errors(bad):
    with pytest.raises(ConfigError) as e:
        check_sampling(**bad)
    (key,) = bad
    msg = str(e.value)
    assert (
        f"sample.{key}=" in msg and f"`{key}" in msg and "\n" not in msg
    )  # the key, in the library
    assert "--" + key.replace("_", "-") in e.value.render(as_flag)  # the flag, at the command line


# ---- streaming decode -------------------------------------------------------------------------


def byte_tokens(ids: list[int]) -> bytes:
    """A byte-level vocabulary: token i is the byte i."""
    return bytes(ids)


def stream_all(pieces: list[bytes], stop=()) -> tuple[list[str], TextStream]:
    """Push `pieces` as multi-byte tokens through a TextStream; returns every release and it."""
    vocab = {i: p for i, p in enumerate(pieces)}
    s = TextStream(lambda ids: b"".join(vocab[i] for i in ids), stop=stop)
    out = []
    for i in range(len(pieces)):
        out.append(s.push(i))
        if s.stopped:
            break
    out.append(s.close())
    return out, s


def test_partial_utf8_is_held_until_the_character_is_complete():
    emoji = "😀".encode()  # 4 bytes, one per token
    out, s = stream_all([b"a", emoji[:1], emoji[1:3], emoji[3:], b"b"])
    assert out == ["a", "", "", "😀", "b", ""]
    assert s.text == "a😀b"


def test_an_unfinished_character_at_the_end_becomes_a_replacement_char():
    out, s = stream_all([b"x", "é".encode()[:1]])
    assert "".join(out) == "x\ufffd" and s.text == "x\ufffd"


def test_stop_string_spanning_tokens_is_never_released():
    out, s = stream_all([b"Hel", b"lo\nEN", b"D more", b"never"], stop=["\nEND"])
    assert out == ["Hel", "lo", "", ""]
    assert s.stopped and s.text == "Hello"


def test_held_text_is_released_when_the_stop_string_does_not_complete():
    out, s = stream_all([b"a\nE", b"NX", b"y"], stop=["\nEND"])
    assert out == ["a", "\nENX", "y", ""] and not s.stopped


def test_the_stop_string_completed_first_ends_the_sample():
    # "a" completes with the first token; "\naa" would start earlier but is not there yet
    out, s = stream_all([b"\na", b"a"], stop=["a", "\naa"])
    assert "".join(out) == s.text == "\n" and s.stopped


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet="ab\n😀é", max_size=30),
    cuts=st.lists(st.integers(0, 200), max_size=12),
    stops=st.lists(st.text(alphabet="ab\n😀", min_size=1, max_size=4), max_size=3),
)
def test_streamed_text_equals_the_text_cut_before_the_first_stop(text, cuts, stops):
    data = text.encode()
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    out, s = stream_all(pieces, stop=stops)
    # reference: after each token, the whole characters so far; the first token after which some
    # stop string occurs ends the sample, cut where the earliest occurrence starts
    expected, stopped = text, False
    for end in bounds[1:]:
        so_far = data[:end].decode("utf-8", errors="ignore")  # drops a trailing partial character
        hits = [so_far.find(x) for x in stops if x in so_far]
        if hits:
            expected, stopped = so_far[: min(hits)], True
            break
    assert "".join(out) == expected == s.text
    assert s.stopped == stopped
    released = ""
    for piece in out:
        released += piece
        assert not any(x in released for x in stops)  # no stop string ever reaches the screen


def test_gpt2_tokens_that_split_characters_stream_whole_characters():
    from gpt2lab.tokenizer import get_tokenizer

    tok = get_tokenizer("gpt2")
    text = "naïve 😀🤖 世界, ok"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens hold part of a character
    s = TextStream(tok.decode_bytes)
    pieces = [s.push(i) for i in ids] + [s.close()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_byte_tokens_round_trip():
    s = TextStream(byte_tokens)
    text = "naïve café 😀"
    assert "".join(s.push(b) for b in text.encode()) + s.close() == text
    assert math.isclose(len(s.text), len(text))


# ---- the cached loop on a real (tiny, random) model -------------------------------------------

V, BLOCK = 97, 32


@pytest.fixture(scope="module")
def models():
    """Our GPT and transformers' GPT2LMHeadModel holding the same random weights."""
    tf = pytest.importorskip("transformers")
    from gpt2lab.config import GPTConfig
    from gpt2lab.model import GPT

    hf_cfg = tf.GPT2Config(
        vocab_size=V,
        n_positions=BLOCK,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=0.3,  # spread-out logits, so argmax is not decided by rounding
    )
    torch.manual_seed(0)
    hf = tf.GPT2LMHeadModel(hf_cfg).eval()
    ours = GPT(GPTConfig(block_size=BLOCK, vocab_size=V, n_layer=2, n_head=2, n_embd=32)).eval()
    sd = ours.state_dict()
    with torch.no_grad():
        for k, t in hf.state_dict().items():
            if k not in sd or ".attn.bias" in k:
                continue
            if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                t = t.t()  # HF's Conv1D stores (in, out)
            sd[k][: t.shape[0]].copy_(t)
    return ours, hf


def hf_greedy(hf, prompt: list[int], n: int, penalty: float = 1.0) -> list[int]:
    out = hf.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        repetition_penalty=penalty,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[0, len(prompt) :].tolist()


PROMPTS = [[5, 17, 3], [40], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [60, 61]]


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_ids_equal_transformers(models, penalty):
    from gpt2lab.generate import generate

    ours, hf = models
    for prompt in PROMPTS:
        n = BLOCK - len(prompt)  # up to the full context
        got = generate(ours, torch.tensor([prompt]), n, temperature=0, repetition_penalty=penalty)
        assert got[0, len(prompt) :].tolist() == hf_greedy(hf, prompt, n, penalty)


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_batched_left_padded_greedy_equals_one_by_one(models, penalty):
    from gpt2lab.generate import generate, left_pad

    ours, _ = models
    kw = {"temperature": 0, "repetition_penalty": penalty}
    ids, mask = left_pad(PROMPTS, pad_id=5)  # 5 is also a real token of the padded row 0
    batched = generate(ours, ids, 15, attention_mask=mask, **kw)[:, ids.size(1) :]
    for row, prompt in zip(batched, PROMPTS):
        alone = generate(ours, torch.tensor([prompt]), 15, **kw)[0, len(prompt) :]
        assert row.tolist() == alone.tolist()


def test_bfloat16_weights_mostly_agree_with_float32(models):
    import copy

    from gpt2lab.generate import generate

    ours, _ = models
    half = copy.deepcopy(ours).to(torch.bfloat16)
    prompt = torch.tensor([PROMPTS[2]])
    a = generate(ours, prompt, 8, temperature=0)
    b = generate(half, prompt, 8, temperature=0)
    assert a.shape == b.shape and (a[0, 10:13] == b[0, 10:13]).all()


def test_seeded_generation_is_reproducible_and_padding_rows_never_appear(models):
    from gpt2lab.generate import generate

    ours, _ = models
    with torch.no_grad():  # make the top 7 real ids irresistible: they must still never appear
        saved = ours.transformer.wte.weight[90:V].clone()
        ours.transformer.wte.weight[90:V] *= 50
    try:
        idx = torch.tensor([[3, 4, 5]] * 8)
        runs = [
            generate(
                ours,
                idx,
                20,
                temperature=1.5,
                generator=torch.Generator().manual_seed(3),
                vocab_size=90,
            )
            for _ in range(2)
        ]
    finally:
        with torch.no_grad():
            ours.transformer.wte.weight[90:V] = saved
    assert torch.equal(runs[0], runs[1])
    assert int(runs[0].max()) < 90
    assert len(set(runs[0][:, 3:].flatten().tolist())) > 5  # it did sample, not repeat one token


def test_eos_ends_rows_and_the_loop(models):
    from gpt2lab.generate import generate, iter_tokens, left_pad

    ours, _ = models
    first = generate(ours, torch.tensor([PROMPTS[0]]), 12, temperature=0)[0, 3:].tolist()
    k = next(k for k in range(1, 12) if first[k] not in first[:k])  # a token new at step k
    eos = first[k]
    out = generate(ours, torch.tensor([PROMPTS[0]]), 12, temperature=0, eos_token_id=eos)
    assert out[0, 3:].tolist() == first[: k + 1]  # stopped right after the eos token
    ids, mask = left_pad([PROMPTS[0], [40]], pad_id=0)
    steps = list(iter_tokens(ours, ids, 12, 0.0, attention_mask=mask, eos_token_id=eos))
    tokens = torch.stack(steps, 1)[0].tolist()
    assert tokens[: k + 1] == first[: k + 1] and set(tokens[k + 1 :]) <= {eos}


def test_long_prompt_is_cropped_from_the_left_with_a_warning(models):
    from gpt2lab.generate import ContextWarning, generate

    ours, hf = models
    prompt = [(7 * i) % V for i in range(BLOCK + 9)]
    with pytest.warns(ContextWarning, match=f"last {BLOCK} tokens"):
        out = generate(ours, torch.tensor([prompt]), BLOCK + 5, temperature=0)
    assert out.shape == (1, 2 * BLOCK + 14)
    assert out[0, len(prompt)].item() == hf_greedy(hf, prompt[-BLOCK:], 1)[0]


def test_generation_past_the_context_slides_with_one_warning(models):
    from gpt2lab.generate import ContextWarning, generate

    ours, hf = models
    prompt = PROMPTS[0]
    with pytest.warns(ContextWarning, match="filled the model's context") as record:
        out = generate(ours, torch.tensor([prompt]), 2 * BLOCK, temperature=0)
    assert len(record) == 1 and out.shape == (1, len(prompt) + 2 * BLOCK)
    within = BLOCK - len(prompt)
    assert out[0, len(prompt) : BLOCK].tolist() == hf_greedy(hf, prompt, within)
    # the first token after the slide sees the window's last 3/4 of the context, from position 0
    window = out[0, BLOCK + 1 - (BLOCK - BLOCK // 4) : BLOCK + 1].tolist()
    assert out[0, BLOCK + 1].item() == hf_greedy(hf, window, 1)[0]
