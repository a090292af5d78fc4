"""Supervised fine-tuning: the loss counts completion / assistant tokens only.

A record becomes an `Example` (posttrain.batching):

- `{"messages": [...]}`: the chat template renders the conversation; the tokens the model is
  trained to write are each assistant message's content and its end-of-turn token (the
  template's `encode_with_mask`). System and user messages and the role markers are masked.
- `{"prompt": str, "completion": str}`: prompt + completion + the template's end-of-turn token
  (as TRL does for plain prompt-completion data); the completion and the end token are learned.
  A prompt / completion given as message lists is a conversation (prompt + completion).

The loss is the mean cross-entropy over the learned target tokens of a micro-batch (the model's
own loss with ignore index -1, the same number as `transformers`' GPT-2 with labels -100:
tested); `val_loss` is the same over every held-out example, weighted by tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gpt2lab.config import Config
from gpt2lab.device import autocast
from gpt2lab.errors import DataError
from gpt2lab.posttrain.batching import (
    Example,
    ItemBatches,
    eval_indices,
    pack,
    packed_batch,
    pad_batch,
    to_device,
    truncate,
)
from gpt2lab.posttrain.common import (
    end_id,
    record_inputs,
    resume_tokenizer,
    start_model,
    task_records,
)
from gpt2lab.tokenizer.chat import ChatTemplate
from gpt2lab.train.dist import Dist, all_reduce_sum
from gpt2lab.train.task import Task, TaskSetup


def encode_example(
    record: dict[str, Any], tokenizer: Any, template: ChatTemplate
) -> tuple[list[int], list[bool]]:
    """(ids, learn) of one SFT record (see the module docstring)."""
    if "messages" in record:
        return template.encode_with_mask(tokenizer, record["messages"])
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) or isinstance(completion, list):
        p = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        c = (
            completion
            if isinstance(completion, list)
            else [{"role": "assistant", "content": completion}]
        )
        return template.encode_with_mask(tokenizer, [*p, *c])
    p_ids = tokenizer.encode_ordinary(prompt)
    c_ids = [*tokenizer.encode_ordinary(completion), end_id(tokenizer, template)]
    return p_ids + c_ids, [False] * len(p_ids) + [True] * len(c_ids)


def encode_examples(
    records: Sequence[dict[str, Any]], tokenizer: Any, template: ChatTemplate, max_len: int
) -> tuple[list[Example], int]:
    """Examples of `records` cut to `max_len` tokens; and how many had nothing left to learn."""
    out, dropped = [], 0
    for record in records:
        ids, learn = encode_example(record, tokenizer, template)
        example = truncate(ids, learn, max_len)
        if example is None:
            dropped += 1
        else:
            out.append(example)
    return out, dropped


class SFTTask(Task):
    """`gpt2lab sft`: masked next-token loss on prompt/completion or chat records."""

    name = "sft"

    inputs = record_inputs

    def __init__(self, records: Sequence[dict] | None = None, val: Sequence[dict] | None = None):
        """Records may be given directly (then sft.data is not read); `val` likewise."""
        self.given, self.given_val = records, val
        self.notes: list[str] = []

    def setup(self, cfg: Config, ckpt: Path | None, run_dir: Path) -> TaskSetup:
        sc = cfg.sft
        if ckpt is None:
            start = start_model(cfg, sc.template, "sft")
            cfg, tok, template, weights = start.cfg, start.tokenizer, start.template, start.weights
        else:
            (tok, template), weights = resume_tokenizer(run_dir), None
        self.tokenizer, self.template = tok, template
        train, val = self.records(cfg)
        max_len = min(sc.max_length or cfg.model.block_size, cfg.model.block_size)
        self.train, dropped = encode_examples(train, tok, template, max_len)
        self.val, dropped_val = encode_examples(val, tok, template, max_len)
        if dropped or dropped_val:
            self.notes.append(
                f"{dropped + dropped_val} examples have no completion token within "
                f"{max_len} tokens and are left out"
            )
        if not self.train:
            raise DataError(
                f"no training examples in {sc.data or 'the records given'}",
                "records with a completion",
                "check the file",
            )
        return TaskSetup(cfg, tok, weights, {"template": template}, list(self.notes))

    def records(self, cfg: Config) -> tuple[list[dict], list[dict]]:
        return task_records(self, cfg, "sft")

    def write_run_dir(self, run_dir: Path) -> None:
        self.template.save(run_dir / "tokenizer")

    def _rows(self, cfg: Config) -> list[list[int]]:
        order = np.random.Generator(np.random.PCG64([cfg.train.seed, 11])).permutation(
            len(self.train)
        )
        return pack(self.train, cfg.model.block_size, order)

    def epoch_size(self, cfg: Config, world: Dist, device: torch.device) -> int:
        return len(self._rows(cfg)) if cfg.sft.packing else len(self.train)

    def batches(self, cfg: Config, world: Dist, device: torch.device) -> ItemBatches:
        tc, examples = cfg.train, self.train
        if cfg.sft.packing:
            rows = self._rows(cfg)

            def collate(idx: list[int]) -> dict:
                batch = packed_batch(
                    [[examples[i] for i in rows[j]] for j in idx], cfg.model.block_size
                )
                batch["tokens"] = sum(len(examples[i].ids) - 1 for j in idx for i in rows[j])
                return batch

            n, what = len(rows), "packed rows"
        else:

            def collate(idx: list[int]) -> dict:
                batch = pad_batch([examples[i] for i in idx])
                batch["tokens"] = sum(len(examples[i].ids) - 1 for i in idx)
                return batch

            n, what = len(examples), "examples"
        return ItemBatches(
            n,
            collate,
            tc.micro_batch_size,
            tc.grad_accum_steps,
            world.rank,
            world.world_size,
            tc.seed,
            device,
            what,
        )

    def objective(
        self, cfg: Config, world: Dist, device: torch.device, dtype: torch.dtype
    ) -> SFTObjective:
        return SFTObjective(self.val, cfg.train.micro_batch_size, world, device, dtype)

    def prompt_ids(self, tokenizer: Any, text: str) -> list[int]:
        return self.template.encode(tokenizer, [{"role": "user", "content": text}])


def masked_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy over the learned targets of a batch (its rows padded or packed)."""
    _, loss = model(
        batch["x"],
        batch["y"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
    )
    return loss


class SFTObjective:
    """The masked loss; evaluation over the held-out examples, weighted by learned tokens."""

    def __init__(
        self,
        val: Sequence[Example],
        batch_size: int,
        world: Dist,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.val, self.B, self.world, self.device, self.dtype = (
            val,
            batch_size,
            world,
            device,
            dtype,
        )

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        return masked_loss(model, batch), {}

    def count_tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["tokens"])

    def weight(self, batch: dict[str, Any]) -> Tensor:
        """The learned targets the batch's loss is a mean over (the Trainer weighs by them)."""
        return (batch["y"] != -1).sum()

    def evaluate(self, model: nn.Module, max_batches: int) -> dict[str, float]:
        val = completion_loss(
            model, self.val, self.B, max_batches, self.world, self.device, self.dtype
        )
        return {"val_loss": val}


@torch.no_grad()
def completion_loss(
    model: nn.Module,
    examples: Sequence[Example],
    batch_size: int,
    max_batches: int = 0,
    world: Dist | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> float:
    """Mean loss per learned token over `examples` (all, or max_batches per rank spread evenly)."""
    world = world or Dist()
    device = torch.device(device)
    if not examples:
        return float("nan")
    items = eval_indices(len(examples), batch_size * world.world_size, max_batches)
    mine, per_rank = items[world.rank :: world.world_size], -(-len(items) // world.world_size)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    was = model.training
    model.eval()
    for i in range(0, per_rank, batch_size):
        chunk = mine[i : i + batch_size]
        weight = 1.0 if chunk else 0.0  # every rank runs as many forwards (FSDP)
        batch = to_device(pad_batch([examples[j] for j in (chunk or [0])]), device)
        n = (batch["y"] != -1).sum()
        with autocast(device, dtype):
            loss = masked_loss(model, batch)
        total[0] += weight * loss.double() * n
        total[1] += weight * n
    all_reduce_sum(total, world)
    model.train(was)
    return (total[0] / total[1]).item()
