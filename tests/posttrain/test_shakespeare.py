"""The post-training demo: the chat set from the plays, the preference rule, the command."""

from __future__ import annotations

import torch

from gpt2lab import cli
from gpt2lab.config import GPTConfig, resolve
from gpt2lab.model import GPT
from gpt2lab.posttrain.common import start_model
from gpt2lab.posttrain.shakespeare import (
    HELD_OUT,
    asks,
    excerpt,
    parse_works,
    reply_logps,
    sample_replies,
)


def test_a_reply_longer_than_the_context_leaves_is_scored_after_the_prompts_last_tokens():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16)).eval()
    prompt, reply = list(range(1, 13)), [20, 21, 22, 23, 24, 25, 26]  # 12 + 7 > 16
    lp = reply_logps(model, [prompt, prompt[:4]], [reply, reply])
    cropped = reply_logps(model, [prompt[3:]], [reply])  # the last 9 of the prompt fit
    assert torch.allclose(lp[0], cropped[0]) and not torch.allclose(lp[0], lp[1])
    with torch.no_grad():  # the summed log-probability of the reply tokens, by hand
        logp = model(torch.tensor([prompt[3:] + reply]))[0].float().log_softmax(-1)[0]
    assert torch.allclose(lp[0], sum(logp[8 + i, t] for i, t in enumerate(reply)), atol=1e-5)


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
    # SFT also learns the longer exchanges of the training plays, the speech cut to its last
    # words so that the exchange fits as the test exchanges do
    assert len(chats.sft_train) > 1.5 * len(chats.train)
    assert all(r in chats.sft_train for r in chats.train[:100])
    speeches = {r["messages"][0]["content"] for r in chats.train}
    originals = [s for w in works.values() for s, _ in w.exchanges]
    for r in chats.sft_train[::200]:
        user, reply = (m["content"] for m in r["messages"])
        assert len(user) + len(reply) <= 120 and user not in held
        name, _, words = user.partition("\n")
        assert name.endswith(".")
        if user not in speeches:  # an excerpt: a speech's name and last words
            assert len(words) >= 12
            assert any(o.startswith(name + "\n") and o.endswith(words) for o in originals)
    assert (
        excerpt("Ham.\nO that this too too solid flesh would melt", 25) == "Ham.\nflesh would melt"
    )
    assert excerpt("Ham.\nO that this too too solid flesh would melt", 16) is None


def test_every_sampled_reply_may_run_to_max_new_tokens_whatever_its_prompt(base_run):
    """Neither a long prompt in the same call nor the prompt's own length cuts a reply short (the
    window slides past the context): a model that never closes its turn writes max_new_tokens
    for each."""
    cfg = resolve("sft", None, [f"train.init_from={base_run}", "sft.template=chat"])
    start = start_model(cfg, "chat", "sft")
    model = GPT(start.cfg.model)
    model.load_state_dict(start.weights)
    tok = start.tokenizer
    limit = min(tok.special_tokens.values())
    assert limit > 60  # the control tokens come after the characters

    class NeverEnds:  # the sampler draws ids below n_vocab: no control token, no reply ends
        n_vocab = limit

        def __getattr__(self, name):
            return getattr(tok, name)

    speeches = [
        "Ham.\nAy.",
        "Hor.\n" + "So have I heard, and do in part believe it. " * 2,
        "A.\nNo.",
    ]
    r = sample_replies(model, NeverEnds(), start.template, speeches, seed=0, max_new_tokens=90)
    assert len(r.prompts[1]) + 90 > model.config.block_size  # this one slides
    assert [len(ids) for ids in r.ids] == [90, 90, 90] and not any(r.ended)
    again = sample_replies(model, NeverEnds(), start.template, speeches, seed=0, max_new_tokens=90)
    assert again.texts == r.texts  # seeded


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
        "--dpo-epochs",
        "1",
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


def test_question_pairs_prefer_a_short_question_over_a_long_other_reply():
    from gpt2lab.posttrain.shakespeare import question_pair

    replies = [
        ("A.\nWill you go?", True),
        ("B.\nNo.", True),
        ("C.\nGo where, and when, and why?", True),
        ("D.\nI will not go, for the night is cold.", True),
        ("E.\nWhat, and run on past the room", False),  # not closed: takes no part
        ("F.\nThis one never ends and never asks anything at all", False),
        ("  ", True),  # empty: takes no part
    ]
    assert question_pair(replies) == (
        "A.\nWill you go?",
        "D.\nI will not go, for the night is cold.",
    )
    assert question_pair(replies, brevity=False) == ("A.\nWill you go?", "B.\nNo.")
    assert question_pair(replies[:1] + replies[4:]) is None  # no closed reply without '?'
    assert question_pair([("X.\nWhy?", False), ("Y.\nBecause.", True)]) is None
