"""Our GGUF files run in llama.cpp itself (llama-cpp-python): same tokens, greedy ids, logits.

Opt-in (`make test-interop`): llama-cpp-python compiles llama.cpp from source when installed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpt2lab import cli
from gpt2lab.checkpoint.gguf import save_gguf
from gpt2lab.config import GPTConfig
from gpt2lab.model import GPT
from gpt2lab.tokenizer import EOT, train_bpe

pytestmark = pytest.mark.interop
llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)"
)

PROMPT = "ROMEO: But soft, what light"
# largest |logit difference| allowed, relative to the largest |logit| of the prompt
# (f32: llama.cpp's CPU kernels sum in another order; measured up to 1.04e-4 on this model.
# q8_0: llama.cpp quantizes the activations to 8 bits as well; measured 7.2e-3 on this 64-wide
# model, 1.3e-2 at 256 wide and 1.9e-2 at 768 wide. llama-cpp-python 0.3.36 compiled with
# GGML_NATIVE on an AVX512 AMD EPYC segfaulted on every q8_0 file; compiled for AVX2 it does not,
# see docs/convert.md)
TOLERANCE = {"f32": 2e-4, "f16": 5e-3, "bf16": 3e-2, "q8_0": 3e-2}


@pytest.fixture(scope="module")
def tokenizer(tiny_shakespeare):
    text = tiny_shakespeare.read_text(encoding="utf-8")[:50_000]
    return train_bpe(text, vocab_size=400, special_tokens=(EOT,))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=128, vocab_size=tokenizer.n_vocab, n_layer=2, n_head=2, n_embd=64)
    return GPT(cfg).eval()


def open_llama(path):
    # float32 keys and values (llama.cpp's default cache is float16), so what is compared is the
    # weights' type alone
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(
        str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, type_k=f32, type_v=f32
    )


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_logits_agree(model, tokenizer, tmp_path, outtype):
    save_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, outtype=outtype)
    llm = open_llama(tmp_path / "m.gguf")
    ids = tokenizer.encode(PROMPT)
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0, :, : model.config.vocab_size].numpy()
    scale = float(np.abs(ours).max())
    np.testing.assert_allclose(theirs, ours, atol=TOLERANCE[outtype] * scale, rtol=0)


def test_greedy_64_tokens_equal_gpt2lab_sample_at_f32(
    model, tokenizer, tmp_path, write_run, capsys
):
    """llama.cpp's 64 greedy ids equal `gpt2lab sample --temperature 0` on the run directory."""
    model = GPT(model.config).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # weights 8x the 0.02 init: a random model whose greedy path wanders
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.16)
    run = write_run(tmp_path / "run", model, tokenizer)
    save_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, outtype="f32")
    llm = open_llama(tmp_path / "m.gguf")
    ids = tokenizer.encode(PROMPT)
    theirs = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        theirs.append(int(token))
        if len(theirs) == 64:
            break
    argv = ["sample", "--model", str(run), "-p", PROMPT, "-m", "64", "--temperature", "0"]
    assert cli.main([*argv, "--dtype", "float32", "--json", "--ignore-eos"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["prompt_ids"] == ids and row["ids"] == theirs
    assert len(set(theirs)) > 1
