"""The reward model against transformers' GPT2ForSequenceClassification: same weights, score."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2lab import cli
from gpt2lab.checkpoint import native
from gpt2lab.config import Config, GPTConfig, to_dict
from gpt2lab.posttrain.reward import RewardModel, bradley_terry, load_reward_model

transformers = pytest.importorskip("transformers")

PAD = 96


def write_rm(path, rm: RewardModel) -> None:
    state = {
        "config": to_dict(Config(model=rm.config)),
        "reward_model": {"pad_token_id": rm.pad_token_id},
    }
    native.save_checkpoint(path, 1, rm.weights(), {}, state)


@pytest.fixture
def rm_dir(tmp_path):
    torch.manual_seed(0)
    # vocabulary padded to 128 rows: the export must cut the padding
    cfg = GPTConfig(block_size=24, vocab_size=97, n_layer=2, n_head=2, n_embd=32, pad_vocab_to=64)
    rm = RewardModel(cfg, PAD)
    with torch.no_grad():
        rm.score.weight.normal_()  # a head that matters
    write_rm(tmp_path / "rm", rm)
    return tmp_path / "rm"


def test_score_equals_transformers_sequence_classification(rm_dir, tmp_path, capsys):
    assert cli.main(["convert", str(rm_dir), str(tmp_path / "hf")]) == 0
    assert "GPT2ForSequenceClassification" in capsys.readouterr().out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    assert config["pad_token_id"] == PAD
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.num_labels == 1

    g = torch.Generator().manual_seed(1)
    lengths = [5, 24, 1, 13, 9]
    seqs = [torch.randint(0, PAD, (n,), generator=g).tolist() for n in lengths]
    seqs.append(seqs[0] + [PAD, PAD])  # trailing pad ids are not read: scored like seqs[0]
    ours = load_reward_model(rm_dir)

    # transformers, one sequence at a time and as one right-padded batch
    one_by_one = []
    for s in seqs:
        with torch.no_grad():
            one_by_one.append(hf(torch.tensor([s])).logits[0, 0].item())
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        batched = hf(ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(batched, torch.tensor(one_by_one), atol=1e-5, rtol=0)

    # ours: left-padded batches of 4 (positions count real tokens), and right-padded by hand
    got = torch.tensor(ours.score_ids(seqs, batch_size=4))
    torch.testing.assert_close(got, torch.tensor(one_by_one), atol=1e-5, rtol=0)
    with torch.no_grad():
        right = ours(ids, mask)
    torch.testing.assert_close(right, batched, atol=1e-5, rtol=0)
    assert got[-1].item() == pytest.approx(got[0].item(), abs=1e-6)


def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    loss, acc = bradley_terry(chosen, rejected)
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(-1) = log(1 + e)
    want = torch.log1p(torch.exp(torch.tensor(-1.0))) + torch.log1p(torch.exp(torch.tensor(1.0)))
    assert loss.item() == pytest.approx(want.item() / 2)
    assert acc.item() == 0.5


def test_a_plain_model_is_not_a_reward_model(tmp_path, capsys):
    assert cli.main(["reward", "score", "--model", str(tmp_path)]) in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reward" in err[0]
