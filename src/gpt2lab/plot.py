"""PNG plots of training runs: train/val loss and perplexity against steps and tokens; for RL
runs (`gpt2lab rlhf`) reward and KL against steps, and reward against KL."""

from __future__ import annotations

import math
from pathlib import Path

from gpt2lab.errors import DataError
from gpt2lab.io import atomic_open
from gpt2lab.train.metrics import number, read_metrics


def default_plot_path(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """`out`, else RUN_DIR/curves.png for one run, ./curves.png for several."""
    if out:
        return Path(out)
    return Path(run_dirs[0]) / "curves.png" if len(run_dirs) == 1 else Path("curves.png")


def plot_runs(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Draw every run's metrics.jsonl on one 2x2 figure; returns the PNG's path.

    Default output: RUN_DIR/curves.png for one run, ./curves.png for several.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and no GUI backend to import
    import matplotlib.pyplot as plt

    runs = [Path(r) for r in run_dirs]
    if not runs:
        raise DataError("no run directory given", "one or more RUN_DIRs", "gpt2lab plot RUN_DIR")
    for run in runs:
        if not (run / "metrics.jsonl").is_file():
            raise DataError(
                f"{run / 'metrics.jsonl'} does not exist",
                "a run directory written by `gpt2lab train`",
                "check the path (the run may not have logged a step yet)",
            )
    if all(is_rl_run(read_metrics(run)) for run in runs):
        return _plot_rl(plt, runs, out)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
    for i, run in enumerate(runs):
        rows = read_metrics(run)
        color = f"C{i % 10}"
        label = run.name if len(runs) > 1 else ""
        for col, xkey in enumerate(("step", "tokens")):
            train = _series(rows, xkey, "loss")
            val = _series(rows, xkey, "val_loss")
            for row_i, f in enumerate((lambda v: v, lambda v: math.exp(min(v, 50.0)))):
                ax = axes[row_i][col]
                ax.plot(
                    [x for x, _ in train],
                    [f(y) for _, y in train],
                    color=color,
                    alpha=0.45,
                    lw=1,
                    label=f"{label} train".strip(),
                )
                ax.plot(
                    [x for x, _ in val],
                    [f(y) for _, y in val],
                    color=color,
                    lw=2,
                    marker="o",
                    ms=3,
                    label=f"{label} val".strip(),
                )
    for row_i, name in enumerate(("loss (nats/token)", "perplexity")):
        for col, xkey in enumerate(("step", "tokens")):
            ax = axes[row_i][col]
            ax.set_xlabel(xkey)
            ax.set_ylabel(name)
            ax.set_yscale("log" if row_i else "linear")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(", ".join(r.name for r in runs))
    fig.tight_layout()
    path = default_plot_path(run_dirs, out)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)
    return path


def _series(rows: list[dict], xkey: str, ykey: str) -> list[tuple[float, float]]:
    """(x, y) of the rows where both are numbers: a hand-edited or damaged row is left out."""
    pairs = [(number(r, xkey), number(r, ykey)) for r in rows]
    return [(x, y) for x, y in pairs if x is not None and y is not None]


def is_rl_run(rows: list[dict]) -> bool:
    """Rows of `gpt2lab rlhf` (reward and KL per step) rather than of a training loss."""
    return bool(rows) and all("reward" in r and "kl" in r for r in rows)


def _plot_rl(plt, runs: list[Path], out: str | Path | None) -> Path:
    """RL runs: mean reward and KL to the reference against steps, and reward against KL."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), squeeze=False)
    ax_r, ax_k, ax_rk = axes[0]
    for i, run in enumerate(runs):
        rows = read_metrics(run)
        color, label = f"C{i % 10}", run.name
        by_step = dict(_series(rows, "step", "reward"))
        points = [(s, by_step[s], k) for s, k in _series(rows, "step", "kl") if s in by_step]
        steps, reward, kl = [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]
        ax_r.plot(steps, reward, color=color, lw=1.2, label=label)
        ax_k.plot(steps, kl, color=color, lw=1.2, label=label)
        ax_rk.scatter(kl, reward, c=steps, cmap="viridis", s=12, label=label)
        ax_rk.plot(kl, reward, color=color, lw=0.5, alpha=0.4)
    ax_r.set(xlabel="step", ylabel="mean reward of the rollouts", title="reward")
    ax_k.set(xlabel="step", ylabel="KL(policy || reference), nats per reply", title="KL")
    ax_rk.set(xlabel="KL, nats per reply", ylabel="mean reward", title="reward vs KL (color: step)")
    for ax in (ax_r, ax_k, ax_rk):
        ax.grid(alpha=0.3)
    ax_r.legend(fontsize=8)
    fig.suptitle(", ".join(r.name for r in runs))
    fig.tight_layout()
    path = default_plot_path(runs, out)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)
    return path
