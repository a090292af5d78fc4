"""GGUF files for llama.cpp (and Ollama, LM Studio): its `gpt2` architecture, written with `gguf`.

The tensors are what llama.cpp's own convert_hf_to_gguf.py makes of our Hugging Face export: HF's
Conv1D weights transposed back to (out, in), the head written out although it is tied, vectors
and the position table kept in float32. The tokenizer travels as GPT-2 BPE tokens and merges.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2lab.checkpoint.hf import CONV1D, to_hf_state
from gpt2lab.checkpoint.weights import require_float_weights
from gpt2lab.config import GPTConfig
from gpt2lab.errors import CheckpointError
from gpt2lab.io import atomic_path
from gpt2lab.tokenizer import EOT, GPT2_PATTERN
from gpt2lab.tokenizer.pretokenize import token_to_str

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# HF GPT-2 key (after `transformer.h.N.`) -> llama.cpp's tensor name (after `blk.N.`)
_BLOCK_NAMES = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
_TOP_NAMES = {
    "transformer.wte": "token_embd",
    "transformer.wpe": "position_embd",
    "transformer.ln_f": "output_norm",
}
# llama.cpp's token types (gguf.TokenType): a vocabulary entry, a special token, a padding slot
_NORMAL, _CONTROL, _UNUSED = 1, 3, 5


def gguf_name(hf_key: str) -> str:
    """llama.cpp's name of a HF GPT-2 tensor:
    `transformer.h.3.mlp.c_fc.weight` -> `blk.3.ffn_up.weight`."""
    stem, kind = hf_key.rsplit(".", 1)
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    _, _, layer, inner = stem.split(".", 3)  # transformer.h.N.<inner>
    return f"blk.{layer}.{_BLOCK_NAMES[inner]}.{kind}"


def gguf_tensors(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Float32 arrays under llama.cpp's names, in its orientation (numpy shape (out, in))."""
    out = {}
    for key, t in to_hf_state(model).items():
        if key.endswith(CONV1D):
            t = t.t()  # HF's Conv1D (in, out) -> (out, in), as convert_hf_to_gguf.py does
        out[gguf_name(key)] = t.contiguous().numpy().astype(np.float32)
    out["output.weight"] = out["token_embd.weight"]  # the tied head, stored once more
    return out


def tensor_type(name: str, array: np.ndarray, outtype: str) -> str:
    """The type a tensor is stored as: vectors and positions stay f32, as llama.cpp's converter
    keeps them; q8_0 falls back to f16 where a row is not a whole number of 32-value blocks."""
    if array.ndim <= 1 or name.startswith("position_embd"):
        return "f32"
    if outtype == "q8_0" and array.shape[-1] % 32:
        return "f16"
    return outtype


def check_tokenizer(tokenizer: Any, cfg: GPTConfig) -> None:
    """A clear error for a tokenizer llama.cpp's `gpt2` vocabulary cannot hold."""
    fix = "convert to a Hugging Face directory instead (gpt2lab convert RUN_DIR hf/DIR)"
    if tokenizer is None:
        raise CheckpointError(
            "this model has no tokenizer, and a GGUF file must carry one",
            "a run or HF directory with its tokenizer",
            fix,
        )
    if getattr(tokenizer, "kind", None) == "char" or not hasattr(tokenizer, "merges"):
        raise CheckpointError(
            f"GGUF holds byte-level BPE vocabularies only, and this model's tokenizer is "
            f"{getattr(tokenizer, 'kind', type(tokenizer).__name__)!r}",
            "a byte-level BPE tokenizer (GPT-2's or one from gpt2lab tokenizer train)",
            fix,
        )
    if getattr(tokenizer, "pattern", GPT2_PATTERN) != GPT2_PATTERN:
        raise CheckpointError(
            "this tokenizer splits text with its own pattern, which llama.cpp's `gpt-2` "
            "pre-tokenizer would not reproduce",
            "GPT-2's pre-tokenization pattern",
            fix,
        )
    if tokenizer.n_vocab > cfg.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer.n_vocab} ids but the model only {cfg.vocab_size}",
            "a tokenizer that fits the model's embedding table",
            "convert the run the tokenizer was trained with",
        )


def vocabulary(tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) in GPT-2's file spelling; ids past the tokenizer's are
    padding slots `[PAD{i}]`, as llama.cpp's converter writes them."""
    names = {i: s for s, i in tokenizer.special_tokens.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i in names:
            tokens.append(names[i])
            types.append(_CONTROL)
        elif i < tokenizer.n_vocab:
            tokens.append(token_to_str(tokenizer.token_bytes(i)))
            types.append(_NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
    merges = [f"{token_to_str(a)} {token_to_str(b)}" for a, b in tokenizer.merges]
    return tokens, types, merges


def save_gguf(
    model: torch.nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    outtype: str = "f32",
    name: str = "gpt2lab",
) -> None:
    """Write `model` and its tokenizer as a llama.cpp GGUF file, atomically.

    `outtype` is one of f32, f16, bf16, q8_0 (the 2-D weights; see `tensor_type`).
    """
    import gguf

    require_float_weights(model, "GGUF export")
    if outtype not in OUTTYPES:
        raise CheckpointError(
            f"unknown GGUF type {outtype!r}", f"one of {', '.join(OUTTYPES)}", "pass --outtype f16"
        )
    cfg: GPTConfig = model.config  # type: ignore[assignment]
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    check_tokenizer(tokenizer, cfg)
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    quant_types = {
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, "gpt2")
        writer.add_name(name)
        writer.add_file_type(file_types[outtype])
        writer.add_context_length(cfg.block_size)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(4 * cfg.n_embd)
        writer.add_block_count(cfg.n_layer)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(1e-5)
        tokens, types, merges = vocabulary(tokenizer, cfg.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        eot = tokenizer.special_tokens.get(EOT)
        if eot is not None:
            writer.add_bos_token_id(eot)
            writer.add_eos_token_id(eot)
        writer.add_add_bos_token(False)  # gpt2lab never prepends a token to a prompt
        template = getattr(tokenizer, "chat_template", None)
        if template is not None:  # llama.cpp renders it for its chat endpoints
            writer.add_chat_template(template.to_jinja())
            end = tokenizer.special_tokens.get(template.end_token)
            if end is not None:
                writer.add_eot_token_id(end)
        for tensor_name, array in gguf_tensors(model).items():
            kind = tensor_type(tensor_name, array, outtype)
            if kind == "f32":
                writer.add_tensor(tensor_name, array)
            elif kind == "f16":
                writer.add_tensor(tensor_name, array.astype(np.float16))
            else:
                qtype = quant_types[kind]
                writer.add_tensor(tensor_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
