"""Device, dtype and allocator choices."""

from __future__ import annotations

import sys

import pytest
import torch

from gpt2lab.device import autocast, keep_freed_memory, pick_device, pick_dtype
from gpt2lab.errors import ConfigError


def test_auto_device_and_dtype_on_this_machine():
    device = pick_device("auto")
    assert device.type in ("cpu", "cuda", "mps")
    assert pick_dtype("float32", device) == torch.float32
    assert pick_dtype("auto", torch.device("cpu")) in (torch.float32, torch.bfloat16)


def test_bad_choices_are_config_errors():
    with pytest.raises(ConfigError, match="unknown dtype"):
        pick_dtype("fp8", torch.device("cpu"))
    with pytest.raises(ConfigError, match="float16 autocast is not supported on the CPU"):
        pick_dtype("float16", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            pick_device("cuda")


def test_autocast_is_a_no_op_for_float32():
    with autocast(torch.device("cpu"), torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), torch.bfloat16):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.bfloat16


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_applies_on_glibc():
    assert keep_freed_memory() is True
    x = torch.randn(1024, 1024)  # allocation still works afterwards
    assert float(x.sum()) == float(x.sum())
