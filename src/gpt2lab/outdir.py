"""Output paths gpt2lab owns: a marker naming what it wrote there, and one writer at a time.

A directory that a command writes (`prepare`, `train`, `convert`, ...) holds `.gpt2lab`, a JSON
marker naming gpt2lab, its version, the command and every entry it wrote there. `--force` /
`--overwrite` removes only those entries; a non-empty directory without the marker is refused;
an output equal to, inside or containing an input is refused before anything is read or written.
A single output file (a .gguf, .onnx or .png) gets the same record beside it, `.NAME.gpt2lab`,
which also says the size and time the file had when gpt2lab wrote it: a file changed since then
is the user's again.

While a command writes, it holds an exclusive OS lock (`flock`) on `.gpt2lab.lock` in the
directory (on the record file, for a single file) with its PID inside. The OS drops the lock
when the process ends, however it ends, so a crash never leaves a stale lock. A second process
gets a one-line error naming the holder's PID. See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from gpt2lab.errors import BusyError, OutputError, mark_key
from gpt2lab.io import atomic_write_json

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, ownership still applies
    fcntl = None  # type: ignore[assignment]

MARKER = ".gpt2lab"
LOCK = ".gpt2lab.lock"
TOOL = "gpt2lab"
INFRA = (MARKER, LOCK)  # gpt2lab's own bookkeeping in a directory
_INFRA = set(INFRA)
_HELD: dict[str, OutputDir] = {}  # directories this process holds, by real path (re-entrant)


def gpt2lab_version() -> str:
    try:
        return version("gpt2lab")
    except PackageNotFoundError:  # running from a source tree
        return "0.1.0+src"


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(path)))))


def _short(names: list[str], n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(sorted(names)[:n]) + more


# ---- outputs and inputs ----------------------------------------------------------------------


def check_not_overlapping(
    out: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None],
    flag: str = "out",
) -> None:
    """Refuse an output equal to, inside or containing one of `inputs` (those that exist)."""
    o = _real(out)
    for given in inputs:
        if given is None or os.fspath(given) == "" or not os.path.lexists(given):
            continue  # a hub name, a preset, nothing given
        i = _real(given)
        if o == i:
            how = "is the input"
        elif i in o.parents:
            how = "is inside the input"
        elif o in i.parents:
            how = "contains the input"
        else:
            continue
        raise OutputError(
            f"{mark_key(flag, out)} {how} {given}",
            "an output apart from every input",
            f"choose a {mark_key(flag)} outside {given} that does not hold it either",
        )


# ---- the lock ---------------------------------------------------------------------------------


class FileLock:
    """An exclusive `flock` on `path`, holding '<pid> gpt2lab <command>'; dropped at exit."""

    def __init__(
        self, path: Path, command: str, what: str, flag: str = "out", keep_body: bool = False
    ) -> None:
        self.path, self.fd, self.keep_body, self.body = path, -1, keep_body, b""
        if fcntl is None:
            return
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise
                raise BusyError(
                    f"{what} is being written by another gpt2lab process ({holder})",
                    "one writer at a time",
                    f"wait for it to finish (or stop it), or choose another {mark_key(flag)}",
                ) from None
            try:  # removed and re-created between open and flock? lock the file that is there
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd, self.holder = fd, f"{os.getpid()} gpt2lab {command}\n".encode()
        if keep_body:  # line 1 says who holds the lock, the rest is kept (a file's record)
            old = os.pread(fd, 1 << 20, 0)
            self.body = old.split(b"\n", 1)[1] if b"\n" in old else b""
        self._write(self.holder)

    def _write(self, first: bytes) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, first + self.body, 0)

    def set_body(self, body: bytes) -> None:
        """Replace what follows the holder line (and flush it to disk)."""
        if self.fd >= 0:
            self.body = body
            self._write(self.holder)
            os.fsync(self.fd)

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                self._write(b"released\n" if self.keep_body else b"")
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
    except OSError:
        text = []
    if text and text[0].isdigit():
        return f"PID {text[0]}" + (f": `{' '.join(text[1:3])}`" if len(text) > 1 else "")
    return "PID unknown"


# ---- directories ------------------------------------------------------------------------------


def _safe_name(name: Any) -> bool:
    """A marker entry: a relative path below the directory (a file's list is not trusted)."""
    if not isinstance(name, str) or not name or "\0" in name:
        return False
    p = Path(name)
    return not p.is_absolute() and ".." not in p.parts and p.parts[0] not in _INFRA


def read_marker(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The `.gpt2lab` marker of a directory, if it is a valid gpt2lab marker, else None."""
    f = Path(directory) / MARKER
    try:
        if f.is_symlink() or not f.is_file() or f.stat().st_size > 1 << 24:
            return None
        marker = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("tool") != TOOL:
        return None
    files = marker.get("files")
    marker["files"] = [n for n in files if _safe_name(n)] if isinstance(files, list) else []
    return marker


def is_owned_dir(directory: str | os.PathLike) -> bool:
    """True when gpt2lab marked `directory` as its own."""
    return read_marker(directory) is not None


class OutputDir:
    """A directory gpt2lab writes, with its marker and (usually) its lock. See `claim_output_dir`.

    `record(name)` before writing an entry; `claim_file(name)` also refuses an existing entry
    that is not gpt2lab's. `remove_ours()` deletes what the marker lists (and temp files named
    after it), `discard()` also the directory if this claim created it, `release()` unlocks.
    """

    def __init__(
        self, path: Path, command: str, marker: dict, created: bool, lock: FileLock | None
    ) -> None:
        self.path, self.command, self.marker = path, command, marker
        self.created, self.lock = created, lock
        self.depth = 1  # claims of this directory by this process not yet released

    @property
    def files(self) -> list[str]:
        return list(self.marker["files"])

    def owns(self, name: str) -> bool:
        """True when `name` (relative) is an entry gpt2lab wrote, or lies inside one."""
        parts = Path(name).parts
        listed = set(self.marker["files"])
        return any("/".join(parts[:k]) in listed for k in range(1, len(parts) + 1))

    def record(self, *names: str) -> None:
        """Note entries as gpt2lab's (before writing them, so a crash leaves them listed)."""
        new = [n for n in names if not self.owns(n)]
        for n in new:
            if not _safe_name(n):
                raise ValueError(f"not an entry name below {self.path}: {n!r}")
        if new:
            self.marker["files"] = [*self.marker["files"], *new]
            self.marker["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            atomic_write_json(self.path / MARKER, self.marker)

    def claim_file(self, name: str, flag: str = "out") -> Path:
        """`path/name` for writing: refused if it exists and is not gpt2lab's; else recorded."""
        p = self.path / name
        if os.path.lexists(p) and not self.owns(name):
            raise OutputError(
                f"{p} exists and gpt2lab did not write it",
                "gpt2lab to replace only its own files",
                f"move it away, or choose another {mark_key(flag)}",
            )
        self.record(name)
        return p

    def remove_ours(self, keep: Iterable[str] = ()) -> list[str]:
        """Delete every entry the marker lists (and `.NAME.*` temp files) but `keep`; nothing
        else."""
        removed, kept = [], [n for n in self.marker["files"] if n in set(keep)]
        for name in self.marker["files"]:
            if name in kept:
                continue
            p = self.path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.lexists(p):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            else:
                continue
            removed.append(name)
        tops = {Path(n).parts[0] for n in self.marker["files"] if n not in kept}
        for p in self.path.iterdir():
            if any(p.name.startswith(f".{t}.") for t in tops):  # atomic_path / atomic_dir temps
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        if self.marker["files"] != kept:
            self.marker["files"] = kept
            atomic_write_json(self.path / MARKER, self.marker)
        return removed

    def discard(self) -> None:
        """remove_ours(), unlock, and remove the directory too if this claim created it. Only the
        outermost claim discards (a library call inside a command leaves it to the command)."""
        if self.depth > 1 or not self.path.is_dir():
            return
        self.remove_ours()
        left = [p.name for p in self.path.iterdir() if p.name not in _INFRA]
        if self.created and not left:
            for name in (MARKER, LOCK):
                with contextlib.suppress(FileNotFoundError):
                    (self.path / name).unlink()
            self._unlock()
            with contextlib.suppress(OSError):
                self.path.rmdir()

    def _unlock(self) -> None:
        self.depth = 1
        self.release()

    def release(self) -> None:
        """Undo one claim; the last one unlocks (the OS also unlocks when the process ends)."""
        self.depth -= 1
        if self.depth > 0:
            return
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        _HELD.pop(str(_real(self.path)), None)

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_output_dir(
    path: str | os.PathLike,
    command: str,
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    lock: bool = True,
    adopt: Callable[[Path], list[str] | None] | None = None,
    flag: str = "out",
    compatible: Iterable[str] = (),
) -> OutputDir:
    """Take `path` as `command`'s output directory, or refuse with a one-line OutputError.

    Refused: a `path` equal to, inside or containing one of `inputs`; a file; a non-empty
    directory without gpt2lab's marker (unless `adopt(path)` recognises it as gpt2lab's, returning
    the entries to list); a directory another command wrote (unless named in `compatible`).
    Accepted: a new or empty directory (marked now) or a marked one; with
    `force`, the entries the marker lists are removed first. With `lock`, an exclusive lock is held
    until `release()` (or exit); a second process gets a BusyError naming this one's PID. Claiming
    a directory this process already holds returns the same OutputDir.
    """
    path = Path(path)
    check_not_overlapping(path, inputs, flag)
    held = _HELD.get(str(_real(path)))
    if held is not None:
        held.depth += 1
        if force:
            held.remove_ours()
        return held
    if os.path.lexists(path) and not path.is_dir():
        raise OutputError(
            f"{mark_key(flag, path)} is a file", "a directory", f"choose another {mark_key(flag)}"
        )
    created = not path.exists()
    accepted = {command, *compatible}
    adopted = None if created else _check_unmarked(path, adopt, flag, accepted)
    path.mkdir(parents=True, exist_ok=True)
    held_lock = FileLock(path / LOCK, command, str(path), flag) if lock else None
    try:
        marker = read_marker(path)
        if marker is None:
            if adopted is None:  # checked again under the lock: someone may have written since
                adopted = _check_unmarked(path, adopt, flag, accepted) or []
            marker = {
                "tool": TOOL,
                "version": gpt2lab_version(),
                "command": command,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": [n for n in adopted if _safe_name(n)],
            }
            atomic_write_json(path / MARKER, marker)
        _check_command(path, marker, accepted, flag)
        out = OutputDir(path, command, marker, created, held_lock)
        if force:
            out.remove_ours()
    except BaseException:
        if held_lock is not None:
            held_lock.release()
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    if lock:
        _HELD[str(_real(path))] = out
    return out


def _check_command(path: Path, marker: dict, accepted: set[str], flag: str) -> None:
    """A directory one command wrote is not another's to clear (a prepare --out runs/x must not
    remove the run's checkpoints, even though gpt2lab wrote them)."""
    wrote = marker.get("command")
    if wrote not in accepted:
        raise OutputError(
            f"{mark_key(flag, path)} holds the output of `gpt2lab {wrote}`",
            f"a directory of `gpt2lab {sorted(accepted)[0]}`'s own",
            f"choose another {mark_key(flag)}",
        )


def _check_unmarked(
    path: Path,
    adopt: Callable[[Path], list[str] | None] | None,
    flag: str,
    accepted: set[str],
) -> list[str] | None:
    """None for a marked directory; [] for an empty one; adopted entries; else an OutputError."""
    marker = read_marker(path)
    if marker is not None:
        _check_command(path, marker, accepted, flag)
        return None
    others = [p.name for p in path.iterdir() if p.name not in _INFRA]
    if not others:
        return []
    adopted = adopt(path) if adopt is not None else None
    if adopted is None:
        raise OutputError(
            f"{mark_key(flag, path)} is not empty ({_short(others)}) and gpt2lab did not create "
            f"it (no {MARKER} marker)",
            "a new or empty directory, or one gpt2lab wrote",
            f"choose another {mark_key(flag)}; gpt2lab never writes into or clears a directory "
            "it did not create",
        )
    return adopted


# ---- single files -----------------------------------------------------------------------------


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


class OutputFile:
    """One output file and its record `.NAME.gpt2lab` (locked while held). See claim_output_file."""

    def __init__(self, path: Path, command: str, record: Path, lock: FileLock) -> None:
        self.path, self.command, self.record_path, self.lock = path, command, record, lock

    def commit(self) -> None:
        """Record the file just written as gpt2lab's (its size and time, so later edits show)."""
        record = {
            "tool": TOOL,
            "version": gpt2lab_version(),
            "command": self.command,
            "file": self.path.name,
            "stamp": _stamp(self.path),
        }
        self.lock.set_body(json.dumps(record).encode() + b"\n")

    def release(self) -> None:
        """Unlock; a record that never described a file (nothing was written) goes too."""
        if self.lock.fd >= 0 and not self.lock.body:
            with contextlib.suppress(OSError):
                self.record_path.unlink()
        self.lock.release()

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _record_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{MARKER}")


def owns_file(path: str | os.PathLike) -> bool:
    """True when gpt2lab wrote `path` and nobody changed it since (its record says so)."""
    path = Path(path)
    marker = read_marker(path.parent)
    if marker is not None and path.name in marker["files"]:
        return True  # listed by the directory's marker (RUN_DIR/curves.png)
    try:
        rec = json.loads(_record_path(path).read_text(encoding="utf-8").splitlines()[1])
        return rec.get("tool") == TOOL and rec.get("stamp") == _stamp(path)
    except (OSError, ValueError, IndexError, AttributeError):
        return False


@contextlib.contextmanager
def owned_file(
    path: str | os.PathLike,
    command: str,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    flag: str = "out",
) -> Iterator[Path]:
    """`with owned_file(p, "plot") as p: write p atomically` - claim_output_file, the write, then
    the record; refused (one line) if `p` exists and is not gpt2lab's."""
    out = claim_output_file(path, command, inputs=inputs, flag=flag)
    try:
        yield out.path
        out.commit()
    finally:
        out.release()


def claim_output_file(
    path: str | os.PathLike,
    command: str,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    flag: str = "out",
) -> OutputFile:
    """Take `path` as an output file: refused if it overlaps an input, is a directory, or exists
    and gpt2lab did not write it (or it changed since). Locked until `release()`; call `commit()`
    after writing the file (atomically)."""
    path = Path(path)
    check_not_overlapping(path, inputs, flag)
    if path.is_dir():
        raise OutputError(
            f"{mark_key(flag, path)} is a directory",
            "a file name",
            f"choose another {mark_key(flag)}",
        )
    if os.path.lexists(path) and not owns_file(path):
        raise OutputError(
            f"{mark_key(flag, path)} exists and gpt2lab did not write it (or it changed since)",
            "gpt2lab to replace only its own files",
            f"move it away, or choose another {mark_key(flag)}",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    record = _record_path(path)  # line 1: the lock's holder; line 2: what gpt2lab wrote
    lock = FileLock(record, command, str(path), flag, keep_body=True)
    if os.path.lexists(path) and not owns_file(path):  # again, under the lock
        lock.release()
        raise OutputError(
            f"{mark_key(flag, path)} exists and gpt2lab did not write it (or it changed since)",
            "gpt2lab to replace only its own files",
            f"move it away, or choose another {mark_key(flag)}",
        )
    return OutputFile(path, command, record, lock)
