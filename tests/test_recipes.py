"""docs/recipes.md's commands (the README's recipe gallery), run at a tiny size on local stand-ins.

The blocks follow test_readme.py's convention (`<!-- test: NAME -->` after each) and its tiny
substitutions; on top of them, a named corpus gets `--input` with a small local file shaped like
the real dataset (same columns, same file type), the demo gets a local text, and N epochs become 2.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from gpt2lab import cli
from gpt2lab.checkpoint.load import load_model
from gpt2lab.data import catalog
from test_readme import FENCE, commands, tiny, workdir  # noqa: F401 - workdir is a fixture

RECIPES = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
README = RECIPES.parents[1] / "README.md"
BLOCKS = [(m.group(3), m.group(1)) for m in FENCE.finditer(RECIPES.read_text(encoding="utf-8"))]
RUN = [(name, body) for name, body in BLOCKS if name and not name.startswith("skip")]
# the local stand-in file of each named corpus (its columns: recipe_dir)
STAND_INS = {
    "paul-graham-essays": "paul_graham_essays.csv",
    "openwebtext-10k": "owt10k/train.parquet",
    "pile-10k": "pile10k/train.parquet",
    "tinystories": "tinystories/train.parquet",
    "wikipedia-de": "wiki-de/train.parquet",
    "wikipedia-en": "wiki-en/train.parquet",
    "fineweb-edu-10B": "fineweb/part-0.parquet",
}
NO_EVAL = ["--train.eval_interval=1000", "--train.checkpoint_interval=1000", "--train.eval_steps=1"]


def test_every_recipe_block_is_tested_and_in_the_readme_gallery():
    assert all(name for name, _ in BLOCKS) and len(RUN) == 11
    readme = README.read_text(encoding="utf-8")
    for heading in (ln[3:] for ln in RECIPES.read_text().splitlines() if ln.startswith("## ")):
        anchor = "".join(c for c in heading.lower() if c.isalnum() or c in " -").replace(" ", "-")
        assert f"docs/recipes.md#{anchor})" in readme, heading


def recipe_tiny(argv: list[str], hf_gpt2: str) -> list[str]:
    """test_readme's tiny size, plus local stand-ins for the corpora and 2 short epochs."""
    if argv[:2] == ["gpt2lab", "prepare"] and "--input" not in argv:
        name = argv[2]
        local = STAND_INS.get(name) or ("tinyshakespeare.txt" if "shakespeare" in name else None)
        argv = [*argv, "--input", local] + ([] if "shakespeare" in name else ["--val-docs", "3"])
    if argv[:2] == ["gpt2lab", "demo"] and "--input" not in argv:
        argv = [*argv, "--input", "tinyshakespeare.txt"]
    out = tiny(argv, hf_gpt2)
    if any(a.startswith("--train.max_epochs=") for a in out):
        out = [a for a in out if not a.startswith("--train.max_epochs=")]
        out += ["--train.max_epochs=2", "--train.sample_tokens=8", *NO_EVAL]
    return out


@pytest.fixture(scope="module")
def recipe_dir(workdir):  # noqa: F811 - the fixture imported above
    """test_readme's scratch directory plus a file of each corpus's real shape."""
    import pandas as pd

    text = (workdir / "tinyshakespeare.txt").read_text(encoding="utf-8")
    docs = [p.strip() for p in text.split("\n\n") if p.strip()][:40]
    n = len(docs)
    shapes = {
        "paul-graham-essays": {"id": range(n), "title": ["T"] * n, "date": ["May 2004"] * n},
        "pile-10k": {"meta": [{"pile_set_name": "Pile-CC"}] * n},
        "wikipedia-de": {"id": [str(i) for i in range(n)], "url": ["u"] * n, "title": ["t"] * n},
    }
    shapes["wikipedia-en"] = shapes["wikipedia-de"]
    for name, path in STAND_INS.items():
        if name == "fineweb-edu-10B":
            continue
        frame = pd.DataFrame({**shapes.get(name, {}), "text": docs})
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        if path.endswith(".csv"):
            frame.to_csv(workdir / path, index=False)
        else:
            frame.to_parquet(workdir / path)
    return workdir


@pytest.mark.parametrize("name,body", RUN, ids=[name for name, _ in RUN])
def test_recipe_runs(name, body, recipe_dir, monkeypatch, capsys):
    monkeypatch.chdir(recipe_dir)
    for argv in commands(body):
        args = recipe_tiny(argv, str(recipe_dir / "hf-gpt2"))
        code = cli.main(args)
        err = capsys.readouterr().err
        assert code == 0, f"`{shlex.join(argv)}` (run as `gpt2lab {shlex.join(args)}`): {err}"
        if "--train.sample_every_epoch=true" in args:
            assert "epoch 2/2 done" in err and "--- sample after epoch 2 ---" in err, err
        if args[0] == "prepare" and args[1] in catalog.DATASETS and args[1] in STAND_INS:
            meta = json.loads(
                (recipe_dir / args[args.index("--out") + 1] / "meta.json").read_text()
            )
            assert meta["source"]["field"] == "text"
        data = recipe_dir / args[args.index("--data") + 1] if "--data" in args else recipe_dir
        if "--init-from" in args and (data / "meta.json").is_file():  # GPT-2 grows for new ids
            vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
            model, tok = load_model(recipe_dir / args[args.index("--out") + 1])
            assert tok.n_vocab == vocab > 50257 and model.config.vocab_size >= vocab
