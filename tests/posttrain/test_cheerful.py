"""The RLHF demo's pieces: VADER labels comparisons (ties and unfinished replies skipped),
distinct n-grams, the speaker line."""

from __future__ import annotations

import pytest

from gpt2lab.posttrain import cheerful
from gpt2lab.posttrain.shakespeare import Replies


def test_distinct_n_by_hand():
    texts = ["a b a b", "a b c"]
    # unigrams: a b a b a b c -> {a, b, c} of 7; bigrams: ab ba ab ab bc -> {ab, ba, bc} of 5
    assert cheerful.distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert cheerful.distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert cheerful.distinct_n([], 2) == 0.0


def test_reply_content_drops_the_speaker_line():
    assert cheerful.reply_content("Fran.\nNay, answer me.") == "Nay, answer me."
    assert cheerful.reply_content("No speaker line here") == "No speaker line here"


def test_comparisons_prefer_the_higher_score_and_skip_ties_and_unfinished(monkeypatch):
    rounds = {
        # per speech: (text, ended) of the two samples
        0: [
            ("Ham.\nI am happy", True),
            ("Ham.\nI am sad", True),
            ("x", False),
            ("Ham.\nsame", True),
        ],
        1: [("Oph.\nI am glum", True), ("Oph.\nO joy", True), ("y", True), ("Oph.\nsame", True)],
    }

    def fake_sample(model, tok, template, speeches, seed, **kw):
        texts = [t for t, _ in rounds[seed % 2][: len(speeches)]]
        ended = [bool(e) for _, e in rounds[seed % 2][: len(speeches)]]
        return Replies([[0]] * len(speeches), [[1]] * len(speeches), texts, ended)

    monkeypatch.setattr(cheerful, "sample_replies", fake_sample)
    score = {"I am happy": 0.5, "I am glum": -0.2, "I am sad": -0.4, "O joy": 0.6, "same": 0.0}
    fn = lambda t: score.get(t, 0.0)  # noqa: E731
    got = cheerful.label_comparisons(None, None, None, ["s1", "s2", "s3", "s4"], 10, fn, passes=1)
    assert got.prompts_used == 4 and got.unended == 1 and got.ties == 1  # s3 unended, s4 tie
    assert [r["chosen"][0]["content"] for r in got.records] == ["Ham.\nI am happy", "Oph.\nO joy"]
    assert [r["rejected"][0]["content"] for r in got.records] == [
        "Oph.\nI am glum",
        "Ham.\nI am sad",
    ]
    assert got.records[0]["prompt"] == [{"role": "user", "content": "s1"}]
    # when the speeches run out, another pass samples them again, until n
    again = cheerful.label_comparisons(None, None, None, ["s1", "s2", "s3", "s4"], 3, fn)
    assert len(again.records) == 3 and again.prompts_used == 5


def test_vader_scores_cheer_above_gloom():
    pytest.importorskip("vaderSentiment")
    score = cheerful.sentiment()
    assert score("O happy day, sweet joy!") > 0.5 > -0.5 > score("Woe, grief and bitter death.")
