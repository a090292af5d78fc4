"""gpt2lab: GPT-2 built from scratch in PyTorch, from tokenizer to zero-shot evaluation.

The public API, imported on first use: `import gpt2lab`, the tokenizer and the data pipeline do
not load torch (forking worker processes from a parent that holds torch makes `prepare` much
slower). `model.py` is the model alone; its conveniences live in the stages that implement them
and are attached to `GPT` here, the moment `gpt2lab.model` is first imported, so that the model
imports nothing above it:

- `GPT.from_pretrained(path, device=None, dtype=None)`: `gpt2lab.checkpoint.load.load_model`;
- `model.save_pretrained(path, tokenizer=None)`: `gpt2lab.checkpoint.hf.save_hf`;
- `model.generate(idx, max_new_tokens, ...)`: `gpt2lab.generate.generate`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "GPT": "gpt2lab.model",
    "GPTConfig": "gpt2lab.config",
    "Config": "gpt2lab.config",
    "GPT2LabError": "gpt2lab.errors",
    "generate": "gpt2lab.generate",
    "get_tokenizer": "gpt2lab.tokenizer",
    "load_model": "gpt2lab.checkpoint.load",
    "quantize": "gpt2lab.quantize",
    "train_bpe": "gpt2lab.tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gpt2lab' has no attribute {name!r}")


# ---- the conveniences of GPT, each a call into the stage that implements it ----


def _from_pretrained(cls: type, path: Any, device: Any = None, dtype: Any = None) -> Any:
    """The model of a Hugging Face GPT-2 directory (or hub name in the local cache), or of a
    gpt2lab run or checkpoint directory, in eval mode (`gpt2lab.checkpoint.load.load_model`)."""
    from gpt2lab.checkpoint.load import load_model

    return load_model(path, device=device, dtype=dtype)[0]


def _save_pretrained(self: Any, path: Any, tokenizer: Any = None) -> None:
    """Write a Hugging Face GPT-2 directory that `transformers` loads as it is; the tokenizer
    defaults to the one loaded with the model, else GPT-2's (`gpt2lab.checkpoint.hf.save_hf`)."""
    from gpt2lab.checkpoint.hf import save_hf

    save_hf(self, path, tokenizer=tokenizer)


def _generate(self: Any, idx: Any, max_new_tokens: int, *args: Any, **kwargs: Any) -> Any:
    """The prompt ids followed by the new ones, KV-cached; temperature=0 is greedy. The options
    (temperature, top_k, top_p, repetition_penalty, generator, attention_mask, eos_token_id)
    are those of `gpt2lab.generate.generate`."""
    from gpt2lab.generate import generate

    return generate(self, idx, max_new_tokens, *args, **kwargs)


def _attach_conveniences(gpt: type) -> None:
    gpt.from_pretrained = classmethod(_from_pretrained)  # type: ignore[attr-defined]
    gpt.save_pretrained = _save_pretrained  # type: ignore[attr-defined]
    gpt.generate = _generate  # type: ignore[attr-defined]


class _CallableModule(types.ModuleType):
    """`gpt2lab.generate` and `gpt2lab.quantize` name both a module and the function the package
    exports from it, and importing the module binds the module to that name on the package:
    calling the module calls its function of the same name."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


# the exported functions that share their module's name
_SAME_NAME = {m for name, m in _EXPORTS.items() if m == f"gpt2lab.{name}"}


def _after_import(module: Any) -> None:
    if module.__name__ == "gpt2lab.model":
        _attach_conveniences(module.GPT)
    elif module.__name__ in _SAME_NAME:
        module.__class__ = _CallableModule


class _AttachOnModelImport(importlib.abc.MetaPathFinder):
    """Finds `gpt2lab.model` (and the modules of `_SAME_NAME`) as usual, and attaches the
    conveniences (makes them callable) once it has run."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "gpt2lab.model" and fullname not in _SAME_NAME:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            run_module = spec.loader.exec_module

            def run_then_attach(module: Any) -> None:
                run_module(module)
                _after_import(module)

            spec.loader.exec_module = run_then_attach  # type: ignore[method-assign]
        return spec


for _name in ("gpt2lab.model", *_SAME_NAME):  # imported before this package ran (e.g. a reload)
    if _name in sys.modules:
        _after_import(sys.modules[_name])
if not any(type(f).__name__ == "_AttachOnModelImport" for f in sys.meta_path):
    sys.meta_path.insert(0, _AttachOnModelImport())
