"""The post-training demo: the chat set from the plays, the preference rule, the command."""

from __future__ import annotations

from gpt2lab import cli
from gpt2lab.posttrain.shakespeare import HELD_OUT, asks, parse_works


def test_the_chat_set_pairs_each_speech_with_its_reply_and_holds_out_whole_plays(okf_text, chats):
    works = {w.title: w for w in parse_works(okf_text)}
    hamlet = works["HAMLET, PRINCE OF DENMARK"].exchanges
    assert hamlet[0] == ("Ber.\nWho's there?", "Fran.\nNay, answer me: stand, and unfold yourself.")
    assert hamlet[1][0] == hamlet[0][1]  # every speech answers the one before it
    assert len(chats.train) > 5000 and len(chats.test) > 500
    held = {
        r["messages"][0]["content"] for t in HELD_OUT for r in chats.test
    }  # nothing of a held-out play is in the train set
    assert not held & {r["messages"][0]["content"] for r in chats.train}
    for r in chats.train[:50] + chats.test[:50]:
        user, reply = r["messages"]
        assert (user["role"], reply["role"]) == ("user", "assistant")
        assert reply["content"].split("\n")[0].endswith(".")  # the speaker's name
        assert "[" not in reply["content"]  # no stage directions
        assert len(user["content"]) + len(reply["content"]) <= 120
    assert asks("Fran.\nWho is there? ") and not asks("Fran.\nStand, ho!")


def test_the_demo_command_measures_sft_and_explains_missing_pairs(
    tmp_path, base_run, shared_data, capsys
):
    """A 12-step base model learns no replies: SFT runs and is measured, then the pairs step
    stops with a one-line error saying why (the full demo's figures are in README.md)."""
    out = tmp_path / "demo"
    argv = [
        "posttrain-demo",
        "--model",
        str(base_run),
        "--input",
        str(shared_data / "shakespeare_okf"),
        "--out",
        str(out),
        "--sft-minutes",
        "0.05",
        "--pair-prompts",
        "100",
        "--samples",
        "20",
        "--no-progress",
    ]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "== 2/4 SFT" in err and "== 3/4 preference pairs" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("gpt2lab: error: the SFT model") and "--sft-minutes" in last
    assert (out / "sft" / "tokenizer" / "chat_template.json").is_file()
    assert not (out / "dpo").exists()
