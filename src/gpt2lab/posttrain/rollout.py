"""Rollouts for RL: replies sampled by the KV-cached batched sampler, then scored token by token.

`sample` runs `gpt2lab.generate.iter_tokens` (one left-padded batch) and lays the replies out
right-padded, each up to and including the token that ended it: a stop token (`<|endoftext|>`,
an end-of-turn token), the reply length, or the model's context (a prompt plus reply never
slides past `block_size`, so every token is scored in the context it was sampled in).
`score_tokens` reruns prompt + reply once with gradients as the caller wants, for the
log-probabilities, entropies and value-head outputs of the reply tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gpt2lab.generate import iter_tokens, left_pad
from gpt2lab.model import GPT
from gpt2lab.posttrain.ppo import entropy as entropy_of
from gpt2lab.posttrain.reward import forward_hidden


@dataclass
class Rollouts:
    """B prompts (left-padded) and their replies (right-padded); masks mark real tokens."""

    query: Tensor  # (B, P) prompt ids, left-padded
    query_mask: Tensor  # (B, P) bool
    response: Tensor  # (B, L) reply ids, right-padded
    response_mask: Tensor  # (B, L) bool: real reply tokens, the one that ended it included
    finish: list[str]  # per reply: "stop" (a stop token), "length" or "context"

    def ids(self, row: int) -> tuple[list[int], list[int]]:
        """(prompt ids, reply ids) of one row without padding."""
        q = self.query[row][self.query_mask[row]].tolist()
        return q, self.response[row][self.response_mask[row]].tolist()

    def select(self, rows: Tensor) -> Rollouts:
        return Rollouts(
            self.query[rows],
            self.query_mask[rows],
            self.response[rows],
            self.response_mask[rows],
            [self.finish[i] for i in rows.tolist()],
        )

    @property
    def n_tokens(self) -> int:
        return int(self.response_mask.sum())


def concat(parts: Sequence[Rollouts], pad_id: int) -> Rollouts:
    """The rows of several batches in one: prompts left-padded, replies right-padded to the
    longest."""
    if len(parts) == 1:
        return parts[0]
    P = max(r.query.size(1) for r in parts)
    L = max(r.response.size(1) for r in parts)
    pad = torch.nn.functional.pad
    return Rollouts(
        torch.cat([pad(r.query, (P - r.query.size(1), 0), value=pad_id) for r in parts]),
        torch.cat([pad(r.query_mask, (P - r.query.size(1), 0)) for r in parts]),
        torch.cat([pad(r.response, (0, L - r.response.size(1)), value=pad_id) for r in parts]),
        torch.cat([pad(r.response_mask, (0, L - r.response.size(1))) for r in parts]),
        [f for r in parts for f in r.finish],
    )


def crop_prompt(ids: Sequence[int], block_size: int) -> list[int]:
    """A prompt's last block_size - 1 tokens: room for at least one reply token."""
    return list(ids)[-(block_size - 1) :]


def length_groups(lengths: Sequence[int], spread: int) -> list[list[int]]:
    """Rows grouped by length (shortest first), each group's lengths within `spread` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] - lengths[groups[-1][0]] <= spread:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def sample(
    policy: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    temperature: float = 1.0,
    vocab_size: int | None = None,
    pad_id: int = 0,
    kernels: bool = True,
    generators: Sequence[torch.Generator] | None = None,
) -> Rollouts:
    """Sample one reply per prompt (ids) with the batched sampler; see the module docstring.

    Prompts whose lengths differ by more than an eighth of the context are sampled in separate
    batches (shortest first), so a long prompt does not take a short one's room in the context.
    `generators` (one per prompt) make each reply's draws its own, whatever else is sampled
    beside it; without them the draws come from torch's global generator.
    """
    block = policy.config.block_size
    cropped = [crop_prompt(p, block) for p in prompts]
    rows_of, parts = [], []
    for rows in length_groups([len(p) for p in cropped], block // 8):
        rows_of += rows
        parts.append(
            _sample_batch(
                policy,
                [cropped[i] for i in rows],
                max_new_tokens,
                stop_ids,
                temperature,
                vocab_size,
                pad_id,
                kernels,
                None if generators is None else [generators[i] for i in rows],
            )
        )
    merged = concat(parts, pad_id)
    if rows_of == list(range(len(prompts))):
        return merged
    back = torch.empty(len(rows_of), dtype=torch.long)
    back[torch.tensor(rows_of)] = torch.arange(len(rows_of))
    return merged.select(back)


def _sample_batch(
    policy: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    temperature: float,
    vocab_size: int | None,
    pad_id: int,
    kernels: bool,
    generators: Sequence[torch.Generator] | None,
) -> Rollouts:
    """One left-padded batch through `iter_tokens`; replies laid out right-padded."""
    block = policy.config.block_size
    idx, qmask = left_pad(prompts, pad_id)
    new = min(max_new_tokens, block - idx.size(1))
    steps = iter_tokens(
        policy,
        idx,
        new,
        temperature,
        attention_mask=qmask,
        eos_token_id=list(stop_ids) or None,
        vocab_size=vocab_size,
        kernels=kernels,
        generator=generators,
    )
    tokens = [t.cpu() for t in steps]
    B = idx.size(0)
    response = torch.stack(tokens, dim=1) if tokens else torch.zeros(B, 0, dtype=torch.long)
    stops = torch.tensor(list(stop_ids), dtype=torch.long)
    is_stop = torch.isin(response, stops) if len(stop_ids) else torch.zeros_like(response).bool()
    # real tokens: everything up to and including the first stop token
    before = (is_stop.long().cumsum(1) - is_stop.long()) == 0
    finish = []
    for row in range(B):
        if bool(is_stop[row].any()):
            finish.append("stop")
        else:
            finish.append("context" if new < max_new_tokens else "length")
    response = response.masked_fill(~before, pad_id)
    return Rollouts(idx, qmask, response, before, finish)


class PolicyValue(nn.Module):
    """A policy and its value head (or none) as one module: what DDP wraps in RL training.

    `forward(idx, mask, keep)` -> (logits, values) at the last `keep` positions, the values
    read by the head from the policy's final hidden states (after ln_f)."""

    def __init__(self, policy: GPT, value_head: nn.Module | None = None) -> None:
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, idx: Tensor, mask: Tensor, keep: int) -> tuple[Tensor, Tensor | None]:
        logits, hidden = forward_hidden(self.policy, idx, mask, logits_to_keep=keep)
        if self.value_head is None:
            return logits, None
        return logits, self.value_head(hidden[:, -keep:].float()).squeeze(-1)


def score_tokens(
    model: nn.Module,
    batch: Rollouts,
    value_head: nn.Module | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(log-probabilities, entropies, values) of the reply tokens, each (B, L).

    One forward pass over prompt + reply; the log-probabilities are those of the distribution
    the replies were sampled from (logits / temperature, cut to `vocab_size`). `values[:, t]`
    is the value head at the position that predicts reply token t. `model` is a GPT (with
    `value_head` beside it) or a `PolicyValue` (possibly wrapped by DDP).
    """
    L = batch.response.size(1)
    if isinstance(model, GPT):
        model = PolicyValue(model, value_head)
    device = next(model.parameters()).device
    idx = torch.cat([batch.query, batch.response], dim=1).to(device)
    mask = torch.cat([batch.query_mask, batch.response_mask], dim=1).to(device)
    logits, values = model(idx, mask, L + 1)
    # the positions P-1 .. P+L-2 predict reply tokens 0 .. L-1
    logits = logits[:, :-1]
    if vocab_size is not None and vocab_size < logits.size(-1):
        logits = logits[..., :vocab_size]
    logits = logits.float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, batch.response.to(device)[..., None]).squeeze(-1)
    ent = entropy_of(logits)
    return logp, ent, None if values is None else values[:, :-1]
