"""`gpt2lab eval` end to end: our GPT loaded from a HF directory against transformers itself."""

from __future__ import annotations

import json
import math

import pytest

from gpt2lab import cli

TEXT = (
    "It is closely related to the American lobster, H. americanus. It may grow to a length of "
    "60 cm (24 in) and a mass of 6 kilograms (13 lb), and bears a conspicuous pair of claws.\n"
)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-gpt2")
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(hf_dir):
    """(our GPT, tokenizer) as `load_model` gives them for the HF directory."""
    from gpt2lab.checkpoint.load import load_model

    return load_model(hf_dir)


def _eval(capsys, *args):
    code = cli.main(["eval", *args, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def test_perplexity_json_equals_transformers_over_the_same_windows(
    tmp_path, hf_dir, gpt2_enc, hf_window_nll, capsys
):
    data = tmp_path / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    args = ("perplexity", "--model", str(hf_dir), "--data", str(data), "--json")
    code, out, err = _eval(capsys, *args, "--context", "24", "--stride", "8")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"} <= result.keys()
    # transformers, the same windows: the first scores 24 tokens, each later one 8 more
    ids = [gpt2_enc.eot_token, *gpt2_enc.encode_ordinary(TEXT)]
    n, ends = len(ids), [24]
    while ends[-1] < n - 1:
        ends.append(min(ends[-1] + 8, n - 1))
    nll = sum(hf_window_nll(ids, max(0, e - 24), e, e - p) for p, e in zip([0, *ends], ends))
    assert result["tokens"] == n - 1 and result["bytes"] == len(TEXT.encode())
    assert result["perplexity"] == pytest.approx(math.exp(nll / (n - 1)), rel=1e-4)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(TEXT), rel=1e-4)
    assert "perplexity (per token)" in out  # the table comes before the JSON line


def test_quantize_int8_scores_the_int8_model(tmp_path, hf_dir, loaded, capsys):
    """--quantize int8 scores exactly what `gpt2lab.quantize` gives, close to the float model."""
    from gpt2lab.config import EvalConfig
    from gpt2lab.eval.scoring import as_logits_fn
    from gpt2lab.eval.tasks import Settings, perplexity
    from gpt2lab.quantize import quantize

    data = tmp_path / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    args = ("perplexity", "--model", str(hf_dir), "--data", str(data), "--json")
    results = {}
    for flags in ((), ("--quantize", "int8")):
        code, out, err = _eval(capsys, *args, "--context", "24", "--stride", "8", *flags)
        assert code == 0, err
        results[flags] = json.loads(out.strip().splitlines()[-1])
    plain, int8 = results[()], results[("--quantize", "int8")]
    assert plain["quantize"] is None and int8["quantize"] == "int8"
    assert "int8 weights" in out
    model, tok = loaded
    settings = Settings(context=24, stride=8, batch_size=EvalConfig().batch_size)
    want = perplexity(as_logits_fn(quantize(model, "int8")), tok, str(data), settings)
    assert int8["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6)
    assert int8["perplexity"] != plain["perplexity"]
    assert int8["perplexity"] == pytest.approx(plain["perplexity"], rel=0.02)
    # the int8 model computes in float32 whatever --dtype asks, and the JSON says so
    code, out, err = _eval(capsys, *args, "--context", "24", "--stride", "8", "--quantize", "int8",
                           "--dtype", "bfloat16")  # fmt: skip
    asked_bf16 = json.loads(out.strip().splitlines()[-1])
    assert asked_bf16["dtype"] == "float32" and plain["dtype"] == "float32"
    assert asked_bf16["perplexity"] == int8["perplexity"]
    code, _, err = _eval(capsys, *args, "--quantize", "int4")
    assert code == 2 and "int4" in err


def test_task_table_shows_the_paper_column_and_bad_files_fail_in_one_line(tmp_path, hf_dir, capsys):
    good = tmp_path / "lambada_test.jsonl"
    good.write_text('{"text": "the lobster is a crustacean"}\n{"text": "a pair of claws"}\n')
    code, out, err = _eval(capsys, "lambada", "-m", str(hf_dir), "--data", str(good))
    assert code == 0, err
    assert "last-word accuracy (%)" in out and "paper" in out and "2 examples" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine line"}\n{"txt": "typo"}\n')
    code, out, err = _eval(capsys, "lambada", "-m", str(hf_dir), "--data", str(bad))
    assert code == 1 and err.count("\n") == 1 and f"{bad}:2:" in err and "lambada_test" in err
    code, _, err = _eval(capsys, "hellaswag", "-m", str(hf_dir), "--data", str(tmp_path / "no"))
    assert code == 1 and "rowanz/hellaswag" in err
    code, _, err = _eval(
        capsys, "perplexity", "-m", str(hf_dir), "--data", str(good), "--context", "65"
    )
    assert code == 2 and "block_size 64" in err


CBT = [f"{i} Line {i} of the story ." for i in range(1, 21)] + [
    "21 The XXXXX ran .\tdog\t\tcat|dog"
]
FILES = {
    "wikitext2": (
        " = Lobster = \n \n The lobster @-@ like animal , it said .\n",
        "word_perplexity",
    ),
    "wikitext103": (" = Lobster = \n The claws are 1 @,@ 000 mm .\n", "word_perplexity"),
    "ptb": (" the lobster 's claws are N mm\n it ran\n", "word_perplexity"),
    "lambada": ('{"text": "the lobster bears a pair of claws"}\n', "accuracy"),
    "cbt-cn": ("\n".join(CBT) + "\n", "accuracy"),
    "cbt-ne": ("\n".join(CBT) + "\n", "accuracy"),
    "enwik8": ("<page><title>Lobster</title></page>", "bits_per_byte"),
    "text8": ("the lobster is a crustacean", "bits_per_char"),
    "hellaswag": ('{"ctx": "A man", "endings": ["runs.", "sits."], "label": 1}\n', "acc_norm"),
}


@pytest.mark.parametrize("task", list(FILES))
def test_every_task_runs_from_the_command_line(task, tmp_path, hf_dir, loaded, capsys, monkeypatch):
    from gpt2lab.commands import eval as eval_cmd

    monkeypatch.setattr(eval_cmd, "_load", lambda path, device: loaded)  # load once for all
    text, key = FILES[task]
    data = tmp_path / task
    data.write_text(text, encoding="utf-8")
    code, out, err = _eval(capsys, task, "-m", str(hf_dir), "--data", str(data), "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["task"] == task and math.isfinite(result[key]) and result["context"] == 64
