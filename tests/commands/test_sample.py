"""`gpt2lab sample` end to end, on run directories built here from the checkpoint layout."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from gpt2lab import cli
from gpt2lab.config import Config, GPTConfig, to_dict, to_toml
from gpt2lab.generate import generate
from gpt2lab.model import GPT


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster, and immune to other jobs on the machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


GREEDY = ["--temperature", "0", "--dtype", "float32"]  # exact: float32 and argmax
TEXT = "the quick brown fox jumps over the lazy dog. <|>é😀\n"


def make_run(root: Path, cfg: GPTConfig, tok=None, seed: int = 0) -> tuple[Path, GPT]:
    """A run directory as training writes it: config.toml, tokenizer/, ckpt/step_*/, latest."""
    from gpt2lab.checkpoint.weights import save_model_safetensors

    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():  # sharper distributions than the 0.02 init, so samples differ visibly
        for p in model.parameters():
            p.mul_(8)
    full = Config(model=cfg)
    (root / "config.toml").parent.mkdir(parents=True, exist_ok=True)
    (root / "config.toml").write_text(to_toml(full))
    if tok is not None:
        tok.save(root / "tokenizer")
    ckpt = root / "ckpt" / "step_00000010"
    ckpt.mkdir(parents=True)
    save_model_safetensors(model, ckpt / "model.safetensors")
    torch.save({}, ckpt / "optimizer.pt")
    state = {"step": 10, "config": to_dict(full), "tokenizer": "tokenizer"}
    (ckpt / "state.json").write_text(json.dumps(state))
    (root / "latest").write_text("ckpt/step_00000010")
    return root, model


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    from gpt2lab.tokenizer import get_tokenizer

    tok = get_tokenizer("char", text=TEXT)
    cfg = GPTConfig(block_size=32, vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=32)
    run, model = make_run(tmp_path_factory.mktemp("char") / "run", cfg, tok)
    return run, model, tok


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    """A tiny model speaking GPT-2's vocabulary."""
    from gpt2lab.tokenizer import get_tokenizer

    cfg = GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)
    run, _ = make_run(tmp_path_factory.mktemp("gpt2") / "run", cfg, get_tokenizer("gpt2"))
    return run


def sample(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["sample", *args])
    out, err = capsys.readouterr()
    return code, out, err


def greedy_text(model, tok, prompt: str, n: int) -> str:
    ids = generate(model, torch.tensor([tok.encode(prompt)]), n, temperature=0)
    return tok.decode(ids[0, len(tok.encode(prompt)) :].tolist())


def test_greedy_output_is_the_prompt_and_its_continuation(char_run, capsys):
    run, model, tok = char_run
    code, out, _ = sample(capsys, "--model", str(run), "-p", "the", "-m", "12", *GREEDY)
    assert code == 0
    assert out == "the" + greedy_text(model, tok, "the", 12) + "\n"


def test_json_lines_have_ids_text_and_finish_reason(char_run, capsys):
    run, model, tok = char_run
    code, out, _ = sample(
        capsys,
        "--model",
        str(run),
        "-p",
        "fox",
        "-p",
        "a",
        *"-m 9 --num-samples 2 --json --seed 1 --ignore-eos".split(),
    )
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["fox", "fox", "a", "a"]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert r["finish_reason"] == "length" and len(r["ids"]) == 9
        assert r["text"] == tok.decode(r["ids"]) and r["prompt_ids"] == tok.encode(r["prompt"])


def test_a_stop_string_spanning_tokens_ends_the_sample_and_is_not_printed(char_run, capsys):
    run, model, tok = char_run
    full = greedy_text(model, tok, "the", 20)
    stop = full[4:6]  # two characters: two tokens of the char vocabulary
    cut = full[: full.index(stop)]
    base = ["--model", str(run), "-p", "the", "-m", "20", *GREEDY, "--stop", stop]
    code, out, _ = sample(capsys, *base, "--json")
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and row["finish_reason"] == "stop" and row["text"] == cut
    assert tok.decode(row["ids"]).startswith(cut + stop)  # ids run through the stop string
    code, out, _ = sample(capsys, *base, "--stream")
    assert code == 0 and out == "the" + cut + "\n"


def test_stream_prints_what_the_batch_prints(char_run, capsys):
    run, _, _ = char_run
    base = ["--model", str(run), "-p", "over", "-m", "15", "--seed", "3", "--num-samples", "3"]
    _, plain, _ = sample(capsys, *base)
    _, streamed, _ = sample(capsys, *base, "--stream")
    assert plain == streamed and plain.count("-" * 40) == 2


def test_seeded_samples_repeat_and_other_seeds_differ(char_run, capsys):
    run, _, _ = char_run
    base = ["--model", str(run), "-m", "20", "--num-samples", "4", "--json", "--ignore-eos"]
    a = sample(capsys, *base, "--seed", "5")[1]
    b = sample(capsys, *base, "--seed", "5")[1]
    c = sample(capsys, *base, "--seed", "6")[1]
    assert a == b and a != c
    texts = [json.loads(line)["text"] for line in a.splitlines()]
    assert len(set(texts)) > 1  # the rows of one batch are different samples


def test_prompts_of_different_lengths_batch_like_one_by_one(char_run, capsys):
    run, _, _ = char_run
    prompts = ["t", "the quick", "lazy dog"]
    base = ["--model", str(run), "-m", "10", *GREEDY, "--json"]
    batched = sample(capsys, *base, *[a for p in prompts for a in ("-p", p)])[1].splitlines()
    alone = [sample(capsys, *base, "-p", p)[1].strip() for p in prompts]
    assert [json.loads(x)["ids"] for x in batched] == [json.loads(x)["ids"] for x in alone]


def test_out_writes_one_file_per_sample(char_run, capsys, tmp_path):
    run, _, _ = char_run
    out_dir = tmp_path / "samples"
    code, out, err = sample(
        capsys,
        "--model",
        str(run),
        "-p",
        "a",
        *"-m 5 --num-samples 3 --batch-size 2 --json".split(),
        "--out",
        str(out_dir),
    )
    assert code == 0 and out == "" and "wrote 3 samples" in err
    txt = sorted(out_dir.glob("*.txt"))
    assert [p.name for p in txt] == ["sample_00000.txt", "sample_00001.txt", "sample_00002.txt"]
    for p in txt:
        record = json.loads(p.with_suffix(".json").read_text())
        assert p.read_text() == "a" + record["text"]


def test_no_prompt_starts_from_endoftext_and_stdin_is_a_prompt(char_run, capsys, monkeypatch):
    run, _, tok = char_run
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    _, out, _ = sample(capsys, "--model", str(run), "-m", "3", "--json", "--ignore-eos")
    assert json.loads(out)["prompt_ids"] == [tok.eot_token]
    monkeypatch.setattr("sys.stdin", io.StringIO("lazy\n"))
    _, out, _ = sample(capsys, "--model", str(run), "-m", "3", "--json")
    assert json.loads(out)["prompt"] == "lazy"


def test_interactive_loop_streams_each_prompt(char_run, capsys, monkeypatch):
    run, model, tok = char_run
    monkeypatch.setattr("sys.stdin", io.StringIO("the\n"))
    code, out, _ = sample(capsys, "--model", str(run), "--interactive", "-m", "6", *GREEDY)
    assert code == 0
    assert out == "> the" + greedy_text(model, tok, "the", 6) + "\n> "


def test_special_token_text_is_plain_text_unless_allowed(gpt2_run, capsys):
    base = ["--model", str(gpt2_run), "-p", "a<|endoftext|>b", "-m", "1", "--json"]
    code, out, err = sample(capsys, *base)
    assert code == 0 and 50256 not in json.loads(out)["prompt_ids"]
    assert err.startswith("gpt2lab: warning: ") and "--allow-special" in err
    code, out, err = sample(capsys, *base, "--allow-special")
    assert code == 0 and json.loads(out)["prompt_ids"][1] == 50256 and err == ""


def test_a_prompt_longer_than_the_context_is_cropped_with_a_warning(char_run, capsys):
    run, _, _ = char_run
    code, out, err = sample(capsys, "--model", str(run), "-p", "the lazy dog " * 4, "-m", "40")
    assert code == 0 and out.startswith("the lazy dog " * 4)
    assert err.count("\n") == 1 and "only its last 32 tokens" in err


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--top-p", "1.5"], "sample.top_p=1.5"),
        (["--top-p", "0"], "sample.top_p=0.0"),
        (["-m", "-1"], "sample.max_new_tokens=-1"),
        (["--stream", "--json"], "--stream and --json"),
        (["--stream", "--out", "samples"], "--stream and --out"),
        (["--lines"], "--lines needs --prompt-file"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(char_run, capsys, flags, needle):
    run, _, _ = char_run
    code, out, err = sample(capsys, "--model", str(run), *flags)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("gpt2lab: error: ") and needle in err


def test_empty_model_directory_is_a_one_line_error(tmp_path, capsys):
    code, _, err = sample(capsys, "--model", str(tmp_path), "-p", "x")
    assert code == 1 and err.count("\n") == 1 and f"{tmp_path} is empty" in err


def test_sampling_leaves_the_process_grad_mode_alone(char_run, capsys):
    run, _, _ = char_run
    assert sample(capsys, "--model", str(run), "-p", "a", "-m", "2")[0] == 0
    assert torch.is_grad_enabled()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "xpu:0"])
def test_a_bad_device_is_one_line_naming_samples_own_flag(char_run, capsys, device):
    run = char_run[0]
    code, _, err = sample(capsys, "--model", str(run), "--device", device, "-m", "2")
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert "--device" in err and "--train.device" not in err
