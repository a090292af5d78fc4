"""The package root: the public API, torch loaded only when a model is, GPT's conveniences bound."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_the_tokenizer_the_data_pipeline_and_the_cli_do_not_load_torch():
    code = (
        "import sys, gpt2lab, gpt2lab.cli, gpt2lab.tokenizer, gpt2lab.data, "
        "gpt2lab.commands.prepare, gpt2lab.commands.tokenizer; print('torch' in sys.modules)"
    )
    assert run(code) == "False"


@pytest.mark.parametrize("how", ["from gpt2lab.model import GPT", "from gpt2lab import GPT"])
def test_a_fresh_process_finds_gpts_conveniences(how):
    code = (
        f"{how}\nimport gpt2lab.model\n"
        "assert GPT is gpt2lab.model.GPT\n"
        "print(all(callable(getattr(GPT, n)) for n in "
        "('from_pretrained', 'save_pretrained', 'generate')))"
    )
    assert run(code) == "True"


def test_the_conveniences_call_their_stages(tmp_path, tiny_cfg):
    import torch

    import gpt2lab
    from gpt2lab.generate import generate
    from gpt2lab.model import GPT

    model = GPT(tiny_cfg).eval()
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(model.generate(idx, 5, temperature=0), generate(model, idx, 5, 0))
    model.save_pretrained(tmp_path / "hf")
    again = GPT.from_pretrained(tmp_path / "hf")
    assert isinstance(again, gpt2lab.GPT) and not again.training
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_exports_named_like_their_module_stay_callable_after_the_module_is_imported(tiny_cfg):
    """`import gpt2lab.quantize` binds the module to `gpt2lab.quantize`; calling it still calls
    the function, and the module's other names stay reachable."""
    import importlib

    import torch

    import gpt2lab

    for name in ("generate", "quantize"):
        importlib.import_module(f"gpt2lab.{name}")
    model = gpt2lab.GPT(tiny_cfg).eval()
    q = gpt2lab.quantize(model, "int8")
    idx = torch.zeros(1, 1, dtype=torch.long)
    assert gpt2lab.generate(q, idx, 3, temperature=0).shape == (1, 4)
    assert gpt2lab.generate.iter_tokens and gpt2lab.quantize.Int8Linear
