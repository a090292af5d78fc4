"""ONNX exports run by onnxruntime (CPU): logits equal ours within 1e-4, full and cached."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpt2lab.checkpoint.onnx import ONNX_LIMIT, save_onnx
from gpt2lab.config import GPTConfig
from gpt2lab.errors import CheckpointError
from gpt2lab.model import GPT

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx's dynamo exporter


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=32)
    return GPT(cfg).eval()


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def ours(model, ids):
    with torch.no_grad():
        return model(ids)[0].numpy()


def test_logits_for_any_batch_and_length(model, tmp_path):
    save_onnx(model, tmp_path / "m.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temp file left behind
    run = session(tmp_path / "m.onnx")
    assert [i.name for i in run.get_inputs()] == ["input_ids"]
    for shape in [(1, 1), (3, 17), (2, 32)]:
        ids = torch.randint(0, 97, shape)
        (logits,) = run.run(None, {"input_ids": ids.numpy()})
        assert logits.shape == (*shape, 97)
        np.testing.assert_allclose(logits, ours(model, ids), atol=1e-4, rtol=0)


def test_prompt_then_16_cached_steps(model, tmp_path):
    save_onnx(model, tmp_path / "m.onnx", past=True)
    run = session(tmp_path / "m.onnx")
    assert [o.name for o in run.get_outputs()] == ["logits", "present_keys", "present_values"]
    ids = torch.randint(0, 97, (3, 20))
    full = ours(model, ids)
    cfg = model.config
    keys = values = np.zeros((cfg.n_layer, 3, cfg.n_head, 0, cfg.head_size), np.float32)
    steps = [ids[:, :4]] + [ids[:, i : i + 1] for i in range(4, 20)]  # a prompt, then 16 tokens
    done = 0
    for step in steps:
        feed = {"input_ids": step.numpy(), "past_keys": keys, "past_values": values}
        logits, keys, values = run.run(None, feed)
        new = step.shape[1]
        np.testing.assert_allclose(logits, full[:, done : done + new], atol=1e-4, rtol=0)
        done += new
    assert keys.shape == values.shape == (cfg.n_layer, 3, cfg.n_head, 20, cfg.head_size)


def test_a_model_over_2_gib_is_a_one_line_error(tmp_path):
    # a meta-device model: the size check comes before any weight is touched
    with torch.device("meta"):
        big = GPT(GPTConfig(block_size=1024, vocab_size=50257, n_layer=48, n_head=25, n_embd=1600))
    assert big.num_params() * 4 >= ONNX_LIMIT
    with pytest.raises(CheckpointError, match="2 GiB") as err:
        save_onnx(big, tmp_path / "xl.onnx")
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())
