"""Each task on tiny hand-made files with known answers; WikiText's protocol on real lines."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gpt2lab.eval import tasks
from gpt2lab.eval.detok import wikitext_detokenize
from gpt2lab.eval.scoring import as_logits_fn

FAVOURITE = 10.0  # logit of " dog" in the unigram model below; every other token has 0


@pytest.fixture(scope="module")
def unigram(gpt2_enc):
    """A model that ignores its context: p(" dog") = e^10 / Z, every other token 1 / Z."""
    (dog,) = gpt2_enc.encode_ordinary(" dog")
    w = torch.zeros(gpt2_enc.n_vocab)
    w[dog] = FAVOURITE
    logz = torch.logsumexp(w, 0).item()

    def fn(idx):
        return w.expand(idx.shape[0], idx.shape[1], -1)

    def logprob(text):  # what the model gives a text's tokens, written out by hand
        return sum(w[t].item() - logz for t in gpt2_enc.encode_ordinary(text))

    return as_logits_fn(fn), logprob


def settings(context=32, stride=16, **kw):
    return tasks.Settings(context=context, stride=stride, batch_size=3, **kw)


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_perplexity_counts_every_token_bytes_and_characters(tmp_path, gpt2_enc, unigram):
    fn, logprob = unigram
    text = "A dog, a dog — and a café.\nThe dog sleeps.\n"
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    m = tasks.perplexity(fn, gpt2_enc, path, settings(context=4, stride=3))
    n_tokens = len(gpt2_enc.encode_ordinary(text))
    assert m["tokens"] == n_tokens and m["bytes"] == len(text.encode()) and m["chars"] == len(text)
    assert m["loss"] == pytest.approx(-logprob(text) / n_tokens, rel=1e-6)
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert m["bits_per_byte"] == pytest.approx(-logprob(text) / math.log(2) / m["bytes"], rel=1e-6)
    assert m["bits_per_char"] > m["bits_per_byte"]  # é and — are several bytes each


def test_lambada_accuracy_and_last_word_perplexity(tmp_path, gpt2_enc, unigram):
    fn, logprob = unigram
    texts = ["I walked my dog", "The sky is so blue", "After dinner she fed the dog"]
    path = _write(tmp_path, "lambada.jsonl", [json.dumps({"text": t}) for t in texts])
    m = tasks.lambada(fn, gpt2_enc, path, settings())
    assert m["accuracy"] == pytest.approx(2 / 3) and m["examples"] == 3
    nll = -(2 * logprob(" dog") + logprob(" blue"))
    assert m["perplexity"] == pytest.approx(math.exp(nll / 3), rel=1e-5)
    assert tasks.lambada(fn, gpt2_enc, path, settings(limit=2))["accuracy"] == 0.5


def _cbt_record(query: str, answer: str, candidates: str) -> list[str]:
    story = [f"{i} Line {i} of the story , where `` nothing '' happens ." for i in range(1, 21)]
    return [*story, f"21 {query}\t{answer}\t\t{candidates}", ""]


def test_cbt_picks_the_most_probable_sentence(tmp_path, gpt2_enc, unigram):
    fn, _ = unigram
    lines = [
        *_cbt_record("`` Look , XXXXX , '' said Tom .", "dog", "cat|dog|hen|pig"),  # right
        *_cbt_record("Then the XXXXX ran home .", "cat", "cat|dog|hen|pig"),  # dog wins: wrong
        *_cbt_record("The XXXXX sat with the XXXXX .", "hen", "cat|hen|elephant"),  # no dog
    ]
    path = _write(tmp_path, "cbtest_CN_test_2500ex.txt", lines)
    m = tasks.cbt(fn, gpt2_enc, path, settings(context=64))
    # third: every candidate token has the same probability, so the fewest tokens win: cat or
    # hen (one token each, cat first); the answer is hen, so it is wrong too
    assert m == {"accuracy": pytest.approx(1 / 3), "examples": 3}


def test_hellaswag_accuracy_and_length_normalised_accuracy(tmp_path, gpt2_enc, unigram):
    fn, logprob = unigram
    short, long = "cat", "dog dog dog cat cat"  # short: higher total, long: higher per token
    assert logprob(" " + short) > logprob(" " + long)
    assert logprob(" " + short) / 1 < logprob(" " + long) / 5
    items = [
        {"ctx": "A man is", "endings": [short, long, "the cat", "cat cat"], "label": 0},
        {"ctx": "A man is", "endings": ["dog", "cat", "cat cat", "the cat"], "label": 0},
        {"ctx": "He", "endings": ["cat", "dog", "cat cat", "the cat"], "label": 0},
    ]
    path = _write(tmp_path, "hellaswag_val.jsonl", [json.dumps(x) for x in items])
    m = tasks.hellaswag(fn, gpt2_enc, path, settings())
    assert m == {"acc": pytest.approx(2 / 3), "acc_norm": pytest.approx(1 / 3), "examples": 3}


def test_text8_and_enwik8_use_the_last_5m_and_their_units(tmp_path, gpt2_enc, unigram, monkeypatch):
    fn, logprob = unigram
    from gpt2lab.eval import datasets

    monkeypatch.setattr(datasets, "TEST_SPLIT_BYTES", 20)
    text8 = tmp_path / "text8"
    text8.write_bytes(b"anarchism originated as a term of abuse first used")
    m = tasks.text8(fn, gpt2_enc, text8, settings())
    tail = "a term of abuse first used"[-20:]
    assert m["chars"] == 20 and m["bits_per_char"] == pytest.approx(
        -logprob(tail) / math.log(2) / 20, rel=1e-6
    )
    enwik8 = tmp_path / "enwik8"
    enwik8.write_bytes("<page><title>Zürich</title> [[dog]]</page>".encode())
    m = tasks.enwik8(fn, gpt2_enc, enwik8, settings())
    assert m["bytes"] == 20 and m["tokens"] > 0


def test_wikitext_protocol_on_real_lines(tmp_path, shared_data, gpt2_enc, hf_model, hf_window_nll):
    real = (shared_data / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")
    lines = real.split("\n")[:12]
    path = _write(tmp_path, "wiki.test.tokens", lines)
    m = tasks.wikitext(as_logits_fn(hf_model), gpt2_enc, path, settings(context=48, stride=48))
    # reference: transformers' loss over 48-token windows scoring disjoint 48-token chunks of the
    # de-tokenized text (the last window keeps a full context)
    text = "\n".join(wikitext_detokenize(line) for line in lines) + "\n"
    ids = [gpt2_enc.eot_token, *gpt2_enc.encode_ordinary(text)]
    ends = [*range(48, len(ids) - 1, 48), len(ids) - 1]
    nll = sum(hf_window_nll(ids, max(0, e - 48), e, e - p) for p, e in zip([0, *ends], ends))
    words = sum(len(line.split()) + 1 for line in lines)
    assert m["words"] == words and m["tokens"] == len(ids) - 1
    assert m["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-4)
    assert m["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-4)
