"""`gpt2lab plot`: one PNG for one run or several, and a clear error without metrics."""

from __future__ import annotations

import json

from gpt2lab import cli


def _run(path, scale):
    path.mkdir()
    rows = [{"step": s, "tokens": 512 * s, "loss": scale * 4 / s} for s in range(1, 21)]
    for r in rows[4::5]:
        r.update(val_loss=r["loss"] + 0.1, val_ppl=0.0)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 2')
    return path


def test_plot_one_run_and_several_runs_on_one_figure(tmp_path, capsys):
    from PIL import Image

    a, b = _run(tmp_path / "a", 1.0), _run(tmp_path / "b", 1.5)
    assert cli.main(["plot", str(a)]) == 0  # the torn last line of a crashed run is skipped
    assert Image.open(a / "curves.png").size == (1200, 800)
    out = tmp_path / "both.png"
    assert cli.main(["plot", str(a), str(b), "--out", str(out)]) == 0
    assert Image.open(out).format == "PNG"
    assert capsys.readouterr().out.split() == [str(a / "curves.png"), str(out)]


def test_plot_without_metrics_is_one_line_exit_1(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl does not exist" in err[0]
