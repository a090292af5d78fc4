"""Before the first step: the config of a resumed run, the data, the model and its checks.

Everything here only reads; nothing in RUN_DIR changes until every check has passed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from gpt2lab.budget import require
from gpt2lab.checkpoint import native
from gpt2lab.checkpoint.load import load_model
from gpt2lab.checkpoint.vocab import grow_vocab, tokenizer_extends
from gpt2lab.checkpoint.weights import load_model_safetensors
from gpt2lab.config import (
    Config,
    GPTConfig,
    TrainConfig,
    apply_overrides,
    flatten,
    from_dict,
    to_dict,
    to_toml,
)
from gpt2lab.data import load_data_tokenizer, load_meta, prepare
from gpt2lab.data.loader import BatchLoader
from gpt2lab.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    GPT2LabError,
    TokenizerError,
    TrainingError,
    mark_key,
)
from gpt2lab.io import atomic_write_text
from gpt2lab.kernels import use_cpu_training_kernels
from gpt2lab.model import GPT
from gpt2lab.outdir import INFRA, OutputDir, claim_output_dir
from gpt2lab.train.dist import (
    Dist,
    all_reduce_sum,
    launched_world_size,
    load_optimizer_state,
    wrap,
)
from gpt2lab.train.memory import estimate_memory
from gpt2lab.train.recipe import apply_freeze, configure_optimizer
from gpt2lab.train.state import TrainState

# Keys a resumed run may not change: they decide the weights' shapes, the optimizer's groups or
# which data each step reads, so the continuation would not be the same run. (data.dir may move:
# the loader checks the token count.)
FIXED_ON_RESUME = (
    "model.",
    "data.sampling",
    "train.micro_batch_size",
    "train.grad_accum_steps",
    "train.seed",
    "train.init_from",
    "train.freeze",
    "train.strategy",
    "train.optimizer",
)


def resume_config(run_dir: Path, overrides: list[str]) -> tuple[Config, Path]:
    """The latest checkpoint's saved config with `overrides` on top; refuses incompatible ones."""
    ckpt = native.require_latest(run_dir)
    saved = from_dict(Config, native.load_state(ckpt)["config"], source=str(ckpt))
    cfg = apply_overrides(saved, overrides)
    before, after = flatten(to_dict(saved)), flatten(to_dict(cfg))
    for key in before:
        if before[key] != after[key] and key.startswith(FIXED_ON_RESUME):
            raise ConfigError(
                f"{mark_key(key, repr(after[key]))} differs from the run being resumed "
                f"({before[key]!r})",
                "overrides that leave the model, data and batch layout alone (e.g. "
                f"{mark_key('train.max_steps')})",
                f"drop {mark_key(key)}, or start a new run with another {mark_key('out')}",
            )
    return cfg, ckpt


def check_data(data_dir: str) -> tuple[dict[str, Any], Any]:
    """meta.json and the tokenizer of a prepared data directory with train and val shards."""
    if not data_dir:
        raise ConfigError(
            "no training data given",
            f"{mark_key('data.dir')} (a directory written by `gpt2lab prepare`) or a text file",
            f"set {mark_key('data.dir')}",
        )
    meta = load_meta(data_dir)
    for split in ("train", "val"):
        if not meta.get("shards", {}).get(split):
            raise DataError(
                f"data directory {data_dir} has no {split} shards",
                f"{split}_000000.bin ... written by `gpt2lab prepare`",
                "prepare the data again with --val-tail 0.1 (a tenth held out)"
                if split == "val"
                else "prepare the data again from more text, or with a smaller --val-tail",
            )
    return meta, load_data_tokenizer(data_dir)


def tokenizers_match(a: Any, b: Any) -> bool:
    """Same vocabulary size, special tokens and ids for a probe text (specs may differ in form)."""
    return a.n_vocab == b.n_vocab and tokenizer_extends(a, b)


def check_resumed_vocab(cfg: Config, meta: dict[str, Any], run_dir: Path) -> None:
    """A resumed run's data may not hold token ids beyond the vocabulary it was trained with."""
    if meta["vocab_size"] > cfg.model.vocab_size:
        raise TrainingError(
            f"the data in {cfg.data.dir} has {meta['vocab_size']} token ids but the run "
            f"in {run_dir} was trained with {cfg.model.vocab_size}",
            "the data the run was started on",
            f"resume with the original {mark_key('data.dir')}",
        )


def pretrained(cfg: Config, data_tok: Any, meta: dict[str, Any]) -> tuple[Config, dict]:
    """Weights and model config of `train.init_from`; the data's tokenizer must be the model's,
    or the model's plus special tokens (then the model grows: `checkpoint.vocab.grow_vocab`)."""
    src = cfg.train.init_from
    model, tok = load_model(src, device="cpu", dtype=torch.float32)
    if tok is not None and data_tok.n_vocab > tok.n_vocab and tokenizer_extends(tok, data_tok):
        # the data's tokenizer adds special tokens: their rows start at the mean of the others
        grow_vocab(model, data_tok.n_vocab, tok.n_vocab)
        tok = data_tok
    mcfg = model.config
    if tok is not None and not tokenizers_match(tok, data_tok):
        raise TokenizerError(
            f"the data in {cfg.data.dir} was tokenized with {data_tok.spec().get('kind')} "
            f"({data_tok.n_vocab} tokens) but {src} uses {tok.spec().get('kind')} "
            f"({tok.n_vocab} tokens)",
            "data prepared with the model's own tokenizer",
            f"prepare the text again with {mark_key('tokenizer', src)}",
        )
    if meta["vocab_size"] > mcfg.vocab_size:
        raise TokenizerError(
            f"the data in {cfg.data.dir} has {meta['vocab_size']} token ids but {src} knows only "
            f"{mcfg.vocab_size}",
            "data prepared with the model's own tokenizer",
            f"prepare the text again with {mark_key('tokenizer', src)}",
        )
    # the architecture comes from the weights; dropout is a training choice of this run
    mcfg = dataclasses.replace(mcfg, dropout=cfg.model.dropout)
    state = {k: v for k, v in model.state_dict().items()}
    return dataclasses.replace(cfg, model=mcfg), state


def check_memory(
    model_cfg: GPTConfig,
    tcfg: TrainConfig,
    dtype: torch.dtype,
    device: torch.device,
    world: int,
) -> str:
    """Estimate one step's memory from the config alone; refuse before allocating if too large."""
    est = estimate_memory(
        model_cfg, tcfg.micro_batch_size, model_cfg.block_size, dtype, optimizer=tcfg.optimizer
    )
    need = est.total
    if tcfg.strategy == "fsdp" and world > 1:  # weights, grads and optimizer state are sharded
        need = (est.params + est.grads + est.optimizer) // world + est.activations
    require(
        need,
        device,
        f"one training step ({est})",
        f"lower {mark_key('train.micro_batch_size')} (now {tcfg.micro_batch_size}) and raise "
        f"{mark_key('train.grad_accum_steps')} to keep the batch, or lower "
        f"{mark_key('model.block_size')}, or use {mark_key('train.dtype', 'bfloat16')} or "
        f"{mark_key('train.strategy', 'fsdp')} on several GPUs",
        error=TrainingError,
    )
    return str(est)


# what `gpt2lab train` writes in a run directory (the marker lists those it wrote)
RUN_ENTRIES = ("config.toml", "tokenizer", "metrics.jsonl", "ckpt", "latest", "best")
RUN_EXTRAS = ("tb", "curves.png", "data", "samples.txt", "demo.json")
RUN_COMMANDS = ("train", "demo")  # commands whose run directories `train --resume` continues


def claim_run_dir(
    run_dir: str | Path,
    inputs: list[Any] = (),
    command: str = "train",  # type: ignore[assignment]
) -> OutputDir:
    """Take RUN_DIR for this process (lock, marker) or refuse: see gpt2lab.outdir."""
    return claim_output_dir(
        run_dir, command, inputs=inputs, adopt=adopt_legacy_run, compatible=RUN_COMMANDS
    )


def claim_for_ranks(
    run_dir: Path,
    inputs: list[Any],
    world: Dist,
    device: torch.device,
    command: str = "train",
) -> OutputDir | None:
    """Rank 0 takes RUN_DIR (lock, marker); every rank learns if it could, so none waits alone.

    Returns the claim on rank 0, None on the others; raises on every rank if rank 0 failed."""
    claim, error = None, None
    if world.is_main:
        try:
            claim = claim_run_dir(run_dir, inputs, command=command)
        except GPT2LabError as e:
            error = e
    if world.enabled:
        flag = torch.tensor([0.0 if error is None else 1.0], device=device)
        failed = all_reduce_sum(flag, world).item() > 0
        if failed and error is None:
            if claim is not None:
                claim.release()
            raise TrainingError(
                f"rank 0 could not take the run directory {run_dir}",
                None,
                "see rank 0's error above",
            )
    if error is not None:
        raise error
    return claim


def write_run_dir(claim: OutputDir, cfg: Config, tokenizer: Any, clear: bool) -> None:
    """Rank 0, once every check passed: claim the run's entries (refused where one exists that
    gpt2lab did not write), write config.toml and the tokenizer (clear: an earlier run first)."""
    run_dir = claim.path
    if clear:
        clear_run_dir(claim)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in RUN_ENTRIES:
        claim.claim_file(name)
    if cfg.train.tensorboard:
        claim.claim_file("tb")
    atomic_write_text(run_dir / "config.toml", to_toml(cfg))
    if tokenizer is not None and not (run_dir / "tokenizer").is_dir():
        tokenizer.save(str(run_dir / "tokenizer"))


def adopt_legacy_run(run_dir: Path) -> list[str] | None:
    """A run directory an older gpt2lab (before markers) wrote: a `latest` pointer or complete
    checkpoints whose state.json holds a config. Its usual entries are adopted; nothing else."""
    found = native.list_checkpoints(run_dir)
    if not found:
        return None
    try:
        state = native.load_state(found[-1])
    except CheckpointError:
        return None
    if not isinstance(state.get("config"), dict):
        return None
    names = [n for n in (*RUN_ENTRIES, *RUN_EXTRAS) if (run_dir / n).exists()]
    return names + [p.name for p in run_dir.glob("*.png") if p.name not in names]


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to reuse a run directory silently: it needs resume or overwrite."""
    # a lone data/ is what `--data FILE` prepared a moment ago for this very run
    used = run_dir.is_dir() and any(p.name not in ("data", *INFRA) for p in run_dir.iterdir())
    if used and not (resume or overwrite):
        raise ConfigError(
            f"run directory {run_dir} already exists and is not empty",
            f"a new {mark_key('out')}, or an explicit choice",
            f"add {mark_key('resume')} to continue it, or {mark_key('overwrite')} to start it "
            "again",
        )
    if run_dir.exists() and not run_dir.is_dir():
        out = mark_key("out")
        raise ConfigError(
            f"{mark_key('out', run_dir)} is a file", "a directory", f"choose another {out}"
        )


def clear_run_dir(claim: OutputDir) -> None:
    """overwrite: remove what an earlier run wrote there (what the marker lists) but the data
    `--data FILE` prepared a moment ago for this run."""
    claim.remove_ours(keep=("data",))


def prepare_text(
    src: Path, run_dir: Path, init_from: str | None, tokenizer: str | None, overwrite: bool
) -> Path:
    """One text file given as --data: tokenize it into RUN_DIR/data (last 10% held out)."""
    if launched_world_size() > 1:
        raise ConfigError(
            f"{mark_key('data', src)} is a text file, which torchrun's ranks would all prepare "
            "at once",
            "a prepared data directory under torchrun",
            f"run `gpt2lab prepare {src} --out DIR` first and pass {mark_key('data', 'DIR')}",
        )
    prepare_run_dir(run_dir, resume=False, overwrite=overwrite)
    claim = claim_run_dir(run_dir, [src])
    tok: Any = tokenizer or "gpt2"
    if init_from:
        if tokenizer:
            raise ConfigError(
                f"{mark_key('tokenizer')} with {mark_key('init_from')}",
                "the pretrained model's own tokenizer",
                f"drop {mark_key('tokenizer')}",
            )
        _, tok = load_model(init_from, device="cpu")
        if tok is None:
            raise TokenizerError(
                f"{init_from} carries no tokenizer to prepare {src} with",
                "a model directory with its tokenizer files",
                f"prepare {src} yourself with `gpt2lab prepare` and pass {mark_key('data', 'DIR')}",
            )
    out = run_dir / "data"
    try:
        claim.record("data")
        prepare(str(src), out, tok, val_tail=0.1, force=True)
    finally:
        claim.release()
    return out


def train_loader(cfg: Config, rank: int, world_size: int, device: torch.device) -> BatchLoader:
    """This rank's BatchLoader over the training split, as the config lays out the batches."""
    tc = cfg.train
    return BatchLoader(
        cfg.data.dir,
        "train",
        block_size=cfg.model.block_size,
        batch_size=tc.micro_batch_size,
        grad_accum_steps=tc.grad_accum_steps,
        rank=rank,
        world_size=world_size,
        seed=tc.seed,
        sampling=cfg.data.sampling,
        device=device,
        vocab_size=cfg.model.vocab_size,
    )


def restore_loader_and_rng(loader: BatchLoader, state: TrainState, world: Dist) -> str | None:
    """Put the loader and the RNGs where a checkpoint left them (its own rank's, when it can).

    Returns a note when the RNGs cannot be restored (saved on another number of ranks).
    """
    data = state.data_per_rank
    loader.load_state_dict(data[world.rank] if len(data) == world.world_size else data[0])
    return restore_rng_per_rank(state.rng_per_rank, world)


def restore_rng_per_rank(rng_per_rank: list[dict[str, Any]], world: Dist) -> str | None:
    """This rank's saved RNGs; a note instead when they were saved on another number of ranks."""
    if len(rng_per_rank) == world.world_size:
        native.restore_rng(rng_per_rank[world.rank])
        return None
    return (
        f"note: resuming on {world.world_size} ranks, saved on {len(rng_per_rank)}: "
        "random draws will differ from an uninterrupted run"
    )


class RunParts(NamedTuple):
    """The trainable pieces of a run."""

    raw: nn.Module  # the plain GPT
    model: nn.Module  # what steps call: DDP/FSDP and torch.compile wrappers around `raw`
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled for float16 only
    frozen: list[str]  # names of the parameters kept fixed


def model_and_optimizer(
    cfg: Config,
    init_weights: dict[str, torch.Tensor] | None,
    ckpt: Path | None,
    state: TrainState,
    world: Dist,
    device: torch.device,
    dtype: torch.dtype,
    new_model: Callable[[Config], nn.Module] | None = None,
) -> RunParts:
    """The GPT (fresh, pretrained or from `ckpt`), wrapped for torchrun, with its optimizer.

    `new_model(cfg)` builds another GPT-shaped module (a task's, e.g. a reward model's)."""
    tc = cfg.train
    raw = new_model(cfg) if new_model is not None else GPT(cfg.model)
    if init_weights is not None:
        raw.load_state_dict(init_weights)  # same config but dropout: every key fits
    if ckpt is not None:
        load_model_safetensors(raw, ckpt / "model.safetensors")
    frozen = apply_freeze(raw, tc.freeze)
    raw.to(device)
    if device.type == "cpu" and not tc.compile:  # (torch.compile fuses these itself)
        use_cpu_training_kernels(raw)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = wrap(raw, tc.strategy, world, device)
    opt = configure_optimizer(model, tc, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if ckpt is not None:
        load_optimizer_state(model, opt, native.load_optimizer_state(ckpt), tc.strategy, world)
        for group in opt.param_groups:  # the saved groups came back: re-apply Muon's overrides
            if group.get("muon"):
                group.update(lr_scale=tc.muon_lr / tc.lr, momentum=tc.muon_momentum)
        if state.scaler:
            scaler.load_state_dict(state.scaler)
    if tc.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return RunParts(raw, model, opt, scaler, frozen)
