"""The architecture's rules, read from the source: imports run one way, the library does not print.

Every `import` in src/gpt2lab is read, those inside functions too (docs/architecture.md):
foundations < tokenizer < data < model < stages < app. A module imports from its own layer or
below, never in a circle, and imports inside functions are for optional heavy packages only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "gpt2lab"

# layer of each top-level module or package under gpt2lab; a higher number sits above
LAYERS = {
    "errors": 0,
    "io": 0,
    "config": 0,
    "device": 0,
    "tokenizer": 1,
    "data": 2,
    "corpus": 2,
    "model": 3,
    "kernels": 3,
    "checkpoint": 4,
    "generate": 4,
    "train": 4,
    "eval": 4,
    "posttrain": 4,
    "inspect": 4,
    "demo": 5,
    "plot": 5,
    "commands": 5,
    "cli": 5,
    "__main__": 5,
    "__init__": 5,  # the package root: the public API binds the stages' conveniences to GPT
}
LAYER_NAMES = ["foundations", "tokenizer", "data", "model", "stages", "app"]

# the only packages a function may import (optional or heavy, needed by one path only)
LAZY_OK = {
    "transformers",
    "datasets",
    "matplotlib",
    "tensorboard",
    "torch.utils.tensorboard",
    "wandb",
    "huggingface_hub",
    "pyarrow",
    "tokenizers",
    "jinja2",  # chat templates read from Hugging Face directories, rendered sandboxed
    "vaderSentiment",  # optional: the RLHF demo's sentiment labeller
    "gguf",  # optional: llama.cpp's file writer, for `gpt2lab convert ... model.gguf` only
}

APP = {name for name, layer in LAYERS.items() if layer == len(LAYER_NAMES) - 1}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top not in LAYERS:
        raise AssertionError(f"{module} has no layer: add it to LAYERS and docs/architecture.md")
    return LAYERS[top]


def resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The gpt2lab modules an import statement loads (a `from pkg import sub` names `pkg.sub`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "gpt2lab"]
    base = node.module or ""
    if node.level:  # relative import
        package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
        anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        base = f"{anchor}.{base}" if base else anchor
    if base.split(".")[0] != "gpt2lab":
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def imports(module: str) -> list[tuple[str, int, bool, str]]:
    """(imported name, line, inside a function, top-level package) of every import statement."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in child.names] if isinstance(child, ast.Import) else []
                raw = names or [child.module or "." * child.level]
                for target in resolve(module, child) or raw:
                    found.append((target, child.lineno, in_function, target.split(".")[0]))
            visit(child, inner)

    visit(tree, False)
    return found


def gpt2lab_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _, top in imports(m):
            if top == "gpt2lab" and target in MODULES and target != m:
                edges[m].add(target)
    return edges


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


def test_imports_never_point_up_a_layer():
    upward = []
    for m in MODULES:
        for target, line, _, top in imports(m):
            if top == "gpt2lab" and target in MODULES and layer_of(target) > layer_of(m):
                upward.append(
                    f"{MODULES[m].relative_to(SRC)}:{line} {m} "
                    f"({LAYER_NAMES[layer_of(m)]}) imports {target} "
                    f"({LAYER_NAMES[layer_of(target)]})"
                )
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    edges = gpt2lab_edges()
    # Tarjan's strongly connected components; any component of two or more modules is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_imports_inside_functions_are_for_optional_heavy_packages_only():
    # one exception: the package root's conveniences of GPT import their stage when called, so
    # that `import gpt2lab` (and the tokenizer and data pipeline) does not load torch
    lazy = []
    for m in MODULES:
        for target, line, in_function, _ in imports(m):
            if (
                in_function
                and m != "gpt2lab"
                and not any(target == ok or target.startswith(ok + ".") for ok in LAZY_OK)
            ):
                lazy.append(f"{MODULES[m].relative_to(SRC)}:{line} imports {target} in a function")
    assert not lazy, "\n".join(lazy)


def test_the_model_file_imports_only_torch_config_and_errors():
    allowed = {"torch", "gpt2lab.config", "gpt2lab.errors", "math", "__future__"}
    names = {target for target, *_ in imports("gpt2lab.model")}
    stray = {n for n in names if n not in allowed and n.split(".")[0] != "torch"}
    assert not stray, stray
    lines = MODULES["gpt2lab.model"].read_text(encoding="utf-8").count("\n")
    assert lines <= 310, f"model.py has {lines} lines: keep it GPT-2 only"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def test_only_the_app_layer_prints():
    printing = []
    for m, path in MODULES.items():
        if layer_of(m) == len(LAYER_NAMES) - 1:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call in _calls(tree):
            if isinstance(call.func, ast.Name) and call.func.id in ("print", "input"):
                printing.append(f"{path.relative_to(SRC)}:{call.lineno} calls {call.func.id}()")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("stdout", "stderr")
                and isinstance(node.value, ast.Name)
                and node.value.id == "sys"
            ):
                printing.append(f"{path.relative_to(SRC)}:{node.lineno} uses sys.{node.attr}")
    assert not printing, "\n".join(printing)


def test_no_one_letter_module_aliases():
    aliases = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    short = a.asname and len(a.asname) == 1 and a.asname != "F"
                    if short and (isinstance(node, ast.Import) or a.name[0].islower()):
                        aliases.append(
                            f"{path.relative_to(SRC)}:{node.lineno} {a.name} as {a.asname}"
                        )
    assert not aliases, "\n".join(aliases)


@pytest.mark.parametrize("variable", ["RANK", "LOCAL_RANK", "WORLD_SIZE"])
def test_only_train_dist_reads_the_launchers_variables(variable):
    readers = [
        str(path.relative_to(SRC))
        for m, path in MODULES.items()
        if m != "gpt2lab.train.dist" and f'"{variable}"' in path.read_text(encoding="utf-8")
    ]
    assert not readers, f"{variable} read outside train/dist.py: {readers}"
