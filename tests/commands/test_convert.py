"""`gpt2lab convert` on the command line, both directions, checked with transformers' logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpt2lab import cli
from gpt2lab.checkpoint.load import load_model
from gpt2lab.commands.convert import save_native
from gpt2lab.config import GPTConfig
from gpt2lab.model import GPT
from gpt2lab.tokenizer import train_bpe
from gpt2lab.tokenizer.char import CharTokenizer

transformers = pytest.importorskip("transformers")


def test_hf_to_gpt2lab_and_back(tmp_path, capsys):
    torch.manual_seed(0)
    hc = transformers.GPT2Config(vocab_size=300, n_positions=24, n_layer=2, n_head=2, n_embd=16)
    hf = transformers.GPT2LMHeadModel(hc).eval()
    hf.save_pretrained(tmp_path / "hf")
    idx = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        expected = hf(idx).logits

    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert "gpt2lab" in capsys.readouterr().out
    state = json.loads((tmp_path / "ours" / "state.json").read_text())
    assert state["config"]["model"]["vocab_size"] == 300
    model, _ = load_model(tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], expected, atol=1e-5, rtol=0)

    assert cli.main(["convert", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, expected, atol=1e-5, rtol=0)


def test_convert_of_nothing_exits_1_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert cli.main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpt2lab: error: ") and "config.json" in err[0]
    assert not (tmp_path / "out").exists()


def _native_checkpoint(path, tokenizer):
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=tokenizer.n_vocab, n_layer=1, n_head=2, n_embd=32)
    save_native(GPT(cfg).eval(), tokenizer, path)
    return path


def test_run_to_gguf_q8_0(tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    tok = train_bpe("the cat sat on the mat. " * 30, vocab_size=262)
    ckpt = _native_checkpoint(tmp_path / "ckpt", tok)
    out = tmp_path / "m.gguf"
    assert cli.main(["convert", str(ckpt), str(out), "--outtype", "q8_0"]) == 0
    assert "gguf q8_0" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert reader.fields["general.name"].contents() == "ckpt"
    qkv = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.weight")
    assert qkv.tensor_type == gguf.GGMLQuantizationType.Q8_0 and list(qkv.shape) == [32, 96]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpt2lab: error: "), err
    return err[0]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["m.gguf", "--outtype", "q4_k"], "invalid choice"),
        (["m.bin"], ".bin"),
        (["hf_dir", "--outtype", "f16"], "GGUF files only"),
        (["m.gguf", "--to", "hf"], "drop --to"),
        (["m.gguf", "--past"], "ONNX files only"),
        (["m.onnx", "--outtype", "f16"], "GGUF files only"),
    ],
)
def test_bad_destinations_exit_2_with_one_line(tmp_path, capsys, argv, words):
    tok = train_bpe("the cat sat on the mat. " * 30, vocab_size=262)
    ckpt = _native_checkpoint(tmp_path / "ckpt", tok)
    dst, *flags = argv
    assert cli.main(["convert", str(ckpt), str(tmp_path / dst), *flags]) == 2
    assert words in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_char_model_to_gguf_exits_1_with_one_line(tmp_path, capsys):
    ckpt = _native_checkpoint(tmp_path / "ckpt", CharTokenizer("abc \n"))
    assert cli.main(["convert", str(ckpt), str(tmp_path / "m.gguf")]) == 1
    assert "byte-level BPE" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_convert_help_shows_gguf_examples(capsys):
    with pytest.raises(SystemExit):
        cli.main(["convert", "--help"])
    out = capsys.readouterr().out
    assert ".gguf --outtype q8_0" in out and "--outtype {f32,f16,bf16,q8_0}" in out
    assert ".onnx --past" in out


def test_run_to_onnx_with_past(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ckpt = _native_checkpoint(tmp_path / "ckpt", CharTokenizer("abc \n"))
    out = tmp_path / "m.onnx"
    assert cli.main(["convert", str(ckpt), str(out), "--past"]) == 0
    assert "onnx with past" in capsys.readouterr().out
    run = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = ["input_ids", "past_keys", "past_values"]
    assert [i.name for i in run.get_inputs()] == names
    model, _ = load_model(ckpt)
    ids = torch.tensor([[0, 1, 2, 3]])
    empty = np.zeros((1, 1, 2, 0, 16), np.float32)
    logits, *_ = run.run(None, dict(zip(names, [ids.numpy(), empty, empty])))
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(ids)[0].numpy(), atol=1e-4, rtol=0)
