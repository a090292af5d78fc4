"""MFU's denominator: the datasheet peak found from a GPU's name."""

from __future__ import annotations

import pytest
import torch

from gpt2lab.train import metrics


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A10G", 125e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA L4", 121e12),
        ("Some Future GPU", 100e12),  # unknown: a round guess, which train.peak_flops overrides
    ],
)
def test_datasheet_peak_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda")
    assert metrics.peak_flops(cuda, torch.bfloat16) == peak
    if name != "Some Future GPU":
        assert metrics.peak_flops(cuda, torch.float32) == peak / 2  # TF32
    assert metrics.peak_flops(cuda, torch.bfloat16, configured=5e12) == 5e12
