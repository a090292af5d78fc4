"""De-tokenizers that undo the pre-processing of WikiText, PTB and CBT before GPT-2 reads them.

GPT-2 sec. 3.1: the paper scores de-tokenized text and still normalises by the original tokens.
Each function maps one line; none drops a character other than separating spaces (tested).
"""

from __future__ import annotations

import re

# WikiText escapes number-internal separators: "1 @,@ 000", "3 @.@ 5", "well @-@ known".
_WIKI_ESCAPES = re.compile(r" @([-,.])@(?: |$)")
_WIKI_NT = re.compile(r"n 't\b")  # WikiText splits "don't" as "don 't"
_HEADING = re.compile(r"^(=(?: =)*) (.*?) ((?:= )*=)$")
_SPACE_BEFORE = re.compile(r" ([.,;:!?%)\]}]|'s\b|'re\b|'ve\b|'ll\b|'d\b|'m\b|n't\b)")
_SPACE_AFTER = re.compile(r"([(\[{$£]) ")
_DOUBLE_QUOTED = re.compile(r'" ([^"]*?) "')
_PLURAL_POSSESSIVE = re.compile(r"s '(?= |$)")  # PTB: "viewers ' opinions"


def _punctuation(line: str) -> str:
    """Join tokens to the punctuation, brackets and English clitics that they were split from."""
    line = _SPACE_BEFORE.sub(r"\1", line)
    line = _SPACE_AFTER.sub(r"\1", line)
    return _DOUBLE_QUOTED.sub(r'"\1"', line)


def wikitext_detokenize(line: str) -> str:
    """One line of wiki.*.tokens as running text: ` = = Title = = ` -> `== Title ==`."""
    line = line.strip()
    heading = _HEADING.match(line)
    if heading:
        left, title, right = heading.groups()
        return f"{left.replace(' ', '')} {wikitext_detokenize(title)} {right.replace(' ', '')}"
    line = _WIKI_ESCAPES.sub(r"\1", line)
    line = _WIKI_NT.sub("n't", line)
    return _punctuation(line)


def ptb_detokenize(line: str) -> str:
    """One line of ptb.*.txt: clitics re-attached (`it 's` -> `it's`), `$ N` -> `$N`."""
    return _PLURAL_POSSESSIVE.sub("s'", _punctuation(line.strip()))


def cbt_detokenize(line: str) -> str:
    """CBT text with PTB-style quotes (`` and '') turned back into plain double quotes."""
    line = line.strip().replace("``", '"').replace("''", '"')
    return _punctuation(line)
