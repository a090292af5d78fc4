"""The RLHF demo, "make the Shakespeare chatbot cheerful": Ziegler et al. (2019)'s sentiment task
on the post-training demo's chat model, with VADER standing in for the human labellers.

1. `label_comparisons`: the SFT model samples two replies to each held-in prompt (a speech of a
   training play); VADER (Hutto & Gilbert 2014, rule-based, no download) prefers the one with
   the higher compound score; ties are skipped until there are `n` comparisons.
2. A reward model learns those comparisons (`gpt2lab reward`); PPO tunes the SFT model against
   it (`gpt2lab rlhf`: the policy never sees VADER); DPO learns the same comparisons.
3. `measure` on held-out prompts (speeches of held-out plays), for each model: the mean VADER
   compound of its samples (the "true" reward), the reward model's score, the KL to the SFT model
   (nats per reply, on the model's own samples), distinct word 1- and 2-grams (collapse shows up
   there first), and how often a reply is closed by the end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpt2lab.config import Config, resolve
from gpt2lab.errors import ConfigError
from gpt2lab.posttrain.reward import RewardModel
from gpt2lab.posttrain.rlhf import stop_ids
from gpt2lab.posttrain.rollout import sample
from gpt2lab.posttrain.shakespeare import Replies, reply_logps
from gpt2lab.tokenizer.chat import ChatTemplate

LABEL_RULE = (
    "of two replies the SFT model samples for a training prompt (both closed by <|end|>), the "
    "one with the higher VADER compound score is chosen; ties are skipped"
)

# time-budgeted recipes, as the post-training demo's: a busy CPU gets fewer steps, not a longer run
REWARD_RECIPE = (
    "train.max_steps=1000000000",
    "train.lr_schedule=wsd",
    "train.micro_batch_size=32",
    "train.lr=3e-4",
    "train.min_lr=3e-5",
    "train.warmup_steps=10",
    "train.eval_interval=50",
    "train.eval_steps=0",
    "train.checkpoint_interval=100",
    "train.keep_last=1",
    "train.log_interval=10",
)
PPO_RECIPE = (
    "train.max_steps=1000000000",
    "train.lr=5e-5",
    "train.min_lr=5e-5",
    "train.checkpoint_interval=20",
    "train.keep_last=0",
    "rl.batch_size=32",
    "rl.minibatch_size=16",
    "rl.epochs=4",
    "rl.max_new_tokens=80",
    "rl.kl_coef=0.1",
    "rl.target_kl=6.0",
    "rl.kl_horizon=200",
    "rl.entropy_coef=0.02",  # keeps the KL near its target (measured: 6.0 nats, not 13)
)


def sentiment() -> Callable[[str], float]:
    """VADER's compound score of a text, in [-1, 1] (needs the vaderSentiment package)."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as e:
        raise ConfigError(
            "the RLHF demo labels comparisons with VADER, which is not installed",
            "the vaderSentiment package",
            "pip install 'gpt2lab[rlhf]' (or pip install vaderSentiment)",
        ) from e
    analyzer = SentimentIntensityAnalyzer()
    return lambda text: float(analyzer.polarity_scores(text)["compound"])


def reply_content(text: str) -> str:
    """A reply without its speaker line (the play prints the speaker's name first)."""
    head, sep, rest = text.partition("\n")
    return rest if sep and head.rstrip().endswith(".") and len(head) < 30 else text


def sample_replies(
    model: nn.Module,
    tokenizer: Any,
    template: ChatTemplate,
    speeches: Sequence[str],
    seed: int,
    max_new_tokens: int = 100,
    batch_size: int = 256,
) -> Replies:
    """One reply per speech (a user turn) from the RL sampler (posttrain.rollout.sample, which
    gives short prompts the room long ones would take), at temperature 1, seeded."""
    stops = stop_ids(tokenizer, template)
    end = tokenizer.special_tokens[template.end_token]
    specials = set(tokenizer.special_tokens.values())
    prompts = [template.encode(tokenizer, [{"role": "user", "content": s}]) for s in speeches]
    out = Replies([], [], [], [])
    model.eval()
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            batch = sample(
                model,
                prompts[i : i + batch_size],
                max_new_tokens,
                stops,
                vocab_size=tokenizer.n_vocab,
                pad_id=stops[0],
            )
            for row in range(batch.query.size(0)):
                prompt, ids = batch.ids(row)
                # closed by the end-of-turn token, with no other control token inside
                ended = batch.finish[row] == "stop" and ids[-1] == end
                ended = ended and not specials.intersection(ids[:-1])
                text = tokenizer.decode(ids[:-1] if batch.finish[row] == "stop" else ids)
                out.prompts.append(prompt)
                out.ids.append(ids)
                out.texts.append(text)
                out.ended.append(ended)
    return out


@dataclass
class Comparisons:
    """Labelled pairs, as preference records, and how they were got."""

    records: list[dict]
    prompts_used: int
    ties: int
    unended: int


def label_comparisons(
    model: nn.Module,
    tokenizer: Any,
    template: ChatTemplate,
    speeches: Sequence[str],
    n: int,
    score: Callable[[str], float],
    seed: int = 0,
    chunk: int = 1024,
    passes: int = 4,
) -> Comparisons:
    """`n` comparisons by LABEL_RULE from two sampled replies per speech, in order; when the
    speeches run out, another pass samples them again (new seeds), up to `passes`."""
    out = Comparisons([], 0, 0, 0)
    for p in range(passes):
        _label_pass(model, tokenizer, template, speeches, n, score, seed + p * 10**6, chunk, out)
        if len(out.records) >= n:
            break
    return out


def _label_pass(
    model: nn.Module,
    tokenizer: Any,
    template: ChatTemplate,
    speeches: Sequence[str],
    n: int,
    score: Callable[[str], float],
    seed: int,
    chunk: int,
    out: Comparisons,
) -> None:
    start = 0
    while start < len(speeches) and len(out.records) < n:
        # sample about twice the comparisons still missing (ties and unfinished replies happen)
        size = max(64, min(chunk, 2 * (n - len(out.records))))
        part = list(speeches[start : start + size])
        a = sample_replies(model, tokenizer, template, part, seed=seed + 2 * start)
        b = sample_replies(model, tokenizer, template, part, seed=seed + 2 * start + 1)
        for i, speech in enumerate(part):
            out.prompts_used += 1
            if not (a.ended[i] and b.ended[i] and a.texts[i].strip() and b.texts[i].strip()):
                out.unended += 1
                continue
            sa, sb = score(reply_content(a.texts[i])), score(reply_content(b.texts[i]))
            if sa == sb or a.texts[i] == b.texts[i]:
                out.ties += 1
                continue
            good, bad = (a.texts[i], b.texts[i]) if sa > sb else (b.texts[i], a.texts[i])
            out.records.append(
                {
                    "prompt": [{"role": "user", "content": speech}],
                    "chosen": [{"role": "assistant", "content": good}],
                    "rejected": [{"role": "assistant", "content": bad}],
                }
            )
            if len(out.records) == n:
                return
        start += size


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all n-grams of the texts (Li et al. 2016): low = repetitive."""
    grams = [tuple(w[i : i + n]) for t in texts for w in [t.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


@dataclass
class Measures:
    """One model's samples on the held-out prompts, measured."""

    vader: float  # mean VADER compound of the replies (the "true" reward)
    rm_score: float  # mean reward-model score
    kl_to_sft: float  # mean log pi(y|x) - log pi_sft(y|x) over its own samples, nats per reply
    distinct_1: float
    distinct_2: float
    ended: float  # share of replies closed by the end-of-turn token
    mean_chars: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def measure(
    model: nn.Module,
    sft: nn.Module,
    rm: RewardModel,
    tokenizer: Any,
    template: ChatTemplate,
    speeches: Sequence[str],
    score: Callable[[str], float],
    seed: int = 1,
) -> tuple[Measures, Replies]:
    """Sample one reply per speech and measure it (see the module docstring)."""
    replies = sample_replies(model, tokenizer, template, speeches, seed=seed)
    texts = replies.texts
    seqs = [p + r for p, r in zip(replies.prompts, replies.ids)]
    with torch.no_grad():
        kl = reply_logps(model, replies.prompts, replies.ids) - reply_logps(
            sft, replies.prompts, replies.ids
        )
    n = max(1, len(texts))
    return (
        Measures(
            vader=sum(score(reply_content(t)) for t in texts) / n,
            rm_score=sum(rm.score_ids(seqs, 64)) / n,
            kl_to_sft=kl.mean().item(),
            distinct_1=distinct_n(texts, 1),
            distinct_2=distinct_n(texts, 2),
            ended=sum(replies.ended) / n,
            mean_chars=sum(len(t) for t in texts) / n,
        ),
        replies,
    )


def reward_config(sft_run: str | Path, minutes: float, overrides: Sequence[str] = ()) -> Config:
    """The demo's reward-model recipe from the SFT run, for `minutes` of training."""
    flags = [f"train.init_from={sft_run}", *REWARD_RECIPE, f"train.max_minutes={minutes}"]
    return resolve("reward", None, [*flags, *overrides])


def ppo_config(
    sft_run: str | Path, rm_dir: str | Path, minutes: float, overrides: Sequence[str] = ()
) -> Config:
    """The demo's PPO recipe: the SFT model against the reward model, for `minutes`."""
    flags = [
        f"train.init_from={sft_run}",
        f"rl.reward_model={rm_dir}",
        *PPO_RECIPE,
        f"train.max_minutes={minutes}",
    ]
    return resolve("ppo", None, [*flags, *overrides])
