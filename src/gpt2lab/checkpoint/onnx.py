"""ONNX files for onnxruntime, exported with torch.onnx's dynamo exporter from the model itself.

Two graphs: logits for a whole sequence (`input_ids` -> `logits`), and one for incremental decoding
that also takes and returns every layer's keys and values (`past_keys`, `past_values` ->
`present_keys`, `present_values`, each (n_layer, batch, n_head, tokens, head_size)). Batch,
sequence and past lengths are dynamic; past + new tokens must stay within block_size.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import Tensor, nn

from gpt2lab.checkpoint.weights import require_float_weights
from gpt2lab.errors import CheckpointError
from gpt2lab.io import atomic_path

ONNX_LIMIT = 2**31  # bytes: one protobuf file (larger graphs need external data files)


class _PastCache:
    """KVCache's interface over given past keys and values plus room for `new` tokens, so the
    model's own cached forward writes the new keys after the past ones (the present)."""

    def __init__(self, past_keys: Tensor, past_values: Tensor, new: int) -> None:
        n_layer, batch, n_head, past, head_size = past_keys.shape
        room = past_keys.new_zeros(n_layer, batch, n_head, new, head_size)
        self.k, self.v = torch.cat([past_keys, room], 3), torch.cat([past_values, room], 3)
        self.pos, self.batch_size, self.max_len = past, batch, past + new


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        # An all-ones attention mask computes the plain causal forward with an explicit mask:
        # SDPA's is_causal flag would depend on the sequence length, which the exporter keeps
        # symbolic, and a flag must be a plain bool.
        return self.model(input_ids, attention_mask=torch.ones_like(input_ids))[0]


class _LogitsWithPast(_Logits):
    def forward(  # type: ignore[override]
        self, input_ids: Tensor, past_keys: Tensor, past_values: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        cache = _PastCache(past_keys, past_values, input_ids.shape[1])
        logits, _ = self.model(input_ids, cache=cache)
        return logits, cache.k, cache.v


def save_onnx(model: nn.Module, path: str | os.PathLike, past: bool = False) -> None:
    """Write `model` (float32, CPU) as an ONNX graph, atomically; `past=True` adds the key/value
    inputs and outputs for incremental decoding (start with past length 0)."""
    require_float_weights(model, "ONNX export")
    size = model.num_params() * 4
    if size >= ONNX_LIMIT:
        raise CheckpointError(
            f"this model's float32 weights take {size / 2**30:.1f} GiB",
            "under 2 GiB, the most one ONNX file holds",
            "convert to .gguf (llama.cpp) or a Hugging Face directory instead",
        )
    model = copy.deepcopy(model).float().cpu().eval()
    cfg = model.config
    batch, seq = 2, min(5, cfg.block_size)
    example: tuple[Tensor, ...] = (torch.zeros(batch, seq, dtype=torch.long),)
    dynamic = torch.export.Dim.DYNAMIC
    # traced with 2+ tokens, where the causal mask has a query per row; 1 token gives the same
    sequence = torch.export.Dim("sequence", min=2, max=max(cfg.block_size, 2))
    shapes: dict[str, dict[int, object]] = {"input_ids": {0: dynamic, 1: sequence}}
    inputs, outputs = ["input_ids"], ["logits"]
    module: nn.Module = _Logits(model)
    if past:
        if cfg.block_size < seq + 2:
            raise CheckpointError(
                f"block_size={cfg.block_size} is too short to export with past keys and values",
                f"block_size >= {seq + 2}",
                "export without past (drop --past)",
            )
        kv = (cfg.n_layer, batch, cfg.n_head, 2, cfg.head_size)
        example += (torch.zeros(kv), torch.zeros(kv))  # two tensors: the exporter merges one
        shapes = {"input_ids": {0: dynamic, 1: dynamic}}
        shapes |= {name: {1: dynamic, 3: dynamic} for name in ("past_keys", "past_values")}
        inputs += ["past_keys", "past_values"]
        outputs += ["present_keys", "present_values"]
        module = _LogitsWithPast(model)
    with atomic_path(path) as tmp, torch.no_grad():
        try:
            torch.onnx.export(
                module,
                example,
                str(tmp),
                dynamo=True,
                external_data=False,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=shapes,
                verbose=False,
            )
        except ImportError as e:  # the dynamo exporter needs onnx and onnxscript
            raise CheckpointError(
                f"torch.onnx cannot export: {e}",
                "the packages onnx and onnxscript",
                "pip install onnx onnxscript",
            ) from e
