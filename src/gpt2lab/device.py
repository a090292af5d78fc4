"""Choosing the device, the compute dtype and the autocast context, the same way everywhere."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from pathlib import Path

import torch

from gpt2lab.errors import ConfigError, mark_key

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto", key: str = "train.device") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is missing is an error
    (naming `key`, the setting that asked for it: `train.device`, or a command's `device`)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(
            f"unknown device {name!r}", "auto, cpu, cuda, cuda:N or mps", f"fix {mark_key(key)}"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} asked for but CUDA is not available",
            "a machine with a CUDA GPU and a CUDA build of PyTorch",
            f"use {mark_key(key, 'cpu')} or install a CUDA build of torch",
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r} asked for but this machine has {torch.cuda.device_count()} GPU(s)",
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}",
            f"fix {mark_key(key)}",
        )
    if device.type == "mps" and not _mps_available():
        raise ConfigError(
            f"device {name!r} asked for but Apple's MPS is not available here",
            "a Mac with Apple silicon and an MPS build of PyTorch",
            f"use {mark_key(key, 'cpu')}",
        )
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bfloat16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str, device: torch.device, key: str = "train.dtype") -> torch.dtype:
    """`auto`: bfloat16 where the hardware does it fast (Ampere+ GPUs, bf16 CPUs), else float32.
    Errors name `key`, the setting that asked for `name`."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(
            f"unknown dtype {name!r}",
            "auto, float32, bfloat16 or float16",
            f"fix {mark_key(key)}",
        )
    if name == "float16" and device.type == "cpu":
        raise ConfigError(
            "float16 autocast is not supported on the CPU",
            "bfloat16 or float32",
            f"use {mark_key(key, 'bfloat16')} (or float32)",
        )
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision context for `dtype` (a no-op for float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Stop glibc from handing each step's freed activations back to the OS (Linux CPUs).

    By default glibc serves blocks over its mmap threshold with mmap and unmaps them when freed,
    and trims a large free heap top, so every training step page-faults its activations in anew;
    fixed thresholds keep the memory for reuse. A process-wide change: the commands make it
    (gpt2lab.commands.train_console.tune_allocator; `gpt2lab eval`, whose batches of logits
    would otherwise be faulted in anew too; and the commands that load a model to decode with,
    through gpt2lab.commands.sample.load_model_for), the library never does. Returns whether it
    applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        ok = libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(m_trim_threshold, 2**30)
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    return bool(ok)


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device` (a GPU's free memory, a Linux CPU's MemAvailable), or None."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None
