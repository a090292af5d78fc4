"""`gpt2lab.quantize(model, "int8")`: exact scales, the memory it saves, and a trained model's
greedy choices and perplexity kept (the demo's model, trained here at a small size, on
characters and on GPT-2's BPE)."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt2lab
from gpt2lab import cli
from gpt2lab.config import GPTConfig
from gpt2lab.errors import ConfigError
from gpt2lab.model import GPT
from gpt2lab.quantize import (
    Int8Embedding,
    Int8Linear,
    dequantize_rows,
    model_bytes,
    quantize,
    quantize_rows,
)


def test_scales_round_trip_exactly():
    torch.manual_seed(0)
    w = torch.randn(300, 96) * torch.logspace(-6, 3, 300)[:, None]  # rows over 9 decades
    w[7] = 0.0  # an all-zero row
    w[8, 3] = 1e-30  # a row with one tiny value
    values, scale = quantize_rows(w)
    assert values.dtype == torch.int8 and scale.dtype == torch.float32
    again_values, again_scale = quantize_rows(dequantize_rows(values, scale))
    assert torch.equal(again_values, values)
    assert torch.equal(again_scale, scale)  # bit-identical, not merely close
    # symmetric, full range: each nonzero row reaches +-127, and the error is half a step at most
    nonzero = w.abs().amax(1) > 0
    assert torch.equal(values.abs().amax(1)[nonzero], torch.full((299,), 127, dtype=torch.int8))
    assert bool(((dequantize_rows(values, scale) - w).abs() <= scale[:, None] / 2 * 1.0001).all())
    assert torch.equal(values[7], torch.zeros(96, dtype=torch.int8))


@pytest.mark.parametrize("amax", [1e-45, 1e-43, 1e-40, 1.2e-38, 1e38, torch.finfo().max])
def test_scales_round_trip_at_float32s_extremes(amax):
    """Subnormal rows and rows near float32's largest value: scales still round-trip, nothing
    dequantizes to infinity, and the error stays within half a step (a step of 0 for rows whose
    step underflows: they become zeros)."""
    w = torch.tensor([[amax, -amax, amax / 3, 0.0]])
    values, scale = quantize_rows(w)
    back = dequantize_rows(values, scale)
    assert bool(back.isfinite().all())
    again = quantize_rows(back)
    assert torch.equal(again[0], values) and torch.equal(again[1], scale)
    step = float(scale) if amax / 127 > 0 else amax
    assert bool(((back - w).abs() <= step / 2 * 1.0001 + 1e-45).all()), (back, w)


def test_weights_with_nan_or_inf_are_refused(tiny_cfg):
    """A NaN has no row scale: quantizing would make values up and hide a broken model."""
    from gpt2lab.errors import CheckpointError

    for bad in (float("nan"), float("inf")):
        model = GPT(tiny_cfg)
        with torch.no_grad():
            model.transformer.h[1].mlp.c_fc.weight[3, 5] = bad
        with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight .*NaN"):
            quantize(model, "int8")


def test_every_matrix_is_int8_and_the_rest_stays_float(tiny_cfg):
    model = GPT(tiny_cfg).eval()
    q = gpt2lab.quantize(model, "int8")
    linears = [m for m in q.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears, linears
    int8 = [m for m in q.modules() if isinstance(m, Int8Linear)]
    assert len(int8) == 4 * tiny_cfg.n_layer + 1  # the head included
    assert isinstance(q.transformer.wte, Int8Embedding)
    for name, p in q.named_parameters():  # LayerNorms and the position embedding
        assert p.dtype == torch.float32, name
    assert q.transformer.wpe.weight.dtype == torch.float32
    # the original is untouched, and int8 values equal those of quantize_rows
    assert isinstance(model.transformer.h[0].attn.c_attn, torch.nn.Linear)
    w = model.transformer.h[1].mlp.c_fc.weight
    assert torch.equal(q.transformer.h[1].mlp.c_fc.int8_weight(), quantize_rows(w)[0])
    head = quantize_rows(model.lm_head.weight[: tiny_cfg.vocab_size])
    assert torch.equal(q.lm_head.int8_weight(), head[0])
    assert torch.equal(q.transformer.wte.values, head[0])  # the tied table: the head's rows


def test_unknown_method_is_a_one_line_error(tiny_cfg):
    with pytest.raises(ConfigError, match="int4"):
        quantize(GPT(tiny_cfg), "int4")


def test_a_quantized_model_is_not_quantized_again_or_saved_as_float(tiny_cfg, tmp_path):
    from gpt2lab.checkpoint.gguf import save_gguf
    from gpt2lab.checkpoint.hf import save_hf
    from gpt2lab.checkpoint.onnx import save_onnx
    from gpt2lab.checkpoint.weights import save_model_safetensors
    from gpt2lab.errors import CheckpointError
    from gpt2lab.tokenizer import get_tokenizer

    q = quantize(GPT(tiny_cfg), "int8")
    with pytest.raises(ConfigError, match="already has int8 weights"):
        quantize(q, "int8")
    writers = [
        lambda: save_model_safetensors(q, tmp_path / "m.safetensors"),
        lambda: save_hf(q, tmp_path / "hf"),
        lambda: save_onnx(q, tmp_path / "m.onnx"),
        lambda: save_gguf(q, tmp_path / "m.gguf", get_tokenizer("char", text="abc")),
    ]
    for write in writers:
        with pytest.raises(CheckpointError, match="int8 weights .* save or export the model you"):
            write()
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_int8_model_equals_transformers_on_the_dequantized_weights(tiny_cfg, tmp_path):
    """The int8 model computes what an independent implementation computes on its dequantized
    weights, up to the 8-bit rounding of the activations."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT(tiny_cfg).eval()
    q = quantize(model, "int8")
    deq = GPT(tiny_cfg).eval()
    with torch.no_grad():
        deq.load_state_dict(model.state_dict())
        for name, own in q.named_modules():
            if isinstance(own, Int8Linear) and name != "lm_head":
                deq.get_submodule(name).weight.copy_(own.dequantized())
        deq.transformer.wte.weight[: tiny_cfg.vocab_size].copy_(q.lm_head.dequantized())
    deq.save_pretrained(tmp_path / "hf")
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, tiny_cfg.vocab_size, (3, 20))
    with torch.no_grad():
        want = ref(idx).logits[..., : tiny_cfg.vocab_size]
        got, _ = q(idx)
    err = (got - want).abs().max() / want.std()
    assert err < 0.05, err


def _held_bytes(model) -> int:
    """Bytes of the model and of what its decoding steps keep, each storage once."""
    from gpt2lab.kernels.cpu_decode import _STEPS

    kept = [t for s in _STEPS.get(model, {}).values() if s.native for t in s.native.keep]
    tensors = [*model.parameters(), *model.buffers(), *kept]
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    packed = sum(
        m.out_features * m.in_features
        for m in model.modules()
        if isinstance(m, Int8Linear) and m.packed is not None
    )
    return sum(seen.values()) + packed


def test_memory_of_gpt2_small_is_at_most_0_3x_float32():
    from gpt2lab.kernels.cpu_decode import decode_step

    torch.manual_seed(0)
    model = GPT(GPTConfig()).eval()  # the 124M shape
    f32 = model_bytes(model)
    compact = quantize(model, "int8")
    assert model_bytes(compact) <= 0.30 * f32, model_bytes(compact) / f32
    assert compact.lm_head.values is compact.transformer.wte.values  # the tied table, once
    # compact=False packs every matrix for fbgemm too (a second int8 copy of the table)
    fast = quantize(model, "int8", compact=False)
    assert model_bytes(fast) <= 0.34 * f32, model_bytes(fast) / f32
    idx = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        want, a, b = model(idx)[0], compact(idx)[0], fast(idx)[0]
    for got in (a, b):  # per-row or per-call input scales: both close to the float model
        assert (got - want).pow(2).mean().sqrt() < 0.05 * want.std()
    # decoding keeps it so: the C step reads the compact model's values in place, and one C step
    # serves every batch size
    for batch in (1, 2, 3):
        compact.generate(idx.expand(batch, -1), 2, temperature=0)
    step = decode_step(compact, 1)
    assert step is not None
    if step.native is not None:
        assert decode_step(compact, 3).native is step.native
        assert _held_bytes(compact) <= 0.30 * f32, _held_bytes(compact) / f32


# ---- a trained model: the demo's, at a small size -------------------------------------------


def _train_demo(text_file: Path, out: Path, tokenizer: str, steps: int, lr: float) -> Path:
    text = out.parent / "input.txt"
    text.write_text(text_file.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    args = ["demo", "--input", str(text), "--out", str(out), "--minutes", "2", "--no-progress"]
    args += ["--tokenizer", tokenizer, "--samples", "1", "--sample-tokens", "10"]
    args += ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=64"]
    args += ["--model.block_size=64", "--train.micro_batch_size=8", f"--train.max_steps={steps}"]
    args += [f"--train.eval_interval={steps}", "--train.eval_steps=1", "--train.warmup_steps=10"]
    args += [f"--train.lr={lr}", "--train.sample_tokens=10", "--train.dtype=float32"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(args) == 0
    return out


@pytest.fixture(scope="module")
def trained(tiny_shakespeare: Path, tmp_path_factory) -> Path:
    """The demo's character model at a small size."""
    return _train_demo(tiny_shakespeare, tmp_path_factory.mktemp("q") / "run", "char", 80, 3e-3)


@pytest.fixture(scope="module")
def trained_bpe(tiny_shakespeare: Path, tmp_path_factory) -> Path:
    """The same recipe on GPT-2's BPE: 50,257 ids, so the int8 head is most of the model."""
    return _train_demo(tiny_shakespeare, tmp_path_factory.mktemp("q") / "run", "gpt2", 60, 6e-3)


def _val_windows(run: Path, T: int = 64, n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    from gpt2lab.data import load_tokens

    val = np.asarray(load_tokens(run / "data", "val"), dtype=np.int64)
    n = min(n, (len(val) - 1) // T)
    x = np.stack([val[i * T : i * T + T] for i in range(n)])
    y = np.stack([val[i * T + 1 : i * T + T + 1] for i in range(n)])
    return torch.from_numpy(x), torch.from_numpy(y)


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_trained_model_keeps_greedy_choices_and_perplexity(tokenizer, request):
    from gpt2lab.checkpoint.load import load_model

    trained = request.getfixturevalue("trained" if tokenizer == "char" else "trained_bpe")
    bf16, _ = load_model(trained, dtype=torch.bfloat16)
    f32, _ = load_model(trained, dtype=torch.float32)
    q = quantize(f32, "int8")
    x, y = _val_windows(trained)
    with torch.no_grad():
        ref_logits, ref_loss = bf16(x, y)
        q_logits, q_loss = q(x, y)
    # it learned: well below guessing among the characters (or GPT-2's 50,257 ids)
    assert ref_loss.item() < math.log(ref_logits.size(-1)) - (0.8 if tokenizer == "char" else 4)
    agree = (ref_logits.argmax(-1) == q_logits.argmax(-1)).float().mean().item()
    assert agree >= 0.95, agree
    assert math.exp(q_loss.item()) <= 1.01 * math.exp(ref_loss.item()), (q_loss, ref_loss)
    # free-running greedy continuations agree as well
    prompts = x[:8, :16]
    a = bf16.generate(prompts, 32, temperature=0)[:, 16:]
    b = q.generate(prompts, 32, temperature=0)[:, 16:]
    assert (a == b).float().mean().item() >= 0.75  # a row that parts once stays apart
    # one row at a time: the C step's int8 products where a compiler is at hand
    one = torch.cat([q.generate(prompts[i : i + 1], 32, temperature=0)[:, 16:] for i in range(8)])
    assert (a == one).float().mean().item() >= 0.75


def test_sample_quantize_int8_flag(trained, capsys):
    args = ["sample", "--model", str(trained), "-p", "ROMEO:", "-m", "24", "--temperature", "0"]
    assert cli.main([*args, "--quantize", "int8"]) == 0
    int8_text = capsys.readouterr().out
    from gpt2lab.checkpoint.load import load_model

    model, tok = load_model(trained, dtype=torch.float32)
    ids = torch.tensor([tok.encode("ROMEO:")])
    want = tok.decode(quantize(model, "int8").generate(ids, 24, temperature=0)[0].tolist())
    assert int8_text.startswith(want)
    assert cli.main([*args, "--quantize", "int4"]) == 2
    assert "int4" in capsys.readouterr().err


@pytest.mark.parametrize("c_step", [True, False])
def test_int8_decode_step_equals_the_int8_models_forward(c_step, monkeypatch):
    """The flat step equals the forward of the model whose products it computes: the C step
    rounds each input row to int8 with its own scale (Int8Linear's plain path, `pack=False`), the
    PyTorch step runs fbgemm's packed products, as the quantized model does."""
    from gpt2lab.kernels import cpu_decode
    from gpt2lab.kernels.int8 import Int8Linear
    from gpt2lab.model import KVCache

    if not c_step:
        monkeypatch.setattr(cpu_decode, "native_step", lambda *a: None)
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg).eval()
    with torch.no_grad():  # spread-out logits, so greedy choices are not decided by rounding
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    q = quantize(model, "int8")
    step = cpu_decode.decode_step(q, 2)
    if step is None:
        pytest.skip("no fbgemm in this build")
    reference = q
    if step.native is not None:  # the same values, each product on Int8Linear's plain path
        reference = quantize(model, "int8")
        for name, m in list(reference.named_modules()):
            if isinstance(m, Int8Linear) and m.packed is not None:
                plain = Int8Linear(m.int8_weight(), m.scale, m.bias, pack=False)
                reference.set_submodule(name, plain)
    idx = torch.randint(0, 97, (2, 5))
    caches = [KVCache(cfg, 2, 8), KVCache(cfg, 2, 8)]
    with torch.no_grad():
        for c in caches:
            reference(idx, cache=c)
        want = reference(idx[:, :1], cache=caches[0])[0][:, -1]
        got = step.step(idx[:, :1], caches[1])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    plain = reference.generate(idx, 12, temperature=0, kernels=False)
    assert q.generate(idx, 12, temperature=0).tolist() == plain.tolist()


def test_int8_with_its_plain_head_decodes_through_the_flat_step_too():
    from gpt2lab.kernels.cpu_decode import decode_step

    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    q = quantize(model, "int8")
    assert q.lm_head.packed is None and decode_step(q, 2) is not None
    idx = torch.randint(0, 97, (2, 5))
    plain = q.generate(idx, 12, temperature=0, kernels=False)
    assert q.generate(idx, 12, temperature=0).tolist() == plain.tolist()
