"""Typed, frozen configs for every command, their presets, TOML files and dotted overrides.

Precedence: dataclass defaults < preset < TOML file < command-line overrides (`--train.lr=3e-4`)
< a command's own flags; `resolve()` applies them in that order for every command.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from gpt2lab.errors import ConfigError, mark_key

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


_INT_MAX = 2**62  # any count beyond this is a typo (and overflows int64 tensors and seeds)
_DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def _check_fields(section: str, obj: Any, checks: list[tuple[str, bool, str, Any]]) -> None:
    """Raise ConfigError naming `section.key` for the first check that fails; every float field
    must also be finite and every int field at most 2**62."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            checks = [(f.name, False, "a finite number", None), *checks]
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > _INT_MAX:
            checks = [(f.name, False, f"an integer of at most {_INT_MAX:.1e}", None), *checks]
        elif isinstance(value, str) and "\0" in value:
            checks = [(f.name, False, "text without NUL characters", None), *checks]
    for key, ok, expected, example in checks:
        if not ok:
            value = getattr(obj, key)
            full = f"{section}.{key}"
            fix = (
                f"e.g. {mark_key(full, example)}"
                if example is not None
                else f"fix {mark_key(full)}"
            )
            raise ConfigError(f"{full}={value!r} is out of range", expected, fix)


@dataclass(frozen=True)
class GPTConfig:
    """The GPT-2 architecture: Radford et al. 2019, sec. 2.3."""

    block_size: int = 1024  # longest context the position table covers
    vocab_size: int = 50257  # tokens the tokenizer can produce; the table may be padded beyond it
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # embedding, attention and residual dropout; 0 for pretraining
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has them
    pad_vocab_to: int = 64  # pad the embedding table to a multiple of this (1 = none)

    def __post_init__(self) -> None:
        _check_fields("model", self, [])
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "pad_vocab_to"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"model.{name}={getattr(self, name)} is not positive",
                    "an integer >= 1",
                    f"set {mark_key('model.' + name)} to a positive value",
                )
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}",
                "n_embd = n_head x head size",
                f"change {mark_key('model.n_embd')} or {mark_key('model.n_head')}",
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(
                f"model.dropout={self.dropout} is out of range",
                "0 <= dropout < 1",
                f"set {mark_key('model.dropout', 0.0)} for pretraining or 0.1 for fine-tuning",
            )

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to
        return (self.vocab_size + m - 1) // m * m


@dataclass(frozen=True)
class DataConfig:
    """Where training data lives and how batches are drawn from it."""

    dir: str = ""  # a directory written by `gpt2lab prepare`
    sampling: Literal["random", "sequential"] = "random"  # random windows or shuffled epochs

    def __post_init__(self) -> None:
        _check_fields(
            "data",
            self,
            [
                ("dir", isinstance(self.dir, str), "a directory path", None),
                ("sampling", self.sampling in ("random", "sequential"), "random or sequential",
                 "random"),
            ],
        )  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe (GPT-2 / GPT-3 style). See `gpt2lab train --help`."""

    max_steps: int = 5000
    micro_batch_size: int = 12
    grad_accum_steps: int = 1
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    lr_schedule: Literal["cosine", "wsd"] = "cosine"  # the decay after warmup (see recipe.lr_at)
    cooldown_frac: float = 0.4  # wsd: the share of the run (after warmup) spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon on the blocks' matrices, AdamW else
    muon_lr: float = 0.02  # Muon's peak LR (follows the same warmup and decay as lr)
    muon_momentum: float = 0.95
    eval_interval: int = 250
    eval_steps: int = 20  # validation batches per evaluation; 0 = the whole validation split
    final_eval_steps: int = -1  # batches for the run's last evaluation; -1 = eval_steps, 0 = all
    log_interval: int = 10
    checkpoint_interval: int = 1000
    seed: int = 1337
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    compile: bool = False
    init_from: str = ""  # "" (scratch), gpt2, a Hugging Face dir or a gpt2lab run/checkpoint dir
    strategy: Literal["ddp", "fsdp"] = "ddp"  # how torchrun ranks share the model
    freeze: tuple[str, ...] = ()  # glob patterns of parameters kept fixed, e.g. transformer.w*e.*
    skip_nonfinite: bool = False  # skip (and count) a step with a NaN/inf loss instead of stopping
    keep_last: int = 3  # checkpoints kept besides the best one (0 keeps all)
    sample_interval: int = 0  # print a sample every N evaluations (0 = never)
    sample_prompt: str = "\n"
    sample_tokens: int = 100
    max_minutes: float = 0.0  # wall-clock budget; > 0 makes the LR schedule follow wall time
    max_epochs: int = 0  # > 0: this many shuffled passes over the train split (sets max_steps)
    sample_every_epoch: bool = False  # at each epoch's end: a sample, its train and val loss
    peak_flops: float = 0.0  # hardware peak for MFU in FLOP/s; 0 = look up (GPU) or measure (CPU)
    tensorboard: bool = False  # also log to RUN_DIR/tb (needs the tensorboard package)
    wandb: str = ""  # Weights & Biases project name; "" = off (needs the wandb package)

    def __post_init__(self) -> None:
        def unit(x: float) -> bool:
            return 0.0 <= x < 1.0

        _check_fields(
            "train",
            self,
            [
                ("max_steps", self.max_steps >= 0, "an integer >= 0", 5000),
                ("micro_batch_size", self.micro_batch_size >= 1, "an integer >= 1", 12),
                ("grad_accum_steps", self.grad_accum_steps >= 1, "an integer >= 1", 1),
                ("lr", self.lr >= 0, "a learning rate >= 0", "6e-4"),
                ("min_lr", self.min_lr >= 0, "a learning rate >= 0", "6e-5"),
                ("warmup_steps", self.warmup_steps >= 0, "an integer >= 0", 100),
                ("lr_schedule", self.lr_schedule in ("cosine", "wsd"), "cosine or wsd", "cosine"),
                ("cooldown_frac", 0.0 <= self.cooldown_frac <= 1.0, "a fraction in [0, 1]", 0.4),
                ("weight_decay", self.weight_decay >= 0, "a number >= 0", 0.1),
                ("beta1", unit(self.beta1), "0 <= beta1 < 1", 0.9),
                ("beta2", unit(self.beta2), "0 <= beta2 < 1", 0.95),
                ("grad_clip", self.grad_clip >= 0, "a number >= 0 (0 = off)", 1.0),
                ("optimizer", self.optimizer in ("adamw", "muon"), "adamw or muon", "adamw"),
                ("muon_lr", self.muon_lr >= 0, "a learning rate >= 0", 0.02),
                ("muon_momentum", unit(self.muon_momentum), "0 <= momentum < 1", 0.95),
                ("eval_interval", self.eval_interval >= 1, "an integer >= 1", 250),
                ("eval_steps", self.eval_steps >= 0, "an integer >= 0 (0 = all)", 20),
                ("final_eval_steps", self.final_eval_steps >= -1, "an integer >= -1", -1),
                ("log_interval", self.log_interval >= 1, "an integer >= 1", 10),
                ("checkpoint_interval", self.checkpoint_interval >= 1, "an integer >= 1", 1000),
                ("seed", self.seed >= 0, "an integer >= 0", 1337),
                ("device", bool(self.device.strip()), "auto, cpu, cuda, cuda:N or mps", "auto"),
                ("dtype", self.dtype in _DTYPE_NAMES, ", ".join(_DTYPE_NAMES), "auto"),
                ("strategy", self.strategy in ("ddp", "fsdp"), "ddp or fsdp", "ddp"),
                ("keep_last", self.keep_last >= 0, "an integer >= 0 (0 keeps all)", 3),
                ("sample_interval", self.sample_interval >= 0, "an integer >= 0", 0),
                ("sample_tokens", self.sample_tokens >= 0, "an integer >= 0", 100),
                ("max_minutes", self.max_minutes >= 0, "minutes >= 0 (0 = no limit)", 5),
                ("max_epochs", self.max_epochs >= 0, "an integer >= 0", 0),
                ("peak_flops", self.peak_flops >= 0, "FLOP/s >= 0 (0 = look up)", 0),
            ],
        )


@dataclass(frozen=True)
class SampleConfig:
    """Decoding settings for `gpt2lab sample`."""

    max_new_tokens: int = 200
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context (CTRL)
    seed: int | None = None
    num_samples: int = 1
    stop: tuple[str, ...] = ()  # stop strings; generation ends before the first one
    batch_size: int = 16  # rows generated together (prompts x samples are split into batches)
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto: bfloat16 on GPUs and on CPUs with native bfloat16, else float32
    quantize: str | None = None  # int8: 8-bit weight matrices (gpt2lab.quantize)

    def __post_init__(self) -> None:
        _check_fields("sample", self, [])
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 0, "an integer >= 0", None),
            ("quantize", self.quantize in (None, "int8"), "int8 (or unset)", "int8"),
            ("temperature", self.temperature >= 0, "a number >= 0 (0 = greedy)", None),
            ("top_k", self.top_k is None or self.top_k >= 1, "an integer >= 1", None),
            ("top_p", self.top_p is None or 0 < self.top_p <= 1, "a number in (0, 1]", "0.9"),
            ("repetition_penalty", self.repetition_penalty > 0, "a number > 0 (1 = off)", "1.2"),
            ("num_samples", self.num_samples >= 1, "an integer >= 1", None),
            ("batch_size", self.batch_size >= 1, "an integer >= 1", None),
        ]
        for key, ok, expected, example in checks:
            if not ok:
                value = getattr(self, key)
                fix = f"e.g. {mark_key(key, example)}" if example else f"change {mark_key(key)}"
                raise ConfigError(f"sample.{key}={value!r} is out of range", expected, fix)


@dataclass(frozen=True)
class EvalConfig:
    """Batching, windows and precision for `gpt2lab eval`."""

    batch_size: int = 8  # windows or candidate sequences per forward pass
    context: int | None = None  # defaults to the model's block_size
    stride: int | None = None  # defaults to context // 2
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "float32"  # float32 reproduces published figures; bfloat16 is faster
    limit: int | None = None  # lambada, cbt, hellaswag: only the first N examples

    def __post_init__(self) -> None:
        _check_fields(
            "eval",
            self,
            [
                ("device", bool(self.device.strip()), "auto, cpu, cuda, cuda:N or mps", "auto"),
                ("dtype", self.dtype in _DTYPE_NAMES, ", ".join(_DTYPE_NAMES), "float32"),
            ],
        )
        for name in ("batch_size", "context", "stride", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(
                    f"eval.{name}={value} is not positive",
                    "an integer >= 1",
                    f"set {mark_key('eval.' + name)} to a positive value",
                )


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning (`gpt2lab sft`, docs/post_training.md): data, template, packing."""

    data: str = ""  # JSONL/Parquet file or dataset name: prompt/completion or messages records
    val_data: str = ""  # held-out records; "" holds out val_fraction of `data`
    val_fraction: float = 0.05  # share of `data` held out when no val_data is given
    template: str = "auto"  # chat template: auto (the model's, else plain), chat, plain, or a file
    packing: bool = False  # pack short examples into full blocks (block-diagonal attention)
    max_length: int = 0  # tokens per example, 0 = model.block_size; longer prompts lose their start
    errors: Literal["raise", "skip"] = "raise"  # a bad record stops the run, or is counted

    def __post_init__(self) -> None:
        _check_fraction("sft", self.val_fraction)


@dataclass(frozen=True)
class DPOConfig:
    """Direct preference optimisation (`gpt2lab dpo`, Rafailov et al. 2023)."""

    data: str = ""  # preference pairs: {prompt, chosen, rejected} or HH-RLHF {chosen, rejected}
    val_data: str = ""  # held-out pairs; "" holds out val_fraction of `data`
    val_fraction: float = 0.05
    template: str = "auto"  # chat template: auto (the model's, else plain), chat, plain, or a file
    beta: float = 0.1  # strength of the KL penalty towards the reference model
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"  # DPO, IPO (Azar et al.), hinge (SLiC)
    cache_reference: bool = True  # reference log-probs computed once into RUN_DIR/reference/
    max_length: int = 0  # tokens per prompt + reply, 0 = model.block_size
    errors: Literal["raise", "skip"] = "raise"

    def __post_init__(self) -> None:
        _check_fraction("dpo", self.val_fraction)
        if not self.beta > 0:
            raise ConfigError(
                f"dpo.beta={self.beta} is not positive",
                "a number > 0",
                f"e.g. {mark_key('dpo.beta', 0.1)}",
            )


def _check_fraction(section: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(
            f"{section}.val_fraction={value} is out of range",
            "0 <= val_fraction < 1",
            f"e.g. {mark_key(section + '.val_fraction', 0.05)}",
        )


@dataclass(frozen=True)
class RewardConfig:
    """`gpt2lab reward`: a reward model trained on preference pairs (Bradley-Terry)."""

    data: str = ""  # preference pairs: {prompt, chosen, rejected} or HH-RLHF {chosen, rejected}
    val_data: str = ""  # held-out pairs; "" holds out val_fraction of `data`
    val_fraction: float = 0.1
    template: str = "auto"  # chat template: auto (the model's, else plain), chat, plain, or a file
    max_length: int = 0  # tokens per prompt + reply, 0 = model.block_size; cut from the left
    errors: Literal["raise", "skip"] = "raise"  # a bad record stops the run, or is counted

    def __post_init__(self) -> None:
        _check_fraction("reward", self.val_fraction)


@dataclass(frozen=True)
class RLConfig:
    """`gpt2lab rlhf`: PPO (Ziegler et al. 2019) or GRPO against a reward. See `--help`."""

    algorithm: Literal["ppo", "grpo"] = "ppo"
    prompts: str = ""  # JSONL with a `prompt` field, or plain text with one prompt per line
    reward_model: str = ""  # a reward-model directory (`gpt2lab reward`)
    template: str = "auto"  # chat template for the prompts: auto (the policy's, else plain)
    batch_size: int = 16  # prompts per rollout batch (GRPO: each sampled group_size times)
    group_size: int = 4  # GRPO: samples per prompt
    minibatch_size: int = 8  # rollouts per optimizer step
    epochs: int = 4  # passes over each rollout batch (PPO's minibatch epochs)
    max_new_tokens: int = 48  # reply length; rollouts are also cut by the model's context
    temperature: float = 1.0  # sampling temperature of the rollouts (1 = the policy itself)
    gamma: float = 1.0  # discount (GAE)
    lam: float = 0.95  # GAE's lambda
    clip: float = 0.2  # PPO's epsilon: the ratio's clip range
    value_clip: float = 0.2  # the value loss's clip range
    value_coef: float = 0.5  # weight of the value loss
    entropy_coef: float = 0.0  # weight of an entropy bonus
    kl_coef: float = 0.1  # beta: the initial (or fixed) weight of the KL penalty
    target_kl: float = 6.0  # nats per reply the adaptive beta steers to; 0 = a fixed beta
    kl_horizon: float = 10000.0  # how fast beta moves: K_beta = batch / horizon (Ziegler et al.)
    whiten_advantages: bool = True
    normalize_reward: bool = True  # scale scores to mean 0, std 1 on the first batch (Ziegler)
    reward_clip: float = 0.0  # clip normalized scores to [-c, c]; 0 = off

    def __post_init__(self) -> None:
        checks = [
            ("batch_size", self.batch_size >= 1),
            ("group_size", self.group_size >= 1),
            ("minibatch_size", self.minibatch_size >= 1),
            ("epochs", self.epochs >= 1),
            ("max_new_tokens", self.max_new_tokens >= 1),
            ("temperature", self.temperature > 0),
            ("clip", self.clip > 0),
            ("kl_coef", self.kl_coef >= 0),
            ("target_kl", self.target_kl >= 0),
            ("kl_horizon", self.kl_horizon > 0),
        ]
        for key, ok in checks:
            if not ok:
                raise ConfigError(
                    f"rl.{key}={getattr(self, key)!r} is out of range",
                    "a positive value" if key not in ("kl_coef", "target_kl") else "a value >= 0",
                    f"change {mark_key('rl.' + key)}",
                )


@dataclass(frozen=True)
class Config:
    """Every section together: what a run directory records and what overrides address."""

    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rl: RLConfig = field(default_factory=RLConfig)


# Model shapes from the paper's Table 2 (n_layer, n_embd); n_head from the released checkpoints.
MODEL_PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    # small models for CPUs
    "shakespeare-char": GPTConfig(
        block_size=256,
        vocab_size=65,
        n_layer=6,
        n_head=6,
        n_embd=384,
        dropout=0.2,
        bias=False,
        pad_vocab_to=1,
    ),
    # GPT-2's vocabulary at 9.9M parameters (7.8M of them the token table); head size 32
    "gpt2-10m": GPTConfig(block_size=256, n_layer=6, n_head=5, n_embd=160),
    # the recipes of docs/recipes.md (their sources: PRESET_SOURCES below)
    "pile-10k": GPTConfig(block_size=1024, n_layer=6, n_head=8, n_embd=256),
    "openwebtext-10k": GPTConfig(block_size=512, n_layer=2, n_head=6, n_embd=384),
    "tinystories": GPTConfig(block_size=256, n_layer=4, n_head=4, n_embd=128, bias=False),
}

# Presets for whole runs: nested partial dicts applied over the defaults, then the model preset.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    name: {"model": dataclasses.asdict(cfg)} for name, cfg in MODEL_PRESETS.items()
}
# Training recipes: nanoGPT's shakespeare-char and GPT-2 (124M) values (Karpathy, nanoGPT configs),
# and a gentle fine-tuning recipe (small constant-ish LR) for `--init-from`.
PRESETS["shakespeare-char"]["train"] = dict(
    max_steps=5000,
    micro_batch_size=64,
    lr=1e-3,
    min_lr=1e-4,
    beta2=0.99,
    warmup_steps=100,
    eval_interval=250,
    eval_steps=200,
    checkpoint_interval=500,
    sample_interval=4,
)
PRESETS["gpt2"]["train"] = dict(
    max_steps=600000,
    micro_batch_size=12,
    grad_accum_steps=40,
    warmup_steps=2000,
    eval_interval=1000,
    eval_steps=200,
    checkpoint_interval=1000,
)
PRESETS["finetune"] = {
    "train": dict(
        max_steps=500,
        micro_batch_size=4,
        grad_accum_steps=8,
        lr=3e-5,
        min_lr=3e-6,
        warmup_steps=20,
        eval_interval=50,
        eval_steps=40,
        checkpoint_interval=100,
    )
}
# `gpt2lab demo`: a character model for a few minutes of CPU, its LR schedule following wall time
# (train.max_minutes); settings and the curve they give are in README.md ("The demo's recipe").
PRESETS["demo"] = {
    "model": dict(
        block_size=128, n_layer=4, n_head=2, n_embd=128, dropout=0.0, bias=False, pad_vocab_to=1
    ),
    "train": dict(
        max_steps=10**9,  # the clock ends the run
        micro_batch_size=36,  # Muon's per-step matmuls pay off over 36 x 128 characters
        optimizer="muon",  # the blocks' matrices; AdamW (lr below) for embeddings and norms
        muon_lr=0.015,
        lr=3e-3,
        min_lr=0.0,
        lr_schedule="wsd",  # hold the peak, then decay to 0 over the last 60% of the budget
        cooldown_frac=0.6,
        warmup_steps=100,
        beta2=0.99,
        eval_interval=250,
        eval_steps=6,
        final_eval_steps=0,
        checkpoint_interval=500,
        keep_last=1,
        sample_interval=2,
        sample_tokens=200,
        max_minutes=5.0,
    ),
}
# `gpt2lab sft` / `gpt2lab dpo` start from these unless given --preset: a short, gentle run from
# a pretrained model (SFT: Ouyang et al. 2022 fine-tune at ~1e-5 for 124M-1.3B models; DPO:
# Rafailov et al. 2023 use 1e-6 with beta 0.1, dpo.beta's default; both with a short warmup).
PRESETS["sft"] = {
    "train": dict(
        max_steps=1000,
        micro_batch_size=8,
        lr=2e-5,
        min_lr=2e-6,
        warmup_steps=20,
        eval_interval=100,
        eval_steps=20,
        checkpoint_interval=200,
    )
}
PRESETS["dpo"] = {
    "train": dict(
        max_steps=500,
        micro_batch_size=4,
        lr=1e-6,
        min_lr=1e-7,
        warmup_steps=20,
        weight_decay=0.0,
        eval_interval=50,
        eval_steps=20,
        checkpoint_interval=100,
    )
}
# TinyStories on a laptop CPU: like the demo, the clock ends the run and the LR follows it.
PRESETS["tinystories"]["train"] = dict(
    max_steps=10**9,
    micro_batch_size=16,
    lr=2e-3,
    min_lr=2e-4,
    lr_schedule="wsd",
    warmup_steps=50,
    eval_interval=100,
    eval_steps=10,
    checkpoint_interval=200,
    max_minutes=15.0,
)
PRESETS["openwebtext-10k"]["train"] = dict(
    max_steps=300,  # ~8 passes over openwebtext-10k's ~10M tokens at 262K tokens a step
    micro_batch_size=32,
    grad_accum_steps=16,
    lr=5e-4,
    min_lr=5e-5,
    lr_schedule="cosine",
    warmup_steps=20,
    eval_interval=25,
    eval_steps=20,
    checkpoint_interval=50,
)
PRESETS["pile-10k"]["train"] = dict(
    max_steps=2000,
    micro_batch_size=16,
    grad_accum_steps=2,
    lr=6e-4,
    min_lr=6e-5,
    warmup_steps=100,
    eval_interval=200,
    eval_steps=20,
    checkpoint_interval=500,
)

# RLHF (`gpt2lab rlhf`): small constant learning rates, as RL fine-tuning uses them.
_RL_TRAIN = dict(
    max_steps=200,
    lr=1e-5,
    min_lr=1e-5,
    warmup_steps=0,
    weight_decay=0.0,
    grad_clip=1.0,
    log_interval=1,
    checkpoint_interval=50,
    dtype="float32",
)
PRESETS["ppo"] = {"train": dict(_RL_TRAIN), "rl": dict(algorithm="ppo")}
PRESETS["grpo"] = {
    "train": dict(_RL_TRAIN),
    "rl": dict(algorithm="grpo", batch_size=8, group_size=4, kl_coef=0.04, target_kl=0.0),
}
# `gpt2lab reward`: a few passes over some thousand comparisons (Ziegler et al. used one epoch)
PRESETS["reward"] = {
    "train": dict(
        max_steps=500,
        micro_batch_size=16,
        lr=5e-5,
        min_lr=5e-6,
        warmup_steps=20,
        weight_decay=0.0,
        log_interval=10,
        eval_interval=50,
        checkpoint_interval=100,
    ),
}

# Where each preset comes from: `gpt2lab config --preset NAME` prints it first, as a TOML comment.
PRESET_SOURCES: dict[str, str] = {
    "gpt2": "GPT-2 124M (Radford et al. 2019, Table 2); training as nanoGPT's train_gpt2.py",
    "gpt2-medium": "GPT-2 350M (Radford et al. 2019, Table 2; n_head of the released checkpoint)",
    "gpt2-large": "GPT-2 774M (Radford et al. 2019, Table 2; n_head of the released checkpoint)",
    "gpt2-xl": "GPT-2 1558M (Radford et al. 2019, Table 2; n_head of the released checkpoint)",
    "shakespeare-char": "nanoGPT's config/train_shakespeare_char.py (Karpathy)",
    "gpt2-10m": "gpt2lab: GPT-2's vocabulary at ~10M parameters, for CPUs",
    "finetune": "gpt2lab: a gentle fine-tuning recipe for --init-from (small LR, short run)",
    "demo": "gpt2lab demo: a 5-minute character model (README.md, 'The demo's recipe')",
    "sft": "gpt2lab sft's defaults: a gentle fine-tuning run (docs/post_training.md)",
    "dpo": "gpt2lab dpo's defaults: lr 1e-6 and beta 0.1 as Rafailov et al. 2023 (sec. 6)",
    "pile-10k": (
        "recipe 'pile-10k 6x256' (docs/recipes.md): 6 layers, n_embd 256, context 1024; the recipe "
        "asks for 6 heads, which do not divide 256, so 8 heads of 32 (n_embd kept); 17.9M "
        "parameters with GPT-2's vocabulary and tied embeddings (the quoted ~34M is not a 256-wide "
        "6-layer GPT-2's count); training values are gpt2lab's"
    ),
    "openwebtext-10k": (
        "recipe 'openwebtext-10k small GPT' (docs/recipes.md): 2 blocks, context 512, batch 32 x "
        "grad_accum_steps 16, cosine from 5e-4; width 384, 6 heads, steps: gpt2lab's"
    ),
    "ppo": "gpt2lab rlhf: PPO with Ziegler et al. 2019's adaptive KL penalty, constant LR",
    "grpo": "gpt2lab rlhf: GRPO (Shao et al. 2024), 4 samples per prompt, KL in the loss",
    "reward": "gpt2lab reward: a reward model on preference pairs (Bradley-Terry)",
    "tinystories": (
        "recipe 'TinyStories on a CPU in 15 minutes' (docs/recipes.md): gpt2lab's 4x128 GPT-2 "
        "(Eldan & Li 2023 show such small models learn fluent stories); wsd LR over 15 minutes"
    ),
}


def resolve(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    base: Config | None = None,
    *,
    flags: typing.Mapping[str, Any] | None = None,
    sections: typing.Collection[str] | None = None,
) -> Config:
    """The one way every command builds its Config.

    Defaults (or `base`) < `preset` < TOML `config_file` (only its `sections`, if given) <
    `overrides` (`section.key=value` strings) < `flags` ({"eval.context": 512}: a command's own
    options, already typed; None means not given).
    """
    cfg = base or Config()
    if preset:
        if preset not in PRESETS:
            raise ConfigError(
                f"unknown preset {preset!r}",
                f"one of {', '.join(PRESETS)}",
                _did_you_mean(preset, PRESETS, prefix=""),
            )
        cfg = merge(cfg, PRESETS[preset], source=f"preset {preset}")
    if config_file:
        tables = load_toml(config_file)
        if sections is not None:
            tables = {k: v for k, v in tables.items() if k in sections}
        cfg = merge(cfg, tables, source=str(config_file))
    cfg = apply_overrides(cfg, overrides)
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    if not given:
        return cfg
    try:
        return merge(cfg, unflatten(given), source="the command line")
    except ConfigError as e:  # name the option the user typed (--top-p), not its key
        e.rename_keys({k: k.rsplit(".", 1)[-1] for k in given})
        raise


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into nested dicts."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {p} does not exist",
            "a TOML file",
            f"check the path given to {mark_key('config')}",
        )
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"config file {p} is not valid TOML ({e})",
            "sections such as [train]",
            "fix the file or see `gpt2lab config --help`",
        ) from e


def merge(cfg: Any, updates: dict[str, Any], source: str = "config", prefix: str = "") -> Any:
    """Return `cfg` with the nested `updates` applied; unknown keys fail naming the closest one."""
    if not isinstance(updates, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'the config'} in {source} must be a table",
            "key = value lines under a [section]",
            "see `gpt2lab config --preset gpt2` for the layout",
        )
    names = {f.name: f for f in dataclasses.fields(cfg)}
    hints = get_type_hints(type(cfg))
    changes: dict[str, Any] = {}
    for key, value in updates.items():
        if key not in names:
            raise ConfigError(
                f"unknown key {key!r} in {source}",
                f"one of {', '.join(names)}",
                _did_you_mean(key, names, prefix=""),
            )
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{key} in {source} must be a table",
                    f"[{key}] with keys",
                    f"write [{key}] followed by key = value lines",
                )
            changes[key] = merge(current, value, source=source, prefix=f"{prefix}{key}.")
        else:
            changes[key] = _coerce(value, hints[key], prefix + key, source)
    return dataclasses.replace(cfg, **changes)


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """Apply `section.key=value` strings (a leading `--` is allowed) to a Config."""
    given: dict[str, str] = {}
    for raw in overrides:
        text = raw[2:] if raw.startswith("--") else raw
        key, sep, value = text.partition("=")
        if not sep:
            raise ConfigError(
                f"override {raw!r} has no value",
                mark_key("section.key", "value"),
                f"write it as {mark_key(key, 'VALUE')}",
            )
        _check_key(cfg, key)
        given[key] = value
    return merge(cfg, unflatten(given), source="the command line") if given else cfg


def _check_key(cfg: Config, key: str) -> None:
    """Fail unless `key` is a dotted leaf key of `cfg`, naming the closest real key."""
    node: Any = cfg
    for part in key.split("."):
        valid = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
        if part not in valid:
            raise ConfigError(
                f"unknown config key {mark_key(key)}",
                f"a key such as {mark_key('train.lr')}",
                _did_you_mean(key, all_keys(cfg)),
            )
        node = getattr(node, part)
    if dataclasses.is_dataclass(node):
        raise ConfigError(
            f"{mark_key(key)} is a section, not a key",
            mark_key("section.key", "value"),
            _did_you_mean(key + ".", all_keys(cfg)),
        )


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys: {"train": {"lr": 1}} -> {"train.lr": 1}."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = v
    return flat


def unflatten(flat: typing.Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys back to nested dicts: {"train.lr": 1} -> {"train": {"lr": 1}}."""
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        *sections, leaf = dotted.split(".")
        node = tree
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def all_keys(cfg: Any) -> list[str]:
    """Every dotted leaf key of a config, e.g. `train.lr`."""
    return list(flatten(to_dict(cfg)))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict (JSON/TOML-ready) of a config."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any], source: str = "saved config") -> Any:
    """Rebuild a config dataclass from `to_dict` output; unknown keys fail."""
    return merge(cls(), data, source=source)


def to_toml(cfg: Any) -> str:
    """Render a config as TOML (None values are left out, so they keep their defaults)."""
    lines: list[str] = []
    flat = [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)]
    leaves = [(k, v) for k, v in flat if not dataclasses.is_dataclass(v)]
    for k, v in leaves:
        if v is not None:
            lines.append(f"{k} = {_toml_value(v)}")
    for k, v in flat:
        if dataclasses.is_dataclass(v):
            lines.append(f"\n[{k}]")
            lines += [ln for ln in to_toml(v).splitlines() if ln]
    return "\n".join(lines).strip() + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    # JSON string escapes (\n, \", \uXXXX) are valid TOML; JSON leaves DEL as is
    return json.dumps(str(v), ensure_ascii=False).replace("\x7f", "\\u007f")


def _did_you_mean(key: str, choices: typing.Iterable[str], prefix: str | None = None) -> str:
    """The closest choice as a hint: a config key (marked, shown as a flag) unless `prefix`."""
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    if close:
        return f"did you mean {mark_key(close[0]) if prefix is None else prefix + close[0]}?"
    return "see `gpt2lab config --list` for every key"


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert `value` (a string from the command line, or a TOML value) to annotation `tp`."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(e)
        if errors:
            raise errors[0] from None  # the first type's error, its keys still marked
        raise ConfigError(f"{key}={value!r} in {source} is invalid")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{key}={value!r} in {source} is not allowed",
                f"one of {', '.join(map(str, allowed))}",
                _did_you_mean(str(value), map(str, allowed), prefix=""),
            )
        return value
    if origin in (tuple, list):
        (inner, *_) = get_args(tp) or (str,)
        if isinstance(value, str):  # "a, b" from the command line
            items = [x.strip() for x in value.split(",") if x.strip()]
        elif isinstance(value, (list, tuple)):  # a TOML array or a typed flag: kept exactly
            items = list(value)
        else:
            raise ConfigError(
                f"{key}={value!r} in {source} is not a list",
                'a list such as ["a", "b"] (or a, b on the command line)',
                f"fix {mark_key(key)}",
            )
        return tuple(_coerce(x, inner, key, source) for x in items)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            if isinstance(value, str) and "e" in value.lower():
                as_float = float(value)
                if not as_float.is_integer():
                    raise ValueError(value)
                number = int(as_float)
            else:
                number = int(value)
            if abs(number) > _INT_MAX:
                raise ValueError(value)
            return number
        if tp is float:
            if isinstance(value, bool) or isinstance(value, (list, dict)):
                raise ValueError(value)
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return number
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError, OverflowError):
        name = getattr(tp, "__name__", str(tp))
        kind = {"int": "an integer of at most 2**62", "float": "a finite number"}.get(
            name, f"a {name}"
        )
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ConfigError(
            f"{key}={shown} in {source} is not a valid {name}",
            kind,
            f"fix the value of {mark_key(key)}",
        ) from None
    return value
