"""What a training run shows and hears: its progress bar, metrics lines, samples, stop signals."""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch

from gpt2lab.device import autocast


class StopSignal:
    """SIGINT/SIGTERM: the first asks the loop to stop after this step; a second exits at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            raise KeyboardInterrupt  # second signal: leave now (a half checkpoint is discarded)
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def progress_bar(total: int, initial: int) -> Any:
    """A tqdm bar over optimizer steps (on stderr, so stdout stays clean for pipes)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)


def row_line(row: dict[str, Any], evaluated: bool) -> str:
    """`step 120 | loss 3.41 | lr 6.00e-04 | 27,000 tok/s | mfu 1.2%[ | val 3.50 (ppl 33.1)]`."""
    line = (
        f"step {row['step']} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
        f"{row['tokens_per_s']:,.0f} tok/s | mfu {100 * row['mfu']:.1f}%"
    )
    if evaluated:
        line += f" | val {row['val_loss']:.4f} (ppl {row['val_ppl']:.2f})"
    return line


def training_sample(
    model: Any, tok: Any, prompt: str, n_tokens: int, device: torch.device, dtype: torch.dtype
) -> str:
    """A short sample from the model being trained (temperature 0.8, top-k 200), prompt excluded.

    Its random draws come from a forked RNG: sampling must not shift training's draws, or a
    resumed run would differ from an uninterrupted one.
    """
    block = model.config.block_size
    ids = (tok.encode_ordinary(prompt) or [tok.eot_token])[-block:]
    idx = torch.tensor([ids], device=device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), autocast(device, dtype):
        model.eval()
        try:
            out = model.generate(idx, n_tokens, temperature=0.8, top_k=200)
        finally:
            model.train()
    return tok.decode(out[0, len(ids) :].tolist())
