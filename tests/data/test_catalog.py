"""The named corpora: each prepares from a small local file shaped like the real dataset."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gpt2lab import cli
from gpt2lab.data import catalog, load_meta, load_tokens, sources

EOT = 50256
DOCS = [f"Story {i}. Being a founder is hard, said the cat number {i}." for i in range(40)]


def _essays_csv(path, docs):  # sgoel9/paul_graham_essays: one CSV, columns id, title, date, text
    rows = {"id": range(len(docs)), "title": [f"Essay {i}" for i in range(len(docs))]}
    frame = pd.DataFrame({**rows, "date": ["March 2008"] * len(docs), "text": docs})
    frame.to_csv(path, index=False)


def _wikipedia_parquet(path, docs):  # wikimedia/wikipedia: id, url, title, text
    urls = [f"https://de.wikipedia.org/wiki?curid={i}" for i in range(len(docs))]
    ids = [str(i) for i in range(len(docs))]
    titles = [f"Artikel {i}" for i in range(len(docs))]
    pd.DataFrame({"id": ids, "url": urls, "title": titles, "text": docs}).to_parquet(path)


def _pile_parquet(path, docs):  # NeelNanda/pile-10k: text, meta {pile_set_name}
    meta = [{"pile_set_name": "Pile-CC"} for _ in docs]
    pd.DataFrame({"text": docs, "meta": meta}).to_parquet(path)


def _text_parquet(path, docs):  # roneneldan/TinyStories, stas/openwebtext-10k: text
    pd.DataFrame({"text": docs}).to_parquet(path)


SHAPES = {
    "paul-graham-essays": ("paul_graham_essays.csv", _essays_csv),
    "openwebtext-10k": ("train-00000-of-00001.parquet", _text_parquet),
    "pile-10k": ("train-00000-of-00001.parquet", _pile_parquet),
    "tinystories": ("train-00000-of-00004.parquet", _text_parquet),
    "wikipedia-de": ("train.00000-of-00020.parquet", _wikipedia_parquet),
    "wikipedia-en": ("train.00000-of-00041.parquet", _wikipedia_parquet),
}


def test_every_hf_corpus_names_dataset_field_tokenizer_and_split():
    for name, entry in catalog.DATASETS.items():
        if "dataset" in entry and name in SHAPES:
            assert entry["field"] == "text" and entry["tokenizer"] == "gpt2", name
            assert 0 < entry["val_fraction"] < 0.1, name
    wiki = catalog.DATASETS["wikipedia-de"]
    assert (wiki["dataset"], wiki["dataset_config"]) == ("wikimedia/wikipedia", "20231101.de")


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_preset_prepares_a_local_file_of_the_real_schema(name, tmp_path, gpt2_ref):
    filename, write = SHAPES[name]
    write(tmp_path / filename, DOCS)
    out = tmp_path / "out"
    argv = ["prepare", name, "--input", str(tmp_path / filename), "--out", str(out)]
    assert cli.main([*argv, "--workers", "1", "--val-docs", "4"]) == 0
    meta = load_meta(out)
    assert meta["documents"] == {"train": 36, "val": 4}
    assert meta["source"]["field"] == "text" and meta["tokenizer"]["kind"] == "gpt2"
    tokens = np.concatenate([load_tokens(out, "train"), load_tokens(out, "val")])
    assert len(tokens) == sum(len(gpt2_ref.encode_ordinary(d)) + 1 for d in DOCS)


def test_new_presets_without_network_show_input_with_their_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "_hub_reachable", lambda *a, **kw: False)
    for name in ("paul-graham-essays", "wikipedia-de"):
        assert cli.main(["prepare", name, "--out", str(tmp_path / name)]) == 1
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("gpt2lab:")]
        assert len(err) == 1 and f"prepare {name} --input" in err[0], err
        assert ("--max-docs" in err[0]) == name.startswith("wikipedia"), err
        assert not (tmp_path / name).exists()


def test_max_docs_takes_the_first_documents(tmp_path):
    _wikipedia_parquet(tmp_path / "w.parquet", DOCS)
    jsonl = tmp_path / "w.jsonl"
    pd.DataFrame({"text": DOCS}).to_json(jsonl, orient="records", lines=True)
    runs = {
        "local": ["wikipedia-de", "--input", str(tmp_path / "w.parquet")],
        "dataset": ["--dataset", "json", "--data-files", str(jsonl)],
    }
    for label, source in runs.items():
        out = tmp_path / label
        argv = ["prepare", *source, "--max-docs", "10", "--out", str(out), "--workers", "1"]
        assert cli.main([*argv, "--val-docs", "2", "--tokenizer", "char"]) == 0
        meta = load_meta(out)
        assert meta["documents"] == {"train": 8, "val": 2}, label
        assert meta["source"]["max_docs"] == 10 and "--max-docs 10" in meta["command"]
        assert sorted(meta["tokenizer"]["chars"]) == sorted(set("".join(DOCS[:10]))), label
