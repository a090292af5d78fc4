"""Plugin discovery for lm-evaluation-harness: what makes `lm_eval --model gpt2lab ...` work.

lm-eval (0.4.x, up to 0.4.13) looks models up in its own registry and reads no package entry
points (its issues #1457, #1621 and #3282 ask for exactly that). gpt2lab declares its backend the
standard way, as the entry point `gpt2lab` in the group `lm_eval.models` (pyproject.toml), and
installs `gpt2lab-lm-eval-plugins.pth` beside itself, whose one line imports this module when
Python starts. It only puts a finder on `sys.meta_path`; nothing else happens unless a process
imports `lm_eval.models` (lm-eval's model table). Then every `lm_eval.models` entry point of the
environment is added to lm-eval's registry as a lazy "module:Class" name (so nothing is imported
until lm-eval asks for that model), unless a model of that name is there already.

Standard library only: this runs in every Python process of the environment.
"""

from __future__ import annotations

import sys

GROUP = "lm_eval.models"
TARGET = "lm_eval.models"


def register_entry_points() -> list[str]:
    """Add each `lm_eval.models` entry point to lm-eval's model registry; returns their names."""
    import importlib.metadata

    from lm_eval.api.registry import model_registry

    added = []
    for entry in importlib.metadata.entry_points(group=GROUP):
        if entry.name not in model_registry:
            # a "module:Class" string: lm-eval imports it on first use, and accepts the class's
            # own @register_model of the same name afterwards
            model_registry.register(entry.name, target=entry.value)
            added.append(entry.name)
    return added


class _AfterImport:
    """A meta path finder that finds nothing itself: for `lm_eval.models` it asks the finders
    after it and wraps the loader they give, to register the entry points once the module ran.
    (No importlib.abc base classes: importing those costs every Python start ~15 ms.)"""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # one time only
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisterAfter(spec.loader)
        return spec


class _RegisterAfter:
    """The real loader of `lm_eval.models`, then `register_entry_points()`."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self.loader  # as if never wrapped
        try:
            register_entry_points()
        except Exception as exc:  # a plugin problem must not break lm-eval itself
            import warnings

            warnings.warn(f"lm_eval.models entry points not registered: {exc}", stacklevel=2)


def install() -> None:
    if TARGET in sys.modules:  # already imported (this module imported late): add them now
        register_entry_points()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


install()
