"""Files: crash-safe writes (temp file, fsync, rename) and UTF-8 reading with one-line errors.

A reader never sees a half-written file; a byte that is not UTF-8 is reported with the file, its
offset (and line, when the data starts at the top of the file) and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpt2lab.errors import ConfigError, DataError, mark_key

_BOM = b"\xef\xbb\xbf"
UTF8_FIX = (
    "convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or pass errors='replace' "
    "(--errors replace)"
)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (a rename) to disk; a no-op where the OS does not allow it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file path beside `path` for a writer that opens the file itself (safetensors,
    GGUF, ONNX, `atomic_open`); on success fsync it and rename it over `path`, else drop it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[Any]:
    """Open a temp file beside `path`; on success fsync and rename it over `path`, else drop it."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success fsync its files and rename it to `path`.

    An existing `path` is replaced only after the new one is complete. On error the temp dir goes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- reading UTF-8 ----------------------------------------------------------------------------


def decode_utf8(
    data: bytes,
    path: str | os.PathLike,
    errors: str = "strict",
    offset: int = 0,
    expected: str = "UTF-8 text",
    fix: str = UTF8_FIX,
) -> str:
    """Decode `data`, read from `path` at byte `offset`; errors: "strict", "replace", ...

    A byte that is not UTF-8 (with errors="strict") is a DataError naming the file, the byte, its
    offset in the file and, when `data` starts the file (`offset` 0), its line.
    """
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        where = f"offset {offset + e.start}"
        if offset == 0:
            line = data.count(b"\n", 0, e.start) + 1
            where += f" (line {line})"
        raise DataError(
            f"{path} is not UTF-8: byte {data[e.start]:#04x} at {where}", expected, fix
        ) from None
    except LookupError:
        raise DataError(f"unknown errors={errors!r}", "'strict' or 'replace'") from None


def read_utf8(path: str | os.PathLike, errors: str = "strict") -> str:
    """A whole file as UTF-8 text (see `decode_utf8` for `errors` and the error it raises)."""
    return decode_utf8(Path(path).read_bytes(), path, errors)


class UTF8Decoder:
    """Decode a file block by block: a character cut by a block's end waits for the next block.

    The text is the same as decoding the whole file at once; errors name the exact file offset.
    `skip_bom=True` drops a UTF-8 byte-order mark at the start of the file (as "utf-8-sig" does).
    """

    def __init__(self, path: str | os.PathLike, errors: str = "strict", skip_bom: bool = False):
        self.path, self.errors = path, errors
        self.offset = 0  # the file offset of the first byte not decoded yet
        self._pending = b""  # an incomplete character at the end of the last block
        self._bom_unseen = skip_bom

    def decode(self, block: bytes, final: bool = False) -> str:
        """The text of `block` after what came before; `final=True` flushes what is left."""
        data = self._pending + block if self._pending else block
        if self._bom_unseen:
            if len(data) < len(_BOM) and _BOM.startswith(data) and not final:
                self._pending = data  # too short to tell yet
                return ""
            self._bom_unseen = False
            if data.startswith(_BOM):
                data, self.offset = data[len(_BOM) :], len(_BOM)
        cut = len(data) if final else _complete_utf8(data)
        text = decode_utf8(data[:cut], self.path, self.errors, self.offset)
        self._pending, self.offset = data[cut:], self.offset + cut
        return text


def _complete_utf8(data: bytes) -> int:
    """The length of `data` without an incomplete UTF-8 character at its end."""
    for k in range(1, min(4, len(data)) + 1):
        byte = data[-k]
        if byte & 0xC0 != 0x80:  # a lead byte or ASCII: does its character fit in k bytes?
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 6 else 3 if byte >> 4 == 14 else 4
            return len(data) - k if need > k else len(data)
    return len(data)


# --- disk full ----------------------------------------------------------------------------------

# a full disk, a quota, or a file-size limit (RLIMIT_FSIZE): the write stops, the data is fine
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


def free_space(path: str | os.PathLike) -> str:
    """Free space on the file system holding `path` (its nearest existing parent), as text."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "unknown free space"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit} free" if unit == "bytes" else f"{free:.1f} {unit} free"
        free /= 1024
    return "unknown free space"


def disk_full_reason(e: OSError, path: str | os.PathLike | None = None) -> str:
    """'no space left on device' / 'file too large (a file-size limit)' / quota, with free space."""
    where = path or e.filename or "."
    why = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file too large (a file-size "
           "limit)"}.get(e.errno or 0, "disk quota exceeded")  # fmt: skip
    return f"{why}, {free_space(os.path.dirname(os.fspath(where)) or '.')}"


# --- limits on what is read and started ---------------------------------------------------------

RECORD_LIMIT = 64 << 20  # bytes of one JSONL record (line) read at most by default


def usable_cores() -> int:
    """CPUs this process may use (the affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def sane_workers(requested: int | None, per_core: int = 4) -> int:
    """`requested` worker processes (None: one per usable core); past `per_core` x the cores, a
    ConfigError (thousands of processes would exhaust memory and process slots)."""
    cores = usable_cores()
    if requested is None:
        return cores
    if requested < 1 or requested > per_core * cores:
        raise ConfigError(
            f"{mark_key('workers', requested)} but this machine has {cores} usable cores",
            f"1 to {per_core * cores} workers",
            f"drop {mark_key('workers')} (it uses all {cores} cores) or pass a smaller number",
        )
    return requested


def read_line_bounded(f: Any, limit: int, path: str | os.PathLike, lineno: int) -> bytes:
    """The next line of binary file `f` (b"" at the end); a line over `limit` bytes is a DataError
    naming the file, the line and the flag that raises the limit - it is never read whole."""
    line = f.readline(limit + 1)
    if len(line) > limit and not line.endswith(b"\n"):
        raise DataError(
            f"{path} line {lineno} is longer than {limit:,} bytes",
            "one record per line, each under the limit",
            f"raise {mark_key('max_record_bytes')} if such records are intended, or split the file",
        )
    return line


def read_text_bounded(path: str | os.PathLike, limit: int, what: str, flag: str) -> str:
    """A whole UTF-8 file (or a FIFO, /dev/zero, stdin as '-') read up to `limit` bytes; longer
    is a DataError before memory runs out."""
    name = os.fspath(path)
    try:
        if name == "-" and not hasattr(sys.stdin, "buffer"):  # a text stream (tests, IDEs)
            data = sys.stdin.read(limit + 1).encode("utf-8", "surrogateescape")
        elif name == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(name, "rb") as f:
                data = f.read(limit + 1)
    except OSError as e:
        raise DataError(
            f"cannot read {what} {name} ({e.strerror or e})",
            "a readable UTF-8 text file",
            f"check the path given to {mark_key(flag)}",
        ) from e
    if len(data) > limit:
        raise DataError(
            f"{what} {name} is longer than {limit:,} bytes (or never ends)",
            f"a text file under {limit:,} bytes",
            f"pass a shorter file to {mark_key(flag)}",
        )
    return decode_utf8(data, name)


def path_inside(base: str | os.PathLike, relative: Any, source: str, what: str) -> Path:
    """`base / relative`, for a path read from a file (`source`): it must be relative text that
    resolves inside `base`, symbolic links followed; else a DataError naming both."""
    base_real = os.path.realpath(base)
    ok = isinstance(relative, str) and relative.strip() and "\0" not in relative
    target = os.path.realpath(os.path.join(base_real, relative.strip())) if ok else ""
    if (
        not ok
        or os.path.isabs(relative.strip())
        or os.path.commonpath([base_real, target]) != (base_real)
    ):
        shown = repr(relative)[:80]
        raise DataError(
            f"{source} names {what} {shown}, which is outside {base}",
            f"a path inside {base}",
            f"fix or delete {source} (gpt2lab never follows a path out of the directory)",
        )
    return Path(target)
