"""Direct preference optimisation (Rafailov et al. 2023) on the Trainer, with a cached reference.

For a prompt x with a chosen reply y_w and a rejected one y_l, let
h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)], the log-probabilities
summed over the reply's tokens (its end-of-turn token included). `dpo.loss` picks the loss:

- sigmoid (DPO, eq. 7): -log sigmoid(beta h);
- ipo (Azar et al. 2023, eq. 17, on summed log-probabilities): (h - 1 / (2 beta))^2;
- hinge (SLiC, Zhao et al. 2023): max(0, 1 - beta h).

Implicit rewards are r = beta (log pi - log ref) of each reply; metrics are their means
(`reward_chosen`, `reward_rejected`), `reward_margin` (their difference), `reward_accuracy` (the
share of pairs whose chosen reward is higher) and `kl`, the mean log-ratio log pi - log ref over
the pairs' replies, an estimate of KL(pi || ref) per reply (exact in expectation only for replies
sampled from pi; the demo measures it on samples). Held-out pairs give the same with `val_`.

The reference model is the starting model, frozen. With dpo.cache_reference (the default) its
log-probabilities of every pair are computed once, with the policy's own starting weights before
the first step, and written to RUN_DIR/reference/KEY.safetensors (atomically; KEY hashes the
starting weights, the pairs' token ids and the dtype), so only one model is ever in memory and a
resumed run reads them back. Without the cache a frozen copy of the model scores each batch.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from gpt2lab.config import Config
from gpt2lab.device import autocast, pick_dtype
from gpt2lab.errors import DataError
from gpt2lab.io import atomic_path, atomic_write_json
from gpt2lab.kernels import has_cpu_training_kernels, use_cpu_training_kernels
from gpt2lab.model import GPT
from gpt2lab.posttrain.batching import (
    Example,
    ItemBatches,
    eval_indices,
    pad_batch,
    to_device,
)
from gpt2lab.posttrain.common import (
    data_hash,
    end_id,
    record_inputs,
    resume_tokenizer,
    start_model,
    task_records,
    weights_hash,
)
from gpt2lab.tokenizer.chat import ChatTemplate
from gpt2lab.train.dist import Dist, all_reduce_sum, unwrap
from gpt2lab.train.task import Task, TaskSetup

CACHE_VERSION = 1
STATS = ("reward_accuracy", "reward_chosen", "reward_rejected", "reward_margin", "kl")


@dataclass(frozen=True)
class Pair:
    """A preference pair as two examples that share their prompt tokens."""

    chosen: Example
    rejected: Example


def preference_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    kind: str = "sigmoid",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean loss over pairs of summed reply log-probabilities (B,) each, and the pairs' stats."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif kind == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif kind == "hinge":
        losses = torch.relu(1.0 - beta * h)
    else:
        raise ValueError(f"unknown preference loss {kind!r}")
    rc, rr = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    stats = {
        "reward_accuracy": (rc > rr).float().mean(),
        "reward_chosen": rc.mean(),
        "reward_rejected": rr.mean(),
        "reward_margin": (rc - rr).mean(),
        "kl": ((chosen_ratio + rejected_ratio).detach() / 2).mean(),
    }
    return losses.mean(), stats


def sequence_logps(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Summed log-probability of each row's learned targets (y != -1): (rows,) float."""
    logits, _ = model(batch["x"])
    y = batch["y"]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        y.reshape(-1),
        ignore_index=-1,
        reduction="none",
    )
    return -nll.view(y.shape).sum(-1)


def _as_messages(value: Any, role: str) -> list[dict[str, str]]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def encode_reply(
    prompt: Any, reply: Any, tokenizer: Any, template: ChatTemplate
) -> tuple[list[int], list[bool]]:
    """(ids, learn) of prompt + reply with only the reply's tokens learned."""
    if isinstance(prompt, list) or isinstance(reply, list):
        head = _as_messages(prompt, "user")
        p_ids = template.encode(tokenizer, head, add_generation_prompt=True)
        ids, learn = template.encode_with_mask(
            tokenizer, [*head, *_as_messages(reply, "assistant")]
        )
        if ids[: len(p_ids)] != p_ids:
            raise DataError(
                f"chat template {template.name!r} renders the prompt differently once a reply "
                "follows it",
                "a template whose generation prompt is the start of the reply's turn",
                "use the 'chat' or 'plain' template",
            )
        return ids, [False] * len(p_ids) + list(learn[len(p_ids) :])
    p_ids = tokenizer.encode_ordinary(prompt)
    r_ids = [*tokenizer.encode_ordinary(reply), end_id(tokenizer, template)]
    return p_ids + r_ids, [False] * len(p_ids) + [True] * len(r_ids)


def encode_pair(
    record: dict[str, Any], tokenizer: Any, template: ChatTemplate, max_len: int
) -> Pair | None:
    """A record's pair, its prompt cut from the left (the same for both) to fit `max_len`."""
    prompt = record.get("prompt", "")
    c_ids, c_learn = encode_reply(prompt, record["chosen"], tokenizer, template)
    r_ids, r_learn = encode_reply(prompt, record["rejected"], tokenizer, template)
    n_prompt = next(i for i, f in enumerate(c_learn) if f) if any(c_learn) else len(c_ids)
    over = max(len(c_ids), len(r_ids)) - max_len
    cut = min(max(over, 0), max(0, n_prompt - 1))
    c = Example(tuple(c_ids[cut : cut + max_len]), tuple(c_learn[cut : cut + max_len]))
    r = Example(tuple(r_ids[cut : cut + max_len]), tuple(r_learn[cut : cut + max_len]))
    if c.n_learned == 0 or r.n_learned == 0:
        return None
    return Pair(c, r)


def encode_pairs(
    records: tuple[Sequence[dict], Sequence[dict]],
    tokenizer: Any,
    template: ChatTemplate,
    max_len: int,
    data: str,
    notes: list[str],
) -> tuple[list[Pair], list[Pair]]:
    """The (train, val) records' pairs (`encode_pair`); pairs with no reply token within
    `max_len` are left out and counted in `notes`; no training pair at all is a DataError
    naming `data`."""
    encoded: tuple[list[Pair], list[Pair]] = ([], [])
    dropped = 0
    for part, out in zip(records, encoded):
        for r in part:
            pair = encode_pair(r, tokenizer, template, max_len)
            if pair is None:
                dropped += 1
            else:
                out.append(pair)
    if dropped:
        notes.append(f"{dropped} pairs have no reply token within {max_len} tokens")
    if not encoded[0]:
        raise DataError(
            f"no training pairs in {data or 'the records given'}",
            "records with a prompt, a chosen and a rejected reply",
            "check the file",
        )
    return encoded


def pair_batch(pairs: Sequence[Pair]) -> dict[str, Tensor]:
    """Chosen rows then rejected rows, right-padded together: {"x", "y"} (2B, T)."""
    batch = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs])
    batch["tokens"] = sum(len(p.chosen.ids) + len(p.rejected.ids) - 2 for p in pairs)
    return batch


@torch.no_grad()
def pair_logps(
    model: nn.Module,
    pairs: Sequence[Pair],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """(n, 2) summed reply log-probabilities [chosen, rejected] of `pairs`, in eval mode."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        with autocast(device, dtype):
            lp = sequence_logps(model, to_device(pair_batch(chunk), device)).float()
        out.append(torch.stack([lp[: len(chunk)], lp[len(chunk) :]], dim=1).cpu())
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, 2)


class DPOTask(Task):
    """`gpt2lab dpo`: preference pairs, a frozen reference, the DPO / IPO / hinge loss."""

    name = "dpo"
    rows_per_item = 2
    perplexity = False  # val_loss is a preference loss per pair: its exp means nothing

    inputs = record_inputs

    def __init__(self, records: Sequence[dict] | None = None, val: Sequence[dict] | None = None):
        self.given, self.given_val = records, val
        self.notes: list[str] = []
        self.ref_model: nn.Module | None = None
        self.ref: dict[str, Tensor] = {}

    def setup(self, cfg: Config, ckpt: Path | None, run_dir: Path) -> TaskSetup:
        dc = cfg.dpo
        self.cfg = cfg
        if ckpt is None:
            start = start_model(cfg, dc.template, "dpo")
            cfg, tok, template, weights = start.cfg, start.tokenizer, start.template, start.weights
            self.model_hash = weights_hash(weights)
        else:
            (tok, template), weights = resume_tokenizer(run_dir), None
            self.model_hash = _read_reference_meta(run_dir).get("model_hash")
        self.cfg, self.tokenizer, self.template = cfg, tok, template
        max_len = min(dc.max_length or cfg.model.block_size, cfg.model.block_size)
        self.train, self.val = encode_pairs(
            self.records(cfg), tok, template, max_len, dc.data, self.notes
        )
        return TaskSetup(cfg, tok, weights, {"template": template}, list(self.notes))

    def records(self, cfg: Config) -> tuple[list[dict], list[dict]]:
        return task_records(self, cfg, "pairs")

    def write_run_dir(self, run_dir: Path) -> None:
        self.template.save(run_dir / "tokenizer")

    def cache_key(self, dtype: torch.dtype) -> str:
        ids = [[p.chosen.ids, p.chosen.learn, p.rejected.ids, p.rejected.learn] for p in self.train]
        val = [[p.chosen.ids, p.chosen.learn, p.rejected.ids, p.rejected.learn] for p in self.val]
        return data_hash(CACHE_VERSION, self.model_hash, str(dtype), ids, val)

    def begin(self, model: nn.Module, run_dir: Path, world: Dist, resumed: bool) -> None:
        """Reference log-probabilities: from the cache, else from the starting weights."""
        cfg = self.cfg
        device = next(unwrap(model).parameters()).device
        dtype = pick_dtype(cfg.train.dtype, device)
        self.device, self.dtype = device, dtype
        reference: nn.Module = model
        if resumed or not cfg.dpo.cache_reference:  # the starting weights, loaded again
            if resumed and cfg.dpo.cache_reference and self._load_cache(run_dir, dtype):
                return
            if resumed:
                start = start_model(cfg, cfg.dpo.template, "dpo")
                reference = GPT(cfg.model)
                reference.load_state_dict(start.weights)
                if has_cpu_training_kernels(unwrap(model)):
                    use_cpu_training_kernels(reference)  # the kernels the policy started with
                self.model_hash = self.model_hash or weights_hash(start.weights)
            else:
                reference = copy.deepcopy(unwrap(model))
            reference.to(device).eval().requires_grad_(False)
            if not cfg.dpo.cache_reference:
                self.ref_model = reference
                self.ref["val"] = pair_logps(reference, self.val, self._eval_batch(), device, dtype)
                return
        elif self._load_cache(run_dir, dtype):
            return
        batch = self._eval_batch()
        self.ref = {
            "train": pair_logps(reference, self.train, batch, device, dtype),
            "val": pair_logps(reference, self.val, batch, device, dtype),
        }
        if world.is_main:
            self._write_cache(run_dir, dtype)

    def _eval_batch(self) -> int:
        return max(1, self.cfg.train.micro_batch_size)

    def _cache_path(self, run_dir: Path, dtype: torch.dtype) -> Path:
        return run_dir / "reference" / f"{self.cache_key(dtype)[:24]}.safetensors"

    def _load_cache(self, run_dir: Path, dtype: torch.dtype) -> bool:
        if self.model_hash is None:
            return False
        path = self._cache_path(run_dir, dtype)
        if not path.is_file():
            return False
        tensors = load_file(str(path))
        if tensors["train"].shape != (len(self.train), 2) or tensors["val"].shape != (
            len(self.val),
            2,
        ):
            return False
        self.ref = {"train": tensors["train"], "val": tensors["val"]}
        return True

    def _write_cache(self, run_dir: Path, dtype: torch.dtype) -> None:
        path = self._cache_path(run_dir, dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.ref.items()}, str(tmp))
        meta = {
            "model_hash": self.model_hash,
            "init_from": self.cfg.train.init_from,
            "dtype": str(dtype).replace("torch.", ""),
            "train_pairs": len(self.train),
            "val_pairs": len(self.val),
            "file": path.name,
        }
        atomic_write_json(run_dir / "reference" / "reference.json", meta)

    def epoch_size(self, cfg: Config, world: Dist, device: torch.device) -> int:
        return len(self.train)

    def batches(self, cfg: Config, world: Dist, device: torch.device) -> ItemBatches:
        tc, pairs, ref = cfg.train, self.train, self.ref.get("train")

        def collate(idx: list[int]) -> dict:
            batch = pair_batch([pairs[i] for i in idx])
            if ref is not None:
                batch["ref"] = ref[idx]
            return batch

        return ItemBatches(
            len(pairs),
            collate,
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
    ) -> DPOObjective:
        return DPOObjective(cfg, self.val, self.ref["val"], self.ref_model, world, device, dtype)

    def prompt_ids(self, tokenizer: Any, text: str) -> list[int]:
        return self.template.encode(tokenizer, [{"role": "user", "content": text}])


class DPOObjective:
    """The preference loss of a batch of pairs; evaluation over the held-out pairs."""

    def __init__(
        self,
        cfg: Config,
        val: Sequence[Pair],
        val_ref: Tensor,
        ref_model: nn.Module | None,
        world: Dist,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.beta, self.kind, self.B = cfg.dpo.beta, cfg.dpo.loss, cfg.train.micro_batch_size
        self.val, self.val_ref, self.ref_model = val, val_ref, ref_model
        self.world, self.device, self.dtype = world, device, dtype

    def reference(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, 2) reference log-probabilities: cached, or from the frozen copy."""
        if "ref" in batch:
            return batch["ref"].to(self.device)
        assert self.ref_model is not None
        with torch.no_grad():
            lp = sequence_logps(self.ref_model, batch).float()
        half = lp.numel() // 2
        return torch.stack([lp[:half], lp[half:]], dim=1)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        lp = sequence_logps(model, batch)
        ref = self.reference(batch)
        half = lp.numel() // 2
        return preference_loss(lp[:half], lp[half:], ref[:, 0], ref[:, 1], self.beta, self.kind)

    def count_tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["tokens"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, max_batches: int) -> dict[str, float]:
        """Loss and stats over held-out pairs (all, or max_batches per rank), mean per pair."""
        if not self.val:
            return {"val_loss": float("nan")}
        world = self.world
        items = eval_indices(len(self.val), self.B * world.world_size, max_batches)
        mine, per_rank = items[world.rank :: world.world_size], -(-len(items) // world.world_size)
        total = torch.zeros(1 + len(STATS) + 1, dtype=torch.float64, device=self.device)
        was = model.training
        model.eval()
        for i in range(0, per_rank, self.B):
            chunk = mine[i : i + self.B]
            weight = float(len(chunk))  # every rank runs as many forwards (FSDP)
            chunk = chunk or [items[0]]
            batch = to_device(pair_batch([self.val[j] for j in chunk]), self.device)
            with autocast(self.device, self.dtype):
                lp = sequence_logps(model, batch).float()
            ref = self.val_ref[chunk].to(self.device)
            half = len(chunk)
            loss, stats = preference_loss(
                lp[:half], lp[half:], ref[:, 0], ref[:, 1], self.beta, self.kind
            )
            values = torch.stack([loss, *(stats[k] for k in STATS)]).double()
            total[:-1] += weight * values
            total[-1] += weight
        all_reduce_sum(total, world)
        model.train(was)
        mean = (total[:-1] / total[-1]).tolist()
        return {"val_loss": mean[0], **{f"val_{k}": v for k, v in zip(STATS, mean[1:])}}


def _read_reference_meta(run_dir: Path) -> dict[str, Any]:
    f = run_dir / "reference" / "reference.json"
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
