"""`gpt2lab chat` and `gpt2lab sample --chat`: templates, history, /reset, /system, Ctrl-C."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import pytest
from test_sample import make_run

from gpt2lab import cli
from gpt2lab.commands import chat as chat_command
from gpt2lab.config import GPTConfig
from gpt2lab.generate import Completion
from gpt2lab.tokenizer import get_tokenizer
from gpt2lab.tokenizer.chat import CHAT, CHAT_TOKENS, crop_history

FLAGS = ["--device", "cpu", "--dtype", "float32", "--seed", "0"]


@pytest.fixture(scope="module")
def chat_tok():
    tok = get_tokenizer("gpt2", special_tokens=list(CHAT_TOKENS))
    tok.chat_template = CHAT
    return tok


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, chat_tok):
    cfg = GPTConfig(block_size=64, vocab_size=chat_tok.n_vocab, n_layer=1, n_head=2, n_embd=16)
    return make_run(tmp_path_factory.mktemp("chat") / "run", cfg, chat_tok)[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    cfg = GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)
    return make_run(tmp_path_factory.mktemp("base") / "run", cfg, get_tokenizer("gpt2"))[0]


class FakeModel:
    """Records the prompt of every reply and answers with a fixed text (and the end token)."""

    def __init__(self, tok, answers):
        self.tok, self.answers, self.prompts = tok, list(answers), []

    def __call__(self, model, tok, prompts, max_new, *args, stop=(), on_text=None, **kw):
        (ids,) = prompts
        self.prompts.append(tok.decode(ids))
        text = self.answers.pop(0)
        on_text(0, text)
        return [Completion(list(ids), tok.encode_ordinary(text), text, "stop")]


def run_chat(monkeypatch, capsys, run, stdin, answers, *extra):
    fake = FakeModel(None, answers)
    monkeypatch.setattr(chat_command, "complete", fake)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(["chat", "--model", str(run), *FLAGS, *extra])
    out, err = capsys.readouterr()
    return code, out, err, fake.prompts


def test_history_reset_and_system(monkeypatch, capsys, chat_run):
    stdin = "Hello\n\nHow are you?\n/system Be brief.\nAnd?\n/reset\nBye\n"
    code, out, err, prompts = run_chat(
        monkeypatch, capsys, chat_run, stdin, ["Hi!", "Fine.", "Ok.", "Ciao."], "-m", "4"
    )
    assert code == 0, err
    assert out.count("assistant> ") == 4 and "assistant> Fine." in out
    u, a, e = "<|user|>", "<|assistant|>", "<|end|>\n"
    assert prompts == [
        f"{u}Hello{e}{a}",
        f"{u}Hello{e}{a}Hi!{e}{u}How are you?{e}{a}",
        f"<|system|>Be brief.{e}{u}Hello{e}{a}Hi!{e}{u}How are you?{e}{a}Fine.{e}{u}And?{e}{a}",
        f"<|system|>Be brief.{e}{u}Bye{e}{a}",  # /reset keeps the system message
    ]
    assert "(conversation reset)" in err and "(system message set)" in err


def test_history_is_cropped_from_the_oldest_turn(monkeypatch, capsys, chat_run):
    long = " ".join(["word"] * 12)  # 12 tokens; the context leaves 64 - 32 = 32 for the prompt
    stdin = f"{long}\nsecond {long}\nthird\n"
    code, out, err, prompts = run_chat(
        monkeypatch, capsys, chat_run, stdin, ["a", "b", "c"], "--system", "S", "-m", "32"
    )
    assert code == 0, err
    assert prompts[1].startswith("<|system|>S<|end|>\n<|user|>second")  # turn 1 left out
    assert prompts[2].startswith("<|system|>S<|end|>\n<|user|>second")
    assert "oldest 2 messages left out" in err


def test_crop_history_keeps_the_system_message_and_latest_turns(chat_tok):
    messages = [{"role": "system", "content": "Sys"}]
    for i in range(6):
        messages += [
            {"role": "user", "content": f"question {i}"},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    messages.append({"role": "user", "content": "last"})
    full = CHAT.encode(chat_tok, messages)
    kept, ids = crop_history(CHAT, chat_tok, messages, len(full) - 1)
    assert kept == messages[:1] + messages[3:]  # the oldest question and its answer went
    assert ids == CHAT.encode(chat_tok, kept) and len(ids) <= len(full) - 1
    kept, _ = crop_history(CHAT, chat_tok, messages, 8)
    assert kept == [{"role": "user", "content": "last"}]  # the system message goes last
    with pytest.raises(Exception, match="more than the 2 the context leaves"):
        crop_history(CHAT, chat_tok, messages, 2)


def test_plain_template_on_a_base_model(monkeypatch, capsys, base_run):
    code, out, err, prompts = run_chat(
        monkeypatch, capsys, base_run, "Hi\n", [" Hello there"], "--template", "plain"
    )
    assert code == 0, err
    assert prompts == ["User: Hi\n\nAssistant:"]
    assert "assistant> Hello there\n" in out  # the template's leading space is not shown


def test_model_without_template_is_one_line_error(monkeypatch, capsys, base_run):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert cli.main(["chat", "--model", str(base_run), *FLAGS]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no chat template" in err and "--template plain" in err


def _env():
    src = os.path.join(os.path.dirname(cli.__file__), "..")
    return {**os.environ, "PYTHONPATH": os.path.abspath(src), "GPT2LAB_DEBUG": "0"}


def test_real_model_streams_replies(monkeypatch, capsys, chat_run):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/reset\nWho are you?\n/quit\nnot read\n"))
    assert cli.main(["chat", "--model", str(chat_run), *FLAGS, "-m", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2 and "<|end|>" not in out


def test_ctrl_c_leaves_cleanly(chat_run):
    cmd = [sys.executable, "-m", "gpt2lab", "chat", "--model", str(chat_run), *FLAGS]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert "chatting with" in proc.stderr.readline()  # loaded, waiting for the first line
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err


def test_sample_chat_file(tmp_path, capsys, chat_run, chat_tok):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Who are you?"},
    ]
    (tmp_path / "conv.json").write_text(json.dumps({"messages": conv}))
    argv = ["sample", "--model", str(chat_run), "--chat", str(tmp_path / "conv.json"), *FLAGS]
    assert cli.main([*argv, "-m", "6", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["prompt"] == CHAT.render(conv) and rec["prompt_ids"] == CHAT.encode(chat_tok, conv)
    assert "<|end|>" not in rec["text"]
    assert cli.main([*argv, "-m", "6"]) == 0
    assert capsys.readouterr().out == rec["text"] + "\n"  # the reply only
    (tmp_path / "bad.json").write_text(json.dumps([{"role": "user"}]))
    bad = ["sample", "--model", str(chat_run), "--chat", str(tmp_path / "bad.json"), *FLAGS]
    assert cli.main(bad) == 1
    assert "message 0 (user) has no 'content'" in capsys.readouterr().err
