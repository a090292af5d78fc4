"""Rollouts end where the sampler ended them, and are scored there: at a stop token, at the reply
length, or where the model's context runs out."""

from __future__ import annotations

import torch

from gpt2lab.config import GPTConfig
from gpt2lab.model import GPT
from gpt2lab.posttrain.ppo import token_rewards
from gpt2lab.posttrain.reward import RewardModel
from gpt2lab.posttrain.rlhf import Scorer
from gpt2lab.posttrain.rollout import sample, score_tokens

V, EOT, END = 12, 10, 11  # a tiny vocabulary with two stop tokens: <|endoftext|> and <|end|>


def policy(block_size: int = 32, stop_bias: float = 0.0) -> GPT:
    """A random tiny GPT whose stop tokens get `stop_bias` more logit everywhere."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=V, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        # ln_f's bias alone makes the features; a stop token's embedding row aligned with it
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight[:V].normal_(0, 0.01)
        model.transformer.wte.weight[EOT] += stop_bias / 16
        model.transformer.wte.weight[END] += stop_bias / 16
    return model.eval()


def test_replies_end_at_their_first_stop_token_and_are_scored_there():
    model = policy(stop_bias=1.2)  # about one token in five is a stop token
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [2, 2]] * 4
    torch.manual_seed(1)
    batch = sample(model, prompts, max_new_tokens=20, stop_ids=[EOT, END], pad_id=EOT)
    rm = RewardModel(model.config, pad_token_id=0)
    seen_ends = set()
    for row in range(len(prompts)):
        prompt, reply = batch.ids(row)
        assert prompt == prompts[row]
        stops = [i for i, t in enumerate(reply) if t in (EOT, END)]
        if batch.finish[row] == "stop":
            assert stops == [len(reply) - 1]  # ends at its first stop token, which it keeps
            seen_ends.add(reply[-1])
        else:
            assert batch.finish[row] == "length" and not stops and len(reply) == 20
    assert seen_ends == {EOT, END}  # both stop tokens ended some reply
    lengths = batch.response_mask.sum(1)
    assert len(set(lengths.tolist())) > 2  # replies of different lengths in one batch
    # the reward model reads each whole sequence, up to and including where it ended
    scores = Scorer(rm=rm)(batch, [""] * len(prompts), [""] * len(prompts))
    want = torch.tensor(rm.score_ids([sum(batch.ids(r), []) for r in range(len(prompts))]))
    torch.testing.assert_close(scores, want)
    for row in range(len(prompts)):
        alone = rm.score_ids([prompts[row] + batch.ids(row)[1]])[0]
        assert abs(scores[row].item() - alone) < 1e-5
    # and the score sits on the reply's last real token
    r = token_rewards(scores, torch.zeros(batch.response.shape), 0.1, batch.response_mask)
    for row, n in enumerate(lengths.tolist()):
        assert r[row, n - 1] == scores[row] and (r[row, n:] == 0).all()


def test_a_reply_cut_by_the_context_ends_at_the_last_position_and_is_scored_there():
    model = policy(block_size=12, stop_bias=-20.0)  # never stops on its own
    prompts = [[1, 2, 3, 4, 5, 6, 7], [3, 3, 3, 3, 3, 3, 3]]
    batch = sample(model, prompts, max_new_tokens=50, stop_ids=[EOT, END], pad_id=EOT)
    assert batch.finish == ["context", "context"]
    assert batch.response_mask.sum(1).tolist() == [5, 5]  # 7 + 5 = the context of 12
    logp, ent, values = score_tokens(model, batch, torch.nn.Linear(16, 1))
    assert logp.shape == ent.shape == values.shape == (2, 5)
    # the log-probabilities are the model's own for those tokens, in full context
    ids = torch.cat([batch.query, batch.response], 1)
    with torch.no_grad():
        logits, _ = model(ids)
    want = torch.log_softmax(logits[:, 6:11], -1).gather(-1, batch.response[..., None])[..., 0]
    torch.testing.assert_close(logp.detach(), want, atol=1e-5, rtol=0)
    r = token_rewards(torch.tensor([1.0, 2.0]), torch.zeros(2, 5), 0.1, batch.response_mask)
    assert r[:, -1].tolist() == [1.0, 2.0]


def test_a_long_prompt_keeps_room_for_one_token():
    model = policy(block_size=8, stop_bias=-20.0)
    batch = sample(model, [list(range(1, 10)) * 2], max_new_tokens=5, stop_ids=[EOT])
    prompt, reply = batch.ids(0)
    assert len(prompt) == 7 and len(reply) == 1 and batch.finish == ["context"]


def test_prompts_of_very_different_lengths_each_get_their_own_room():
    model = policy(block_size=32, stop_bias=-20.0)
    prompts = [[1] * 20, [2, 3], [4] * 19]  # 2 and ~20 tokens: two batches (spread > 32 / 8)
    batch = sample(model, prompts, max_new_tokens=40, stop_ids=[EOT, END], pad_id=EOT)
    assert batch.response_mask.sum(1).tolist() == [12, 30, 12]  # 19 and 20 share a batch
    assert batch.finish == ["context"] * 3
    for row, p in enumerate(prompts):
        assert batch.ids(row)[0] == p
    # the merged batch scores like each row alone
    logp, _, _ = score_tokens(model, batch)
    for row, p in enumerate(prompts):
        reply = batch.ids(row)[1]
        with torch.no_grad():
            logits, _ = model(torch.tensor([p + reply]))
        lp = torch.log_softmax(logits[0, len(p) - 1 : -1], -1)
        want = lp.gather(-1, torch.tensor(reply)[:, None])[:, 0]
        torch.testing.assert_close(logp[row, : len(reply)].detach(), want, atol=1e-5, rtol=0)
