"""The CLI: help, version, subcommand table, one-line errors and exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gpt2lab import cli


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpt2lab", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_available_command():
    r = run_cli("--help")
    assert r.returncode == 0
    for name in cli.available_commands():
        assert f"  {name} " in r.stdout
    assert "examples:" in r.stdout


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("gpt2lab ")


@pytest.mark.parametrize("name", list(cli.available_commands()))
def test_each_command_has_help_with_an_example(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"gpt2lab {name}" in out


def test_misspelled_override_exits_2_with_one_line_suggestion():
    r = run_cli("config", "--train.lrr=1")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("gpt2lab: error: ") and "--train.lr" in lines[0]


def test_cli_shows_the_keys_that_library_errors_name_as_flags(monkeypatch, capsys):
    from gpt2lab.commands import config as config_cmd
    from gpt2lab.errors import ConfigError, mark_key

    def fail(args):
        raise ConfigError(
            f"{mark_key('val_docs', 5)} is too many",
            f"{mark_key('train.lr')} or {mark_key('inputs')}",
            f"try {mark_key('train.lr', '3e-4')} or {mark_key('shard_tokens', '1M')}",
        )

    monkeypatch.setattr(config_cmd, "run", fail)
    with pytest.raises(ConfigError) as e:
        fail(None)
    assert str(e.value) == (
        "`val_docs=5` is too many, expected `train.lr` or `inputs`, "
        "try `train.lr=3e-4` or `shard_tokens=1M`"
    )
    assert cli.main(["config"]) == 2
    assert capsys.readouterr().err == (
        "gpt2lab: error: --val-docs 5 is too many, expected --train.lr or --input, "
        "try --train.lr=3e-4 or --shard-size 1M\n"
    )


def test_unknown_command_and_flag_exit_2(capsys):
    assert cli.main(["no-such-command"]) == 2
    assert cli.main(["config", "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("gpt2lab: error: ") for line in err) and len(err) == 2


def test_runtime_error_exits_1_and_debug_shows_traceback(monkeypatch, capsys):
    from gpt2lab.commands import config as config_cmd
    from gpt2lab.errors import DataError

    def boom(args):
        raise DataError("file x.txt is empty", "some text", "give a non-empty file")

    monkeypatch.setattr(config_cmd, "run", boom)
    assert cli.main(["config"]) == 1
    assert capsys.readouterr().err == (
        "gpt2lab: error: file x.txt is empty, expected some text, give a non-empty file\n"
    )
    assert cli.main(["config", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_ctrl_c_exits_130(monkeypatch):
    from gpt2lab.commands import config as config_cmd

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(config_cmd, "run", interrupted)
    assert cli.main(["config"]) == 130
