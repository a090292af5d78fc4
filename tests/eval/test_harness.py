"""The lm-eval backend scores like lm-eval's own Hugging Face backend on the same weights."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.interop  # lm-eval is a heavy peer: `make test-interop`
pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from gpt2lab.checkpoint.hf import save_hf  # noqa: E402
from gpt2lab.config import GPTConfig  # noqa: E402
from gpt2lab.eval.harness import GPT2LabLM  # noqa: E402
from gpt2lab.model import GPT  # noqa: E402

PAIRS = [
    ("The cat sat on the", " mat"),
    ("To be, or not to be: ", "that is the question"),
    ("", "Hello world"),
    ("A long context " * 30, " ends here."),  # longer than block_size: windows are cut
]
TEXTS = ["First Citizen: Before we proceed any further, hear me speak. " * 8, "short"]


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32))
    path = tmp_path_factory.mktemp("harness") / "hf"
    save_hf(model.eval(), path)
    ours = GPT2LabLM(path=str(path), batch_size=3)
    theirs = HFLM(pretrained=str(path), batch_size=3, device="cpu", dtype="float32")
    return ours, theirs


def instances(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihoods_equal_lm_evals_hf_backend(backends):
    ours, theirs = backends
    reqs = instances("loglikelihood", PAIRS)
    got, want = ours.loglikelihood(reqs), theirs.loglikelihood(reqs)
    for (lp, greedy), (lp_hf, greedy_hf) in zip(got, want):
        assert lp == pytest.approx(lp_hf, abs=1e-4) and greedy == greedy_hf


def test_rolling_loglikelihoods_equal(backends):
    ours, theirs = backends
    reqs = instances("loglikelihood_rolling", [(t,) for t in TEXTS])
    for lp, lp_hf in zip(ours.loglikelihood_rolling(reqs), theirs.loglikelihood_rolling(reqs)):
        assert lp == pytest.approx(lp_hf, abs=1e-4)


def test_generate_until_equals_hf_greedy(backends):
    ours, theirs = backends
    args = [("The cat sat", {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False})]
    reqs = instances("generate_until", args)
    assert ours.generate_until(reqs) == theirs.generate_until(reqs)


def test_a_local_yaml_task_scores_the_same_through_simple_evaluate(backends, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in PAIRS if c)
    )
    (tmp_path / "task.yaml").write_text(
        f"""task: gpt2lab_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""
    )
    scores = []
    for lm in backends:
        out = simple_evaluate(
            model=lm,
            tasks=["gpt2lab_local"],
            task_manager=TaskManager(include_path=str(tmp_path)),
            log_samples=True,
        )
        samples = sorted(out["samples"]["gpt2lab_local"], key=lambda s: s["doc_id"])
        scores.append([s["resps"][0][0][0] for s in samples])
    assert len(scores[0]) == len(PAIRS) - 1
    assert scores[0] == pytest.approx(scores[1], abs=1e-4)
