"""Evaluation: perplexity on any text, the paper's zero-shot tasks (Table 3) and HellaSwag."""

from gpt2lab.eval.scoring import (
    ContinuationScore,
    LogitsFn,
    TextScore,
    Window,
    as_logits_fn,
    score_continuations,
    score_ids,
    sliding_windows,
)
from gpt2lab.eval.tasks import TASKS, Settings, text_metrics

__all__ = [
    "TASKS",
    "ContinuationScore",
    "LogitsFn",
    "Settings",
    "TextScore",
    "Window",
    "as_logits_fn",
    "score_continuations",
    "score_ids",
    "sliding_windows",
    "text_metrics",
]
