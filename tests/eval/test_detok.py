"""De-tokenizers on real lines of ../shared/data (wikitext2, ptb) and the published word counts."""

from __future__ import annotations

import re

import pytest

from gpt2lab.eval.datasets import read_tokenized, word_count
from gpt2lab.eval.detok import cbt_detokenize, ptb_detokenize, wikitext_detokenize


@pytest.fixture(scope="module")
def wiki_lines(shared_data):
    return read_tokenized(shared_data / "wikitext2" / "wiki.valid.tokens", "WikiText")


@pytest.fixture(scope="module")
def ptb_lines(shared_data):
    return read_tokenized(shared_data / "ptb" / "ptb.valid.txt", "PTB")


def _line(lines, start):
    return next(line for line in lines if line.startswith(start))


def test_wikitext_lines_by_hand(wiki_lines):
    assert wikitext_detokenize(_line(wiki_lines, " = Homarus")) == "= Homarus gammarus ="
    assert wikitext_detokenize(_line(wiki_lines, " = = Description")) == "== Description =="
    assert wikitext_detokenize(_line(wiki_lines, " The spines on the claws")) == (
        "The spines on the claws of H. americanus are red or red-tipped, while those of "
        "H. gammarus are white or white-tipped."
    )
    para = wikitext_detokenize(_line(wiki_lines, " Homarus gammarus is a large"))
    assert para.startswith(
        "Homarus gammarus is a large <unk>, with a body length up to 60 centimetres (24 in) and"
    )
    assert "weigh 0.7 – 2.2 kg (1.5 – 4.9 lb). Like" in para
    assert "part in the RAAF's first Long" in wikitext_detokenize(
        _line(wiki_lines, " <unk> completed a flying")
    )
    assert wikitext_detokenize(' he said " lobster red " ;') == 'he said "lobster red";'
    assert wikitext_detokenize(" 1 @,@ 000 people don 't") == "1,000 people don't"


def test_wikitext_keeps_every_character_and_leaves_no_artifacts(wiki_lines):
    for line in wiki_lines:
        out = wikitext_detokenize(line)
        undone = re.sub(r"@([-,.])@", r"\1", line)
        assert re.sub(r"\s", "", out) == re.sub(r"\s", "", undone)
        assert not re.search(r" [,.;:)]( |$)|@[-,.]@|^\s|\s$", out), (line, out)


def test_ptb_lines_by_hand(ptb_lines):
    assert ptb_detokenize(_line(ptb_lines, " <unk> <unk> watching abc")).startswith(
        "<unk> <unk> watching abc's monday night football can now vote"
    )
    assert "records viewers' opinions for possible airing on the next day's show" in (
        ptb_detokenize(_line(ptb_lines, " and the new syndicated reality show"))
    )
    for line in ptb_lines:
        out = ptb_detokenize(line)
        assert re.sub(r"\s", "", out) == re.sub(r"\s", "", line) and " 's" not in out


def test_cbt_quotes():
    assert cbt_detokenize("`` Oh , do n't ! '' said Tom .") == '"Oh, don\'t!" said Tom.'


def test_word_counts_are_the_published_ones(wiki_lines, ptb_lines):
    # Merity et al. 2016 (WikiText-2 valid: 217,646 tokens); Mikolov's PTB valid: 73,760 with <eos>
    assert word_count(wiki_lines) == 217_646
    assert word_count(ptb_lines) == 73_760
