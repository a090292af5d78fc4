"""`gpt2lab reward`: a reward model trained on preference pairs, on the Trainer's Task seam.

The pairs are read and encoded as DPO reads them (posttrain.dpo.encode_pair: the chat template,
the prompt cut from the left to fit); each text is prompt + reply up to and including the reply's
end-of-turn token, which is exactly what an RL rollout that ended there holds. The model is a
`RewardModel` (posttrain.reward: GPT-2 + a scalar head on the last real token) whose backbone
starts as the given model and whose head starts at N(0, 0.02) from train.seed. The loss is the
Bradley-Terry one; metrics are `accuracy` and `margin` (chosen minus rejected score) on the
training pairs of each step, and `val_loss`, `val_accuracy`, `val_margin` over the held-out pairs
at each evaluation. Checkpoints, exact resume, DDP, metrics.jsonl and events are the Trainer's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gpt2lab.config import Config
from gpt2lab.device import autocast
from gpt2lab.generate import left_pad
from gpt2lab.posttrain.batching import ItemBatches, eval_indices, to_device
from gpt2lab.posttrain.common import (
    record_inputs,
    resume_tokenizer,
    start_model,
    task_records,
)
from gpt2lab.posttrain.dpo import Pair, encode_pairs
from gpt2lab.posttrain.reward import SCORE_KEY, RewardModel, bradley_terry, default_pad
from gpt2lab.train import train
from gpt2lab.train.dist import Dist, all_reduce_sum
from gpt2lab.train.events import TrainSummary
from gpt2lab.train.task import Task, TaskSetup

STATS = ("loss", "accuracy", "margin")
Texts = tuple[list[int], list[int]]  # (chosen ids, rejected ids)


def reply_end(ids: Sequence[int], learn: Sequence[bool]) -> list[int]:
    """The ids through the reply's last learned token (its end of turn), separators dropped."""
    last = max((i for i, f in enumerate(learn) if f), default=len(ids) - 1)
    return list(ids[: last + 1])


def pair_texts(pad_id: int, pairs: Sequence[Texts]) -> dict[str, Any]:
    """Chosen rows then rejected rows, left-padded together: {"ids", "mask", "tokens"}."""
    ids, mask = left_pad([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
    return {"ids": ids, "mask": mask, "tokens": int(mask.sum())}


def _ends(pair: Pair) -> tuple:
    """Each reply of a pair up to its last learned token (where its score is read)."""
    c, r = pair.chosen, pair.rejected
    return reply_end(c.ids, c.learn), reply_end(r.ids, r.learn)


class RewardTask(Task):
    """Preference pairs -> a reward model trained with the Bradley-Terry loss."""

    name = "reward"
    rows_per_item = 2

    inputs = record_inputs

    def __init__(self, records: Sequence[dict] | None = None, val: Sequence[dict] | None = None):
        self.given, self.given_val = records, val
        self.notes: list[str] = []
        self.pad = 0

    def setup(self, cfg: Config, ckpt: Path | None, run_dir: Path) -> TaskSetup:
        rc = cfg.reward
        weights = None
        if ckpt is None:
            start = start_model(cfg, rc.template, "reward")
            cfg, tok, template = start.cfg, start.tokenizer, start.template
            g = torch.Generator().manual_seed(cfg.train.seed)
            head = torch.randn(1, cfg.model.n_embd, generator=g) * 0.02
            weights = {**start.weights, SCORE_KEY: head}
        else:
            tok, template = resume_tokenizer(run_dir)
        self.cfg, self.tokenizer, self.template = cfg, tok, template
        self.pad = default_pad(tok)
        max_len = min(rc.max_length or cfg.model.block_size, cfg.model.block_size)
        pairs = encode_pairs(self.records(cfg), tok, template, max_len, rc.data, self.notes)
        self.train, self.val = ([_ends(p) for p in part] for part in pairs)
        return TaskSetup(cfg, tok, weights, {"template": template}, list(self.notes))

    def records(self, cfg: Config) -> tuple[list[dict], list[dict]]:
        return task_records(self, cfg, "pairs")

    def new_model(self, cfg: Config) -> nn.Module:
        return RewardModel(cfg.model, self.pad)

    def write_run_dir(self, run_dir: Path) -> None:
        self.template.save(run_dir / "tokenizer")

    def epoch_size(self, cfg: Config, world: Dist, device: torch.device) -> int:
        return len(self.train)

    def batches(self, cfg: Config, world: Dist, device: torch.device) -> ItemBatches:
        tc, pairs, pad = cfg.train, self.train, self.pad
        return ItemBatches(
            len(pairs),
            lambda idx: pair_texts(pad, [pairs[i] for i in idx]),
            tc.micro_batch_size,
            tc.grad_accum_steps,
            world.rank,
            world.world_size,
            tc.seed,
            device,
            "pairs",
        )

    def objective(
        self, cfg: Config, world: Dist, device: torch.device, dtype: torch.dtype
    ) -> RewardObjective:
        return RewardObjective(self.val, self.pad, cfg.train.micro_batch_size, world, device, dtype)


class RewardObjective:
    """Bradley-Terry on a batch of pairs; the same over the held-out pairs."""

    def __init__(
        self,
        val: Sequence[Texts],
        pad: int,
        batch_size: int,
        world: Dist,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.val, self.pad, self.B = val, pad, batch_size
        self.world, self.device, self.dtype = world, device, dtype

    def stats(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        scores = model(batch["ids"], batch["mask"])
        half = scores.numel() // 2
        loss, acc = bradley_terry(scores[:half], scores[half:])
        margin = (scores[:half] - scores[half:]).detach().mean()
        return loss, {"accuracy": acc, "margin": margin}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        return self.stats(model, batch)

    def count_tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["tokens"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, max_batches: int) -> dict[str, float]:
        """Loss, accuracy and margin over the held-out pairs (all, or max_batches per rank)."""
        if not self.val:
            return {"val_loss": float("nan")}
        world = self.world
        items = eval_indices(len(self.val), self.B * world.world_size, max_batches)
        mine, per_rank = items[world.rank :: world.world_size], -(-len(items) // world.world_size)
        total = torch.zeros(len(STATS) + 1, dtype=torch.float64, device=self.device)
        was = model.training
        model.eval()
        for i in range(0, per_rank, self.B):
            chunk = mine[i : i + self.B]
            weight = float(len(chunk))  # every rank runs as many forwards (FSDP)
            chunk = chunk or [items[0]]
            batch = to_device(pair_texts(self.pad, [self.val[j] for j in chunk]), self.device)
            with autocast(self.device, self.dtype):
                loss, stats = self.stats(model, batch)
            values = torch.stack([loss.float(), stats["accuracy"], stats["margin"]]).double()
            total[:-1] += weight * values
            total[-1] += weight
        all_reduce_sum(total, world)
        model.train(was)
        mean = (total[:-1] / total[-1]).tolist()
        return {f"val_{k}": v for k, v in zip(STATS, mean)}


def reward_model(
    cfg: Config,
    run_dir: str | Path,
    *,
    records: Sequence[dict] | None = None,
    val: Sequence[dict] | None = None,
    **options: Any,
) -> TrainSummary:
    """Train a reward model from cfg.train.init_from on the pairs of cfg.reward.data (or
    `records`, held out: `val`) into RUN_DIR, as `gpt2lab reward` does; `options` are
    `gpt2lab.train.train`'s (resume, overwrite, on_event, should_stop, progress, ...)."""
    return train(cfg, run_dir, task=RewardTask(records, val), **options)
