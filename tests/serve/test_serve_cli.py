"""`gpt2lab serve` as a command: its refusals (one line each) and a real process that drains its
in-flight requests on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gpt2lab import cli

httpx = pytest.importorskip("httpx")

REPO = Path(__file__).resolve().parents[2]


def serve(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(["serve", *args])
    err = capsys.readouterr().err
    return code, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpt2lab: error:"), err
    assert "Traceback" not in err
    return lines[0]


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--host",
        "--api-key",
        "--insecure",
        "--max-batch",
        "--max-concurrent",
        "--max-body-bytes",
        "--max-prompt-tokens",
        "--max-tokens",
        "--max-n",
        "--device",
        "--dtype",
        "--quantize",
    ):
        assert flag in out
    assert "gpt2lab serve --model" in out


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::"])
def test_binding_beyond_localhost_needs_a_key(capsys, model_dir, monkeypatch, host):
    monkeypatch.delenv("GPT2LAB_API_KEY", raising=False)
    code, err = serve(capsys, "--model", str(model_dir), "--host", host)
    line = one_line_error(err)
    assert code == 2 and "--api-key" in line and "--insecure" in line


def test_the_kv_cache_must_fit_in_memory(capsys, model_dir):
    code, err = serve(capsys, "--model", str(model_dir), "--port", "0", "--max-batch", "10000000")
    line = one_line_error(err)
    assert code == 1 and "GiB" in line and "--max-batch" in line


def test_bad_limits_and_a_busy_port_are_one_line_errors(capsys, model_dir):
    code, err = serve(capsys, "--model", str(model_dir), "--max-n", "9", "--max-batch", "4")
    assert code == 2 and "--max-n" in one_line_error(err)
    code, err = serve(capsys, "--model", str(model_dir), "--max-concurrent", "0")
    assert code == 2 and "--max-concurrent" in one_line_error(err)
    code, err = serve(capsys, "--model", str(model_dir), "--threads", "0")
    assert code == 2 and "--threads" in one_line_error(err)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        code, err = serve(capsys, "--model", str(model_dir), "--port", port)
    assert code == 2 and "--port" in one_line_error(err)


def test_without_the_web_packages_it_says_what_to_install(capsys, model_dir, monkeypatch):
    from gpt2lab.commands import serve as command

    monkeypatch.setattr(command, "missing_packages", lambda: ["uvicorn"])
    code, err = serve(capsys, "--model", str(model_dir))
    assert code == 2 and "pip install 'gpt2lab[serve]'" in one_line_error(err)


def test_sigterm_drains_the_requests_in_flight_then_stops(tmp_path, make_tiny):
    model = make_tiny(tmp_path / "long", block_size=512)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "GPT2LAB_API_KEY": "k",
    }
    cmd = [sys.executable, "-m", "gpt2lab", "serve", "--model", str(model), "--port", "0"]
    proc = subprocess.Popen(
        cmd + ["--dtype", "float32", "--drain-seconds", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert "gpt2lab serve:" in line, line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0].rstrip("/")
        assert httpx.get(url + "/v1/models").status_code == 401  # the key from the environment
        headers = {"Authorization": "Bearer k"}
        body = {"prompt": "Hello", "max_tokens": 500, "temperature": 0, "stream": True}
        lines: list[str] = []
        times: list[float] = []
        first = threading.Event()

        def read() -> None:
            with httpx.stream(
                "POST", url + "/v1/completions", json=body, headers=headers, timeout=60
            ) as r:
                for ln in r.iter_lines():
                    if ln:
                        lines.append(ln)
                        times.append(time.monotonic())
                        first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.5)  # the server stops accepting within its 0.1 s tick
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
        reader.join(60)
        code = proc.wait(30)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert lines[-1] == "data: [DONE]", lines[-3:]
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    after = sum(t > signalled + 0.2 for t in times)
    assert after > 10, (after, len(times))  # the stream went on well after the signal
    assert code == 0, err
    assert "SIGTERM" in err and "stopped" in err
