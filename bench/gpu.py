"""The GPU check: training, DDP, FSDP, sampling and evaluation on one NVIDIA machine, in one report.

Runs in under 10 minutes on one modern NVIDIA GPU and writes one JSON report plus a table:

1. the 124M training step in bfloat16 with `torch.compile` and flash SDPA (`gpt2lab train`):
   tokens/s and MFU against the device's datasheet peak;
2. DDP over every visible GPU through `torchrun` for 20 steps, and the same-weights check: the
   final weights equal those of one process that accumulates as many micro-batches (each tensor
   within 1% of its norm: `SAME_WEIGHTS_RTOL`), the logged losses compared beside them;
3. FSDP on gpt2-medium for 20 steps (`--train.strategy=fsdp`);
4. sampling tokens/s (greedy, batch 1 and 8) beside transformers' `generate`, same weights;
5. a 124M WikiText-2 (validation) slice through `gpt2lab eval`'s scoring, and a HellaSwag
   slice when --hellaswag FILE is given (random weights unless --model; speed is the point).

On a machine without a CUDA GPU it refuses in one line. `--dry-run` runs the same plumbing on
the CPU at tiny shapes (2 gloo ranks for DDP and FSDP, float32, no compile), which the test
suite does (tests/test_bench_gpu.py).

    python bench/gpu.py                       # on the GPU machine: report to gpu_report.json
    python bench/gpu.py --out report.json --hellaswag hellaswag_val.jsonl --model gpt2
    python bench/gpu.py --dry-run --out /tmp/dry.json   # the plumbing, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpt2lab.config import MODEL_PRESETS, GPTConfig
from gpt2lab.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.valid.tokens"


def shapes(dry: bool) -> dict:
    """Model shapes, batch sizes and step counts of the full check, or of the dry run."""
    if dry:
        tiny = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)
        return dict(
            small=tiny, medium=tiny, batch=4, seq=32, steps=6, dist_steps=4, ranks=2,
            dtype="float32", compile=False, device="cpu", new_tokens=8, eval_tokens=512,
            eval_context=32, hellaswag_limit=4,
        )  # fmt: skip
    small = dict(MODEL_PRESETS["gpt2"].__dict__)
    medium = dict(MODEL_PRESETS["gpt2-medium"].__dict__)
    return dict(
        small=small, medium=medium, batch=16, seq=1024, steps=60, dist_steps=20,
        ranks=torch.cuda.device_count(), dtype="bfloat16", compile=True, device="cuda",
        new_tokens=256, eval_tokens=40_000, eval_context=1024, hellaswag_limit=500,
    )  # fmt: skip


def model_flags(shape: dict) -> list[str]:
    keys = ("n_layer", "n_head", "n_embd", "block_size")
    return [f"--model.{k}={shape[k]}" for k in keys] + ["--model.dropout=0.0"]


def train_flags(s: dict, steps: int) -> list[str]:
    return [
        f"--train.max_steps={steps}",
        f"--train.micro_batch_size={s['batch']}",
        f"--train.dtype={s['dtype']}",
        f"--train.compile={str(s['compile']).lower()}",
        f"--train.device={s['device']}",
        "--train.eval_interval=1000000",
        "--train.eval_steps=1",
        "--train.final_eval_steps=1",
        "--train.log_interval=1",
        "--train.checkpoint_interval=1000000",
        "--train.warmup_steps=2",
        "--no-plot",
        "--no-progress",
    ]


def run(argv: list[str], env: dict | None = None, timeout: int = 900) -> None:
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ... failed:\n{r.stderr[-3000:]}")


def gpt2lab(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpt2lab", *args]


def torchrun(ranks: int, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={ranks}", "-m", "gpt2lab", *args,
    ]  # fmt: skip


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "tokens_per_s" in r]


def steady(rows: list[dict], key: str) -> float:
    """Median of `key` over the second half of the steps (after compilation and warm-up)."""
    return statistics.median(r[key] for r in rows[len(rows) // 2 :])


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from gpt2lab.checkpoint.load import load_model

    model, _ = load_model(run_dir, device="cpu", dtype=torch.float32)
    return {k: v.clone() for k, v in model.state_dict().items()}


def flash_sdpa(s: dict) -> str:
    """Whether the flash SDPA kernel runs the 124M attention shape on this device."""
    if s["device"] != "cuda":
        return "n/a (CPU dry run)"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(s["batch"], 12, s["seq"], 64, device="cuda", dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return "flash kernel runs this shape (chosen by SDPA in bfloat16)"
    except RuntimeError as e:
        return f"flash kernel refused: {str(e).splitlines()[0]}"


def check_training(s: dict, data: Path, work: Path) -> dict:
    out = work / "train124m"
    run(gpt2lab("train", "--data", str(data), "--out", str(out), *model_flags(s["small"]),
                *train_flags(s, s["steps"])))  # fmt: skip
    rows = metrics(out)
    return {
        "tokens_per_s": steady(rows, "tokens_per_s"),
        "mfu": steady(rows, "mfu"),
        "steps": len(rows),
        "flash_sdpa": flash_sdpa(s),
        "compile": s["compile"],
        "dtype": s["dtype"],
    }


def check_ddp(s: dict, data: Path, work: Path, env: dict) -> dict:
    ranks, steps = s["ranks"], s["dist_steps"]
    flags = [*model_flags(s["small"]), *train_flags(s, steps)]
    flags = [f for f in flags if not f.startswith("--train.compile")] + ["--train.compile=false"]
    one, many = work / "ddp_one", work / "ddp_many"
    run(gpt2lab("train", "--data", str(data), "--out", str(one), *flags,
                f"--train.grad_accum_steps={ranks}"), env=env)  # fmt: skip
    run(torchrun(ranks, "train", "--data", str(data), "--out", str(many), *flags,
                 "--train.grad_accum_steps=1", "--train.strategy=ddp"), env=env)  # fmt: skip
    a, b = final_weights(one), final_weights(many)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    rel = max(((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)).item() for k in a)
    rows, ref = metrics(many), metrics(one)
    return {
        "ranks": ranks,
        "steps": len(rows),
        "tokens_per_s": steady(rows, "tokens_per_s"),
        "max_weight_difference_vs_one_process": diff,
        "max_relative_difference_vs_one_process": rel,
        "max_loss_difference_vs_one_process": max(
            abs(x["loss"] - y["loss"]) for x, y in zip(rows, ref)
        ),
        "same_weights": rel < SAME_WEIGHTS_RTOL,
    }


# DDP against one process, per tensor, |a - b| / |a| (L2). Summation order, and on a GPU the
# nondeterministic backward of flash attention, should move a tensor far less (0 on the CPU dry
# run; not yet measured on a GPU); a rank whose gradients were not averaged moves it by the size
# of its updates: 0.34 after 4 steps of the dry run's shapes (one process on half the batch
# against one on all of it)
SAME_WEIGHTS_RTOL = 1e-2


def check_fsdp(s: dict, data: Path, work: Path, env: dict) -> dict:
    out = work / "fsdp_medium"
    flags = [f for f in train_flags(s, s["dist_steps"]) if not f.startswith("--train.compile")]
    run(torchrun(s["ranks"], "train", "--data", str(data), "--out", str(out),
                 *model_flags(s["medium"]), *flags, "--train.compile=false",
                 "--train.strategy=fsdp"), env=env)  # fmt: skip
    rows = metrics(out)
    return {
        "ranks": s["ranks"],
        "steps": len(rows),
        "tokens_per_s": steady(rows, "tokens_per_s"),
        "mfu": steady(rows, "mfu"),
        "final_loss": rows[-1]["loss"],
    }


def check_sampling(s: dict) -> dict:
    import transformers

    from gpt2lab.checkpoint.hf import config_to_hf, to_hf_state
    from gpt2lab.generate import generate
    from gpt2lab.model import GPT

    torch.manual_seed(0)
    dtype = getattr(torch, s["dtype"])
    ours = GPT(GPTConfig(**{**s["small"], "dropout": 0.0})).eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(ours.config)))
    hf.load_state_dict(to_hf_state(ours), strict=False)  # lm_head is tied to wte
    ours, hf = ours.to(s["device"], dtype), hf.eval().to(s["device"], dtype)
    new, out = s["new_tokens"], {}
    for B in (1, 8):
        idx = torch.randint(0, ours.config.vocab_size, (B, 16), device=s["device"])
        runs = {
            "gpt2lab": lambda idx=idx: generate(ours, idx, new, temperature=0),
            "transformers": lambda idx=idx: hf.generate(
                idx, attention_mask=torch.ones_like(idx), max_new_tokens=new,
                min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None,
            ),
        }  # fmt: skip
        times: dict[str, list[float]] = {k: [] for k in runs}
        with torch.inference_mode():
            for fn in runs.values():
                fn()  # warm-up
            for _ in range(3):  # in turns
                for k, fn in runs.items():
                    _sync(s)
                    t0 = time.perf_counter()
                    fn()
                    _sync(s)
                    times[k].append(time.perf_counter() - t0)
        rates = {k: B * new / statistics.median(v) for k, v in times.items()}
        out[f"batch_{B}"] = {
            "gpt2lab_tokens_per_s": rates["gpt2lab"],
            "transformers_tokens_per_s": rates["transformers"],
            "ratio": rates["gpt2lab"] / rates["transformers"],
        }
    return out


def check_eval(s: dict, model_name: str | None, hellaswag: str | None) -> dict:
    from gpt2lab.eval import tasks
    from gpt2lab.eval.detok import wikitext_detokenize
    from gpt2lab.eval.scoring import as_logits_fn, score_ids
    from gpt2lab.model import GPT
    from gpt2lab.tokenizer import get_tokenizer

    dtype = getattr(torch, s["dtype"])
    if model_name:
        from gpt2lab.checkpoint.load import load_model

        model, tok = load_model(model_name, device=s["device"])
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**s["small"], "dropout": 0.0})).to(s["device"]).eval()
        tok = get_tokenizer("gpt2")
    fn = as_logits_fn(model, dtype)
    if WIKI.is_file():
        lines = WIKI.read_text(encoding="utf-8").split("\n")
        text = "\n".join(wikitext_detokenize(ln) for ln in lines[:2000])
        source = "WikiText-2 validation"
    else:
        text = " ".join(f"word{i % 97}" for i in range(s["eval_tokens"]))
        source = "synthetic text (WikiText-2 not found beside the repository)"
    ids = [tok.eot_token, *tok.encode_ordinary(text)][: s["eval_tokens"] + 1]
    ctx = min(s["eval_context"], model.config.block_size)
    _sync(s)
    t0 = time.perf_counter()
    score = score_ids(fn, ids, ctx, ctx // 2, batch_size=8)
    _sync(s)
    seconds = time.perf_counter() - t0
    out = {
        "wikitext2_slice": {
            "source": source,
            "tokens": score.tokens,
            "perplexity": float(torch.tensor(score.loss).exp()),
            "scored_tokens_per_s": score.tokens / seconds,
            "weights": model_name or "random",
        }
    }
    if hellaswag:
        settings = tasks.Settings(
            context=ctx, stride=ctx // 2, batch_size=8, progress=False,
            limit=s["hellaswag_limit"],
        )  # fmt: skip
        t0 = time.perf_counter()
        m = tasks.hellaswag(fn, tok, hellaswag, settings)
        out["hellaswag_slice"] = {**m, "seconds": time.perf_counter() - t0}
    return out


def _sync(s: dict) -> None:
    if s["device"] == "cuda":
        torch.cuda.synchronize()


def prepare_data(work: Path, s: dict) -> Path:
    text = work / "train.txt"
    if WIKI.is_file():
        text.write_text(WIKI.read_text(encoding="utf-8"), encoding="utf-8")
    else:
        text.write_text(" ".join(f"w{i % 251}" for i in range(200_000)), encoding="utf-8")
    data = work / "data"
    run(gpt2lab("prepare", "--input", str(text), "--out", str(data), "--val-tail", "0.1",
                "--no-progress"))  # fmt: skip
    return data


def table(report: dict) -> str:
    rows = [("check", "result")]
    t = report.get("training_124m", {})
    if "tokens_per_s" in t:
        rows.append(("124M train step", f"{t['tokens_per_s']:,.0f} tok/s, MFU {t['mfu']:.1%}"))
    d = report.get("ddp", {})
    if "tokens_per_s" in d:
        same = "same weights" if d["same_weights"] else "WEIGHTS DIFFER"
        rows.append(
            (
                f"DDP x{d['ranks']}, {d['steps']} steps",
                f"{d['tokens_per_s']:,.0f} tok/s, {same} as one process "
                f"(max diff {d['max_weight_difference_vs_one_process']:.1e}, relative "
                f"{d['max_relative_difference_vs_one_process']:.1e}; loss "
                f"{d['max_loss_difference_vs_one_process']:.1e})",
            )
        )
    f = report.get("fsdp_medium", {})
    if "tokens_per_s" in f:
        rows.append(
            (
                f"FSDP gpt2-medium x{f['ranks']}",
                f"{f['tokens_per_s']:,.0f} tok/s, MFU {f['mfu']:.1%}",
            )
        )
    for b, r in report.get("sampling", {}).items():
        if isinstance(r, dict):
            rows.append(
                (
                    f"sampling {b.replace('_', ' ')}",
                    f"{r['gpt2lab_tokens_per_s']:,.0f} tok/s vs transformers "
                    f"{r['transformers_tokens_per_s']:,.0f} ({r['ratio']:.2f}x)",
                )
            )
    e = report.get("eval", {})
    if "wikitext2_slice" in e:
        w = e["wikitext2_slice"]
        rows.append(
            (
                "WikiText-2 slice",
                f"{w['scored_tokens_per_s']:,.0f} tok/s, ppl {w['perplexity']:.4g}",
            )
        )
    if "hellaswag_slice" in e:
        h = e["hellaswag_slice"]
        rows.append(("HellaSwag slice", f"acc_norm {h.get('acc_norm', float('nan')):.3f}"))
    for k, v in report.items():
        if isinstance(v, dict) and "error" in v:
            rows.append((k, "FAILED: " + v["error"].splitlines()[0][:80]))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="gpu_report.json", help="the JSON report")
    p.add_argument("--dry-run", action="store_true", help="the plumbing on the CPU, tiny shapes")
    p.add_argument("--model", help="weights for the eval slices (default: random)")
    p.add_argument("--hellaswag", metavar="FILE", help="HellaSwag validation JSONL for a slice")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "bench/gpu.py: error: no CUDA GPU here; run it on a machine with an NVIDIA GPU "
            "(or --dry-run to check its plumbing on the CPU)",
            file=sys.stderr,
        )
        return 2
    s = shapes(args.dry_run)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), *sys.path]))
    if args.dry_run:
        env |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if s["device"] == "cuda" else "cpu",
        "gpus": torch.cuda.device_count() if s["device"] == "cuda" else 0,
    }
    if s["device"] == "cuda":
        from gpt2lab.train.metrics import peak_flops

        report["datasheet_peak_bf16_flops"] = peak_flops(torch.device("cuda"), torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare_data(work, s)
        checks = {
            "training_124m": lambda: check_training(s, data, work),
            "ddp": lambda: check_ddp(s, data, work, env),
            "fsdp_medium": lambda: check_fsdp(s, data, work, env),
            "sampling": lambda: check_sampling(s),
            "eval": lambda: check_eval(s, args.model, args.hellaswag),
        }
        for name, check in checks.items():
            t0 = time.perf_counter()
            try:
                report[name] = check()
            except Exception as e:  # one failed check must not hide the others' figures
                report[name] = {"error": f"{type(e).__name__}: {e}"}
            report[name]["seconds"] = round(time.perf_counter() - t0, 1)
    report["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(args.out, report)
    print(table(report))
    print(f"report: {args.out} ({report['seconds']:.0f} s)")
    return 1 if any(isinstance(v, dict) and "error" in v for v in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
