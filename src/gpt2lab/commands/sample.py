"""`gpt2lab sample`: continue prompts with a trained model, batched, streamed or as JSON lines."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gpt2lab import config
from gpt2lab.budget import require_inference, require_model
from gpt2lab.checkpoint.load import load_model, peek_config
from gpt2lab.config import SampleConfig
from gpt2lab.device import keep_freed_memory, pick_device, pick_dtype
from gpt2lab.errors import CheckpointError, DataError, GPT2LabError, UsageError
from gpt2lab.generate import complete, prompt_ids
from gpt2lab.io import atomic_write_json, atomic_write_text, read_text_bounded
from gpt2lab.outdir import OutputDir, claim_output_dir
from gpt2lab.quantize import METHODS as QUANTIZE_METHODS
from gpt2lab.quantize import quantize
from gpt2lab.tokenizer.chat import resolve_chat_template, validate_messages

EXAMPLES = """
gpt2lab sample --model runs/sc -p 'ROMEO:' -m 200 --temperature 0.8 --top-k 200
gpt2lab sample --model gpt2 -p 'Being a founder' --stream --top-p 0.9 --seed 1
gpt2lab sample --model hf/gpt2 -p 'Q: What is 2+2?' --stop $'\\n' --temperature 0   # greedy
gpt2lab sample --model runs/owt --num-samples 100 --out samples/ --json             # a dataset
gpt2lab sample --model runs/owt --prompt-file prompts.txt --lines --json > out.jsonl
echo 'Once upon a time' | gpt2lab sample --model runs/sc
gpt2lab sample --model runs/sc --interactive
gpt2lab sample --model gpt2 -p 'Hello' --quantize int8 --temperature 0       # int8 weights
gpt2lab sample --model runs/sft --chat conversation.json      # the assistant's next reply
"""

_DEFAULTS = SampleConfig()


def add_model_arguments(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--model and the precision options (--device, --dtype, --quantize), read by
    `sample_config` and `load_model_for`; `gpt2lab serve` takes the same ones. Returns the
    precision group."""
    p.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="a gpt2lab run or checkpoint directory, a Hugging Face GPT-2 directory, or a hub "
        "name already in the local cache (gpt2); its tokenizer comes with it",
    )
    g = p.add_argument_group("model precision")
    add_device_arguments(g)
    g.add_argument(
        "--quantize",
        choices=list(QUANTIZE_METHODS),
        help="int8: every weight matrix (the head included) in 8 bits with a float32 scale per "
        "row, ~3x less memory and faster decoding on a CPU; LayerNorms and embeddings stay float "
        "(docs/quantize.md)",
    )
    return g


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    g = p.add_argument_group("prompts (none: start from <|endoftext|>)")
    g.add_argument(
        "-p",
        "--prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="text to continue; repeat for several prompts (batched together)",
    )
    g.add_argument(
        "--prompt-file",
        action="append",
        default=[],
        metavar="FILE",
        help="a file whose whole text is one prompt ('-' = stdin); repeatable. "
        "Without -p or --prompt-file, text piped on stdin is the prompt",
    )
    g.add_argument(
        "--chat",
        metavar="FILE",
        help='a conversation, JSON: [{"role": "user", "content": ...}, ...] (or {"messages": '
        "[...]}), rendered with the model's chat template; prints the assistant's reply",
    )
    g.add_argument(
        "--template",
        metavar="NAME",
        help="with --chat: 'chat', 'plain' or a chat_template.json instead of the model's own",
    )
    g.add_argument(
        "--lines",
        action="store_true",
        help="each non-empty line of the prompt files is a separate prompt",
    )
    g.add_argument(
        "--allow-special",
        action="store_true",
        help="encode special-token text such as <|endoftext|> in a prompt as the "
        "special token (default: as plain text)",
    )
    g = p.add_argument_group("decoding")
    g.add_argument(
        "-m",
        "--max-new-tokens",
        type=int,
        metavar="N",
        help=f"tokens to generate per sample (default {_DEFAULTS.max_new_tokens})",
    )
    add_sampling_arguments(g)
    g.add_argument("--num-samples", type=int, metavar="N", help="samples per prompt (default 1)")
    g.add_argument(
        "--stop",
        action="append",
        metavar="STR",
        help="end a sample before this text (repeatable); it is not printed",
    )
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        help="go on past <|endoftext|> instead of ending the sample there",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--stream",
        action="store_true",
        help="print text as it is generated (the first sample of each batch live)",
    )
    g.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per sample: prompt, text, ids, finish_reason",
    )
    g.add_argument(
        "--out",
        metavar="DIR",
        help="write one file per sample (sample_00000.txt, .json with --json)",
    )
    g.add_argument("--interactive", action="store_true", help="a prompt loop (Ctrl-D quits)")
    g = p.add_argument_group("speed")
    g.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help=f"samples generated together (default {_DEFAULTS.batch_size})",
    )


def add_sampling_arguments(g: Any) -> None:
    """--temperature, --top-k, --top-p, --repetition-penalty and --seed (sample, chat)."""
    g.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        help="divide logits by this; 0 = greedy (default 1.0)",
    )
    g.add_argument(
        "--top-k", type=int, metavar="K", help="sample from the k most likely tokens only"
    )
    g.add_argument(
        "--top-p",
        type=float,
        metavar="P",
        help="nucleus sampling: the fewest most likely tokens with probability >= p, 0 < p <= 1",
    )
    g.add_argument(
        "--repetition-penalty",
        type=float,
        metavar="R",
        help="> 1 makes tokens already in the text less likely (default 1.0 = off)",
    )
    g.add_argument("--seed", type=int, metavar="S", help="seed for reproducible samples")


def add_device_arguments(g: Any) -> None:
    """--device and --dtype (sample, chat)."""
    g.add_argument("--device", metavar="DEVICE", help="auto (default), cpu, cuda, cuda:N or mps")
    g.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and compute dtype. auto (default): bfloat16 on GPUs and on "
        "CPUs with native bfloat16 (AVX512-BF16/AMX: half the bytes to read per token), else "
        "float32; --dtype float32 for exact results",
    )


def run(args: argparse.Namespace) -> int:
    cfg = sample_config(args)
    _check_flags(args)
    out = None
    if args.out:  # a directory of samples: new, empty or gpt2lab's (never the user's files)
        inputs = [args.model, *args.prompt_file]
        out = claim_output_dir(args.out, "sample", inputs=inputs, lock=True)
    try:
        return _run(args, cfg, out)
    finally:
        if out is not None:
            out.release()


def _run(args: argparse.Namespace, cfg: SampleConfig, out: OutputDir | None) -> int:
    with _warnings_to_stderr():
        chat = args.interactive or args.chat  # the conversation is read once the tokenizer is
        texts = [] if chat else _read_prompts(args)  # bounded, before the model
        check_memory(args.model, cfg, len(texts) * cfg.num_samples, before_loading=True)
        model, tok = load_model_for(args.model, cfg)
        check_memory(model.config, cfg, len(texts) * cfg.num_samples or cfg.num_samples)
        if args.interactive:
            return _interactive(model, tok, cfg, args)
        if args.chat:
            texts, prompts, cfg = _chat_prompt(args, tok, cfg)
        else:
            prompts = [_encode(tok, t, args.allow_special) for t in texts]
        rows = [
            (i, t, ids)
            for i, (t, ids) in enumerate(zip(texts, prompts))
            for _ in range(cfg.num_samples)
        ]
        writer = _Writer(args, len(rows), out)
        for completion, (i, text, _) in zip(
            _run_batches(model, tok, cfg, args, rows, writer), rows
        ):
            writer.done(text, i, completion)
        writer.finish()
    return 0


def sample_config(args: argparse.Namespace) -> SampleConfig:
    """The run's [sample] settings (config.toml beside the model, if any) < the flags given."""
    toml = Path(args.model) / "config.toml"
    flags = {
        f"sample.{f.name}": getattr(args, f.name, None) for f in dataclasses.fields(SampleConfig)
    }
    stop = getattr(args, "stop", None)  # `gpt2lab serve` reads its model options here too
    flags["sample.stop"] = tuple(stop) if stop else None
    return config.resolve(
        config_file=toml if toml.is_file() else None, flags=flags, sections=["sample"]
    ).sample


def _chat_prompt(
    args: argparse.Namespace, tok: Any, cfg: SampleConfig
) -> tuple[list[str], list[list[int]], SampleConfig]:
    """--chat FILE: the rendered conversation and its ids; the template's stop strings added."""
    template = resolve_chat_template(args.model, tok, args.template)
    text = read_text_bounded(args.chat, PROMPT_LIMIT, "--chat file", "chat")
    try:
        data = json.loads(text)
    except ValueError as e:
        raise DataError(
            f"--chat file {args.chat} is not JSON ({e})",
            'a list of {"role": ..., "content": ...} messages',
        ) from None
    messages = data.get("messages") if isinstance(data, dict) else data
    ids = template.encode(tok, validate_messages(messages, where=args.chat))
    stop = tuple(dict.fromkeys([*cfg.stop, *(template.stop_strings or (template.end_token,))]))
    args.reply_lead = template.reply_lead
    return [template.render(messages)], [ids], dataclasses.replace(cfg, stop=stop)


def check_memory(model: Any, cfg: SampleConfig, rows: int, before_loading: bool = False) -> None:
    """Refuse a job whose KV cache, logits and kept tokens cannot fit (the weights too, before
    loading); `model` is a path (its config is read without the weights) or a GPTConfig."""
    try:
        mcfg = peek_config(model) if before_loading else model
    except GPT2LabError:  # not a model: loading it says so in its own words
        return
    if mcfg is None:  # a hub name: checked once loaded
        return
    device = pick_device(cfg.device, key="device")
    dtype = pick_dtype(cfg.dtype, device, key="dtype") if cfg.dtype != "float16" else torch.float16
    if before_loading:  # the weights first: a config.json may claim anything
        require_model(mcfg, device, dtype, source=str(model))
    require_inference(
        mcfg,
        max(1, min(cfg.batch_size, rows)),
        mcfg.block_size,  # the longest prompt a row keeps
        cfg.max_new_tokens,
        dtype,
        device,
        f"sampling {cfg.max_new_tokens:,} tokens x {min(cfg.batch_size, max(rows, 1))} rows",
        "lower --max-new-tokens or --batch-size (the context slides: any length works, but the "
        "tokens of a sample are kept until it ends)",
        loaded=not before_loading,
    )


def _check_flags(args: argparse.Namespace) -> None:
    if args.stream and (args.json or args.out):
        raise UsageError(
            f"--stream and {'--json' if args.json else '--out'} cannot go together",
            fix="drop one of them",
        )
    if args.interactive and (args.json or args.out or args.prompt or args.prompt_file):
        raise UsageError(
            "--interactive reads prompts from the keyboard and prints as it goes",
            "no -p, --prompt-file, --json or --out with it",
            "drop those flags, or drop --interactive",
        )
    if args.chat and (args.prompt or args.prompt_file or args.interactive):
        raise UsageError(
            "--chat reads the conversation from its file",
            "no -p, --prompt-file or --interactive with it",
            "drop those flags (or use `gpt2lab chat` to talk turn by turn)",
        )
    if args.template and not args.chat:
        raise UsageError("--template applies to --chat only", fix="add --chat FILE")
    if args.lines and not args.prompt_file:
        raise UsageError("--lines needs --prompt-file", fix="add --prompt-file FILE (or -)")


def load_model_for(path: str, cfg: SampleConfig) -> tuple[Any, Any]:
    """(model, tokenizer) on cfg's device and dtype; one-line errors for an empty directory, float16
    on a CPU, or a model without its tokenizer (`gpt2lab inspect` loads through this too)."""
    p = Path(path)
    if p.is_dir() and not any(p.iterdir()):
        raise CheckpointError(
            f"model directory {p} is empty",
            "a gpt2lab run or checkpoint directory, or a Hugging Face GPT-2 directory",
            "point --model at a trained run such as runs/sc",
        )
    device = pick_device(cfg.device, key="device")
    if cfg.dtype == "float16" and device.type == "cpu":
        raise UsageError(
            "--dtype float16 is not supported on the CPU",
            "bfloat16 or float32",
            "use --dtype bfloat16 (or float32)",
        )
    dtype = pick_dtype(cfg.dtype, device, key="dtype")
    if device.type == "cpu":  # each token's logits reuse freed memory instead of faulting in anew
        keep_freed_memory()
    model, tok = load_model(p, device=device, dtype=dtype)
    method = getattr(cfg, "quantize", None)
    if method:
        model = quantize(model, method)
    if tok is None:
        raise CheckpointError(
            f"{p} has no tokenizer and its vocabulary ({model.config.vocab_size} tokens) is not "
            "GPT-2's",
            "the tokenizer/ directory of the run, or vocab.json + merges.txt beside the weights",
            "copy the tokenizer the model was trained with into the model directory",
        )
    return model, tok


def _read_prompts(args: argparse.Namespace) -> list[str]:
    texts = list(args.prompt)
    for name in args.prompt_file:
        text = read_prompt_file(name)
        if args.lines:
            texts += [ln for ln in text.splitlines() if ln.strip()]
        else:
            texts.append(text)
    if not args.prompt and not args.prompt_file and not _stdin_is_terminal():
        try:
            piped = read_text_bounded("-", PROMPT_LIMIT, "standard input", "prompt_file")
        except DataError as e:
            if "cannot read" not in str(e):
                raise
            piped = ""  # stdin closed or not readable: no prompt
        if piped.strip():
            texts.append(piped.rstrip("\n"))
    return texts or [""]


def _stdin_is_terminal() -> bool:
    try:
        return sys.stdin is None or sys.stdin.isatty()
    except (OSError, ValueError):
        return True


PROMPT_LIMIT = 64 << 20  # bytes of one prompt file (or of stdin) read at most


def read_prompt_file(name: str) -> str:
    """A prompt file's whole text ('-' = stdin), at most PROMPT_LIMIT bytes (a FIFO or /dev/zero
    that never ends is refused, not read into memory); one-line errors for unreadable files."""
    return read_text_bounded(name, PROMPT_LIMIT, "prompt file", "prompt_file")


def _encode(tok: Any, text: str, allow_special: bool) -> list[int]:
    """Prompt ids (generate.prompt_ids), with a warning for special-token text left plain."""
    found = [s for s in tok.special_tokens if s in text]
    if found and not allow_special:
        warnings.warn(
            f"the prompt contains {found[0]!r}, encoded as plain text; add "
            "--allow-special to encode it as the special token",
            stacklevel=2,
        )
    return prompt_ids(tok, text, allow_special)


def _run_batches(model, tok, cfg: SampleConfig, args, rows, writer) -> Iterator[Any]:
    """Completions of every row, in order, generated cfg.batch_size at a time."""
    generator = None
    if cfg.seed is not None:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    for start in range(0, len(rows), cfg.batch_size):
        batch = rows[start : start + cfg.batch_size]
        on_text = None
        if args.stream:
            writer.begin(batch[0][1])
            on_text = writer.live  # row 0 of each batch is shown live, the rest when it ends
        yield from complete(
            model,
            tok,
            [ids for _, _, ids in batch],
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_k,
            cfg.top_p,
            cfg.repetition_penalty,
            generator,
            stop=cfg.stop,
            stop_at_eos=not args.ignore_eos,
            on_text=on_text,
        )


class _Writer:
    """Prints samples (plain, streamed or JSON lines) or writes them to --out, in order."""

    def __init__(self, args: argparse.Namespace, total: int, out: OutputDir | None = None) -> None:
        self.args, self.total, self.count, self.streamed = args, total, 0, False
        self.out = out
        # --chat shows the reply only, without the template's text before it (a space)
        self.chat, self.lead = bool(getattr(args, "chat", None)), getattr(args, "reply_lead", "")
        self.pending_lead = ""

    def begin(self, prompt: str) -> None:
        """A streamed sample starts: show its prompt."""
        self._separator()
        print("" if self.chat else prompt, end="", flush=True)
        self.streamed, self.pending_lead = True, self.lead

    def live(self, row: int, piece: str) -> None:
        if row == 0:
            if self.pending_lead:
                piece = piece.removeprefix(self.pending_lead)
                self.pending_lead = ""
            print(piece, end="", flush=True)

    def done(self, prompt: str, prompt_index: int, c: Any) -> None:
        record = {
            "index": self.count,
            "prompt_index": prompt_index,
            "prompt": prompt,
            "text": c.text,
            "ids": c.ids,
            "prompt_ids": c.prompt_ids,
            "finish_reason": c.finish_reason,
        }
        if self.args.out:
            stem = f"sample_{self.count:05d}"
            atomic_write_text(self.out.claim_file(stem + ".txt"), prompt + c.text)
            if self.args.json:
                atomic_write_json(self.out.claim_file(stem + ".json"), record)
        elif self.args.json:
            print(json.dumps(record, ensure_ascii=False), flush=True)
        elif self.streamed:
            print(flush=True)
            self.streamed = False
        else:
            self._separator()
            shown = c.text.removeprefix(self.lead) if self.chat else prompt + c.text
            print(shown, flush=True)
        self.count += 1

    def _separator(self) -> None:
        if self.count and not self.args.out:
            print("-" * 40, flush=True)

    def finish(self) -> None:
        if self.args.out:
            print(f"wrote {self.count} samples to {self.args.out}", file=sys.stderr)


def _interactive(model: Any, tok: Any, cfg: SampleConfig, args: argparse.Namespace) -> int:
    """Read a prompt, stream its samples, repeat; Ctrl-C stops one answer, Ctrl-D quits."""
    args.stream = True
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        rows = [(0, text, _encode(tok, text, args.allow_special))] * cfg.num_samples
        writer = _Writer(args, len(rows))
        try:
            for completion, (i, prompt, _) in zip(
                _run_batches(model, tok, cfg, args, rows, writer), rows
            ):
                writer.done(prompt, i, completion)
        except KeyboardInterrupt:
            print(file=sys.stderr)


@contextlib.contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """Show warnings as one `gpt2lab: warning: ...` line each."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"gpt2lab: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():  # restores showwarning and the filters on the way out
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield
