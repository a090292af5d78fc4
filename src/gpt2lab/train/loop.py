"""The training loop: `train(cfg, run_dir)` from one CPU to torchrun's many GPUs, resumable exactly.

Step s (1-based) = A micro-batches per rank, gradients synced on the last one, then clip and
the optimizer. After step s: log, evaluate, sample, checkpoint as their intervals say; a stop
request, the wall-clock budget or max_steps ends the run with a checkpoint. Nothing is printed:
the run reports through events (gpt2lab.train.events) to the caller's `on_event`.

What the steps train on and minimise is a `Task` (gpt2lab.train.task: its data setup, batch
source and objective); pretraining on token shards (`PretrainTask`) is the default, and
post-training (gpt2lab.posttrain: SFT, DPO) passes its own to `train(..., task=...)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt2lab.checkpoint import native
from gpt2lab.config import Config, merge, to_dict
from gpt2lab.device import autocast, pick_dtype
from gpt2lab.errors import TrainingError, mark_key
from gpt2lab.generate import PREVIEW_SAMPLING, generate
from gpt2lab.io import disk_full_reason, is_disk_full
from gpt2lab.outdir import OutputDir
from gpt2lab.train import build
from gpt2lab.train.dist import (
    Dist,
    all_reduce_sum,
    barrier,
    gather,
    model_state,
    optimizer_state,
    setup_ddp,
    teardown,
    unwrap,
)
from gpt2lab.train.epochs import EpochPlan, epochs_config, plan_epochs
from gpt2lab.train.events import (
    CheckpointEvent,
    DoneEvent,
    EpochEvent,
    EvalEvent,
    Event,
    EventHandler,
    SampleEvent,
    StartEvent,
    StepEvent,
    TrainSummary,
    WarningEvent,
    broadcast,
)
from gpt2lab.train.memory import flops_per_token
from gpt2lab.train.metrics import MetricsLog, peak_flops
from gpt2lab.train.progress import ProgressBar
from gpt2lab.train.recipe import budget_fraction, lr_at
from gpt2lab.train.state import TrainState
from gpt2lab.train.task import PretrainTask, Task

Hook = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class TrainOptions:
    """How to run (not what to train: that is the config)."""

    resume: bool = False  # continue RUN_DIR from its latest checkpoint
    overwrite: bool = False  # start RUN_DIR over if it holds an earlier run
    on_event: EventHandler | None = None  # every event of the run (rank 0)
    on_log: Hook | None = None  # each metrics row; returning True stops the run (rank 0)
    on_eval: Hook | None = None  # each row with an evaluation; True stops the run (rank 0)
    should_stop: Callable[[], bool] | None = None  # polled once a step, e.g. set by a signal


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, as every rank agreed on it."""

    loss: float  # mean over micro-batches and ranks
    grad_norm: float  # before clipping
    lr: float
    stop: bool  # some rank was asked to stop
    out_of_time: bool  # the wall-clock budget (train.max_minutes) is spent


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_event: EventHandler | None = None,
    on_log: Hook | None = None,
    on_eval: Hook | None = None,
    progress: bool = False,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
    task: Task | None = None,
) -> TrainSummary:
    """Train (or fine-tune, or continue) a GPT as `cfg` says, writing RUN_DIR; returns a summary.

    `cfg` is the resolved config; with `resume=True` pass the one `build.resume_config` returns.
    The run prints nothing: `on_event(event)` receives its events (gpt2lab.train.events),
    `progress=True` draws a bar, `log(message)` receives its warnings as text. `on_log(row)` /
    `on_eval(row)` run after each logged step / evaluation with the metrics row; returning True
    from either stops the run (with a checkpoint). `should_stop()` is asked once a step.
    `task` says what to train on and minimise (gpt2lab.train.task); default: pretraining.
    """

    def log_warnings(event: Event) -> None:
        if log is not None and isinstance(event, WarningEvent):
            log(event.message)

    options = TrainOptions(
        resume=resume,
        overwrite=overwrite,
        on_event=broadcast(
            on_event, ProgressBar() if progress else None, log_warnings if log else None
        ),
        on_log=on_log,
        on_eval=on_eval,
        should_stop=should_stop,
    )
    world, device = setup_ddp(cfg.train.device)
    run_dir = Path(run_dir)
    claim, finished = None, False
    try:
        task = task or PretrainTask()
        claim = _claim(cfg, run_dir, world, device, task)
        # no name for the Trainer: it (DDP, its buffers) must be gone before teardown() below
        summary = Trainer(cfg, run_dir, options, world, device, task, claim).run()
        finished = True
        return summary
    except BaseException:
        if claim is not None and claim.created and not native.list_checkpoints(run_dir):
            claim.discard()  # a run that failed before its first checkpoint leaves no trace
        raise
    finally:
        if claim is not None:
            claim.release()
        teardown(finished)


def _claim(
    cfg: Config, run_dir: Path, world: Dist, device: torch.device, task: Task
) -> OutputDir | None:
    """Rank 0 takes RUN_DIR for the run and the inputs it reads (see build.claim_for_ranks)."""
    inputs = None
    if world.is_main:
        own_data = Path(cfg.data.dir) == run_dir / "data"  # what `--data FILE` prepared here
        read = [d for d in task.inputs(cfg) if not (own_data and d == cfg.data.dir)]
        inputs = [cfg.train.init_from, *read]
    return build.claim_for_ranks(run_dir, inputs or [], world, device)


def clips(norm: float, limit: float) -> bool:
    """Whether clip_grad_norm_(limit) scales gradients of this norm: unless clipping is off, or
    its factor limit / (norm + 1e-6) is over 1 with a margin for float32 rounding (NaN clips,
    as it does there)."""
    return limit > 0 and not norm + 1e-6 < limit * (1 - 1e-6)


class Trainer:
    """One run: model, optimizer, data and state; `train()` drives it, benchmarks time steps."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        options: TrainOptions | None = None,
        world: Dist | None = None,
        device: torch.device | None = None,
        task: Task | None = None,
        claim: OutputDir | None = None,
    ) -> None:
        """Check everything, then build the run (on `device`, CPU by default; one process).

        `claim` is RUN_DIR taken by `train()` (rank 0); without it rank 0 takes it here."""
        options, world = options or TrainOptions(), world or Dist()
        if claim is None and world.is_main:
            claim = build.claim_run_dir(run_dir, [cfg.train.init_from])
        self.claim = claim
        device = device or torch.device("cpu")
        self.world, self.device, self.run_dir, self.options = world, device, run_dir, options
        self.task = task = task or PretrainTask()
        self.dtype = pick_dtype(cfg.train.dtype, device)
        # ---- checks that only read: nothing in RUN_DIR changes before they all pass ----
        build.prepare_run_dir(run_dir, options.resume, options.overwrite)
        ckpt = native.require_latest(run_dir) if options.resume else None
        self.state = TrainState()
        if ckpt is not None:
            self.state = TrainState.from_json(native.load_state(ckpt))
        setup = task.setup(cfg, ckpt, run_dir)
        cfg, self.tok, init_weights = setup.cfg, setup.tokenizer, setup.init_weights
        self.meta = setup.extra.get("meta")  # pretraining: the data's meta.json
        for note in setup.notes:
            self.emit(WarningEvent(note))
        self.epochs: EpochPlan | None = None
        if cfg.train.max_epochs > 0:  # shuffled passes: the data's size decides the steps
            cfg = merge(cfg, {"data": {"sampling": "sequential"}}, source="train.max_epochs")
            self.epochs = plan_epochs(cfg, task.epoch_size(cfg, world, device), world.world_size)
            cfg = epochs_config(cfg, self.epochs)
        self.cfg, tc = cfg, cfg.train
        rows = dataclasses.replace(tc, micro_batch_size=tc.micro_batch_size * task.rows_per_item)
        self.memory = build.check_memory(cfg.model, rows, self.dtype, device, world.world_size)
        # ---- from here on the run directory is ours (once every rank has checked it) ----
        barrier(world)
        if world.is_main:
            self._write_run_dir(options.overwrite and not options.resume)
        torch.manual_seed(tc.seed)  # the same initial weights on every rank
        parts = build.model_and_optimizer(
            cfg, init_weights, ckpt, self.state, world, device, self.dtype, task.new_model
        )
        torch.manual_seed(tc.seed + world.rank)  # dropout differs between ranks
        self.raw, self.model, self.opt, self.scaler, self.frozen = parts
        self.tokens_per_step = (
            tc.micro_batch_size * cfg.model.block_size * tc.grad_accum_steps * world.world_size
        )
        task.begin(self.model, run_dir, world, resumed=ckpt is not None)
        self.loader = task.batches(cfg, world, device)
        self.objective = task.objective(cfg, world, device, self.dtype)
        self.step_metrics: dict[str, float] = {}  # the objective's, of the last step
        if ckpt is not None and (
            note := build.restore_loader_and_rng(self.loader, self.state, world)
        ):
            self.emit(WarningEvent(note))
        self.metrics = None
        if world.is_main:
            resumed_at = self.state.step if ckpt is not None else None
            self.metrics = MetricsLog(run_dir, resumed_at, tc.tensorboard, tc.wandb, to_dict(cfg))
        self.flops_per_token = flops_per_token(unwrap(self.model), cfg.model.block_size)
        self.peak = peak_flops(device, self.dtype, tc.peak_flops) * world.world_size
        self.peak_probed = device.type == "cpu" and tc.peak_flops <= 0
        self.resumed_s = self.state.elapsed_s  # training time of the earlier sessions
        self.t0 = time.perf_counter()  # run() resets it; the wall-clock budget counts from here

    def _write_run_dir(self, clear: bool) -> None:
        assert self.claim is not None
        build.write_run_dir(self.claim, self.cfg, self.tok, clear)
        self.task.write_run_dir(self.run_dir)

    # ---------------------------------------------------------------- the loop

    def run(self) -> TrainSummary:
        """Step until max_steps, the budget, a stop request or a hook; checkpoint; summarize.

        A full disk (or a file-size limit) is one TrainingError saying what was being written,
        the free space, and which complete checkpoint a resume continues from."""
        self.writing = "the run directory"
        try:
            return self._run()
        except OSError as e:
            if not is_disk_full(e):
                raise
            last = native.find_latest(self.run_dir)
            kept = (
                f"the last complete checkpoint, {last}, is intact and resumable"
                if last is not None
                else "no checkpoint was complete yet"
            )
            raise TrainingError(
                f"writing {self.writing} in {self.run_dir} stopped: "
                f"{disk_full_reason(e, self.run_dir / 'x')}; {kept}",
                "room for checkpoints and metrics",
                f"free some space (or raise the limit), then continue with "
                f"`gpt2lab train --out {self.run_dir} --resume`",
            ) from e

    def _run(self) -> TrainSummary:
        tc = self.cfg.train
        self.emit(self.start_event())
        if self.state.step >= tc.max_steps:
            already = f"{self.run_dir} is already at step {self.state.step}"
            self.emit(
                WarningEvent(
                    f"{already} (train.max_steps={tc.max_steps}); raise train.max_steps to train on"
                )
            )
        self.first_step, self.t0 = self.state.step + 1, time.perf_counter()
        self.first_tokens = self.state.tokens
        self.last_row = (self.t0, self.state.tokens)  # time and tokens of the last metrics row
        loss, val, checkpoint, stopped_by = math.nan, None, None, None
        while self.state.step < tc.max_steps:
            result = self.train_step()
            self.state.step += 1
            step, loss = self.state.step, result.loss
            stopped_by = self.stop_reason(step, result)
            row = self.metrics_row(result) if self.should_log(step, stopped_by) else None
            evaluated = self.should_eval(step, stopped_by)
            if evaluated:
                scores = self.evaluate_all(self.eval_batches(stopped_by))
                val = scores["val_loss"]
                assert row is not None
                row.update(val_loss=val)
                if self.task.perplexity:
                    row.update(val_ppl=math.exp(min(val, 50.0)))
                row.update(scores)
                if self.should_sample(step):
                    self.emit(SampleEvent(step, tc.sample_prompt, self.sample()))
            if self.epochs is not None:
                self.count_epoch_loss(step, loss, row)
            self.writing = "metrics.jsonl"
            if self.report(step, row, evaluated) and stopped_by is None:
                stopped_by = "hook"
            if self.epochs is not None and self.epochs.ends_epoch(step):
                self.finish_epoch(step, val if evaluated else None)
            if self.should_checkpoint(step, stopped_by):
                self.writing = f"the checkpoint of step {step}"
                checkpoint = self.save(val if evaluated else None)
            if stopped_by is not None:
                break
        summary = self.summary(loss, val, checkpoint, stopped_by or "max_steps")
        if self.metrics is not None:
            self.metrics.close()
        self.emit(DoneEvent(summary))
        return summary

    def count_epoch_loss(self, step: int, loss: float, row: dict[str, Any] | None) -> None:
        """Add the step's loss to its epoch's; its metrics row (if logged) names the epoch."""
        assert self.epochs is not None
        self.state.epoch_loss_sum += loss
        self.state.epoch_steps += 1
        if row is not None:
            row["epoch"] = self.epochs.epoch_of(step)

    def finish_epoch(self, step: int, val: float | None) -> None:
        """Report the epoch that ended during `step` (EpochEvent) and start counting the next."""
        assert self.epochs is not None
        state, tc = self.state, self.cfg.train
        sample = None
        if tc.sample_every_epoch:  # every rank evaluates: val_loss is reduced over ranks
            val = self.evaluate(tc.eval_steps) if val is None else val
            if self.world.is_main and tc.strategy != "fsdp":
                sample = self.sample()
        epoch = self.epochs.epoch_of(step)
        mean = state.epoch_loss_sum / state.epoch_steps
        self.emit(
            EpochEvent(
                epoch,
                self.epochs.max_epochs,
                step,
                mean,
                val if tc.sample_every_epoch else None,
                tc.sample_prompt,
                sample,
            )
        )
        state.epoch_loss_sum, state.epoch_steps = 0.0, 0

    # What happens after step `step` (1-based). `stopped_by` is why the run ends after it, if it
    # does: the last step is always evaluated and checkpointed, and every checkpoint evaluated.

    def should_checkpoint(self, step: int, stopped_by: str | None) -> bool:
        return stopped_by is not None or step % self.cfg.train.checkpoint_interval == 0

    def should_eval(self, step: int, stopped_by: str | None) -> bool:
        return self.should_checkpoint(step, stopped_by) or step % self.cfg.train.eval_interval == 0

    def should_log(self, step: int, stopped_by: str | None) -> bool:
        every = self.cfg.train.log_interval
        return self.should_eval(step, stopped_by) or step % every == 0 or step == self.first_step

    def should_sample(self, step: int) -> bool:
        """Every sample_interval-th evaluation, on rank 0 (FSDP's shards need every rank)."""
        tc = self.cfg.train
        if tc.sample_interval <= 0 or not self.world.is_main or tc.strategy == "fsdp":
            return False
        return (step // max(1, tc.eval_interval)) % tc.sample_interval == 0

    def eval_batches(self, stopped_by: str | None) -> int:
        """train.eval_steps, or for the last evaluation train.final_eval_steps (if >= 0)."""
        tc = self.cfg.train
        return tc.final_eval_steps if stopped_by and tc.final_eval_steps >= 0 else tc.eval_steps

    def stop_reason(self, step: int, result: StepResult) -> str | None:
        """Why the run ends after this step, or None to go on."""
        if result.stop:
            return "signal"
        if result.out_of_time:
            return "max_minutes"
        return "max_steps" if step >= self.cfg.train.max_steps else None

    # ---------------------------------------------------------------- one step

    def train_step(self) -> StepResult:
        """One optimizer step: A micro-batches, clip, the NaN guard, a step at the scheduled LR."""
        tc, world = self.cfg.train, self.world
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        sums: dict[str, torch.Tensor] = {}  # the objective's metrics, summed over micro-batches
        tokens = 0
        batches = [self.loader.next_batch() for _ in range(tc.grad_accum_steps)]
        for micro, (batch, share) in enumerate(zip(batches, self.loss_shares(batches))):
            with self.gradient_sync(last=micro == tc.grad_accum_steps - 1):
                with autocast(self.device, self.dtype):
                    loss, metrics = self.objective.loss(self.model, batch)
                loss = loss * share
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
            tokens += self.objective.count_tokens(batch)
            for key, value in metrics.items():
                value = value.detach().float().reshape(()).to(self.device)
                sums[key] = sums[key] + value if key in sums else value
        self.scaler.unscale_(self.opt)
        params = [p for p in self.model.parameters() if p.requires_grad]
        # clip_grad_norm_ in two halves: the norm now, the scaling after the sync below, and only
        # where it changes something (clip_grad_norm_ multiplies by 1 otherwise: a pass for naught)
        split = hasattr(torch.nn.utils, "get_total_norm")  # (torch >= 2.6; before: in one go)
        if split:
            total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        else:
            total = torch.nn.utils.clip_grad_norm_(
                params, tc.grad_clip if tc.grad_clip > 0 else math.inf
            )
        norm = total.full_tensor() if hasattr(total, "full_tensor") else total
        # one sync per step, so every rank takes the same decisions: the loss (NaN guard, log),
        # the stop request and the clock (the wall-time LR and budget)
        asked = self.options.should_stop is not None and self.options.should_stop()
        extra = torch.tensor([float(asked), self.clock(), float(tokens)], device=self.device)
        flags = torch.cat(
            [loss_sum.float().view(1), norm.float().view(1).to(self.device), extra]
            + [v.view(1) for v in sums.values()]
        )
        loss_v, norm_v, stop_v, clock, tokens_v, *metric_v = all_reduce_sum(flags, world).tolist()
        # every rank holds the same whole-model norm (DDP's reduced gradients, FSDP's full_tensor)
        loss_v, norm_v = loss_v / world.world_size, norm_v / world.world_size
        clock = clock / world.world_size
        self.state.tokens += int(tokens_v)
        per = world.world_size * tc.grad_accum_steps
        self.step_metrics = {k: v / per for k, v in zip(sums, metric_v)}
        if tc.warmup_steps <= self.state.step and self.state.warmup_end_s is None:
            self.state.warmup_end_s = clock
        time_frac = budget_fraction(self.state.step, tc, clock, self.state.warmup_end_s)
        lr = lr_at(self.state.step, tc, time_frac)
        result = StepResult(loss_v, norm_v, lr, stop_v > 0, 0 < tc.max_minutes * 60 <= clock)
        if split and clips(norm_v, tc.grad_clip):
            torch.nn.utils.clip_grads_with_norm_(params, tc.grad_clip, total)
        # a float16 scaler expects overflowing gradients now and then and skips them itself
        if math.isfinite(loss_v) and (self.scaler.is_enabled() or math.isfinite(norm_v)):
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.scaler.step(self.opt)
        else:
            self.skip_nonfinite(loss_v, norm_v)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        return result

    def loss_shares(self, batches: list[Any]) -> list[torch.Tensor] | list[float]:
        """Each micro-batch's share of the step's loss: 1/A, or, for an objective whose loss is a
        mean over a count that varies between batches (`weight(batch)`: SFT's learned tokens),
        that count over the whole step's, all ranks' (DDP then averages over the ranks). So the
        step's loss is the mean over all its tokens however they are split, as one batch would
        give, and as transformers' Trainer has had since its October 2024 fix
        (`num_items_in_batch`). On the device: no sync."""
        weigh = getattr(self.objective, "weight", None)
        A = len(batches)
        if weigh is None:
            return [1.0 / A] * A
        counts = torch.stack([torch.as_tensor(weigh(b), device=self.device) for b in batches])
        counts = counts.float()  # (float64 is not on every device, MPS's for one)
        total = all_reduce_sum(counts.sum().reshape(1), self.world)[0]
        # a step with nothing to learn keeps 1/A: its loss is NaN, which the guard skips
        shares = torch.where(total > 0, counts * self.world.world_size / total, 1.0 / A)
        return list(shares.unbind())

    def gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Under torchrun, gradients are reduced on the last micro-batch of a step only."""
        if self.world.enabled and self.cfg.train.strategy == "fsdp":
            self.raw.set_requires_gradient_sync(last)  # type: ignore[operator]
        elif self.world.enabled and not last:
            return self.model.no_sync()  # type: ignore[operator]
        return contextlib.nullcontext()

    def skip_nonfinite(self, loss: float, norm: float) -> None:
        """The NaN guard: stop with the last good checkpoint, or skip (train.skip_nonfinite)."""
        step = self.state.step + 1
        if not self.cfg.train.skip_nonfinite:
            raise TrainingError(
                f"non-finite loss ({loss}) or gradient norm ({norm}) at step {step} of "
                f"{self.run_dir}; the last good checkpoint is {native.find_latest(self.run_dir)}",
                "finite values",
                f"lower {mark_key('train.lr')}, use {mark_key('train.dtype', 'bfloat16/float32')}, "
                f"raise {mark_key('train.warmup_steps')}, or set "
                f"{mark_key('train.skip_nonfinite', 'true')} to skip such steps",
            )
        self.state.skipped_steps += 1
        self.emit(
            WarningEvent(
                f"step {step}: non-finite loss {loss}, skipped ({self.state.skipped_steps} so far)"
            )
        )

    def clock(self) -> float:
        """Seconds of training in this run directory, earlier sessions included."""
        return self.resumed_s + time.perf_counter() - self.t0

    # ---------------------------------------------------------------- around the steps

    def evaluate(self, max_batches: int = 0) -> float:
        """Mean validation loss of the model now (0 batches = the whole validation split)."""
        return self.evaluate_all(max_batches)["val_loss"]

    def evaluate_all(self, max_batches: int = 0) -> dict[str, float]:
        """The objective's evaluation of the model now: val_loss and the task's other scores."""
        return self.objective.evaluate(self.model, max_batches)

    def sample(self) -> str:
        """A short continuation of train.sample_prompt by the model being trained.

        Its random draws come from a forked RNG: sampling must not shift training's draws, or a
        resumed run would differ from an uninterrupted one.
        """
        tc, model = self.cfg.train, self.raw
        ids = self.task.prompt_ids(self.tok, tc.sample_prompt)[-self.cfg.model.block_size :]
        idx = torch.tensor([ids], device=self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), autocast(self.device, self.dtype):
            model.eval()
            try:
                s = PREVIEW_SAMPLING
                out = generate(model, idx, tc.sample_tokens, s.temperature, s.top_k, s.top_p)
            finally:
                model.train()
        return self.tok.decode(out[0, len(ids) :].tolist())

    def mfu(self, tokens_per_s: float) -> float:
        """Model FLOPs utilisation. A CPU's peak is a matmul probe taken at the start; a probe that
        ran while other work held the cores reads low, and a step that beats it shows what the
        machine can do, so the peak rises to it (never an MFU above 100%)."""
        achieved = self.flops_per_token * tokens_per_s
        if self.peak_probed and achieved > self.peak:
            self.peak = achieved
        return achieved / self.peak

    def metrics_row(self, result: StepResult) -> dict[str, Any]:
        """The metrics.jsonl row of the step just taken; speed is measured since the last row."""
        now, step = time.perf_counter(), self.state.step
        last_t, last_tokens = self.last_row
        tps = (self.state.tokens - last_tokens) / (now - last_t)
        row: dict[str, Any] = {
            "step": step,
            "tokens": self.state.tokens,
            "loss": result.loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "tokens_per_s": tps,
            "mfu": self.mfu(tps),
            "elapsed_s": self.clock(),
        }
        if self.state.skipped_steps:
            row["skipped_steps"] = self.state.skipped_steps
        row.update(self.step_metrics)
        return row

    def report(self, step: int, row: dict[str, Any] | None, evaluated: bool) -> bool:
        """Tell the caller about the step; write its metrics row. True if a hook asks to stop."""
        if row is None:
            self.emit(StepEvent(step, None))
            return False
        stop = False
        if self.world.is_main:
            assert self.metrics is not None
            self.metrics.write(row)
            self.emit(StepEvent(step, dict(row)))
            if evaluated:
                self.emit(EvalEvent(step, dict(row)))
            hooks = ((self.options.on_log, True), (self.options.on_eval, evaluated))
            stop = any(hook(dict(row)) is True for hook, on in hooks if hook is not None and on)
        self.last_row = (time.perf_counter(), self.state.tokens)
        flag = torch.tensor([float(stop)], device=self.device)
        return bool(all_reduce_sum(flag, self.world).item() > 0)

    def emit(self, event: Event) -> None:
        if self.options.on_event is not None and self.world.is_main:
            self.options.on_event(event)

    def start_event(self) -> StartEvent:
        tc, mcfg = self.cfg.train, self.cfg.model
        return StartEvent(
            run_dir=str(self.run_dir),
            step=self.state.step,
            max_steps=tc.max_steps,
            max_minutes=tc.max_minutes,
            params=unwrap(self.model).num_params(),
            frozen=len(self.frozen),
            micro_batch_size=tc.micro_batch_size,
            block_size=mcfg.block_size,
            grad_accum_steps=tc.grad_accum_steps,
            world_size=self.world.world_size,
            tokens_per_step=self.tokens_per_step,
            memory=self.memory,
            device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""),
            max_epochs=self.epochs.max_epochs if self.epochs is not None else 0,
        )

    def save(self, val: float | None) -> Path | None:
        """Checkpoint the current step (every rank joins: RNG states and shards are gathered)."""
        tc, world, state = self.cfg.train, self.world, self.state
        state.val_loss = val
        if val is not None and (state.best_val_loss is None or val < state.best_val_loss):
            state.best_val_loss = val
        state.elapsed_s = self.clock()
        state.scaler = self.scaler.state_dict() if self.scaler.is_enabled() else None
        model_sd = model_state(self.model, tc.strategy, world)
        opt_sd = optimizer_state(self.model, self.opt, tc.strategy, world)
        state.rng_per_rank = gather(native.capture_rng(), world)
        state.data_per_rank = gather(self.loader.state_dict(), world)
        if not world.is_main:
            return None
        path = native.save_checkpoint(
            self.run_dir,
            state.step,
            model_sd,
            opt_sd,
            state.to_json(to_dict(self.cfg)),
            keep_last=tc.keep_last,
        )
        self.emit(CheckpointEvent(state.step, str(path)))
        return path

    def summary(
        self, loss: float, val: float | None, checkpoint: Path | None, stopped_by: str
    ) -> TrainSummary:
        elapsed = time.perf_counter() - self.t0
        ran = self.state.step - (self.first_step - 1)
        tps = (self.state.tokens - self.first_tokens) / elapsed if ran else 0.0
        return TrainSummary(
            run_dir=str(self.run_dir),
            step=self.state.step,
            tokens=self.state.tokens,
            loss=loss,
            val_loss=val,
            val_ppl=(
                math.exp(min(val, 50.0)) if val is not None and self.task.perplexity else None
            ),
            best_val_loss=self.state.best_val_loss,
            tokens_per_s=tps,
            mfu=self.mfu(tps),
            elapsed_s=elapsed,
            checkpoint=str(checkpoint) if checkpoint else None,
            stopped_by=stopped_by,
            skipped_steps=self.state.skipped_steps,
            rank=self.world.rank,
        )
