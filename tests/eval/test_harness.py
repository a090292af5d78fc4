"""The lm-eval backend scores like lm-eval's own Hugging Face backend on the same weights, and
`gpt2lab eval lambada` relates to lm-eval's `lambada_openai` as docs/convert.md states."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.interop  # lm-eval is a heavy peer: `make test-interop`
pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

import lm_eval  # noqa: E402
import yaml  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from gpt2lab.checkpoint.hf import save_hf  # noqa: E402
from gpt2lab.config import GPTConfig  # noqa: E402
from gpt2lab.eval import tasks  # noqa: E402
from gpt2lab.eval.harness import GPT2LabLM  # noqa: E402
from gpt2lab.eval.scoring import as_logits_fn  # noqa: E402
from gpt2lab.model import GPT  # noqa: E402
from gpt2lab.tokenizer import get_tokenizer  # noqa: E402

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
    """Batched (3 a batch, left-padded prompts of different lengths, two `until` groups) and
    one at a time, our continuations equal lm-eval's hf backend's."""
    ours, theirs = backends
    greedy = {"max_gen_toks": 12, "do_sample": False}
    args = [
        ("The cat sat", {"until": ["\n\n"], **greedy}),
        ("To be, or not to be, that is", {"until": ["\n\n"], **greedy}),
        ("A", {"until": ["\n\n"], **greedy}),
        ("Once upon a time there", {"until": ["\n\n"], **greedy}),
        ("Hello", {"until": ["e", "a"], **{**greedy, "max_gen_toks": 20}}),
    ]
    reqs = instances("generate_until", args)
    want = theirs.generate_until(reqs)
    assert ours.generate_until(reqs) == want
    assert [ours.generate_until([r])[0] for r in reqs] == want
    assert len(set(want)) > 1 and all("\n\n" not in w for w in want)


def test_a_local_yaml_task_scores_the_same_through_simple_evaluate(backends, tmp_path):
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


REPO = Path(__file__).resolve().parents[2]
PTH = "gpt2lab-lm-eval-plugins.pth"


def _installed_hook() -> bool:
    """Whether this environment's gpt2lab install put its lm-eval hook in site-packages."""
    return (Path(sysconfig.get_paths()["purelib"]) / PTH).is_file()


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """A site directory with what installing gpt2lab puts beside it for lm-eval: the .pth file of
    src/ and the `lm_eval.models` entry points that pyproject.toml declares (for an environment
    where gpt2lab was installed before it had them)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    site = tmp_path_factory.mktemp("site")
    shutil.copy(REPO / "src" / PTH, site)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    points = project["entry-points"]["lm_eval.models"]
    info = site / "gpt2lab_from_source-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gpt2lab-from-source\nVersion: 0\n")
    lines = "".join(f"{name} = {value}\n" for name, value in points.items())
    (info / "entry_points.txt").write_text("[lm_eval.models]\n" + lines)
    return site


def run_lm_eval(args: list[str], out: Path, site: Path | None) -> list[dict]:
    """The real `lm_eval` command; with `site`, its CLI after `site.addsitedir(site)` (the way
    Python reads site-packages' .pth files at start). Returns the task's logged samples."""
    path = [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if site is None:  # lm-eval's own script, or the same CLI as `python -m lm_eval`
        script = Path(sys.executable).with_name("lm_eval")
        cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "lm_eval"]
    else:
        boot = (
            "import site, sys; site.addsitedir(sys.argv.pop(1)); sys.argv[0] = 'lm_eval'; "
            "from lm_eval.__main__ import cli_evaluate; cli_evaluate()"
        )
        cmd = [sys.executable, "-c", boot, str(site)]
    done = subprocess.run(
        [*cmd, *args, "--output_path", str(out), "--log_samples"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (samples,) = out.rglob("samples_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return sorted(rows, key=lambda r: r["doc_id"])


@pytest.mark.parametrize("how", ["installed", "site"])
def test_the_lm_eval_command_scores_a_run_directory_like_hf(how, plugin_site, write_run, tmp_path):
    """`lm_eval --model gpt2lab --model_args path=RUN_DIR` (lm-eval's own command line) scores a
    local YAML task over JSONL like `lm_eval --model hf` on the Hugging Face export of the same
    weights, within 1e-4 per request."""
    if how == "installed" and not _installed_hook():
        pytest.skip(f"this environment's gpt2lab predates {PTH}: pip install -e . again")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)).eval()
    run = write_run(tmp_path / "run", model, get_tokenizer("gpt2"))
    save_hf(model, tmp_path / "hf")
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    data = tasks_dir / "pairs.jsonl"
    pairs = [(c, t) for c, t in PAIRS if c]
    data.write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in pairs))
    task = {
        "task": "gpt2lab_cli",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{continuation}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc"}],
    }
    (tasks_dir / "task.yaml").write_text(yaml.safe_dump(task))
    common = ["--tasks", "gpt2lab_cli", "--include_path", str(tasks_dir), "--batch_size", "2"]
    site = plugin_site if how == "site" else None
    ours = run_lm_eval(
        ["--model", "gpt2lab", "--model_args", f"path={run}", *common], tmp_path / "ours", site
    )
    hf_args = f"pretrained={tmp_path / 'hf'},dtype=float32"
    theirs = run_lm_eval(
        ["--model", "hf", "--model_args", hf_args, "--device", "cpu", *common],
        tmp_path / "hf_out",
        site,
    )
    assert len(ours) == len(theirs) == len(pairs)
    for a, b in zip(ours, theirs):
        (lp, greedy), (lp_hf, greedy_hf) = a["resps"][0][0], b["resps"][0][0]
        assert lp == pytest.approx(lp_hf, abs=1e-4) and greedy == greedy_hf
    assert ours[0]["resps"][0][0][0] != pytest.approx(ours[1]["resps"][0][0][0], abs=1e-3)


def _passages(tiny_shakespeare, lines_per_passage):
    """Passages of consecutive Tiny Shakespeare speech lines joined by spaces, as in LAMBADA."""
    lines = [
        line.strip()
        for line in tiny_shakespeare.read_text(encoding="utf-8").splitlines()
        if len(line.split()) >= 5
    ]
    return [" ".join(lines[i : i + n]) for i, n in enumerate(lines_per_passage * 8)]


@pytest.fixture(scope="module")
def lambada_setup(tiny_shakespeare, tmp_path_factory):
    """A tiny random GPT, a LAMBADA-shaped file for it, and lm-eval's lambada_openai task copied
    to read that file: as is, and with the context after `<|endoftext|>` as ours has it.

    Every other passage ends with the word the model itself predicts (when its greedy next token is
    a space and letters), so that accuracy is neither 0 nor 1; the others end as Shakespeare wrote.
    """
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)).eval()
    fn, tok = as_logits_fn(model), get_tokenizer("gpt2")
    texts = []
    # 1-3 lines stay within the 64-token window; 8 lines overflow it, so the start is cut
    for i, text in enumerate(_passages(tiny_shakespeare, [1, 2, 3, 8])):
        ids = torch.tensor([[tok.eot_token, *tok.encode_ordinary(text)][-64:]])
        word = tok.decode([fn(ids, 1)[0, -1].argmax().item()])
        predictable = i % 2 == 0 and word[:1] == " " and word[1:].isalpha()
        texts.append(text + word if predictable else text)
    root = tmp_path_factory.mktemp("lambada")
    save_hf(model.eval(), root / "hf")
    data = root / "lambada_test.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    stock = Path(lm_eval.__file__).parent / "tasks" / "lambada" / "lambada_openai.yaml"
    task = yaml.safe_load(stock.read_text())
    task.pop("tag")
    task.update(dataset_path="json", dataset_kwargs={"data_files": {"test": str(data)}})
    task.pop("dataset_name")
    (root / "local.yaml").write_text(yaml.safe_dump({**task, "task": "lambada_local"}))
    eot = {
        **task,
        "task": "lambada_local_eot",
        "doc_to_text": "<|endoftext|>" + task["doc_to_text"],
    }
    (root / "local_eot.yaml").write_text(yaml.safe_dump(eot))
    return root, data, texts, TaskManager(include_path=str(root))


def _lm_eval_lambada(lm, task_manager, task):
    out = simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, log_samples=True)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return out["results"][task], [s["resps"][0][0] for s in samples]


def test_lambada_equals_lm_evals_lambada_openai_after_endoftext(lambada_setup):
    """`gpt2lab eval lambada` is lambada_openai with `<|endoftext|>` before every context: the same
    target (" " + the text after the last space, all its tokens scored, greedy over all of them),
    the same perplexity (exp of the mean negative log-likelihood per passage)."""
    root, data, texts, task_manager = lambada_setup
    ours = GPT2LabLM(path=str(root / "hf"), batch_size=4)
    theirs = HFLM(pretrained=str(root / "hf"), batch_size=4, device="cpu", dtype="float32")
    settings = tasks.Settings(context=64, stride=32, batch_size=4)
    m = tasks.lambada(as_logits_fn(ours.model), ours.tokenizer, data, settings)
    assert m["examples"] == len(texts) and 0 < m["accuracy"] < 1
    for lm in (ours, theirs):
        results, _ = _lm_eval_lambada(lm, task_manager, "lambada_local_eot")
        assert results["acc,none"] == m["accuracy"]
        assert results["perplexity,none"] == pytest.approx(m["perplexity"], rel=1e-4)


def test_lambada_openai_as_is_differs_only_by_the_missing_endoftext(lambada_setup):
    """Without `<|endoftext|>`, lambada_openai conditions the first context token on nothing: the
    scores differ exactly on passages shorter than the window, and agree where the window cuts
    the start of the passage off anyway (both keep the last block_size + 1 tokens)."""
    root, _, texts, task_manager = lambada_setup
    lm = GPT2LabLM(path=str(root / "hf"), batch_size=4)
    _, with_eot = _lm_eval_lambada(lm, task_manager, "lambada_local_eot")
    _, as_is = _lm_eval_lambada(lm, task_manager, "lambada_local")
    window = lm.max_length + 1
    long = [len(lm.tok_encode(t)) >= window for t in texts]
    assert 0 < sum(long) < len(texts)
    for fits_not, (lp, greedy), (lp_as_is, greedy_as_is) in zip(long, with_eot, as_is):
        if fits_not:
            assert lp == pytest.approx(lp_as_is, abs=1e-5) and greedy == greedy_as_is
        else:
            assert lp != pytest.approx(lp_as_is, abs=1e-5)
