"""SFT's masked loss and DPO's loss and gradient against transformers' GPT-2 (independent code).

The same random weights sit in our GPT and in `transformers.GPT2LMHeadModel`; the references
are transformers' own loss with labels -100 (SFT) and the DPO paper's formula evaluated on
transformers' log-probabilities (DPO), its gradient from transformers' autograd.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from gpt2lab.checkpoint.hf import from_hf_state
from gpt2lab.config import GPTConfig
from gpt2lab.model import GPT
from gpt2lab.posttrain.batching import Example, pack, packed_batch, pad_batch
from gpt2lab.posttrain.dpo import Pair, pair_batch, preference_loss, sequence_logps
from gpt2lab.posttrain.sft import masked_loss

tf = pytest.importorskip("transformers")
V, BLOCK = 101, 48


def twins(seed: int = 0):
    """Our GPT and transformers' GPT2LMHeadModel with the same random weights (float32)."""
    hf_cfg = tf.GPT2Config(
        vocab_size=V,
        n_positions=BLOCK,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    hf = tf.GPT2LMHeadModel(hf_cfg).eval()
    cfg = GPTConfig(block_size=BLOCK, vocab_size=V, n_layer=2, n_head=4, n_embd=32)
    ours = GPT(cfg).eval()
    ours.load_state_dict(from_hf_state(hf.state_dict(), cfg), strict=False)
    return ours, hf


def examples(n: int, seed: int, lo: int = 4, hi: int = 20) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, c = rng.randint(1, hi // 2), rng.randint(1, hi // 2)
        ids = [rng.randrange(V) for _ in range(max(lo, p + c))]
        learn = [False] * (len(ids) - c) + [True] * c
        out.append(Example(tuple(ids), tuple(learn)))
    return out


def hf_labels_loss(hf, batch: list[Example]) -> torch.Tensor:
    """transformers' loss: right-padded input_ids, attention_mask, labels -100 where masked."""
    L = max(len(e.ids) for e in batch)
    ids = torch.zeros(len(batch), L, dtype=torch.long)
    att = torch.zeros(len(batch), L, dtype=torch.long)
    labels = torch.full((len(batch), L), -100)
    for i, e in enumerate(batch):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        att[i, : len(e.ids)] = 1
        labels[i, : len(e.ids)] = torch.tensor([t if f else -100 for t, f in zip(e.ids, e.learn)])
    return hf(input_ids=ids, attention_mask=att, labels=labels).loss


def test_masked_sft_loss_equals_transformers_labels_minus_100():
    ours, hf = twins()
    batch = examples(6, seed=1)
    with torch.no_grad():
        got = masked_loss(ours, pad_batch(batch))
        want = hf_labels_loss(hf, batch)
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    assert math.isfinite(got.item()) and got.item() > 1.0


def test_packed_rows_give_each_example_its_unpacked_loss():
    """Block-diagonal attention and restarted positions: packing changes nothing per token."""
    ours, hf = twins()
    batch = examples(9, seed=2, hi=16)
    rows = pack(batch, BLOCK, range(len(batch)))
    assert len(rows) < len(batch)  # something was packed together
    packed = packed_batch([[batch[i] for i in row] for row in rows], BLOCK)
    with torch.no_grad():
        got = masked_loss(ours, packed)
        # transformers scores each example alone; the token-weighted mean is the packed loss
        n = [e.n_learned for e in batch]
        each = [hf_labels_loss(hf, [e]).item() for e in batch]
    want = sum(a * b for a, b in zip(n, each)) / sum(n)
    assert got.item() == pytest.approx(want, abs=1e-5)


def hf_reply_logps(hf, batch: list[Example]) -> torch.Tensor:
    """Summed log-probabilities of the learned tokens, from transformers' logits."""
    L = max(len(e.ids) for e in batch)
    ids = torch.zeros(len(batch), L, dtype=torch.long)
    att = torch.zeros(len(batch), L, dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        att[i, : len(e.ids)] = 1
    logp = hf(input_ids=ids, attention_mask=att).logits.float().log_softmax(-1)
    out = []
    for i, e in enumerate(batch):
        s = sum(logp[i, t - 1, e.ids[t]] for t in range(1, len(e.ids)) if e.learn[t])
        out.append(s)
    return torch.stack(out)


def paper_loss(pc, pr, rc, rr, beta, kind):
    """Rafailov et al. 2023 eq. 7 (sigmoid); Azar et al. 2023 eq. 17 (ipo); SLiC hinge."""
    h = (pc - rc) - (pr - rr)
    if kind == "sigmoid":
        return -torch.log(torch.sigmoid(beta * h)).mean()
    if kind == "ipo":
        return ((h - 1 / (2 * beta)) ** 2).mean()
    return torch.clamp(1 - beta * h, min=0).mean()


def hf_grads(hf, ours) -> dict[str, torch.Tensor]:
    """transformers' gradients under our parameter names and layouts."""
    out = {}
    grads = {k: p.grad for k, p in hf.named_parameters()}
    for name, _p in ours.named_parameters():
        g = grads["transformer.wte.weight" if name == "lm_head.weight" else name]
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            g = g.t()
        out[name] = g
    return out


@pytest.mark.parametrize(
    "kind, beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("hinge", 0.3)]
)
def test_dpo_loss_and_gradient_equal_the_paper_formula_on_transformers_logprobs(kind, beta):
    ours, hf = twins(seed=3)
    ref_model = twins(seed=4)[1]  # another model as the reference
    chosen, rejected = examples(5, seed=5), examples(5, seed=6)
    pairs = [Pair(c, r) for c, r in zip(chosen, rejected)]
    with torch.no_grad():
        rc, rr = hf_reply_logps(ref_model, chosen), hf_reply_logps(ref_model, rejected)
    # ours: one forward over chosen + rejected rows, the cached reference log-probs
    lp = sequence_logps(ours, pair_batch(pairs))
    loss, stats = preference_loss(lp[:5], lp[5:], rc, rr, beta, kind)
    loss.backward()
    # the reference: transformers' log-probabilities in the paper's formula
    pc, pr = hf_reply_logps(hf, chosen), hf_reply_logps(hf, rejected)
    want = paper_loss(pc, pr, rc, rr, beta, kind)
    want.backward()
    # float32 sums: 1e-5 absolute, or relative for IPO's squares of ~8 nats
    assert loss.item() == pytest.approx(want.item(), abs=1e-5, rel=1e-6)
    assert lp[:5].detach() == pytest.approx(pc.detach(), abs=1e-4)
    ref_grads = hf_grads(hf, ours)
    for name, p in ours.named_parameters():
        g, w = p.grad, ref_grads[name]
        if name == "transformer.wte.weight":
            g = g[:V]
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=name)
    rewards_c, rewards_r = beta * (pc - rc), beta * (pr - rr)
    assert stats["reward_accuracy"].item() == pytest.approx((rewards_c > rewards_r).float().mean())
    assert stats["reward_margin"].item() == pytest.approx(
        (rewards_c - rewards_r).mean().item(), abs=1e-5
    )


def test_the_sigmoid_loss_is_log_2_when_policy_equals_reference():
    x = torch.randn(4)
    loss, stats = preference_loss(x, x + 1, x, x + 1, 0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert stats["reward_margin"].item() == 0 and stats["kl"].item() == 0
    assert F.logsigmoid(torch.zeros(1)).item() == pytest.approx(-math.log(2))
