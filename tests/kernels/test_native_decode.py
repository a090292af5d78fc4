"""decode.c's one-sequence step equals the model's cached forward, builds atomically, and steps
aside where it cannot run."""

from __future__ import annotations

import copy
import platform

import pytest
import torch

from gpt2lab.config import GPTConfig
from gpt2lab.generate import _CachedRunner, generate
from gpt2lab.kernels import cpu_decode, native
from gpt2lab.kernels.cpu_decode import decode_step
from gpt2lab.kernels.int8 import Int8Linear
from gpt2lab.model import GPT, KVCache
from gpt2lab.quantize import quantize

needs_cc = pytest.mark.skipif(
    native.load_library() is None, reason="no C compiler here (or GPT2LAB_NATIVE=0)"
)


def gpt(n_embd: int = 64, bias: bool = True, pad: int = 1, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(
        block_size=48,
        vocab_size=101,
        n_layer=2,
        n_head=4,
        n_embd=n_embd,
        bias=bias,
        pad_vocab_to=pad,
    )
    model = GPT(cfg).eval()
    with torch.no_grad():  # spread-out logits and non-trivial LayerNorms
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.mul_(6.0)
            elif name.endswith(".weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.uniform_(-0.2, 0.2)
    return model


def model_logits(model: GPT, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The model's own cached forward, one token at a time: (T, vocab) float32."""
    cache = KVCache(model.config, 1, model.config.block_size, "cpu", dtype)
    out = []
    with torch.no_grad():
        for t in range(ids.size(1)):
            logits = model(ids[:, t : t + 1], cache=cache, last_only=True)[0][:, -1]
            out.append(logits[0, : model.config.vocab_size].float())
    return torch.stack(out)


def native_logits(model: GPT, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    step = native.native_step(model, dtype)
    cache = KVCache(model.config, 1, model.config.block_size, "cpu", dtype)
    out = [step.step(ids[:, t : t + 1], cache)[0] for t in range(ids.size(1))]
    assert cache.pos == ids.size(1)
    return torch.stack(out)


@needs_cc
@pytest.mark.parametrize("n_embd", [64, 40])  # 40: rows that are no multiple of the vector width
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("pad", [1, 64])
def test_float32_step_equals_the_model(n_embd: int, bias: bool, pad: int) -> None:
    model = gpt(n_embd, bias, pad)
    ids = torch.randint(0, 101, (1, 48), generator=torch.Generator().manual_seed(1))
    ours, ref = native_logits(model, ids, torch.float32), model_logits(model, ids, torch.float32)
    assert ours.shape == ref.shape == (48, 101)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)


@needs_cc
def test_bfloat16_step_is_as_close_to_float32_as_the_models_bfloat16() -> None:
    """In bfloat16 our activations and sums stay float32 between products, so we are compared
    with the float32 model, against the error of the model's own bfloat16 forward on the same
    weights."""
    ids = torch.randint(0, 101, (1, 40), generator=torch.Generator().manual_seed(2))
    bf16 = gpt().to(torch.bfloat16)
    exact = model_logits(gpt().to(torch.bfloat16).float(), ids, torch.float32)  # same weights
    ours = native_logits(bf16, ids, torch.bfloat16)
    theirs = model_logits(bf16, ids, torch.bfloat16)
    our_err = (ours - exact).abs().max().item()
    their_err = (theirs - exact).abs().max().item()
    assert our_err <= their_err * 1.5 + 1e-3, (our_err, their_err)
    assert (ours.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.95


@needs_cc
def test_float16_step_is_the_float32_step_on_the_same_weights() -> None:
    """A float16 model's weights widen exactly to float32 and the sums stay float32, so only the
    cache's rounding to float16 separates the step from the float32 model on the same weights:
    far less than the model's own float16 forward (which rounds every activation)."""
    ids = torch.randint(0, 101, (1, 40), generator=torch.Generator().manual_seed(2))
    f16 = gpt().half()
    assert decode_step(f16, 1).native is not None
    exact = model_logits(gpt().half().float(), ids, torch.float32)
    ours = native_logits(f16, ids, torch.float16)
    theirs = model_logits(f16, ids, torch.float16)
    our_err = (ours - exact).abs().max().item()
    their_err = (theirs - exact).abs().max().item()
    assert our_err <= 2e-3 * exact.abs().max().item(), (our_err, their_err)
    assert our_err <= their_err, (our_err, their_err)
    plain = generate(f16, ids[:, :5], 30, temperature=0, kernels=False)
    fast = generate(f16, ids[:, :5], 30, temperature=0)
    assert (fast == plain).float().mean() >= 0.9


@needs_cc
def test_float16_conversions_are_pytorchs() -> None:
    """decode.c's scalar float16 conversions (the cache's writes, the tables' reads): every
    float16 widens to PyTorch's float32 and rounds back to itself; random float32 bit patterns
    and every pair of neighbouring float16s' midpoint (ties), and the floats on either side of
    it, round as PyTorch's `.half()` does (nearest, ties to even, overflow to infinity)."""
    lib = native.load_library()

    def round_trip(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.contiguous()
        h, y = torch.empty(x.numel(), dtype=torch.int16), torch.empty_like(x)
        lib.gpt2lab_f16_round_trip(x.data_ptr(), h.data_ptr(), y.data_ptr(), x.numel())
        return h, y

    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    wide = every.view(torch.float16).float()
    nan = wide.isnan()
    h, y = round_trip(wide)
    assert torch.equal(y[~nan], wide[~nan]) and y[nan].isnan().all()
    assert torch.equal(h[~nan], every[~nan]) and h.view(torch.float16)[nan].isnan().all()
    finite = wide[wide.isfinite()].double().unique()
    mids = ((finite[1:] + finite[:-1]) / 2).float()
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (1_000_000,), generator=g).to(torch.int32)
    down, up = torch.tensor(-float("inf")), torch.tensor(float("inf"))
    for x in [bits.view(torch.float32), mids, mids.nextafter(down), mids.nextafter(up)]:
        h, _ = round_trip(x)
        want = x.half()
        same = (h == want.view(torch.int16)) | (want.isnan() & h.view(torch.float16).isnan())
        assert same.all(), x[~same][:4]


@needs_cc
def test_generate_takes_the_c_step_and_matches_the_plain_model() -> None:
    model = gpt()
    step = decode_step(model, 1)
    assert step is not None and step.native is not None
    idx = torch.randint(0, 101, (1, 5), generator=torch.Generator().manual_seed(3))
    fast = generate(model, idx, 40, temperature=0)
    plain = generate(model, idx, 40, temperature=0, kernels=False)
    assert torch.equal(fast, plain)
    with torch.no_grad():  # an in-place update: the next generation sees the new weights
        model.transformer.h[0].mlp.c_fc.weight.mul_(-1.0)
    plain = generate(model, idx, 40, temperature=0, kernels=False)
    assert torch.equal(generate(model, idx, 40, temperature=0), plain)


@needs_cc
@pytest.mark.parametrize("quantized", [False, True])
def test_a_prompt_of_one_or_two_tokens_goes_through_the_c_step(
    quantized: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = plain_int8(gpt()) if quantized else gpt()  # (the int8 sums the C step equals)
    calls = []
    step = native.NativeStep.step
    monkeypatch.setattr(
        native.NativeStep, "step", lambda self, *a: calls.append(1) or step(self, *a)
    )
    for T in (1, 2, 3):
        idx = torch.randint(0, 101, (1, T), generator=torch.Generator().manual_seed(T))
        calls.clear()
        fast = generate(model, idx, 12, temperature=0)
        # the prompt's tokens and every new token but the last; from 3 tokens the plain model
        assert len(calls) == (T + 11 if T <= 2 else 11), T
        assert torch.equal(fast, generate(model, idx, 12, temperature=0, kernels=False))
        ours = _CachedRunner(model, 1, 16, "cpu").prefill(idx, None)
        plain = _CachedRunner(model, 1, 16, "cpu", kernels=False).prefill(idx, None)
        assert (ours - plain).abs().max() <= 1e-5 * plain.abs().max(), T
    # a left-padded prompt runs through the plain model; its new tokens through the C step
    calls.clear()
    padded = dict(attention_mask=torch.tensor([[0, 1]]), temperature=0)
    fast = generate(model, torch.tensor([[0, 7]]), 3, **padded)
    assert len(calls) == 2
    assert torch.equal(fast, generate(model, torch.tensor([[0, 7]]), 3, kernels=False, **padded))


@needs_cc
@pytest.mark.parametrize(
    # 4 and 16: four-row passes only; 5: one and a single row; 1: a padded sequence alone;
    # width 96: rows of 96 and 384 values, no multiple of the four-row pass's 64
    "kind, rows, width",
    [
        ("float32", 4, 64),
        ("float32", 1, 64),
        ("bfloat16", 5, 64),
        ("bfloat16", 16, 64),
        ("bfloat16", 4, 96),
        ("float16", 5, 64),
        ("float16", 16, 96),
        ("int8", 3, 64),
    ],
)
def test_left_padded_rows_step_as_the_model_does(
    kind: str, rows: int, width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    half = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    model = gpt(width).to(half[kind]) if kind in half else gpt(width)
    model = plain_int8(model) if kind == "int8" else model
    dtype = half.get(kind, torch.float32)
    calls = []
    c_step = native.NativeStep.step
    monkeypatch.setattr(native.NativeStep, "step", lambda s, *a: calls.append(1) or c_step(s, *a))
    g = torch.Generator().manual_seed(rows)
    idx = torch.randint(0, 101, (rows, 6), generator=g)
    mask = torch.ones(rows, 6 + 5, dtype=torch.bool)
    for r in range(rows):
        mask[r, : r % 5] = False  # left padding of 0-4 columns
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    step = decode_step(model, rows)
    caches = [KVCache(model.config, rows, 16, "cpu", dtype) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(idx, cache=cache, attention_mask=mask[:, :6], position_ids=pos[:, :6])
        for t in range(6, 11):  # five steps, each row at its own position
            nxt = torch.randint(0, 101, (rows, 1), generator=g)
            kw = dict(attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1])
            plain = model(nxt, cache=caches[0], **kw)[0][:, -1, :101].float()
            ours = step.step(nxt, caches[1], kw["position_ids"], kw["attention_mask"])
            # bf16 / f16: the model rounds each product's input and output, we sum in float32
            tol = {"bfloat16": 0.05, "float16": 0.01}.get(kind, 1e-5)
            assert (ours - plain).abs().max() <= tol * plain.abs().max(), t
    assert len(calls) == 5
    tol = {"bfloat16": 0.05, "float16": 0.01}.get(kind, 1e-5)
    for r in range(rows):  # the keys and values written: the columns a row holds tokens in
        cols = mask[r].nonzero()[:, 0]
        for plain, ours in [(caches[0].k, caches[1].k), (caches[0].v, caches[1].v)]:
            a, b = plain[:, r, :, cols].float(), ours[:, r, :, cols].float()
            assert (a - b).abs().max() <= tol * a.abs().max()


@needs_cc
def test_float16_models_take_the_c_step_up_to_its_rows_and_else_their_own_forward() -> None:
    model = gpt().half()
    assert decode_step(model, native.MAX_ROWS).native.max_rows == native.MAX_ROWS
    wide = decode_step(model, native.MAX_ROWS + 1)  # no oneDNN float16 product to pack
    assert wide.native is None and wide.chunked is not None and not wide.packs
    assert decode_step(model, 1024) is None  # scoring's rows: the model's own forward
    step = decode_step(model, 2)
    ids = torch.randint(0, 101, (2, 1), generator=torch.Generator().manual_seed(8))
    other = KVCache(model.config, 2, 8, "cpu", torch.float16)
    other.v = other.v.transpose(-1, -2).contiguous().transpose(-1, -2)  # not a layout C reads
    assert not step.native.fits(other)
    ref = KVCache(model.config, 2, 8, "cpu", torch.float16)
    with torch.no_grad():
        want = model(ids, cache=ref, last_only=True)[0][:, -1].float()
    assert torch.equal(step.step(ids, other), want) and other.pos == 1
    assert torch.equal(step.score(ids, 1)[:, -1], want)


@needs_cc
@pytest.mark.parametrize("kind, rows", [("bfloat16", 20), ("float16", 33), ("int8", 17)])
def test_more_rows_go_through_the_c_step_in_chunks_over_a_long_cache(
    kind: str, rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the C step's rows, from `CHUNKS_FROM_POS` cached positions on (here every step), a
    step runs it on consecutive chunks of rows of the one cache: the same logits and cache
    columns as the model's forward, left padding included; under it, the PyTorch step (float16,
    which has no packed product, chunks from the first step)."""
    half = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    model = plain_int8(gpt()) if kind == "int8" else gpt().to(half[kind])
    dtype = half.get(kind, torch.float32)
    calls: list[int] = []
    c_step = native.NativeStep.step
    monkeypatch.setattr(
        native.NativeStep, "step", lambda s, *a: calls.append(len(a[0])) or c_step(s, *a)
    )
    step = decode_step(model, rows)
    assert step.native is None and step.chunked is not None
    g = torch.Generator().manual_seed(rows)
    idx = torch.randint(0, 101, (rows, 6), generator=g)
    mask = torch.ones(rows, 9, dtype=torch.bool)
    for r in range(rows):
        mask[r, : r % 5] = False
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    caches = [KVCache(model.config, rows, 12, "cpu", dtype) for _ in range(2)]
    tol = {"bfloat16": 0.05, "float16": 0.01}.get(kind, 1e-5)
    with torch.no_grad():
        for cache in caches:
            model(idx, cache=cache, attention_mask=mask[:, :6], position_ids=pos[:, :6])
        for t, chunks_from in [(6, 7), (7, 0), (8, 0)]:  # first under the threshold, then over
            monkeypatch.setattr(cpu_decode, "CHUNKS_FROM_POS", chunks_from)
            nxt = torch.randint(0, 101, (rows, 1), generator=g)
            kw = dict(attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1])
            plain = model(nxt, cache=caches[0], **kw)[0][:, -1, :101].float()
            ours = step.step(nxt, caches[1], kw["position_ids"], kw["attention_mask"])
            assert caches[1].pos == t + 1
            assert (ours - plain).abs().max() <= tol * plain.abs().max(), t
    n = native.MAX_ROWS
    steps = 3 if kind == "float16" else 2  # float16 (no packed product) chunks under it too
    assert calls == steps * ([n] * (rows // n) + [rows % n])
    for r in range(rows):
        cols = mask[r].nonzero()[:, 0]
        for a, b in [(caches[0].k, caches[1].k), (caches[0].v, caches[1].v)]:
            a, b = a[:, r, :, cols].float(), b[:, r, :, cols].float()
            assert (a - b).abs().max() <= tol * a.abs().max()
    assert decode_step(gpt(), rows).chunked is None  # float32: chunks of 4 rows would not pay


@needs_cc
def test_more_rows_than_the_c_step_takes_go_through_pytorch(monkeypatch) -> None:
    model = gpt()  # float32: native.MAX_ROWS_FLOAT32 rows
    rows = native.MAX_ROWS_FLOAT32 + 1
    step = decode_step(model, rows)
    cache = KVCache(model.config, rows, 8, "cpu", torch.float32)
    assert step.native is not None and not step.native.fits(cache)
    assert step.native.fits(KVCache(model.config, native.MAX_ROWS_FLOAT32, 8, "cpu"))


def test_into_huge_pages_copies_in_order_and_moves_only_tensors_used_as_they_are() -> None:
    kept = torch.arange(10, dtype=torch.float32)  # used as it is: moved
    source = torch.arange(6, dtype=torch.float32).view(2, 3)
    converted = source.to(torch.bfloat16)  # a conversion: copied, the source left alone
    where = source.data_ptr()
    a, b = native.into_huge_pages([(kept, kept), (source, converted)])
    assert torch.equal(a, torch.arange(10, dtype=torch.float32)) and kept.data_ptr() == a.data_ptr()
    assert torch.equal(b, converted) and b.dtype == torch.bfloat16 and b.shape == (2, 3)
    assert source.data_ptr() == where
    assert b.data_ptr() - a.data_ptr() == 64  # 40 bytes, padded to the next 64


@needs_cc
def test_without_an_anonymous_mapping_the_step_uses_ordinary_memory(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(native.mmap, "mmap", refuse)
    assert native.huge_page_buffer(100).shape == (100,)
    model = gpt()
    idx = torch.randint(0, 101, (1, 5), generator=torch.Generator().manual_seed(3))
    plain = generate(model, idx, 10, temperature=0, kernels=False)
    assert decode_step(model, 1).native is not None
    assert torch.equal(generate(model, idx, 10, temperature=0), plain)


@needs_cc
def test_the_step_moves_the_matrices_without_changing_the_model() -> None:
    model = gpt(pad=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = model.lm_head.weight
    where = {n: p.data_ptr() for n, p in model.named_parameters()}
    step = decode_step(model, 1)
    assert step is not None and step.native is not None
    moved = {n for n, p in model.named_parameters() if p.data_ptr() != where[n]}
    assert moved == {n for n, p in model.named_parameters() if p.dim() == 2 and "wpe" not in n}
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.lm_head.weight is head is model.transformer.wte.weight  # still tied
    assert decode_step(model, 1) is step  # moving them does not make the step look stale
    # the model still trains (in place, where the step reads), and decoding follows it
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(1))
    model(ids, ids)[1].backward()
    opt.step()
    model.eval()
    assert not torch.equal(model.lm_head.weight, before["lm_head.weight"])
    idx = ids[:1, :4]
    plain = generate(model, idx, 20, temperature=0, kernels=False)
    assert torch.equal(generate(model, idx, 20, temperature=0), plain)


@needs_cc
def test_weights_moved_under_inference_mode_stay_ordinary_tensors() -> None:
    """`generate` under `torch.inference_mode()` (as the commands and the server call it) moves a
    bfloat16 model's matrices; they must not become inference tensors, which the model could not
    be trained on afterwards, and on which torch's matmul broadcasts the head per row."""
    model = gpt().to(torch.bfloat16)
    idx = torch.randint(0, 101, (1, 4), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        generate(model, idx, 3, temperature=0)
    assert decode_step(model, 1).native is not None
    assert not any(p.is_inference() for p in model.parameters())
    model.train()
    model(idx, idx)[1].backward()  # "Inference tensors cannot be saved for backward" before
    assert model.lm_head.weight.grad is not None


@needs_cc
def test_a_float32_model_decoded_in_bfloat16_keeps_its_own_weights() -> None:
    model = gpt()
    where = {n: p.data_ptr() for n, p in model.named_parameters()}
    assert native.native_step(model, torch.bfloat16) is not None
    assert where == {n: p.data_ptr() for n, p in model.named_parameters()}
    assert all(p.dtype == torch.float32 for p in model.parameters())


@needs_cc
def test_sampling_draws_the_same_tokens_as_the_plain_model() -> None:
    model = gpt()
    idx = torch.randint(0, 101, (1, 3), generator=torch.Generator().manual_seed(4))
    a = generate(model, idx, 30, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = generate(
        model,
        idx,
        30,
        temperature=1.0,
        generator=torch.Generator().manual_seed(5),
        kernels=False,
    )
    assert torch.equal(a, b)


def test_off_switch_and_no_compiler_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    native.load_library.cache_clear()
    try:
        monkeypatch.setenv("GPT2LAB_NATIVE", "0")
        assert native.load_library() is None
        assert native.native_step(gpt(), torch.float32) is None
        native.load_library.cache_clear()
        monkeypatch.delenv("GPT2LAB_NATIVE")
        monkeypatch.setenv("CC", "no-such-compiler-anywhere")
        assert native.load_library() is None
        step = decode_step(gpt(), 1)  # the PyTorch step still runs
        assert step is not None and step.native is None
        assert decode_step(gpt().half(), 1) is None  # float16: the model's own forward
    finally:
        native.load_library.cache_clear()


@needs_cc
def test_build_is_cached_and_leaves_no_partial_file(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    native.load_library.cache_clear()
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        assert native.load_library() is not None
        built = list((tmp_path / "gpt2lab" / "native").iterdir())
        assert len(built) == 1 and built[0].name.startswith("kernels-")
        assert built[0].suffix == ".so"
        mtime = built[0].stat().st_mtime_ns
        native.load_library.cache_clear()
        assert native.load_library() is not None  # loaded again, not rebuilt
        assert built[0].stat().st_mtime_ns == mtime
    finally:
        native.load_library.cache_clear()


def plain_int8(model: GPT) -> GPT:
    """`quantize(model)` with every matrix unpacked from fbgemm: each product then runs
    Int8Linear's plain CPU path (the input's rows rounded to int8, torch._int_mm, scaled)."""
    q = quantize(model, "int8")
    for name, m in list(q.named_modules()):
        if isinstance(m, Int8Linear) and m.packed is not None:
            q.set_submodule(name, Int8Linear(m.int8_weight(), m.scale, m.bias, pack=False))
    return q


def dequantized_twin(model: GPT, q: GPT) -> GPT:
    """A float GPT whose matrices are the int8 model's values times its scales."""
    twin = copy.deepcopy(model)
    vocab = model.config.vocab_size
    with torch.no_grad():
        for mine, theirs in zip(twin.transformer.h, q.transformer.h):
            for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                mine.get_submodule(name).weight.copy_(theirs.get_submodule(name).dequantized())
        twin.lm_head.weight[:vocab].copy_(q.lm_head.dequantized())  # tied: the table too
    return twin


@needs_cc
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("n_embd", [64, 40, 200])  # one VNNI block; none; two blocks and a tail
def test_int8_step_equals_the_int8_products_of_pytorch(compact: bool, n_embd: int) -> None:
    """Each int8 product rounds its input to int8 (one scale) and sums the 8-bit products
    exactly: the same logits as Int8Linear's plain path through the model's own forward, and a
    different model from the weight-only one (int8 weights times float32 inputs)."""
    model = gpt(n_embd=n_embd)
    q = quantize(model, "int8", compact=compact)
    ids = torch.randint(0, 101, (1, 48), generator=torch.Generator().manual_seed(6))
    plain = plain_int8(model)
    ours = native_logits(q, ids, torch.float32)
    ref = model_logits(plain, ids, torch.float32)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    weight_only = model_logits(dequantized_twin(model, q), ids, torch.float32)
    assert (weight_only - ref).abs().max() > 100 * (ours - ref).abs().max()
    step = decode_step(plain, 1)  # (q's prompt runs through fbgemm, which rounds otherwise)
    assert step is not None and step.native is not None
    idx = ids[:, :4]
    fast = generate(plain, idx, 40, temperature=0)
    assert torch.equal(fast, generate(plain, idx, 40, temperature=0, kernels=False))


@needs_cc
def test_int8_sums_are_the_same_without_vnni(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain C loop a CPU without VNNI runs gives the very logits the VNNI one does (both sum
    the 8-bit products exactly)."""
    model = gpt(n_embd=200)
    q = quantize(model, "int8")
    ids = torch.randint(0, 101, (1, 24), generator=torch.Generator().manual_seed(7))
    vnni = native_logits(q, ids, torch.float32)
    native.load_library.cache_clear()
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        monkeypatch.setattr(native, "FLAGS", [*native.FLAGS, "-mno-avx512vnni", "-mno-avx512bf16"])
        assert torch.equal(native_logits(q, ids, torch.float32), vnni)
    finally:
        native.load_library.cache_clear()


@needs_cc
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flags")
def test_the_portable_c_loops_give_the_vector_loops_logits(tmp_path, monkeypatch) -> None:
    """A build without AVX-512 (plain loops for products, attention, GELU, int8 rounding) gives
    the logits of the default build, float32 and int8, up to float summation order."""
    models = {"float32": gpt(n_embd=64), "int8": quantize(gpt(n_embd=200, seed=1), "int8")}
    models["float16"] = gpt(n_embd=72, seed=2).half()  # 72: vector loops and scalar tails
    dtypes = {"float16": torch.float16}
    ids = torch.randint(0, 101, (1, 24), generator=torch.Generator().manual_seed(7))
    vector = {k: native_logits(m, ids, dtypes.get(k, torch.float32)) for k, m in models.items()}
    native.load_library.cache_clear()
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        monkeypatch.setattr(native, "FLAGS", [*native.FLAGS, "-mno-avx512f"])
        for k, m in models.items():
            plain = native_logits(m, ids, dtypes.get(k, torch.float32))
            scale = vector[k].abs().max()
            # float16: a sum that differs in its last bits may round the cache the other way
            tol = 1e-3 if k == "float16" else 1e-5
            assert (plain - vector[k]).abs().max() <= tol * scale, k
    finally:
        native.load_library.cache_clear()


@needs_cc
def test_out_of_range_token_or_position_raises_instead_of_reading_past_the_tables() -> None:
    model = gpt()
    step = native.native_step(model, torch.float32)
    cache = KVCache(model.config, 1, model.config.block_size, "cpu", torch.float32)
    with pytest.raises(IndexError):
        step.step(torch.tensor([[10_000]]), cache)
    cache.pos = model.config.block_size
    with pytest.raises(IndexError):
        step.step(torch.tensor([[1]]), cache)
    cache.pos = 3
    with pytest.raises(IndexError):  # a left-padded row's position below 0
        step.step(torch.tensor([[1]]), cache, torch.tensor([[-1]]))
    with pytest.raises(ValueError):  # more rows than the cache holds: C would write past it
        step.step(torch.tensor([[1], [2]]), cache)
    with pytest.raises(ValueError):  # a mask of another shape
        step.step(torch.tensor([[1]]), cache, None, torch.ones(1, 2, dtype=torch.bool))
    assert cache.pos == 3
