"""References for the tokenizer tests: tiktoken and HF `tokenizers` offline from GPT-2's files."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def gpt2_dir() -> Path:
    from gpt2lab.tokenizer.files import gpt2_files_dir

    return gpt2_files_dir()


@pytest.fixture(scope="session")
def pinned_hashes() -> dict[str, str]:
    """The sha256 of GPT-2's two files pinned in tiktoken's source (its `gpt2()` entry)."""
    import inspect
    import re

    from tiktoken_ext import openai_public

    src = inspect.getsource(openai_public.gpt2)
    return {
        "vocab.bpe": re.search(r'vocab_bpe_hash="([0-9a-f]{64})"', src).group(1),
        "encoder.json": re.search(r'encoder_json_hash="([0-9a-f]{64})"', src).group(1),
    }


@pytest.fixture(scope="session")
def ref_tiktoken(gpt2_dir, pinned_hashes, tmp_path_factory):
    """tiktoken's own GPT-2 encoding, read by tiktoken's parser from local files."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    hashes = pinned_hashes
    with pytest.MonkeyPatch.context() as mp:  # tiktoken caches what it reads; keep it private
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-cache")))
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(gpt2_dir / "vocab.bpe"),
            encoder_json_file=str(gpt2_dir / "encoder.json"),
            vocab_bpe_hash=hashes["vocab.bpe"],
            encoder_json_hash=hashes["encoder.json"],
        )
    # the pattern and special token come from tiktoken's registry module, not from us
    return tiktoken.Encoding(
        "gpt2-ref", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: 50256}
    )


@pytest.fixture(scope="session")
def ref_hf(gpt2_dir):
    """HF `tokenizers` byte-level BPE on GPT-2's files (its own regex and merge loop)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(
        models.BPE.from_file(str(gpt2_dir / "encoder.json"), str(gpt2_dir / "vocab.bpe"))
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.fixture(scope="session")
def gpt2_fast():
    from gpt2lab.tokenizer import get_tokenizer

    return get_tokenizer("gpt2")


@pytest.fixture(scope="session")
def gpt2_py():
    from gpt2lab.tokenizer import get_tokenizer

    return get_tokenizer("gpt2", backend="python")
