"""An lm-evaluation-harness backend: `lm_eval` scores gpt2lab run directories directly.

Importing this module registers the model name `gpt2lab` with lm-eval (`lm_eval.api.registry`), so
`lm_eval.simple_evaluate(model="gpt2lab", model_args="path=runs/sc", tasks=[...])` works once it is
imported. Scoring follows lm-eval's Hugging Face backend: the same context/continuation split
(lm-eval's TemplateLM), windows of at most block_size tokens, rolling windows for perplexity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from gpt2lab.checkpoint.load import load_model
from gpt2lab.errors import CheckpointError
from gpt2lab.generate import generate


@register_model("gpt2lab")
class GPT2LabLM(TemplateLM):
    """A gpt2lab model (run dir, checkpoint, HF dir or cached hub name) as an lm-eval LM."""

    def __init__(
        self,
        path: str,
        batch_size: int | str = 8,
        device: str = "cpu",
        dtype: str | None = None,
        max_gen_toks: int = 256,
        **_: Any,
    ) -> None:
        super().__init__()
        self.model, self.tokenizer = load_model(path, device=device, dtype=dtype)
        if self.tokenizer is None:
            raise CheckpointError(
                f"{path} has no tokenizer",
                "a model saved with its tokenizer",
                "use a run directory",
            )
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self._device = torch.device(device)
        self.max_length = self.model.config.block_size
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_token

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **_: Any
    ) -> list[int]:
        return self.tokenizer.encode(string, allowed_special="all")

    def tok_decode(self, tokens: list[int], **_: Any) -> str:
        return self.tokenizer.decode(tokens)

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding gives it) per
        (context ids, continuation ids), in batches, each from its last block_size + 1 tokens."""
        results = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = [
                (ctx + cont)[-(self.max_length + 1) :]
                for ctx, cont in pairs[start:][: self.batch_size]
            ]
            inputs = [whole[:-1] for whole in chunk]
            width = max(len(x) for x in inputs)
            # right padding: a causal model's logits before the padding do not see it
            idx = torch.tensor([x + [0] * (width - len(x)) for x in inputs], device=self._device)
            logprobs = F.log_softmax(self.model(idx)[0].float(), dim=-1)
            for row, (whole, (_, cont)) in enumerate(zip(chunk, pairs[start:][: self.batch_size])):
                n, end = len(cont), len(whole) - 1
                target = torch.tensor(whole[-n:], device=self._device)
                lp = logprobs[row, end - n : end]
                total = lp.gather(-1, target[:, None]).sum().item()
                results.append((total, bool((lp.argmax(-1) == target).all())))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_: Any):
        return self.score([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        totals = []
        for (text,) in (req.args for req in requests):
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            totals.append(sum(lp for lp, _ in self.score(windows)))
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in (req.args for req in requests):
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = (
                self.tok_encode(context)[-(self.max_length - new) :]
                if new < self.max_length
                else []
            )
            prompt = torch.tensor([ids or [self.eot_token_id]], device=self._device)
            tokens = generate(self.model, prompt, new, temperature=0.0)[0, prompt.shape[1] :]
            tokens = tokens.tolist()
            if self.eot_token_id in tokens:
                tokens = tokens[: tokens.index(self.eot_token_id)]
            text = self.tok_decode(tokens)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out
