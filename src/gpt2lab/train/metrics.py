"""What a run reports: metrics.jsonl rows, TensorBoard / W&B mirrors, and MFU's hardware peak."""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from gpt2lab.errors import ConfigError, mark_key
from gpt2lab.io import atomic_write_text

# Dense bf16/fp16 tensor-core peaks from the vendors' datasheets, FLOP/s.
_GPU_PEAKS = {  # dense bfloat16; the first key found in the device's name wins
    "B200": 2250e12,
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "A10": 125e12,
    "L4": 121e12,
    "4090": 165e12,
    "3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def peak_flops(device: torch.device, dtype: torch.dtype, configured: float = 0.0) -> float:
    """Peak FLOP/s: the configured value, a datasheet figure, or a CPU matmul probe."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in _GPU_PEAKS.items():
            if key in name:
                return peak if dtype != torch.float32 else peak / 2  # TF32 runs at half rate
        return 100e12
    return _cpu_probe(dtype)


@functools.lru_cache(maxsize=4)
def _cpu_probe(dtype: torch.dtype) -> float:
    """Best of a few large matmuls: what this CPU reaches in practice (no datasheet to read)."""
    n = 1024
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


class MetricsLog:
    """Appends one JSON row per logged step to RUN_DIR/metrics.jsonl (rank 0 only)."""

    def __init__(
        self,
        run_dir: Path,
        resume_step: int | None,
        tensorboard: bool,
        wandb: str,
        config: dict[str, Any],
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # rows logged after the checkpoint we resume from would be logged twice: drop them
            keep = [
                ln
                for ln in self.path.read_text(encoding="utf-8", errors="replace").splitlines()
                if ln.strip() and _step(ln) <= resume_step
            ]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run
        self.tb = self.wb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError(
                    f"{mark_key('train.tensorboard', 'true')} needs the tensorboard package",
                    "tensorboard installed",
                    "pip install 'gpt2lab[log]' or drop the flag",
                ) from e
            self.tb = SummaryWriter(str(run_dir / "tb"))
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError as e:
                raise ConfigError(
                    f"{mark_key('train.wandb', wandb)} needs the wandb package",
                    "wandb installed",
                    "pip install 'gpt2lab[log]' or drop the flag",
                ) from e
            self.wb = wandb_lib.init(
                project=wandb, name=run_dir.name, config=config, dir=str(run_dir), resume="allow"
            )

    def write(self, row: dict[str, Any]) -> None:
        """Record one row (floats rounded to what a plot needs)."""
        clean = {
            k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
            for k, v in row.items()
        }
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        step = int(row["step"])
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wb is not None:
            self.wb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def _step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError, OverflowError):
        return 1 << 62  # an unreadable row (torn by a crash, damaged) is dropped too


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of RUN_DIR/metrics.jsonl: its JSON objects. Other lines (a torn last line from a
    crash, damaged bytes, values that are not objects) are skipped."""
    rows = []
    text = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8", errors="replace")
    for ln in text.splitlines():
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def number(row: dict[str, Any], key: str) -> float | None:
    """row[key] where it is a number (not a bool); None for anything else or nothing."""
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
