"""A reward model: a GPT backbone and a scalar head on the last real token (Ziegler et al. 2019).

It is Hugging Face's `GPT2ForSequenceClassification` with `num_labels=1`: the same parameter
names (`transformer.*`, `score.weight`), and the same token read out: the last one that is not
`pad_token_id`. Trained with the Bradley-Terry loss on preference pairs,
    loss = -log sigmoid(r(chosen) - r(rejected)).

A reward-model directory is a run directory whose checkpoints hold the backbone's weights plus
`score.weight`, and whose state.json has a `reward_model` entry (its `pad_token_id`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from gpt2lab.budget import require_model
from gpt2lab.checkpoint.load import find_checkpoint, native_tokenizer
from gpt2lab.checkpoint.native import load_state
from gpt2lab.checkpoint.weights import assign_state, read_tensors
from gpt2lab.config import GPTConfig, from_dict
from gpt2lab.errors import CheckpointError
from gpt2lab.generate import left_pad
from gpt2lab.model import GPT

SCORE_KEY = "score.weight"


def forward_hidden(
    gpt: GPT, idx: Tensor, attention_mask: Tensor | None = None, logits_to_keep: int | None = None
) -> tuple[Tensor, Tensor]:
    """(logits, final hidden states (B, T, C) after ln_f) of one forward pass of a GPT.

    The hidden states are read at `ln_f`'s output, so heads (a reward's, a value's) sit on the
    very features the language-model head sees. `logits_to_keep` as in `GPT.forward`.
    """
    seen: list[Tensor] = []
    handle = gpt.transformer.ln_f.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        logits, _ = GPT.forward(
            gpt, idx, attention_mask=attention_mask, logits_to_keep=logits_to_keep
        )
    finally:
        handle.remove()
    return logits, seen[0]


def last_real(mask: Tensor) -> Tensor:
    """(B,) index of the rightmost real token of each row of a (B, T) mask."""
    idx = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    return (idx * mask.long()).argmax(dim=1)


class RewardModel(GPT):
    """GPT-2 + a bias-free linear `score` head read at each sequence's last real token.

    Its parameters are GPT's (`transformer.*`, the tied head) and `score.weight`, exactly the
    names of transformers' GPT2ForSequenceClassification; `forward` returns scores, not logits.
    """

    def __init__(self, cfg: GPTConfig, pad_token_id: int) -> None:
        super().__init__(cfg)
        self.score = nn.Linear(cfg.n_embd, 1, bias=False)
        nn.init.normal_(self.score.weight, std=0.02)  # as transformers initialises it
        self.pad_token_id = int(pad_token_id)
        self.tokenizer: Any = None

    def forward(self, idx: Tensor, attention_mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """(B,) scores of (B, T) ids; `attention_mask` marks real tokens (left or right padding).

        The score is read at the rightmost token that is real and not `pad_token_id`, as
        transformers reads it.
        """
        mask = attention_mask
        if mask is not None and bool(mask.all()):
            mask = None
        _, hidden = forward_hidden(self, idx, mask, logits_to_keep=1)
        read = idx != self.pad_token_id
        if mask is not None:
            read &= mask.to(device=idx.device, dtype=torch.bool)
        rows = torch.arange(idx.size(0), device=idx.device)
        return self.score(hidden[rows, last_real(read)]).squeeze(-1).float()

    def trim(self, ids: Sequence[int]) -> list[int]:
        """The ids the score reads: trailing `pad_token_id`s dropped (transformers does the same;
        GPT-2's pad is its <|endoftext|>, so a text ending in it is scored at the token before),
        then the last block_size of them."""
        ids = list(ids)
        while len(ids) > 1 and ids[-1] == self.pad_token_id:
            ids.pop()
        return ids[-self.config.block_size :]

    @torch.no_grad()
    def score_ids(self, seqs: Sequence[Sequence[int]], batch_size: int = 16) -> list[float]:
        """Scores of token sequences, in batches left-padded (positions count real tokens only)."""
        device = next(self.parameters()).device
        out: list[float] = []
        was_training = self.training
        self.eval()
        try:
            for i in range(0, len(seqs), batch_size):
                chunk = [self.trim(s) for s in seqs[i : i + batch_size]]
                idx, mask = left_pad(chunk, self.pad_token_id)
                out += self(idx.to(device), mask.to(device)).tolist()
        finally:
            self.train(was_training)
        return out

    def score_texts(self, texts: Sequence[str], batch_size: int = 16) -> list[float]:
        """Scores of texts (encoded with the model's tokenizer, special-token text allowed)."""
        tok = self.tokenizer
        if tok is None:
            raise CheckpointError(
                "the reward model has no tokenizer", "a tokenizer/ in the reward-model directory"
            )
        seqs = [tok.encode(t, allowed_special="all") or [self.pad_token_id] for t in texts]
        return self.score_ids(seqs, batch_size)

    def weights(self) -> dict[str, Tensor]:
        """Our GPT keys plus `score.weight`: what a reward-model checkpoint holds."""
        return {k: v for k, v in self.state_dict().items() if k != "lm_head.weight"}


def bradley_terry(chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
    """(mean -log sigmoid(r_c - r_r), accuracy = share of pairs with r_c > r_r)."""
    margin = chosen - rejected
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


def reward_from_policy(model: GPT, tokenizer: Any, pad_token_id: int | None = None) -> RewardModel:
    """A reward model whose backbone starts as `model` (a fresh score head)."""
    pad = pad_token_id if pad_token_id is not None else default_pad(tokenizer)
    rm = RewardModel(model.config, pad)
    rm.load_state_dict({**model.state_dict(), SCORE_KEY: rm.score.weight.detach().clone()})
    rm.tokenizer = tokenizer
    return rm


def default_pad(tokenizer: Any) -> int:
    """`<|pad|>` when the tokenizer has it, else its end of text (GPT-2's usual pad)."""
    special = getattr(tokenizer, "special_tokens", {}) or {}
    if "<|pad|>" in special:
        return int(special["<|pad|>"])
    eot = getattr(tokenizer, "eot_token", None)
    return int(eot) if eot is not None else 0


def is_reward_dir(path: str | Path) -> bool:
    """True for a run or checkpoint directory whose weights hold a reward head (`score.weight`)."""
    try:
        ckpt = find_checkpoint(Path(path))
        with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
            return SCORE_KEY in f.keys()
    except Exception:  # noqa: BLE001 - not a model directory, or a corrupt file: not a reward model
        return False


def require_reward_dir(path: str | Path) -> Path:
    """`path` if it holds a reward model (a checkpoint with a score head); else a one-line error."""
    p = Path(path)
    if not is_reward_dir(p):
        raise CheckpointError(
            f"{p} is not a reward-model directory (no checkpoint with a {SCORE_KEY} head)",
            "a directory written by `gpt2lab reward`",
            f"train one with `gpt2lab reward --init-from MODEL --data PAIRS --out {p}`",
        )
    return p


def load_reward_model(path: str | Path, device: Any = None) -> RewardModel:
    """A RewardModel (eval mode, with its tokenizer) from a reward-model run or checkpoint dir.

    Its pad id is state.json's `reward_model.pad_token_id` if given, else its tokenizer's
    (`default_pad`), as `gpt2lab reward` chose it."""
    ckpt = find_checkpoint(require_reward_dir(path))
    state = load_state(ckpt)
    config = state.get("config") if isinstance(state, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(
            f"{ckpt / 'state.json'} holds no model config",
            'a state.json with {"config": {"model": {...}}}',
            "use a checkpoint directory `gpt2lab reward` wrote",
        )
    cfg = from_dict(GPTConfig, config["model"], source=str(ckpt / "state.json"))
    require_model(cfg, device, source=str(ckpt / "state.json"))  # before allocating it
    tok = native_tokenizer(ckpt, state.get("tokenizer", "tokenizer"))
    pad = (state.get("reward_model") or {}).get("pad_token_id")
    rm = RewardModel(cfg, int(pad) if pad is not None else default_pad(tok))
    assign_state(rm, read_tensors(ckpt / "model.safetensors"), str(ckpt / "model.safetensors"))
    rm.tokenizer = tok
    return rm.to(device).eval()
