"""The decoding step in C (`decode.c`, up to 16 rows a step), compiled here on first use.

Batch-1 decoding reads every weight once per token, so it runs at the speed the weights stream
from memory; `decode.c` writes the step as plain loops (one call per token, each weight read once
in order) where PyTorch's one-row products stream at about two thirds of the bandwidth and its
~170 operations a step each cost dispatch time (figures in docs/performance.md). It is an
optional accelerator: `native_step(...)` returns None, and the PyTorch `DecodeStep` runs, where
there is no C compiler, the build fails, the CPU is not x86-64/ARM64 Linux or macOS, or
`GPT2LAB_NATIVE=0` is set. The library (decode.c, with gelu.c and attention.c for the training
kernels of `gpt2lab.kernels.gelu` and `gpt2lab.kernels.attention`) is compiled once per source,
compiler and CPU into `$XDG_CACHE_HOME/gpt2lab/native` (default ~/.cache), written atomically,
and loaded with ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from gpt2lab.kernels.int8 import Int8Linear
from gpt2lab.model import GPT, KVCache

HERE = Path(__file__).parent
# one library: decoding, and GELU and attention for training
SOURCES = [HERE / "decode.c", HERE / "gelu.c", HERE / "attention.c"]
HEADERS = [HERE / "vecmath.h"]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
# dtype codes of the tensors the training kernels (gelu.c, attention.c) take
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# the C step reads float16 weights too (converted as they are read, sums in float32): PyTorch has
# no fast float16 product on most CPUs (124M, batch 1: 8.6 tokens/s against bfloat16's 116)
DECODE_DTYPES = {**DTYPES, torch.float16: 3}
# rows (sequences) a C step takes; more go through PyTorch's batched products, which are as fast
# there. 124M, the C step against the PyTorch step, in turns, at 1 / 2 / 4 / 8 / 16 rows
# (bench/decode_rows.py): bf16 1.99x / 1.98x / 1.57x / 1.22x / 1.21x, int8 2.86x ... 1.16x,
# float32 1.65x / 1.69x / 1.18x / 1.01x / 1.03x
MAX_ROWS = 16
MAX_ROWS_FLOAT32 = 4

_LAYER_FIELDS = ("ln1_w", "ln1_b", "attn_w", "attn_b", "proj_w", "proj_b")
_LAYER_FIELDS += ("ln2_w", "ln2_b", "fc_w", "fc_b", "fcp_w", "fcp_b")
_SCALE_FIELDS = ("attn_s", "proj_s", "fc_s", "fcp_s")  # int8 matrices' row scales
_SUM_FIELDS = ("attn_r", "proj_r", "fc_r", "fcp_r")  # and their rows' sums (int32)
_MATRICES = {"attn": "attn.c_attn", "proj": "attn.c_proj", "fc": "mlp.c_fc", "fcp": "mlp.c_proj"}


class _Model(ctypes.Structure):
    """decode.c's `Model`: sizes, then pointers to the tensors (kept alive by NativeStep)."""

    _fields_ = [
        *((name, ctypes.c_int) for name in ("n_layer", "n_head", "head_size", "n_embd")),
        *((name, ctypes.c_int) for name in ("vocab", "max_len", "dtype", "threads", "wdtype")),
        ("eps", ctypes.c_float),
        *((name, ctypes.POINTER(ctypes.c_void_p)) for name in _LAYER_FIELDS),
        *((name, ctypes.c_void_p) for name in ("lnf_w", "lnf_b", "wte", "wpe", "head_w")),
        *((name, ctypes.c_void_p) for name in ("k_cache", "v_cache", "work")),
        *((name, ctypes.POINTER(ctypes.c_void_p)) for name in _SCALE_FIELDS),
        *((name, ctypes.c_void_p) for name in ("head_s", "wte_s")),
        *((name, ctypes.POINTER(ctypes.c_void_p)) for name in _SUM_FIELDS),
        ("head_r", ctypes.c_void_p),
    ]


class _Step(ctypes.Structure):
    """decode.c's `Step`: the rows, the write column, the cache's strides, ids, positions, mask."""

    _fields_ = [
        ("rows", ctypes.c_int),
        ("pos", ctypes.c_int),
        ("layer_stride", ctypes.c_int64),
        ("row_stride", ctypes.c_int64),
        ("ids", ctypes.c_void_p),
        ("positions", ctypes.c_void_p),
        ("mask", ctypes.c_void_p),
        ("mask_stride", ctypes.c_int64),
    ]


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "gpt2lab" / "native"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """decode.c and gelu.c compiled for this CPU (cached on disk), or None where they cannot be."""
    if os.environ.get("GPT2LAB_NATIVE", "1") == "0" or platform.system() not in ("Linux", "Darwin"):
        return None
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None
    key = hashlib.sha256(b"".join(f.read_bytes() for f in [*SOURCES, *HEADERS]))
    key.update(cc.encode() + " ".join(FLAGS).encode() + _cpu_signature().encode())
    path = _cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            _build(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError):
        return None
    lib.gpt2lab_rows.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(_Step), ctypes.c_void_p]
    lib.gpt2lab_rows.restype = None
    lib.gpt2lab_work_floats.argtypes = [ctypes.c_int] * 4
    lib.gpt2lab_work_floats.restype = ctypes.c_size_t
    size, flag = ctypes.c_int64, ctypes.c_int
    lib.gpt2lab_gelu.argtypes = [ctypes.c_void_p, ctypes.c_void_p, size, flag, flag]
    lib.gpt2lab_gelu.restype = None
    lib.gpt2lab_gelu_backward.argtypes = [*[ctypes.c_void_p] * 3, size, flag, flag]
    lib.gpt2lab_gelu_backward.restype = None
    lib.gpt2lab_attention_work_floats.argtypes = [flag, flag]
    lib.gpt2lab_attention_work_floats.restype = ctypes.c_size_t
    lib.gpt2lab_attention.argtypes = [*[ctypes.c_void_p] * 4, *[flag] * 6]
    lib.gpt2lab_attention.restype = None
    lib.gpt2lab_attention_backward.argtypes = [*[ctypes.c_void_p] * 5, *[flag] * 6]
    lib.gpt2lab_attention_backward.restype = None
    lib.gpt2lab_f16_round_trip.argtypes = [*[ctypes.c_void_p] * 3, size]
    lib.gpt2lab_f16_round_trip.restype = None
    return lib


def _build(cc: str, path: Path) -> None:
    """Compile into a temporary file beside `path`, then rename: never a half-written library."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        cmd = [cc, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def huge_page_buffer(nbytes: int) -> Tensor:
    """`nbytes` of zeroed memory (uint8) in an anonymous mapping of its own, advised to Linux as
    transparent huge pages. A matrix-vector product streams its matrix once: from 4 KiB pages every
    4 KiB costs a TLB miss and restarts the hardware prefetcher, from 2 MiB pages it does not
    (docs/performance.md). Elsewhere, or where the kernel declines, plain pages; where the mapping
    itself fails, ordinary memory from PyTorch's allocator."""
    try:
        buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, AttributeError, ValueError):  # no anonymous mmap here, or no room for one
        return torch.zeros(nbytes, dtype=torch.uint8)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            buf.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buf, dtype=torch.uint8)  # the tensor keeps the mapping alive


def into_huge_pages(tensors: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """Copies of `converted` in one `huge_page_buffer`, in order, each 64-byte aligned, for
    (source, converted) pairs. Where `converted` is its source itself (a model's tensor used as it
    is), the source is moved there (`source.data` set to the copy, values unchanged): one copy of
    the weights in memory, not two."""
    sizes = [(c.numel() * c.element_size() + 63) // 64 * 64 for _, c in tensors]
    # not inference tensors, even under inference_mode: a model's parameters stay ordinary
    # tensors (they can be trained further, and torch's matmul treats them as parameters)
    with torch.inference_mode(False):
        buf, at, out = huge_page_buffer(sum(sizes)), 0, []
        for (source, converted), size in zip(tensors, sizes):
            n = converted.numel() * converted.element_size()
            slot = buf[at : at + n].view(converted.dtype).view(converted.shape)
            slot.copy_(converted)
            if converted.data_ptr() == source.data_ptr():
                source.data = slot
            out.append(slot)
            at += size
    return out


class NativeStep:
    """`step(ids, cache, position_ids, mask)` through decode.c: the logits (B, vocab_size),
    float32, of one new token per row, ids (B, 1), after what `cache` holds, written at
    `cache.pos` (which it advances), for up to `max_rows` rows, left-padded or not.

    The matrices (the blocks' four and the head) lie in one huge-page buffer in the order a step
    reads them: `dtype` copies where the model's are another dtype (a float32 model decoded in
    bfloat16), or the model's own tensors, moved there (see `into_huge_pages`). For an int8 model
    (`gpt2lab.quantize`), the matrices' int8 values, with their row scales and row sums, and
    float32 for the rest."""

    def __init__(self, lib: ctypes.CDLL, model: GPT, dtype: torch.dtype) -> None:
        cfg = model.config
        int8 = isinstance(model.lm_head, Int8Linear)
        if int8:
            dtype = torch.float32
        self.lib, self.dtype, self.vocab = lib, dtype, cfg.vocab_size
        self.max_rows = MAX_ROWS_FLOAT32 if dtype == torch.float32 and not int8 else MAX_ROWS
        self.keep: list[Tensor] = []  # every tensor a pointer refers to

        def converted(t: Tensor) -> Tensor:
            t = t.detach()
            return (t if t.dtype in (torch.int8, torch.int32) else t.to(dtype)).contiguous()

        def ptr(t: Tensor | None) -> int | None:
            if t is None:
                return None
            t = converted(t)
            self.keep.append(t)
            return t.data_ptr()

        def array(tensors) -> ctypes.Array:  # one pointer per layer
            return (ctypes.c_void_p * cfg.n_layer)(*(ptr(t) for t in tensors))

        def row_sums(values: Tensor) -> Tensor:
            return values.sum(dim=1, dtype=torch.int32)

        h = model.transformer
        blocks = list(h.h)
        linears = {key: [b.get_submodule(path) for b in blocks] for key, path in _MATRICES.items()}
        # an int8 matrix's plain values are moved here (or unpacked once from fbgemm's layout,
        # with compact=False); a float model's head is its token table (tied), whose rows the
        # step also looks up
        table = model.lm_head.int8_weight() if int8 else model.lm_head.weight
        in_step_order = [m for layer in zip(*linears.values()) for m in layer]
        matrices = [m.int8_weight() if int8 else m.weight for m in in_step_order]
        *flat, table = into_huge_pages([(t, converted(t)) for t in [*matrices, table]])
        values = {key: flat[i :: len(_MATRICES)] for i, key in enumerate(_MATRICES)}
        arrays = {  # ctypes arrays, kept alive with the struct
            "ln1_w": array(b.ln_1.weight for b in blocks),
            "ln1_b": array(b.ln_1.bias for b in blocks),
            "ln2_w": array(b.ln_2.weight for b in blocks),
            "ln2_b": array(b.ln_2.bias for b in blocks),
        }
        for key, ms in linears.items():
            arrays[f"{key}_w"] = array(values[key])
            arrays[f"{key}_b"] = array(m.bias for m in ms)
            if int8:
                arrays[f"{key}_s"] = array(m.scale for m in ms)
                arrays[f"{key}_r"] = array(row_sums(v) for v in values[key])
        if int8:
            head, head_s, head_r = table, model.lm_head.scale, row_sums(table)
            wte, wte_s = h.wte.values, h.wte.scale
        else:
            head, head_s, head_r = table[: cfg.vocab_size], None, None
            wte, wte_s = table, None
        self.arrays = arrays
        self.m = _Model(
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            head_size=cfg.head_size,
            n_embd=cfg.n_embd,
            vocab=cfg.vocab_size,
            dtype=DECODE_DTYPES[dtype],
            wdtype=2 if int8 else DECODE_DTYPES[dtype],
            eps=h.ln_f.eps,
            lnf_w=ptr(h.ln_f.weight),
            lnf_b=ptr(h.ln_f.bias),
            wte=ptr(wte),
            wte_s=ptr(wte_s),
            wpe=ptr(h.wpe.weight),
            head_w=ptr(head),
            head_s=ptr(head_s),
            head_r=ptr(head_r),
            **{k: ctypes.cast(v, ctypes.POINTER(ctypes.c_void_p)) for k, v in arrays.items()},
        )
        self.work: Tensor | None = None
        self.rows_fit = 0  # the rows `work` was sized for
        self.n_tokens, self.n_positions = wte.size(0), h.wpe.weight.size(0)

    def fits(self, cache: KVCache, mask: Tensor | None = None) -> bool:
        """Whether decode.c can read and write `cache` (this dtype, at most `max_rows` rows, each
        row's heads contiguous: a whole KVCache or its first rows) and read `mask`."""
        k, v = cache.k, cache.v
        L, B, H, T, D = k.shape
        rows_ok = k.dtype == self.dtype and 1 <= B <= self.max_rows and k.stride() == v.stride()
        heads_ok = k.stride()[2:] == (T * D, D, 1)
        mask_ok = mask is None or (mask.dtype == torch.bool and mask.stride(-1) == 1)
        return rows_ok and heads_ok and mask_ok

    def step(
        self,
        ids: Tensor,
        cache: KVCache,
        position_ids: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, vocab_size), float32, of ids (B, 1) after what `cache` holds, written at
        `cache.pos` (which it advances); `position_ids` (B, 1) and `mask` (B, pos + 1) as the
        model takes them for left-padded rows."""
        m, B, pos = self.m, ids.size(0), cache.pos
        if self.work is None or (m.max_len, self.rows_fit) != (cache.max_len, B):
            n = self.lib.gpt2lab_work_floats(m.n_embd, m.n_head, cache.max_len, B)
            self.work = torch.empty(n)
            m.max_len, m.work, self.rows_fit = cache.max_len, self.work.data_ptr(), B
        m.k_cache, m.v_cache = cache.k.data_ptr(), cache.v.data_ptr()
        m.threads = torch.get_num_threads()
        tokens = ids[:, 0].to(torch.int64).contiguous()
        positions = position_ids
        if positions is not None:
            positions = positions[:, 0].to(torch.int64).contiguous()
        low, top = (pos, pos) if positions is None else (int(positions.min()), int(positions.max()))
        # C would read or write out of bounds: fail as the model's own lookup does
        if not (0 <= int(tokens.min()) and int(tokens.max()) < self.n_tokens):
            raise IndexError(f"a token of {tokens.tolist()} is outside the model's table")
        if not (0 <= low and top < self.n_positions and pos < cache.max_len):
            raise IndexError(f"positions {low}-{top} (cache column {pos}) are outside the tables")
        if B != cache.k.size(1) or (positions is not None and positions.numel() != B):
            raise ValueError(f"{B} rows of ids for a cache of {cache.k.size(1)} rows")
        if mask is not None and mask.shape != (B, pos + 1):
            raise ValueError(f"a mask of shape {tuple(mask.shape)} for {B} rows at column {pos}")
        st = _Step(
            rows=B,
            pos=pos,
            layer_stride=cache.k.stride(0),
            row_stride=cache.k.stride(1),
            ids=tokens.data_ptr(),
            positions=None if positions is None else positions.data_ptr(),
            mask=None if mask is None else mask.data_ptr(),
            mask_stride=0 if mask is None else mask.stride(0),
        )
        logits = torch.empty(B, self.vocab)  # a fresh tensor each step: callers may keep it
        self.lib.gpt2lab_rows(ctypes.byref(m), ctypes.byref(st), logits.data_ptr())
        cache.pos += 1
        return logits


def native_step(model: GPT, dtype: torch.dtype) -> NativeStep | None:
    """The C step for a float32, bfloat16, float16 or int8 (`gpt2lab.quantize`) GPT on a CPU,
    or None where it cannot run."""
    if dtype not in DECODE_DTYPES:
        return None
    lib = load_library()
    return None if lib is None else NativeStep(lib, model, dtype)
