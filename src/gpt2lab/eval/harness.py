"""An lm-evaluation-harness backend: `lm_eval` scores gpt2lab run directories directly.

`lm_eval --model gpt2lab --model_args path=runs/sc --tasks ...` finds it through the entry point
`gpt2lab` of the group `lm_eval.models` (pyproject.toml), which `_gpt2lab_lm_eval_plugins` adds to
lm-eval's registry (lm-eval reads no entry points itself). Importing this module registers the name
as well, so `lm_eval.simple_evaluate(model="gpt2lab", ...)` works either way. Scoring follows
lm-eval's Hugging Face backend: the same context/continuation split (lm-eval's TemplateLM), windows
of at most block_size tokens, rolling windows for perplexity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from gpt2lab.checkpoint.load import load_model
from gpt2lab.device import pick_device
from gpt2lab.errors import CheckpointError
from gpt2lab.generate import complete


@register_model("gpt2lab")
class GPT2LabLM(TemplateLM):
    """A gpt2lab model (run dir, checkpoint, HF dir or cached hub name) as an lm-eval LM."""

    def __init__(
        self,
        path: str,
        batch_size: int | str = 8,
        device: str | None = "auto",
        dtype: str | None = None,
        max_gen_toks: int = 256,
        **_: Any,
    ) -> None:
        super().__init__()
        # lm_eval's command line asks for cuda:0 unless told; like its hf backend, a machine
        # without CUDA then runs on what it has
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "auto"
        self._device = pick_device(str(device))
        self.model, self.tokenizer = load_model(path, device=self._device, dtype=dtype)
        if self.tokenizer is None:
            raise CheckpointError(
                f"{path} has no tokenizer",
                "a model saved with its tokenizer",
                "use a run directory",
            )
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
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
        """Greedy continuations, batch_size prompts at a time (left-padded, one KV cache), each cut
        at <|endoftext|> or before the first of its `until` strings, as lm-eval's hf backend."""
        groups: dict[tuple, list[tuple[int, list[int]]]] = {}
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            until = gen_kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            keep = self.max_length - new  # the context's latest tokens that leave room for `new`
            ids = self.tok_encode(context)[-keep:] if keep > 0 else []
            groups.setdefault((until, new), []).append((i, ids or [self.eot_token_id]))
        out = [""] * len(requests)
        for (until, new), rows in groups.items():
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                done = complete(
                    self.model, self.tokenizer, [ids for _, ids in chunk], new, 0.0, stop=until
                )
                for (i, _), completion in zip(chunk, done):
                    out[i] = completion.text
        return out
