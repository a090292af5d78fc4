"""Atomic writes: complete or absent, never half-written, with normal permissions."""

from __future__ import annotations

import os
import stat

import pytest

from gpt2lab.io import atomic_dir, atomic_open, atomic_write_json


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_open(target, "w") as f:
        f.write("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert os.listdir(tmp_path) == ["x.json"]


def test_files_and_dirs_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "f.json", {})
        with atomic_dir(tmp_path / "d") as d:
            (d / "w").write_text("ok")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as d:
        (d / "a").write_text("1")
    with pytest.raises(KeyError), atomic_dir(target) as d:
        (d / "a").write_text("2")
        raise KeyError("killed")
    assert (target / "a").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
