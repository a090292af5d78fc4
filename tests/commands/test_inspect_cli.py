"""`gpt2lab inspect` end to end on tiny saved models: PNG, HTML and JSON; one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from gpt2lab import cli, inspect
from gpt2lab.checkpoint.hf import save_hf
from gpt2lab.checkpoint.load import load_model
from gpt2lab.config import GPTConfig
from gpt2lab.model import GPT
from gpt2lab.tokenizer import get_tokenizer

pytest.importorskip("matplotlib")

VIEWS = ["attention", "next", "surprise", "lens", "norms"]
PROMPT = "Hello world, 日本\nthe cat"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """A random model with GPT-2's vocabulary, saved as a Hugging Face directory."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bpe") / "tiny"
    save_hf(GPT(GPTConfig(block_size=80, vocab_size=50257, n_layer=2, n_head=3, n_embd=24)), path)
    return path


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    torch.manual_seed(1)
    tok = get_tokenizer("char", text="abcdefgh ij\n")
    path = tmp_path_factory.mktemp("char") / "tiny"
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=16))
    save_hf(model, path, tok)
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["inspect", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("view", VIEWS)
def test_each_view_writes_png_html_and_json(view, bpe_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, view, "--model", bpe_model, "-p", PROMPT, "--html", "v.html")
    assert code == 0, err
    png = tmp_path / f"inspect-{view}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png.name}" in out
    page = (tmp_path / "v.html").read_text(encoding="utf-8")
    assert "<script>" in page and "http" not in page.split("<script>")[1]  # nothing fetched
    code, out, err = run(capsys, view, "--model", bpe_model, "-p", PROMPT, "--json")
    assert code == 0, err
    data = json.loads(out)  # stdout is the JSON only
    model, tok = load_model(bpe_model)
    ids = tok.encode_ordinary(PROMPT)
    assert data["ids"] == ids and data["tokens"] == inspect.labels(tok, ids)
    if view == "attention":
        att = torch.tensor(data["attention"])
        torch.testing.assert_close(att, inspect.attention(model, ids), atol=1e-6, rtol=0)
    if view == "surprise":
        s = inspect.surprise(model, ids, tok)
        assert data["bits"][0] is None and len(data["bits"]) == len(ids)
        assert data["bits_per_byte"] == pytest.approx(s.bits_per_byte, abs=1e-3)


def test_one_head_with_a_window_says_so(bpe_model, tmp_path, capsys):
    long_prompt = "the cat sat on the mat and " * 6  # > 20 tokens
    out_png, page = tmp_path / "h.png", tmp_path / "h.html"
    code, out, err = run(
        capsys, "attention", "--model", bpe_model, "-p", long_prompt, "--layer", 1, "--head", 2,
        "--window", 20, "--out", out_png, "--html", page,
    )  # fmt: skip
    assert code == 0, err
    assert out_png.is_file() and "--window" in out
    text = page.read_text(encoding="utf-8")
    assert "only (--window)" in text
    data = json.loads(text.split("const data = ")[1].split(";\n")[0])
    assert len(data["tokens"]) == 20 and len(data["attention"][0][0]) == 20


def test_a_char_model_works(char_model, tmp_path, capsys):
    for view in VIEWS:
        code, out, err = run(capsys, view, "--model", char_model, "-p", "abc ij\nh", "--json")
        assert code == 0, err
        assert json.loads(out)["tokens"][3] == "\u2423"


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["-p", ""], 1, "the prompt is empty"),
        (["-p", "a" * 17], 1, "more than the model's context (block_size=16)"),
        (["-p", "abc", "--layer", "2"], 2, "--layer 2 is out of range, expected 0 to 1"),
        (["-p", "abc", "--layer", "0", "--head", "5"], 2, "--head 5 is out of range"),
        (["-p", "abc", "--head", "0"], 2, "--head needs a layer"),
        ([], 2, "give the prompt with -p TEXT or --prompt-file FILE"),
    ],
)
def test_bad_input_is_one_line_with_an_exit_code(char_model, capsys, args, code, message):
    got, out, err = run(capsys, "attention", "--model", char_model, *args)
    assert got == code and message in err and err.count("\n") == 1, err


def test_the_page_script_runs_in_node(bpe_model, tmp_path, capsys):
    """The page's script, run in node with a stand-in DOM: no syntax or runtime error."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    stub = """
const fs = require("fs");
const page = fs.readFileSync(process.argv[2], "utf8");
const script = page.split("<script>")[1].split("</script>")[0];
const el = () => ({ style: {}, dataset: {}, value: "0,0", appendChild() {}, append() {},
  replaceChildren() {}, add() {}, querySelectorAll() { return []; } });
global.document = { getElementById: el, createElement: el };
global.Option = function () {};
eval(script);
"""
    (tmp_path / "stub.js").write_text(stub)
    for view in VIEWS:
        page = tmp_path / f"{view}.html"
        args = ["--html", page, "--out", tmp_path / "x.png"]
        assert run(capsys, view, "--model", bpe_model, "-p", PROMPT, *args)[0] == 0
        done = subprocess.run([node, tmp_path / "stub.js", page], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
