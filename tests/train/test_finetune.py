"""Fine-tuning from a checkpoint that transformers wrote, in one command from a text file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from trainutil import tiny_config

from gpt2lab import cli
from gpt2lab.errors import TokenizerError
from gpt2lab.train import train

transformers = pytest.importorskip("transformers")


def _hf_loss(model_dir, tokens: np.ndarray, T: int) -> float:
    """Mean next-token loss of a transformers model over non-overlapping windows."""
    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()
    n = (len(tokens) - 1) // T
    x = torch.from_numpy(tokens[: n * T].astype(np.int64).reshape(n, T))
    y = torch.from_numpy(tokens[1 : n * T + 1].astype(np.int64).reshape(n, T))
    with torch.no_grad():
        logits = model(x).logits
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), y.reshape(-1)
    ).item()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=50257)
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def test_finetuning_a_transformers_checkpoint_on_a_text_file_lowers_its_loss(
    tmp_path, hf_dir, tiny_shakespeare, capsys
):
    from gpt2lab.data import load_tokens
    from gpt2lab.model import GPT

    text = tmp_path / "my.txt"
    text.write_text(tiny_shakespeare.read_text(encoding="utf-8")[200_000:230_000], encoding="utf-8")
    run = tmp_path / "ft"
    argv = [
        "train",
        "--init-from",
        str(hf_dir),
        "--data",
        str(text),
        "--out",
        str(run),
        "--preset",
        "finetune",
        "--train.max_steps=12",
        "--train.lr=1e-2",
        "--train.min_lr=1e-3",
        "--train.warmup_steps=2",
        "--train.micro_batch_size=4",
        "--train.grad_accum_steps=1",
        "--train.device=cpu",
        "--train.dtype=float32",
        "--train.eval_interval=12",
        "--train.eval_steps=2",
        "--no-plot",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    val = load_tokens(run / "data", "val")
    assert len(val) > 500  # the last 10% of the file, tokenized with GPT-2's vocabulary
    before = _hf_loss(hf_dir, val, 32)
    GPT.from_pretrained(run).save_pretrained(tmp_path / "exported")
    after = _hf_loss(tmp_path / "exported", val, 32)
    assert after < before - 1.0, (before, after)


def test_data_with_another_tokenizer_is_refused(tmp_path, hf_dir, char_data):
    cfg = tiny_config(char_data, f"train.init_from={hf_dir}")
    with pytest.raises(TokenizerError, match="tokenized with char"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
