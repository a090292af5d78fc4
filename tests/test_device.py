"""Device, dtype and allocator choices."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gpt2lab.device import autocast, pick_device, pick_dtype
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


@pytest.mark.parametrize("name", ["xpu:0", "meta", "CUDA", "cuda:x", "", "cpu cuda"])
def test_unknown_devices_are_config_errors(name):
    with pytest.raises(ConfigError, match="unknown device"):
        pick_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_missing_device_is_named_by_the_setting_that_asked_for_it():
    from gpt2lab.cli import as_flag

    with pytest.raises(ConfigError) as e:
        pick_device("cuda:1", key="device")
    assert e.value.render(as_flag).endswith("use --device cpu or install a CUDA build of torch")
    with pytest.raises(ConfigError) as e:
        pick_device("cuda")
    assert "--train.device=cpu" in e.value.render(as_flag)
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        with pytest.raises(ConfigError, match="MPS is not available"):
            pick_device("mps", key="device")


def test_autocast_is_a_no_op_for_float32():
    with autocast(torch.device("cpu"), torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), torch.bfloat16):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.bfloat16


CHURN = """
import ctypes, resource, sys
from gpt2lab.device import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def churn(n=8, size=4 << 20):  # a training step's activations: allocated, written, freed
    ptrs = [libc.malloc(size) for _ in range(n)]
    for p in ptrs:
        ctypes.memset(p, 1, size)
    for p in ptrs:
        libc.free(p)

churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    churn()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> tuple[str, int]:
    """(whether keep_freed_memory applied, page faults of 5 rounds of malloc/free) in a child
    process: mallopt changes the whole process, so the test process is left alone."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_glibc_returning_freed_memory_to_the_os():
    applied, kept = _page_faults("keep")
    default, returned = _page_faults("default")
    if applied != "True":
        pytest.skip("not glibc")
    # 8 x 4 MiB freed at once: glibc trims it back to the OS, and the next round faults every
    # page in again (8 MiB trim threshold after its dynamic mmap threshold rises to 4 MiB)
    assert default == "False" and returned >= 5 * 8 * (4 << 20) // 4096 // 2
    assert kept < returned // 100
