"""The training loop: `train(cfg, run_dir)` from one CPU to torchrun's many GPUs, resumable exactly.

Step s (1-based) = A micro-batches per rank, gradients synced on the last one, then clip and
AdamW. After step s: log, evaluate, checkpoint as their intervals say; a signal, the wall-clock
budget or max_steps ends the run with a checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gpt2lab import config as C
from gpt2lab.checkpoint import native
from gpt2lab.device import autocast, keep_freed_memory, pick_dtype
from gpt2lab.errors import TrainingError
from gpt2lab.io import atomic_write_text
from gpt2lab.train import build
from gpt2lab.train.console import StopSignal, progress_bar, row_line, training_sample
from gpt2lab.train.dist import (
    Dist,
    all_reduce_sum,
    barrier,
    gather,
    log0,
    setup_ddp,
    teardown,
    unwrap,
)
from gpt2lab.train.dist import model_state as _model_state
from gpt2lab.train.dist import optimizer_state as _opt_state
from gpt2lab.train.evaluate import val_loss
from gpt2lab.train.metrics import MetricsLog, peak_flops
from gpt2lab.train.recipe import budget_fraction, lr_at

Hook = Callable[[dict[str, Any]], Any]


@dataclass
class TrainSummary:
    """What a finished (or stopped) run reports."""

    run_dir: str
    step: int
    tokens: int
    loss: float  # train loss of the last step
    val_loss: float | None
    val_ppl: float | None
    best_val_loss: float | None
    tokens_per_s: float  # mean over the steps this process ran
    mfu: float
    elapsed_s: float
    checkpoint: str | None
    stopped_by: str  # "max_steps", "max_minutes", "signal", "hook"
    skipped_steps: int = 0
    rank: int = 0  # this process's rank under torchrun (only rank 0 logs and writes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, as every rank agreed on it."""

    loss: float  # mean over micro-batches and ranks
    grad_norm: float  # before clipping
    lr: float
    stop: bool  # a signal reached some rank
    out_of_time: bool  # the wall-clock budget (train.max_minutes) is spent


def train(
    cfg: C.Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_log: Hook | None = None,
    on_eval: Hook | None = None,
    progress: bool = True,
    log: Callable[..., None] | None = None,
) -> TrainSummary:
    """Train (or fine-tune, or continue) a GPT as `cfg` says, writing RUN_DIR; returns a summary.

    `cfg` is the resolved config; with `resume=True` pass the one `build.resume_config` returns.
    `on_log(row)` / `on_eval(row)` run on rank 0 after each logged step / evaluation with the
    metrics row; returning True from either stops the run (with a checkpoint).
    """
    d, device = setup_ddp(cfg.train.device)
    if device.type == "cpu":
        keep_freed_memory()
    try:
        return Trainer(
            cfg, Path(run_dir), d, device, resume, overwrite, on_log, on_eval, progress, log
        ).run()
    finally:
        teardown()


class Trainer:
    """One run: model, optimizer, data and state; `train()` drives it, benchmarks time steps."""

    def __init__(
        self,
        cfg: C.Config,
        run_dir: Path,
        d: Dist,
        device: torch.device,
        resume: bool,
        overwrite: bool,
        on_log: Hook | None,
        on_eval: Hook | None,
        progress: bool,
        log: Callable[..., None] | None,
    ) -> None:
        self.d, self.device, self.run_dir = d, device, run_dir
        self.on_log, self.on_eval, self.progress = on_log, on_eval, progress and d.is_main
        self.log = log if log is not None else (lambda *a: log0(d, *a))
        self.log_is_default = log is None
        tc = cfg.train
        self.dtype = pick_dtype(tc.dtype, device)
        # ---- checks that only read: nothing in RUN_DIR changes before they all pass ----
        build.prepare_run_dir(run_dir, resume, overwrite)
        ckpt = native.require_latest(run_dir) if resume else None
        self.meta, self.tok = build.check_data(cfg.data.dir)
        init_state: dict[str, torch.Tensor] | None = None
        if ckpt is None and tc.init_from:
            cfg, init_state = build.pretrained(cfg, self.tok, self.meta)
        elif ckpt is None:  # from scratch: the data decides the vocabulary
            cfg = C.merge(cfg, {"model": {"vocab_size": int(self.meta["vocab_size"])}})
        elif self.meta["vocab_size"] > cfg.model.vocab_size:
            raise TrainingError(
                f"the data in {cfg.data.dir} has {self.meta['vocab_size']} token ids but the run "
                f"in {run_dir} was trained with {cfg.model.vocab_size}",
                "the data the run was started on",
                "resume with the original --data",
            )
        self.cfg, tc = cfg, cfg.train
        self.mem = build.check_memory(cfg.model, tc, self.dtype, device, d.world_size)
        # ---- from here on the run directory is ours (once every rank has checked it) ----
        barrier(d)
        if d.is_main:
            if overwrite and not resume:
                build.clear_run_dir(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.toml", C.to_toml(cfg))
            if not (run_dir / "tokenizer").is_dir():
                self.tok.save(str(run_dir / "tokenizer"))
        torch.manual_seed(tc.seed)  # the same initial weights on every rank
        parts = build.model_and_optimizer(cfg, init_state, ckpt, d, device, self.dtype)
        torch.manual_seed(tc.seed + d.rank)  # dropout differs between ranks
        self.raw, self.model, self.opt, self.scaler, self.frozen = parts
        self.state = native.load_state(ckpt) if ckpt is not None else {}
        self.step = int(self.state.get("step", 0))
        self.skipped = int(self.state.get("skipped_steps", 0))
        self.best_val = self.state.get("best_val_loss")
        self.elapsed0 = float(self.state.get("elapsed_s", 0.0))
        self.t0 = time.perf_counter()  # run() resets it; the wall-clock budget counts from here
        self.warm_end_s = self.state.get("warmup_end_s")
        self.tokens_per_step = (
            tc.micro_batch_size * cfg.model.block_size * tc.grad_accum_steps * d.world_size
        )
        from gpt2lab.data import load_tokens

        self.loader = build.train_loader(cfg, d.rank, d.world_size, device)
        self.val_tokens = load_tokens(cfg.data.dir, "val")
        if ckpt is not None:
            build.restore_data_and_rng(self.loader, self.state, d.rank, d.world_size, self.log)
        self.metrics = (
            MetricsLog(
                run_dir,
                self.step if ckpt is not None else None,
                tc.tensorboard,
                tc.wandb,
                C.to_dict(cfg),
            )
            if d.is_main
            else None
        )
        self.flops_per_token = unwrap(self.model).flops_per_token(cfg.model.block_size)
        self.peak = peak_flops(device, self.dtype, tc.peak_flops) * d.world_size

    # ---------------------------------------------------------------- the loop

    def run(self) -> TrainSummary:
        cfg, tc, d = self.cfg, self.cfg.train, self.d
        self.log(
            f"model: {unwrap(self.model).num_params():,} parameters ({len(self.frozen)} tensors "
            f"frozen) | tokens per step = {tc.micro_batch_size} x {cfg.model.block_size} x "
            f"{tc.grad_accum_steps} x {d.world_size} = {self.tokens_per_step:,} | memory per "
            f"step ~ {self.mem} | {self.device} {str(self.dtype).replace('torch.', '')}"
        )
        if self.step >= tc.max_steps:
            self.log(
                f"{self.run_dir} is already at step {self.step} (train.max_steps="
                f"{tc.max_steps}); raise --train.max_steps to train on"
            )
        start_step, t0 = self.step, time.perf_counter()
        self.t0 = t0
        last_row_t, last_row_step = t0, self.step
        loss = float("nan")
        val = None
        stopped_by = "max_steps"
        ckpt_path: Path | None = None
        bar = progress_bar(tc.max_steps, self.step) if self.progress else None
        if bar is not None and self.log_is_default:  # print above the bar, not through it
            self.log = lambda *a: bar.write(" ".join(map(str, a)), file=sys.stderr)
        with StopSignal() as stop:
            while self.step < tc.max_steps:
                res = self.train_step(stop)
                loss, norm, lr = res.loss, res.grad_norm, res.lr
                stop_now, budget_over = res.stop, res.out_of_time
                self.step += 1
                at_end = self.step >= tc.max_steps
                if stop_now:
                    stopped_by = "signal"
                elif budget_over:
                    stopped_by = "max_minutes"
                finishing = at_end or stop_now or budget_over
                do_ckpt = finishing or self.step % tc.checkpoint_interval == 0
                do_eval = do_ckpt or self.step % tc.eval_interval == 0
                do_log = do_eval or self.step % tc.log_interval == 0 or self.step == start_step + 1
                row: dict[str, Any] = {}
                if do_log:
                    now = time.perf_counter()
                    tps = self.tokens_per_step * (self.step - last_row_step) / (now - last_row_t)
                    row = {
                        "step": self.step,
                        "tokens": self.step * self.tokens_per_step,
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": norm,
                        "tokens_per_s": tps,
                        "mfu": self.flops_per_token * tps / self.peak,
                        "elapsed_s": self.elapsed0 + now - t0,
                    }
                    if self.skipped:
                        row["skipped_steps"] = self.skipped
                if do_eval:
                    last = finishing and tc.final_eval_steps >= 0
                    val = self.evaluate(tc.final_eval_steps if last else tc.eval_steps)
                    row.update(val_loss=val, val_ppl=math.exp(min(val, 50.0)))
                    self._maybe_sample()
                if do_log:
                    hook_stop = self._report(row, do_eval, bar)
                    if hook_stop and not finishing:
                        stopped_by, finishing, do_ckpt = "hook", True, True
                    last_row_t, last_row_step = time.perf_counter(), self.step
                if do_ckpt:
                    ckpt_path = self.save(val if do_eval else None, time.perf_counter() - t0)
                if bar is not None:
                    bar.update(1)
                if finishing:
                    break
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        ran = self.step - start_step
        tps = self.tokens_per_step * ran / elapsed if ran else 0.0
        if self.metrics is not None:
            self.metrics.close()
        if stopped_by == "signal":
            self.log(
                f"stopped by a signal after step {self.step}; checkpoint {ckpt_path}; "
                f"continue with `gpt2lab train --out {self.run_dir} --resume`"
            )
        return TrainSummary(
            run_dir=str(self.run_dir),
            step=self.step,
            tokens=self.step * self.tokens_per_step,
            loss=loss,
            val_loss=val,
            val_ppl=math.exp(min(val, 50.0)) if val is not None else None,
            best_val_loss=self.best_val,
            tokens_per_s=tps,
            mfu=self.flops_per_token * tps / self.peak,
            elapsed_s=elapsed,
            checkpoint=str(ckpt_path) if ckpt_path else None,
            stopped_by=stopped_by,
            skipped_steps=self.skipped,
            rank=self.d.rank,
        )

    def train_step(self, stop: StopSignal | None = None) -> StepResult:
        """One optimizer step: A micro-batches, clip, the NaN guard, AdamW at the scheduled LR."""
        tc, d = self.cfg.train, self.d
        A = tc.grad_accum_steps
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(A):
            x, y = self.loader.next_batch()
            last = micro == A - 1
            ctx: Any = contextlib.nullcontext()
            if d.enabled and tc.strategy == "fsdp":
                self.raw.set_requires_gradient_sync(last)  # type: ignore[operator]
            elif d.enabled and not last:
                ctx = self.model.no_sync()  # type: ignore[operator]
            with ctx:
                with autocast(self.device, self.dtype):
                    _, loss = self.model(x, y)
                loss = loss / A
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.opt)
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(
            params, tc.grad_clip if tc.grad_clip > 0 else math.inf
        )
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        # one sync per step, so every rank takes the same decisions: the loss (NaN guard, log),
        # the stop flag and the clock (the wall-time LR and budget)
        signalled = float(stop is not None and stop.signum > 0)
        clock = self.elapsed0 + time.perf_counter() - self.t0
        extra = torch.tensor([signalled, clock], device=self.device)
        flags = torch.cat([loss_sum.float().view(1), norm.float().view(1).to(self.device), extra])
        all_reduce_sum(flags, d)
        loss_v, norm_v, stop_v, clock = flags.tolist()
        loss_v, clock = loss_v / d.world_size, clock / d.world_size
        if tc.warmup_steps <= self.step and self.warm_end_s is None:
            self.warm_end_s = clock
        lr = lr_at(self.step, tc, budget_fraction(self.step, tc, clock, self.warm_end_s))
        result = StepResult(loss_v, norm_v, lr, stop_v > 0, 0 < tc.max_minutes * 60 <= clock)
        # a float16 scaler expects overflowing gradients now and then and skips them itself
        finite = math.isfinite(loss_v) and (self.scaler.is_enabled() or math.isfinite(norm_v))
        if not finite:
            if not tc.skip_nonfinite:
                raise TrainingError(
                    f"non-finite loss ({loss_v}) or gradient norm ({norm_v}) at step "
                    f"{self.step + 1} of {self.run_dir}; the last good checkpoint is "
                    f"{native.find_latest(self.run_dir)}",
                    "finite values",
                    "lower --train.lr, use --train.dtype=bfloat16/float32, raise warmup_steps, "
                    "or pass --train.skip_nonfinite=true to skip such steps",
                )
            self.skipped += 1
            self.log(
                f"step {self.step + 1}: non-finite loss {loss_v}, skipped ({self.skipped} so far)"
            )
            self.opt.zero_grad(set_to_none=True)
            self.scaler.update()
            return result
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        return result

    def evaluate(self, max_batches: int = 0) -> float:
        """Mean validation loss of the model now (0 batches = the whole validation split)."""
        return val_loss(
            self.model,
            self.val_tokens,
            self.cfg.model.block_size,
            self.cfg.train.micro_batch_size,
            max_batches,
            self.device,
            self.dtype,
            self.d,
            source=self.cfg.data.dir,
        )

    def _maybe_sample(self) -> None:
        tc = self.cfg.train
        if tc.sample_interval <= 0 or not self.d.is_main or tc.strategy == "fsdp":
            return
        if (self.step // max(1, tc.eval_interval)) % tc.sample_interval:
            return
        text = training_sample(
            self.raw, self.tok, tc.sample_prompt, tc.sample_tokens, self.device, self.dtype
        )
        self.log(f"--- sample at step {self.step} ---\n{tc.sample_prompt}{text}\n---")

    def _report(self, row: dict[str, Any], evaluated: bool, bar: Any) -> bool:
        """Write the row, show it, run the hooks (rank 0); True if a hook asks to stop."""
        stop = False
        if self.d.is_main:
            assert self.metrics is not None
            self.metrics.write(row)
            line = row_line(row, evaluated)
            if bar is not None:
                bar.set_postfix_str(line.split(" | ", 1)[1], refresh=False)
                if evaluated:
                    bar.write(line, file=sys.stderr)
            elif evaluated or not self.progress:
                self.log(line)
            for hook, on in ((self.on_log, True), (self.on_eval, evaluated)):
                if hook is not None and on and hook(dict(row)) is True:
                    stop = True
        flag = torch.tensor([float(stop)], device=self.device)
        return bool(all_reduce_sum(flag, self.d).item() > 0)

    def save(self, val: float | None, ran_s: float) -> Path | None:
        """Checkpoint the current step (every rank joins: RNG states and shards are gathered)."""
        tc, d = self.cfg.train, self.d
        if val is not None and (self.best_val is None or val < self.best_val):
            self.best_val = val
        model_sd = _model_state(self.model, tc.strategy, d)
        opt_sd = _opt_state(self.model, self.opt, tc.strategy, d)
        rngs = gather(native.capture_rng(), d)
        datas = gather(self.loader.state_dict(), d)
        if not d.is_main:
            return None
        state = {
            "config": C.to_dict(self.cfg),
            "tokenizer": "tokenizer",
            "val_loss": val,
            "best_val_loss": self.best_val,
            "rng_per_rank": rngs,
            "data": datas[0],
            "data_per_rank": datas,
            "world_size": d.world_size,
            "skipped_steps": self.skipped,
            "elapsed_s": self.elapsed0 + ran_s,
            "warmup_end_s": self.warm_end_s,
            "tokens": self.step * self.tokens_per_step,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
        }
        return native.save_checkpoint(
            self.run_dir, self.step, model_sd, opt_sd, state, keep_last=tc.keep_last
        )
