"""Our DPO loss against trl's own: `trl.DPOTrainer.compute_loss` on the same pairs and weights.

trl 1.x computes its loss in a public Trainer method, `compute_loss(model, inputs)`, on the
batches its own collator builds from the pairs it tokenized itself (prompt, chosen + EOS,
rejected + EOS). We take trl's token ids as they are, lay them out as our `Pair`s, and compare
our `preference_loss` over our `sequence_logps` (our GPT, loaded with the same random weights)
with trl's number, and the gradients of both models. trl's IPO divides each log-ratio by the
reply's length (a choice trl made with the IPO authors); ours is Azar et al.'s eq. 17 on summed
log-probabilities as documented, so only sigmoid and hinge are compared.
"""

from __future__ import annotations

import pytest
import torch

from gpt2lab.checkpoint.hf import from_hf_state, write_hf_tokenizer
from gpt2lab.config import GPTConfig
from gpt2lab.model import GPT
from gpt2lab.posttrain.batching import Example
from gpt2lab.posttrain.dpo import Pair, pair_batch, preference_loss, sequence_logps
from gpt2lab.tokenizer import get_tokenizer

pytestmark = pytest.mark.interop

PAIRS = [
    ("Ber.\nWho's there?\n\n", "Fran.\nNay, answer me: stand, and unfold yourself.", "Fran.\nNo."),
    ("Ham.\nWhat hour now?\n\n", "Hor.\nI think it lacks of twelve.", "Hor.\nIt is cold."),
    ("Mar.\nPeace, break thee off!\n\n", "Ber.\nIn the same figure, like the king?", "Ber.\nAy."),
    ("Hor.\nWhat art thou?\n\n", "Ghost.\nMark me.", "Ghost.\nI am thy father's spirit, doom'd."),
]


def gpt2_shaped(seed: int, vocab: int):
    """A small transformers GPT-2 over GPT-2's vocabulary and our GPT with its weights."""
    tf = pytest.importorskip("transformers")
    hf_cfg = tf.GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    hf = tf.GPT2LMHeadModel(hf_cfg)
    cfg = GPTConfig(block_size=64, vocab_size=vocab, n_layer=2, n_head=4, n_embd=32)
    ours = GPT(cfg)
    ours.load_state_dict(from_hf_state(hf.state_dict(), cfg), strict=False)
    return ours, hf


@pytest.mark.parametrize("kind, beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("hinge", 0.3)])
def test_our_dpo_loss_and_gradient_equal_trl_dpotrainer_compute_loss(tmp_path, kind, beta):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tf = pytest.importorskip("transformers")
    tok_dir = tmp_path / "tok"
    gpt2 = get_tokenizer("gpt2")
    write_hf_tokenizer(gpt2, tok_dir)
    hf_tok = tf.AutoTokenizer.from_pretrained(tok_dir)
    hf_tok.pad_token = hf_tok.eos_token
    ours, hf = gpt2_shaped(3, gpt2.n_vocab)
    ref_ours, ref_hf = gpt2_shaped(4, gpt2.n_vocab)  # another model as the reference
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        loss_type=[kind],
        precompute_ref_log_probs=False,
        use_cpu=True,
        bf16=False,  # trl's default would wrap the reference's forward in bfloat16 autocast
        fp16=False,
        report_to=[],
        max_length=None,
        dataset_num_proc=None,
    )
    trainer = trl.DPOTrainer(
        model=hf,
        ref_model=ref_hf,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=hf_tok,
    )
    data = [trainer.train_dataset[i] for i in range(len(rows))]
    inputs = trainer.data_collator(data)
    trainer.model.train()
    want = trainer.compute_loss(trainer.model, inputs)
    want.backward()

    def example(prompt: list[int], reply: list[int]) -> Example:
        return Example(tuple(prompt + reply), (False,) * len(prompt) + (True,) * len(reply))

    pairs = [
        Pair(example(d["prompt_ids"], d["chosen_ids"]), example(d["prompt_ids"], d["rejected_ids"]))
        for d in data
    ]
    assert all(d["chosen_ids"][-1] == gpt2.eot_token for d in data)  # trl's EOS closes a reply
    batch = pair_batch(pairs)
    ours.train()
    lp = sequence_logps(ours, batch)
    with torch.no_grad():
        ref = sequence_logps(ref_ours.eval(), batch)
    n = len(pairs)
    got, _ = preference_loss(lp[:n], lp[n:], ref[:n], ref[n:], beta, kind)
    got.backward()
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    assert got.item() > 0.05  # the two models differ: not the trivial log 2 or 1
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    for name, p in ours.named_parameters():
        w = hf_grads["transformer.wte.weight" if name == "lm_head.weight" else name]
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            w = w.t()
        g = p.grad[: w.size(0)]  # our embedding may have padding rows past the vocabulary
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=name)
