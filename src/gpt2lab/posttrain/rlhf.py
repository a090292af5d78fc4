"""RLHF as Ziegler et al. (2019) did it on GPT-2: PPO against a reward, with a KL penalty to the
frozen starting model; and GRPO (Shao et al. 2024) for rewards that can be checked.

One step of `RLTrainer`:
1. take the next `rl.batch_size` prompts (a shuffled pass over the prompt file; GRPO repeats
   each `rl.group_size` times) and sample replies with the batched KV-cached sampler;
2. score them (a reward model, or a function the user named), normalised as Ziegler et al. do
   (mean 0, std 1 on the first batch);
3. PPO: per-token rewards r_t = -beta KL_t + score on the last token, a value head on the
   policy's last hidden states, GAE; GRPO: group-relative advantages, KL (k3) in the loss;
4. `rl.epochs` passes of minibatch steps with the clipped losses and gradient clipping;
5. move beta toward `rl.target_kl` (the proportional controller), log one metrics.jsonl row.

Checkpoints are the trainer's (gpt2lab.checkpoint.native): the policy's weights as a plain GPT
(so `gpt2lab sample`, `convert`, `eval` load an RL run like any run), the optimizer and value
head in optimizer.pt, and in state.json the step, beta, the prompt position, the reward
normalisation and the RNGs, so `--resume` continues exactly.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2lab.checkpoint import native
from gpt2lab.checkpoint.load import load_model
from gpt2lab.checkpoint.weights import load_model_safetensors
from gpt2lab.config import Config, merge, to_dict
from gpt2lab.data.records import read_prompts
from gpt2lab.device import autocast, pick_device, pick_dtype
from gpt2lab.errors import ConfigError, DataError, TrainingError, mark_key
from gpt2lab.kernels import use_cpu_training_kernels
from gpt2lab.outdir import OutputDir
from gpt2lab.posttrain.common import pick_template
from gpt2lab.posttrain.kl import KLController, kl_k1, kl_k3
from gpt2lab.posttrain.ppo import (
    gae,
    group_advantages,
    masked_mean,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from gpt2lab.posttrain.reward import RewardModel, load_reward_model
from gpt2lab.posttrain.rollout import PolicyValue, Rollouts, concat, sample, score_tokens
from gpt2lab.tokenizer.chat import ChatTemplate
from gpt2lab.train import build
from gpt2lab.train.dist import Dist, all_reduce_sum, barrier, gather, setup_ddp, teardown, wrap
from gpt2lab.train.events import (
    CheckpointEvent,
    DoneEvent,
    Event,
    EventHandler,
    StartEvent,
    StepEvent,
    TrainSummary,
    WarningEvent,
)
from gpt2lab.train.metrics import MetricsLog
from gpt2lab.train.recipe import configure_optimizer, lr_at

# the keys of every metrics.jsonl row of an RL run
METRICS = (
    "step",
    "reward",
    "kl",
    "beta",
    "entropy",
    "clip_frac",
    "value_loss",
    "approx_kl",
    "tokens_per_s",
)

RewardFn = Callable[[str, str], float]


# ------------------------------------------------------------------------- rewards


def load_reward_fn(spec: str) -> RewardFn:
    """`FILE.py:NAME` -> the function NAME of that file, run as Python: only ever a file the user
    named on the command line (never one found in a model or data directory)."""
    path_text, sep, name = spec.rpartition(":")
    path = Path(path_text)
    if not sep or not name.isidentifier() or path.suffix != ".py":
        raise ConfigError(
            f"--reward-fn {spec!r} is not FILE.py:FUNCTION",
            "a Python file and a function name, e.g. my_rewards.py:score",
            "write it as --reward-fn my_rewards.py:score",
        )
    if not path.is_file():
        raise ConfigError(
            f"reward function file {path} does not exist", "a Python file", "check the path"
        )
    module_spec = importlib.util.spec_from_file_location(f"gpt2lab_reward_fn_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"{path} cannot be loaded as Python", "a .py file", "check the file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(
            f"{path} has no function {name!r}",
            f"def {name}(prompt: str, completion: str) -> float",
            f"define it in {path}, or name another one after the colon",
        )
    return fn


class Scorer:
    """Scores replies: a reward model (on token ids, or on text when its tokenizer differs from
    the policy's) or a Python function `score(prompt, completion) -> float`."""

    def __init__(
        self,
        rm: RewardModel | None = None,
        fn: RewardFn | None = None,
        same_tokenizer: bool = True,
        batch_size: int = 16,
        name: str = "",
    ) -> None:
        if (rm is None) == (fn is None):
            raise ConfigError("exactly one of a reward model and a reward function is needed")
        self.rm, self.fn, self.same = rm, fn, same_tokenizer
        self.batch_size, self.name = batch_size, name

    def __call__(self, batch: Rollouts, prompts: Sequence[str], replies: Sequence[str]) -> Tensor:
        if self.fn is not None:
            out = []
            for p, r in zip(prompts, replies):
                value = self.fn(p, r)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TrainingError(
                        f"reward function {self.name} returned {value!r}",
                        "a float",
                        "return a number from score(prompt, completion)",
                    )
                out.append(float(value))
            return torch.tensor(out)
        assert self.rm is not None
        if self.same:
            seqs = [sum(batch.ids(i), []) for i in range(len(prompts))]
            return torch.tensor(self.rm.score_ids(seqs, self.batch_size))
        texts = [p + r for p, r in zip(prompts, replies)]
        return torch.tensor(self.rm.score_texts(texts, self.batch_size))


# ------------------------------------------------------------------------- prompts


@dataclass
class PromptSet:
    """The prompts: their text (what a reward function sees) and their ids (a chat template's
    user turn with the generation prompt, or plain text)."""

    texts: list[str]
    ids: list[list[int]]

    def order(self, seed: int, epoch: int) -> list[int]:
        """The shuffled order of pass `epoch`: a function of the seed and the pass only."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self.texts), generator=g).tolist()


# ------------------------------------------------------------------------- the run


@dataclass
class RLState:
    """What an RL run's state.json holds besides the trainer's fields."""

    beta: float
    epoch: int = 0  # passes over the prompts begun
    position: int = 0  # the next prompt's index in this pass's order
    reward_mean: float | None = None  # normalisation of the scores (set on the first batch)
    reward_std: float | None = None
    elapsed_s: float = 0.0
    reward_fn: str = ""  # the --reward-fn the run was started with, if any
    threads: int = 0  # torch threads of the last session (0: not recorded)


@dataclass(frozen=True)
class RLOptions:
    resume: bool = False
    overwrite: bool = False
    on_event: EventHandler | None = None
    should_stop: Callable[[], bool] | None = None


class RLTrainer:
    """One RL run in RUN_DIR: policy (+ value head), frozen reference, scorer, prompts.

    Under torchrun (`world`, from `train.dist.setup_ddp`) every rank samples and scores its
    share of each step's rollouts; the shares are gathered, so every rank holds the whole batch
    and computes the same rewards, advantages and beta; each minibatch is split over the ranks,
    whose gradients DDP all-reduces. Only rank 0 writes (checkpoints, metrics.jsonl). Each reply
    is drawn from its own generator, seeded by the step and its row, and the minibatch shuffles
    by the step and epoch: a run ends where one process with the same batch does."""

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        scorer: Scorer,
        prompts: PromptSet,
        stop_ids: Sequence[int],
        options: RLOptions | None = None,
        reward_fn_spec: str = "",
        template: ChatTemplate | None = None,
        claim: OutputDir | None = None,
        world: Dist | None = None,
        device: torch.device | None = None,
    ) -> None:
        """`claim` is RUN_DIR taken by `rlhf()` (rank 0); without it rank 0 takes it here."""
        self.options = options or RLOptions()
        self.world = world = world or Dist()
        self.run_dir = Path(run_dir)
        if claim is None and world.is_main:
            claim = build.claim_run_dir(self.run_dir, [cfg.train.init_from], command="rlhf")
        self.claim = claim
        self.template = template
        self.scorer, self.prompts, self.stop_ids = scorer, prompts, list(stop_ids)
        rc, tc = cfg.rl, cfg.train
        self.check(cfg)
        build.prepare_run_dir(self.run_dir, self.options.resume, self.options.overwrite)
        ckpt = native.require_latest(self.run_dir) if self.options.resume else None
        self.device = device or pick_device(tc.device)
        self.dtype = pick_dtype(tc.dtype, self.device)
        # the reference: the starting policy, frozen; the policy: it, or the checkpoint's weights
        ref, self.tok = load_model(tc.init_from, device="cpu", dtype=torch.float32)
        cfg = merge(cfg, {"model": to_dict(ref.config)}, source=tc.init_from)
        self.cfg = cfg
        self.policy = copy.deepcopy(ref)
        if ckpt is not None:
            load_model_safetensors(self.policy, ckpt / "model.safetensors")
        self.ref = ref.to(self.device).eval().requires_grad_(False)
        self.policy.to(self.device).eval()  # no dropout in rollouts nor in updates
        if self.device.type == "cpu":  # GELU and attention in C, as `gpt2lab train` has them
            use_cpu_training_kernels(self.policy)
            use_cpu_training_kernels(self.ref)
        self.value_head: nn.Linear | None = None
        if rc.algorithm == "ppo":
            self.value_head = nn.Linear(cfg.model.n_embd, 1).to(self.device)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self.raw = PolicyValue(self.policy, self.value_head)
        self.model = wrap(self.raw, "ddp", world, self.device)  # DDP under torchrun
        self.opt = configure_optimizer(self.raw, tc, self.device)
        self.ctl = KLController(
            rc.kl_coef, rc.target_kl if rc.target_kl > 0 else None, rc.kl_horizon
        )
        self.state = RLState(beta=rc.kl_coef, reward_fn=reward_fn_spec)
        self.step = 0
        rng_per_rank = None
        if ckpt is not None:
            saved = native.load_state(ckpt)
            self.step = int(saved["step"])
            self.state = RLState(**saved["rl"])
            if self.state.reward_fn and not reward_fn_spec:
                raise ConfigError(
                    f"{self.run_dir} was started with --reward-fn {self.state.reward_fn}",
                    "the reward function named again (it is never run from a saved config)",
                    f"add --reward-fn {self.state.reward_fn}",
                )
            self.ctl.load_state_dict({"beta": self.state.beta})
            extra = native.load_optimizer_state(ckpt)
            self.opt.load_state_dict(extra["optimizer"])
            if self.value_head is not None:
                self.value_head.load_state_dict(extra["value_head"])
            rng_per_rank = saved["rng_per_rank"]
        # ---- from here on the run directory is ours (once every rank has checked it) ----
        barrier(world)
        if world.is_main and not self.options.resume:
            assert self.claim is not None
            build.write_run_dir(self.claim, cfg, self.tok, self.options.overwrite)
        self.metrics = None
        if world.is_main:
            resumed_at = self.step if ckpt is not None else None
            self.metrics = MetricsLog(
                self.run_dir, resumed_at, tc.tensorboard, tc.wandb, to_dict(cfg)
            )
        torch.manual_seed(tc.seed + world.rank)
        if rng_per_rank is not None and (note := build.restore_rng_per_rank(rng_per_rank, world)):
            self.emit(WarningEvent(note))
        threads = torch.get_num_threads()
        if ckpt is not None and self.state.threads not in (0, threads):
            self.emit(
                WarningEvent(
                    f"resuming on {threads} torch threads, saved on {self.state.threads}: the "
                    "run goes on, but float sums round differently, so not bit for bit as an "
                    "uninterrupted run (set OMP_NUM_THREADS to match)"
                )
            )
        self.state.threads = threads

    def check(self, cfg: Config) -> None:
        """What the config must hold before anything is loaded."""
        rc, tc, ranks = cfg.rl, cfg.train, self.world.world_size
        if not self.prompts.texts:
            raise DataError("no prompts", "at least one prompt", "check --prompts")
        if not tc.init_from:
            raise ConfigError(
                "no policy to start from", f"{mark_key('policy')} (an SFT run directory)"
            )
        if rc.algorithm == "grpo" and rc.group_size < 2:
            raise ConfigError(
                f"{mark_key('rl.group_size', rc.group_size)} with GRPO",
                "at least 2 samples per prompt (advantages compare them)",
                f"set {mark_key('rl.group_size', 4)}",
            )
        if self.world.enabled and tc.strategy == "fsdp":
            raise ConfigError(
                f"{mark_key('train.strategy', 'fsdp')} for RL",
                "DDP: each rank holds the policy, the reference and the sampler's caches",
                f"set {mark_key('train.strategy', 'ddp')}",
            )
        for key, value in (("batch_size", rc.batch_size), ("minibatch_size", rc.minibatch_size)):
            if value % ranks:
                raise ConfigError(
                    f"{mark_key('rl.' + key, value)} on {ranks} ranks",
                    "a multiple of the number of ranks (each takes an equal share)",
                    f"set {mark_key('rl.' + key, max(ranks, value // ranks * ranks))}",
                )

    def emit(self, event: Event) -> None:
        if self.options.on_event is not None and self.world.is_main:
            self.options.on_event(event)

    # ----------------------------------------------------------------- the loop

    def run(self) -> TrainSummary:
        tc = self.cfg.train
        self.emit(self.start_event())
        t0 = time.perf_counter()
        first, stopped_by, checkpoint, row = self.step, None, None, None
        while self.step < tc.max_steps:
            row = self.rl_step()
            self.step += 1
            if self.metrics is not None:
                self.metrics.write(row)
            self.emit(StepEvent(self.step, dict(row)))
            # every rank takes the same decision: a signal to any, the mean clock
            asked = self.options.should_stop is not None and self.options.should_stop()
            flags = torch.tensor([float(asked), self.state.elapsed_s], device=self.device)
            stop, clock = all_reduce_sum(flags, self.world).tolist()
            if stop > 0:
                stopped_by = "signal"
            elif 0 < tc.max_minutes * 60 <= clock / self.world.world_size:
                stopped_by = "max_minutes"
            elif self.step >= tc.max_steps:
                stopped_by = "max_steps"
            if stopped_by or self.step % tc.checkpoint_interval == 0:
                checkpoint = self.save()
            if stopped_by:
                break
        if self.metrics is not None:
            self.metrics.close()
        elapsed = time.perf_counter() - t0
        summary = TrainSummary(
            run_dir=str(self.run_dir),
            step=self.step,
            tokens=0,
            loss=float(row["reward"]) if row else math.nan,
            val_loss=None,
            val_ppl=None,
            best_val_loss=None,
            tokens_per_s=float(row["tokens_per_s"]) if row else 0.0,
            mfu=0.0,
            elapsed_s=elapsed,
            checkpoint=str(checkpoint) if checkpoint else None,
            stopped_by=stopped_by or "max_steps",
            rank=self.world.rank,
        )
        if self.step == first and first >= tc.max_steps:
            self.emit(
                WarningEvent(
                    f"{self.run_dir} is already at step {self.step} "
                    f"(train.max_steps={tc.max_steps}); raise train.max_steps to train on"
                )
            )
        self.emit(DoneEvent(summary))
        return summary

    def next_prompts(self) -> list[int]:
        """Indices of the next batch of prompts, going on into a new shuffled pass as needed."""
        rc, out = self.cfg.rl, []
        while len(out) < rc.batch_size:
            order = self.prompts.order(self.cfg.train.seed, self.state.epoch)
            take = order[self.state.position : self.state.position + rc.batch_size - len(out)]
            out += take
            self.state.position += len(take)
            if self.state.position >= len(order):
                self.state.epoch, self.state.position = self.state.epoch + 1, 0
        return out

    def generator(self, purpose: int, index: int, device: torch.device | str = "cpu"):
        """A generator of this step's draws for `purpose` (0: a rollout row, 1: an epoch's
        shuffle) and `index`: the same on every rank, and after a resume."""
        seed = self.cfg.train.seed
        for part in (self.step, purpose, index):
            seed = (seed * 1_000_003 + part) % (2**63 - 1)
        return torch.Generator(device=device).manual_seed(seed)

    def rl_step(self) -> dict[str, Any]:
        """One rollout batch and its updates; returns the metrics row."""
        rc, world = self.cfg.rl, self.world
        t0 = time.perf_counter()
        chosen = self.next_prompts()
        if rc.algorithm == "grpo":
            chosen = [i for i in chosen for _ in range(rc.group_size)]
        share = len(chosen) // world.world_size
        rows = range(world.rank * share, (world.rank + 1) * share)  # this rank's rollouts
        texts = [self.prompts.texts[chosen[r]] for r in rows]
        vocab = getattr(self.tok, "n_vocab", None)
        pad = self.stop_ids[0] if self.stop_ids else 0
        with autocast(self.device, self.dtype):
            local = sample(
                self.policy,
                [self.prompts.ids[chosen[r]] for r in rows],
                rc.max_new_tokens,
                self.stop_ids,
                rc.temperature,
                vocab_size=vocab,
                pad_id=pad,
                generators=[self.generator(0, r, self.device) for r in rows],
            )
        replies = [self.reply_text(local, i) for i in range(len(texts))]
        raw = self.scorer(local, texts, replies).float()
        with torch.no_grad(), autocast(self.device, self.dtype):
            old_logp, ent, old_values = score_tokens(self.raw, local, None, rc.temperature, vocab)
            ref_logp, _, _ = score_tokens(self.ref, local, None, rc.temperature, vocab)
        per_token = [old_logp, ent, ref_logp] + ([old_values] if old_values is not None else [])
        batch, raw, per_token = self.gather(local, raw, per_token, pad)
        old_logp, ent, ref_logp = per_token[:3]
        old_values = per_token[3] if len(per_token) > 3 else None
        scores = self.normalize(raw)
        mask = batch.response_mask.to(self.device)
        fmask = mask.float()
        kl = kl_k1(old_logp, ref_logp) * fmask
        kl_per_reply = kl.sum(1)
        beta = self.ctl.beta
        returns = None
        if rc.algorithm == "ppo":
            assert old_values is not None
            old_values = old_values * fmask
            rewards = token_rewards(scores.to(self.device), kl, beta, mask)
            adv, returns = gae(rewards, old_values, mask, rc.gamma, rc.lam)
            if rc.whiten_advantages:
                adv = whiten(adv, mask)
        else:
            adv = group_advantages(scores, rc.group_size).to(self.device)[:, None] * fmask
        stats = self.update(batch, old_logp, ref_logp, old_values, adv, returns, beta)
        self.ctl.update(kl_per_reply.mean().item(), len(chosen))
        self.state.beta = self.ctl.beta
        elapsed = time.perf_counter() - t0
        self.state.elapsed_s += elapsed
        return {
            "step": self.step + 1,
            "reward": raw.mean().item(),
            "kl": kl_per_reply.mean().item(),
            "beta": beta,
            "entropy": masked_mean(ent, mask).item(),
            "clip_frac": stats["clip_frac"],
            "value_loss": stats["value_loss"],
            "approx_kl": stats["approx_kl"],
            "tokens_per_s": batch.n_tokens / elapsed,
        }

    def gather(
        self, local: Rollouts, raw: Tensor, per_token: list[Tensor], pad_id: int
    ) -> tuple[Rollouts, Tensor, list[Tensor]]:
        """Every rank's rollouts, scores and per-token values, in rank order (one process: its
        own). Replies are right-padded to the longest; per-token values with zeros."""
        if not self.world.enabled:
            return local, raw, per_token
        parts = gather((local, raw.cpu(), [t.cpu() for t in per_token]), self.world)
        batch = concat([p[0] for p in parts], pad_id)
        L = batch.response.size(1)
        merged = [
            torch.cat([F.pad(p[2][i], (0, L - p[2][i].size(1))) for p in parts]).to(self.device)
            for i in range(len(per_token))
        ]
        return batch, torch.cat([p[1] for p in parts]), merged

    def reply_text(self, batch: Rollouts, row: int) -> str:
        """A reply as text, without the token that ended it."""
        reply = batch.ids(row)[1]
        if batch.finish[row] == "stop":
            reply = reply[:-1]
        text = self.tok.decode(reply) if self.tok is not None else ""
        return self.template.parse_reply(text) if self.template is not None else text

    def normalize(self, raw: Tensor) -> Tensor:
        """Scores scaled by the first batch's mean and std (Ziegler et al.), clipped if asked."""
        rc = self.cfg.rl
        if not rc.normalize_reward:
            scores = raw
        else:
            if self.state.reward_mean is None:
                self.state.reward_mean = raw.mean().item()
                std = raw.std().item() if raw.numel() > 1 else 0.0
                self.state.reward_std = std if std > 1e-6 else 1.0  # all equal: shift only
            scores = (raw - self.state.reward_mean) / (self.state.reward_std or 1.0)
        if rc.reward_clip > 0:
            scores = scores.clamp(-rc.reward_clip, rc.reward_clip)
        return scores

    def update(
        self,
        batch: Rollouts,
        old_logp: Tensor,
        ref_logp: Tensor,
        old_values: Tensor | None,
        adv: Tensor,
        returns: Tensor | None,
        beta: float,
    ) -> dict[str, float | None]:
        """`rl.epochs` shuffled passes of minibatch steps; returns the mean diagnostics.

        Each minibatch is split evenly over the ranks; a rank's loss is weighted by its share
        of the minibatch's tokens, so DDP's mean of the gradients is the whole minibatch's."""
        rc, tc, world = self.cfg.rl, self.cfg.train, self.world
        n = batch.query.size(0)
        params = [p for p in self.raw.parameters() if p.requires_grad]
        sums = torch.zeros(3, dtype=torch.float64)  # clip_frac, approx_kl, value_loss
        count = 0
        lr = lr_at(self.step, tc)
        for group in self.opt.param_groups:
            group["lr"] = lr
        for epoch in range(rc.epochs):
            order = torch.randperm(n, generator=self.generator(1, epoch))
            for start in range(0, n, rc.minibatch_size):
                rows = order[start : start + rc.minibatch_size]
                share = rows.numel() // world.world_size
                mine = rows[world.rank * share : (world.rank + 1) * share]
                sub = batch.select(mine)
                dev_rows = mine.to(self.device)
                mask = sub.response_mask.to(self.device)
                # this rank's share of the minibatch's tokens (1 for one process)
                weight = sub.n_tokens / max(int(batch.response_mask[rows].sum()), 1)
                with autocast(self.device, self.dtype):
                    logp, ent, values = score_tokens(
                        self.model,
                        sub,
                        None,
                        rc.temperature,
                        getattr(self.tok, "n_vocab", None),
                    )
                pl = policy_loss(logp, old_logp[dev_rows], adv[dev_rows], mask, rc.clip)
                loss = pl.loss
                vl = None
                if values is not None and old_values is not None and returns is not None:
                    vl = value_loss(
                        values, old_values[dev_rows], returns[dev_rows], mask, rc.value_clip
                    )
                    loss = loss + rc.value_coef * vl
                if rc.algorithm == "grpo" and beta > 0:
                    loss = loss + beta * masked_mean(kl_k3(logp, ref_logp[dev_rows]), mask)
                if rc.entropy_coef:
                    loss = loss - rc.entropy_coef * masked_mean(ent, mask)
                if world.enabled:
                    loss = loss * (weight * world.world_size)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(
                    params, tc.grad_clip if tc.grad_clip > 0 else math.inf
                )
                self.opt.step()
                sums += weight * torch.tensor(
                    [pl.clip_frac.item(), pl.approx_kl.item(), vl.item() if vl is not None else 0]
                )
                count += 1
        sums = all_reduce_sum(sums, world) / max(count, 1)
        out: dict[str, float | None] = dict(
            zip(("clip_frac", "approx_kl", "value_loss"), sums.tolist())
        )
        if self.value_head is None:
            out["value_loss"] = None
        return out

    def save(self) -> Path | None:
        """A trainer checkpoint: the policy as a plain GPT; optimizer + value head; the state.
        Every rank joins (its RNGs are gathered); rank 0 writes."""
        rng_per_rank = gather(native.capture_rng(), self.world)
        if not self.world.is_main:
            return None
        extra: dict[str, Any] = {"optimizer": self.opt.state_dict()}
        if self.value_head is not None:
            extra["value_head"] = self.value_head.state_dict()
        state = {
            "config": to_dict(self.cfg),
            "tokenizer": "tokenizer",
            "val_loss": None,
            "rl": asdict(self.state),
            "rng_per_rank": rng_per_rank,
            "elapsed_s": self.state.elapsed_s,
            "world_size": self.world.world_size,
        }
        path = native.save_checkpoint(
            self.run_dir,
            self.step,
            self.policy.state_dict(),
            extra,
            state,
            keep_last=self.cfg.train.keep_last,
        )
        self.emit(CheckpointEvent(self.step, str(path)))
        return path

    def start_event(self) -> StartEvent:
        tc, rc = self.cfg.train, self.cfg.rl
        rollouts = rc.batch_size * (rc.group_size if rc.algorithm == "grpo" else 1)
        return StartEvent(
            run_dir=str(self.run_dir),
            step=self.step,
            max_steps=tc.max_steps,
            max_minutes=tc.max_minutes,
            params=self.policy.num_params(),
            frozen=0,
            micro_batch_size=rc.minibatch_size,
            block_size=self.cfg.model.block_size,
            grad_accum_steps=1,
            world_size=self.world.world_size,
            tokens_per_step=rollouts * rc.max_new_tokens,
            memory="",
            device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""),
        )


# ------------------------------------------------------------------------- the whole job


def rlhf(
    cfg: Config,
    run_dir: str | Path,
    *,
    reward_fn: str = "",
    prompts: Sequence[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_event: EventHandler | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainSummary:
    """RL-tune cfg.train.init_from against cfg.rl.reward_model, or the function `reward_fn`
    (`FILE.py:NAME`, run as Python: name only files you trust), on the prompts of cfg.rl.prompts
    (or `prompts`). Writes RUN_DIR like a training run; returns its summary."""
    run_dir = Path(run_dir)
    rc = cfg.rl
    inputs = [cfg.train.init_from, rc.reward_model, rc.prompts, reward_fn.rpartition(":")[0]]
    world, device = setup_ddp(cfg.train.device)  # torchrun's ranks, if any
    claim, finished = None, False
    try:
        claim = build.claim_for_ranks(run_dir, inputs, world, device, command="rlhf")
        options = RLOptions(resume, overwrite, on_event, should_stop)
        # no name for the trainer: it (DDP) must be gone before teardown() below
        summary = _rlhf(cfg, run_dir, claim, options, reward_fn, prompts, world, device).run()
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


def _rlhf(
    cfg: Config,
    run_dir: Path,
    claim: OutputDir,
    options: RLOptions,
    reward_fn: str,
    prompts: Sequence[str] | None,
    world: Dist,
    device: torch.device,
) -> RLTrainer:
    rc = cfg.rl
    policy_tok = load_model(cfg.train.init_from, device="cpu")[1] if cfg.train.init_from else None
    if policy_tok is None:
        raise ConfigError(
            f"the policy {cfg.train.init_from or '(none)'} carries no tokenizer",
            "a gpt2lab run directory or a Hugging Face GPT-2 directory",
            f"point {mark_key('policy')} at the run directory of `gpt2lab sft`",
        )
    template = pick_template(rc.template, policy_tok)
    if prompts is None:
        if not rc.prompts:
            raise ConfigError(
                "no prompts given", "a prompts file", f"pass {mark_key('prompts', 'FILE')}"
            )
        records = read_prompts(rc.prompts)
        texts = [prompt_text(p.messages, p.raw) for p in records]
        messages = [list(p.messages) for p in records]
    else:
        texts = list(prompts)
        messages = [[{"role": "user", "content": t}] for t in texts]
    ids = [template.encode(policy_tok, m, add_generation_prompt=True) for m in messages]
    if reward_fn:
        scorer = Scorer(fn=load_reward_fn(reward_fn), name=reward_fn)
    elif rc.reward_model:
        rm = load_reward_model(rc.reward_model, device=device)
        same = rm.tokenizer is not None and build.tokenizers_match(rm.tokenizer, policy_tok)
        scorer = Scorer(rm=rm, same_tokenizer=same, batch_size=rc.minibatch_size)
    else:
        raise ConfigError(
            "no reward given",
            f"{mark_key('reward', 'RM_DIR')} or --reward-fn FILE.py:NAME",
            f"train a reward model with `gpt2lab reward` and pass {mark_key('reward', 'RM_DIR')}",
        )
    stops = stop_ids(policy_tok, template)
    return RLTrainer(
        cfg,
        run_dir,
        scorer,
        PromptSet(texts, ids),
        stops,
        options,
        reward_fn,
        template,
        claim,
        world,
        device,
    )


def stop_ids(tokenizer: Any, template: ChatTemplate) -> list[int]:
    """The tokens that end a reply: the template's end of turn, and <|endoftext|>."""
    special = getattr(tokenizer, "special_tokens", {}) or {}
    out = [special[template.end_token]] if template.end_token in special else []
    eot = getattr(tokenizer, "eot_token", None)
    if eot is not None and eot not in out:
        out.append(eot)
    return out


def prompt_text(messages: Sequence[dict[str, str]], raw: str | None) -> str:
    """What a reward function sees as the prompt: the text given, else the last user message."""
    if raw is not None:
        return raw
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
