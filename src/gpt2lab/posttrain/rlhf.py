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
from torch import Tensor, nn

from gpt2lab.checkpoint import native
from gpt2lab.checkpoint.load import load_model
from gpt2lab.checkpoint.weights import load_model_safetensors
from gpt2lab.config import Config, merge, to_dict, to_toml
from gpt2lab.data.records import read_prompts
from gpt2lab.device import autocast, pick_device, pick_dtype
from gpt2lab.errors import ConfigError, DataError, TrainingError, mark_key
from gpt2lab.io import atomic_write_text
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
from gpt2lab.posttrain.rollout import Rollouts, sample, score_tokens
from gpt2lab.tokenizer.chat import ChatTemplate
from gpt2lab.train import build
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


@dataclass(frozen=True)
class RLOptions:
    resume: bool = False
    overwrite: bool = False
    on_event: EventHandler | None = None
    should_stop: Callable[[], bool] | None = None


class RLTrainer:
    """One RL run in RUN_DIR: policy (+ value head), frozen reference, scorer, prompts."""

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
    ) -> None:
        """`claim` is RUN_DIR taken by `rlhf()`; without it, it is taken here (and kept)."""
        self.options = options or RLOptions()
        self.run_dir = Path(run_dir)
        if claim is None:
            claim = build.claim_run_dir(self.run_dir, [cfg.train.init_from], command="rlhf")
        self.claim = claim
        self.template = template
        self.scorer, self.prompts, self.stop_ids = scorer, prompts, list(stop_ids)
        rc, tc = cfg.rl, cfg.train
        if not prompts.texts:
            raise DataError("no prompts", "at least one prompt", "check --prompts")
        if rc.algorithm == "grpo" and rc.group_size < 2:
            raise ConfigError(
                f"{mark_key('rl.group_size', rc.group_size)} with GRPO",
                "at least 2 samples per prompt (advantages compare them)",
                f"set {mark_key('rl.group_size', 4)}",
            )
        build.prepare_run_dir(self.run_dir, self.options.resume, self.options.overwrite)
        ckpt = native.require_latest(self.run_dir) if self.options.resume else None
        if not tc.init_from:
            raise ConfigError(
                "no policy to start from", f"{mark_key('policy')} (an SFT run directory)"
            )
        self.device = pick_device(tc.device)
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
        self.value_head: nn.Linear | None = None
        parts: dict[str, nn.Module] = {"policy": self.policy}
        if rc.algorithm == "ppo":
            self.value_head = nn.Linear(cfg.model.n_embd, 1).to(self.device)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            parts["value_head"] = self.value_head
        self.trainable = nn.ModuleDict(parts)
        self.opt = configure_optimizer(self.trainable, tc, self.device)
        self.ctl = KLController(
            rc.kl_coef, rc.target_kl if rc.target_kl > 0 else None, rc.kl_horizon
        )
        self.state = RLState(beta=rc.kl_coef, reward_fn=reward_fn_spec)
        self.step = 0
        rng = None
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
            rng = saved["rng_per_rank"][0]
        if self.options.resume is False:
            self._write_run_dir(self.options.overwrite)
        self.metrics = MetricsLog(
            self.run_dir,
            self.step if ckpt is not None else None,
            tc.tensorboard,
            tc.wandb,
            to_dict(cfg),
        )
        if rng is not None:
            native.restore_rng(rng)
        else:
            torch.manual_seed(tc.seed)

    def _write_run_dir(self, clear: bool) -> None:
        if clear:
            build.clear_run_dir(self.claim)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in build.RUN_ENTRIES:  # refused if one exists that gpt2lab did not write
            self.claim.claim_file(name)
        if self.cfg.train.tensorboard:
            self.claim.claim_file("tb")
        atomic_write_text(self.run_dir / "config.toml", to_toml(self.cfg))
        if self.tok is not None and not (self.run_dir / "tokenizer").is_dir():
            self.tok.save(str(self.run_dir / "tokenizer"))

    def emit(self, event: Event) -> None:
        if self.options.on_event is not None:
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
            self.metrics.write(row)
            self.emit(StepEvent(self.step, dict(row)))
            if self.options.should_stop is not None and self.options.should_stop():
                stopped_by = "signal"
            elif tc.max_minutes > 0 and self.state.elapsed_s >= tc.max_minutes * 60:
                stopped_by = "max_minutes"
            elif self.step >= tc.max_steps:
                stopped_by = "max_steps"
            if stopped_by or self.step % tc.checkpoint_interval == 0:
                checkpoint = self.save()
            if stopped_by:
                break
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

    def rl_step(self) -> dict[str, Any]:
        """One rollout batch and its updates; returns the metrics row."""
        rc = self.cfg.rl
        t0 = time.perf_counter()
        chosen = self.next_prompts()
        if rc.algorithm == "grpo":
            chosen = [i for i in chosen for _ in range(rc.group_size)]
        texts = [self.prompts.texts[i] for i in chosen]
        ids = [self.prompts.ids[i] for i in chosen]
        vocab = getattr(self.tok, "n_vocab", None)
        with autocast(self.device, self.dtype):
            batch = sample(
                self.policy,
                ids,
                rc.max_new_tokens,
                self.stop_ids,
                rc.temperature,
                vocab_size=vocab,
                pad_id=self.stop_ids[0] if self.stop_ids else 0,
            )
        replies = [self.reply_text(batch, i) for i in range(len(texts))]
        raw = self.scorer(batch, texts, replies).float()
        scores = self.normalize(raw)
        mask = batch.response_mask.to(self.device)
        fmask = mask.float()
        with torch.no_grad(), autocast(self.device, self.dtype):
            old_logp, ent, old_values = score_tokens(
                self.policy, batch, self.value_head, rc.temperature, vocab
            )
            ref_logp, _, _ = score_tokens(self.ref, batch, None, rc.temperature, vocab)
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
        """`rl.epochs` shuffled passes of minibatch steps; returns the mean diagnostics."""
        rc, tc = self.cfg.rl, self.cfg.train
        n = batch.query.size(0)
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        sums = {"clip_frac": 0.0, "approx_kl": 0.0, "value_loss": 0.0}
        count = 0
        lr = lr_at(self.step, tc)
        for group in self.opt.param_groups:
            group["lr"] = lr
        for _ in range(rc.epochs):
            order = torch.randperm(n)
            for start in range(0, n, rc.minibatch_size):
                rows = order[start : start + rc.minibatch_size]
                sub = batch.select(rows)
                dev_rows = rows.to(self.device)
                mask = sub.response_mask.to(self.device)
                with autocast(self.device, self.dtype):
                    logp, ent, values = score_tokens(
                        self.policy,
                        sub,
                        self.value_head,
                        rc.temperature,
                        getattr(self.tok, "n_vocab", None),
                    )
                pl = policy_loss(logp, old_logp[dev_rows], adv[dev_rows], mask, rc.clip)
                loss = pl.loss
                if values is not None and old_values is not None and returns is not None:
                    vl = value_loss(
                        values, old_values[dev_rows], returns[dev_rows], mask, rc.value_clip
                    )
                    loss = loss + rc.value_coef * vl
                    sums["value_loss"] += vl.item()
                if rc.algorithm == "grpo" and beta > 0:
                    loss = loss + beta * masked_mean(kl_k3(logp, ref_logp[dev_rows]), mask)
                if rc.entropy_coef:
                    loss = loss - rc.entropy_coef * masked_mean(ent, mask)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(
                    params, tc.grad_clip if tc.grad_clip > 0 else math.inf
                )
                self.opt.step()
                sums["clip_frac"] += pl.clip_frac.item()
                sums["approx_kl"] += pl.approx_kl.item()
                count += 1
        out: dict[str, float | None] = {k: v / max(count, 1) for k, v in sums.items()}
        if self.value_head is None:
            out["value_loss"] = None
        return out

    def save(self) -> Path:
        """A trainer checkpoint: the policy as a plain GPT; optimizer + value head; the state."""
        extra: dict[str, Any] = {"optimizer": self.opt.state_dict()}
        if self.value_head is not None:
            extra["value_head"] = self.value_head.state_dict()
        state = {
            "config": to_dict(self.cfg),
            "tokenizer": "tokenizer",
            "val_loss": None,
            "rl": asdict(self.state),
            "rng_per_rank": [native.capture_rng()],
            "elapsed_s": self.state.elapsed_s,
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
            world_size=1,
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
    claim = build.claim_run_dir(run_dir, inputs, command="rlhf")  # before anything is read
    try:
        options = RLOptions(resume, overwrite, on_event, should_stop)
        return _rlhf(cfg, run_dir, claim, options, reward_fn, prompts).run()
    except BaseException:
        if claim.created and not native.list_checkpoints(run_dir):
            claim.discard()  # a run that failed before its first checkpoint leaves no trace
        raise
    finally:
        claim.release()


def _rlhf(
    cfg: Config,
    run_dir: Path,
    claim: OutputDir,
    options: RLOptions,
    reward_fn: str,
    prompts: Sequence[str] | None,
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
        rm = load_reward_model(rc.reward_model, device=pick_device(cfg.train.device))
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
        cfg, run_dir, scorer, PromptSet(texts, ids), stops, options, reward_fn, template, claim
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
