"""Post-training records: the formats people have, and one-line errors naming file, line, field."""

from __future__ import annotations

import json

import pytest

from gpt2lab.data.records import (
    Example,
    PreferencePair,
    read_examples,
    read_pairs,
    read_prompts,
)
from gpt2lab.errors import ConfigError, DataError

U = {"role": "user", "content": "Hi?"}
A = {"role": "assistant", "content": "Hello."}


def jsonl(path, records):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records),
        encoding="utf-8",
    )
    return path


def test_prompt_completion_and_messages(tmp_path):
    f = jsonl(
        tmp_path / "sft.jsonl",
        [
            {"prompt": "2+2=", "completion": " 4"},
            "",  # blank lines are skipped silently
            {"messages": [{"role": "system", "content": "Be kind."}, U, A, U, A]},
        ],
    )
    got = read_examples(f)
    assert len(got) == 2 and not got.skipped
    assert got[0] == Example(
        ({"role": "user", "content": "2+2="}, {"role": "assistant", "content": " 4"}),
        ("2+2=", " 4"),
        f"{f} line 1",
    )
    assert got[1].raw is None and len(got[1].messages) == 5 and got[1].where == f"{f} line 3"


BAD_EXAMPLES = [
    ({"prompt": "x"}, "no field 'completion'", "missing field"),
    ({"text": "x"}, r"none of the expected fields \(has \['text'\]\)", "missing field"),
    ({"prompt": "x", "completion": ""}, "field 'completion' is empty", "empty completion"),
    ({"prompt": 1, "completion": "y"}, "field 'prompt' is a int", "wrong type"),
    ({"messages": [U, U, A]}, r"field 'messages\[1\].role' is 'user'", "roles do not alternate"),
    ({"messages": [A]}, r"'messages\[0\].role' is 'assistant'", "roles do not alternate"),
    ({"messages": [U, A, U]}, r"'messages\[2\]' is a user message", "no assistant reply"),
    ({"messages": [U, {"role": "bot", "content": "x"}]}, r"'messages\[1\].role'", "bad role"),
    (
        {"messages": [U, {"role": "assistant"}]},
        r"'messages\[1\].content' is missing",
        "missing field",
    ),
    (
        {"messages": [U, {**A, "content": ""}]},
        r"'messages\[1\].content' is empty",
        "empty completion",
    ),
    ({"messages": []}, "field 'messages' is an empty list", "wrong type"),
    ([1, 2], "is a JSON list", "wrong type"),
    ('{"prompt": "x", ', "is not JSON", "invalid JSON"),
]


@pytest.mark.parametrize(("record", "match", "reason"), BAD_EXAMPLES)
def test_bad_example_names_file_line_and_field(tmp_path, record, match, reason):
    good = {"prompt": "a", "completion": "b"}
    f = jsonl(tmp_path / "bad.jsonl", [good, good, record])
    with pytest.raises(DataError, match=match) as e:
        read_examples(f)
    msg = str(e.value)
    assert msg.startswith(f"{f} line 3: ") and "\n" not in msg and "--errors skip" in msg
    skipped = read_examples(f, errors="skip")
    assert len(skipped) == 2 and dict(skipped.skipped) == {reason: 1}
    assert f"skipped 1: 1 {reason}" in skipped.summary()


def test_size_limit_and_errors_mode(tmp_path):
    big = {"prompt": "x" * 5000, "completion": "y"}
    f = jsonl(tmp_path / "big.jsonl", [big, {"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match=r"line 1: is larger than"):
        read_examples(f, max_record_bytes=1000)
    got = read_examples(f, errors="skip", max_record_bytes=1000)
    assert len(got) == 1 and got[0].where.endswith("line 2") and got.skipped["too large"] == 1
    with pytest.raises(ConfigError, match="errors='ignore'"):
        read_examples(f, errors="ignore")
    with pytest.raises(DataError, match="not a readable file"):
        read_examples(tmp_path / "missing.jsonl")


def test_json_array_and_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": ""}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"a.json record 2: field 'completion' is empty"):
        read_examples(tmp_path / "a.json")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a.parquet row 2: field 'completion' is empty"):
        read_examples(tmp_path / "a.parquet")
    assert read_examples(tmp_path / "a.parquet", errors="skip")[0].raw == ("p1", "c1")


def test_datasets_folder(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    folder.mkdir()
    jsonl(folder / "train.jsonl", [{"messages": [U, A]}, {"messages": [U, A, U, A]}])
    got = read_examples(folder)
    assert [len(e.messages) for e in got] == [2, 4]
    assert got[1].where == f"dataset {folder} record 2"


def test_preference_formats(tmp_path):
    ultra = {  # UltraFeedback-binarized: prompt text; the lists repeat the user turn
        "prompt": "Hi?",
        "chosen": [U, A],
        "rejected": [U, {"role": "assistant", "content": "Go away."}],
        "score_chosen": 8.0,
    }
    trl = {"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant", "content": "No."}]}
    text = {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}
    hh = {
        "chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant: Fine.",
        "rejected": "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant: Bad",
    }
    whole = {"chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "Meh."}]}
    f = jsonl(tmp_path / "pairs.jsonl", [ultra, trl, text, hh, whole])
    p = read_pairs(f)
    assert len(p) == 5
    assert p[0] == PreferencePair(
        (U,), (A,), ({"role": "assistant", "content": "Go away."},), None, f"{f} line 1"
    )
    assert p[1].prompt_messages == (U,) and p[1].chosen_messages == (A,)
    assert p[2].raw == ("Q: 2+2?\nA:", " 4", " 5")
    assert p[2].chosen_messages == ({"role": "assistant", "content": " 4"},)
    assert p[3].raw == (
        "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:",
        " Fine.",
        " Bad",
    )
    assert p[3].prompt_messages == (U, A, {"role": "user", "content": "How are you?"})
    assert p[3].chosen_messages == ({"role": "assistant", "content": " Fine."},)
    assert p[4].prompt_messages == (U,) and p[4].rejected_messages[0]["content"] == "Meh."


BAD_PAIRS = [
    ({"prompt": "x", "chosen": "a"}, "no field 'rejected'", "missing field"),
    ({"prompt": "x", "chosen": "a", "rejected": "a"}, "'chosen' equals 'rejected'", None),
    ({"prompt": "x", "chosen": "", "rejected": "a"}, "field 'chosen' is empty", "empty completion"),
    (
        {"prompt": [U], "chosen": [{**U, "content": "?"}, A], "rejected": [A]},
        "'chosen.0..role'",
        None,
    ),
    ({"prompt": "x", "chosen": 3, "rejected": "a"}, "field 'chosen' is a int", None),
    ({"prompt": [A], "chosen": "a", "rejected": "b"}, r"'prompt\[0\].role' is 'assistant'", None),
    ({"chosen": "no marker", "rejected": "b"}, r"'chosen' has no '\\n\\nAssistant:'", None),
    (
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: b"},
        "do not share",
        None,
    ),
]


@pytest.mark.parametrize(("record", "match", "reason"), BAD_PAIRS)
def test_bad_pairs(tmp_path, record, match, reason):
    f = jsonl(tmp_path / "p.jsonl", [record])
    with pytest.raises(DataError, match=match) as e:
        read_pairs(f)
    assert str(e.value).startswith(f"{f} line 1: ")
    got = read_pairs(f, errors="skip")
    assert len(got) == 0 and sum(got.skipped.values()) == 1
    if reason:
        assert got.skipped[reason] == 1


def test_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("First prompt\n\n  second one \n", encoding="utf-8")
    got = read_prompts(tmp_path / "p.txt")
    assert [p.raw for p in got] == ["First prompt", "  second one "]
    assert got[1].messages == ({"role": "user", "content": "  second one "},)
    assert got[1].where.endswith("p.txt line 3")
    f = jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": [U]}, {"prompt": [U, A]}])
    with pytest.raises(DataError, match=r"line 3: field 'prompt\[1\]' is a assistant message"):
        read_prompts(f)
    assert [p.messages for p in read_prompts(f, errors="skip")] == [
        ({"role": "user", "content": "a"},),
        (U,),
    ]
