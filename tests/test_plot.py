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


def test_damaged_or_hand_edited_metrics_rows_are_left_out_not_fatal(tmp_path, capsys):
    """Lines that are not objects, values that are not numbers, damaged bytes: the readable
    rows are drawn, for training and for RL runs alike."""
    from gpt2lab.train.metrics import read_metrics

    good = [{"step": s, "tokens": 64 * s, "loss": 4 / s} for s in range(1, 6)]
    bad = [5, [1, 2], {"step": "x", "loss": 1.0}, {"step": 2, "loss": "y"}, {"step": True}]
    bad += [{"step": 3, "loss": 1.0, "val_loss": [1]}, {"step": None, "loss": 1.0}]
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps(r) for r in [*good[:2], *bad, *good[2:]]]
    (run / "metrics.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe{\n")
    assert len(read_metrics(run)) == 2 + 5 + 3  # every object, none of the rest
    assert cli.main(["plot", str(run)]) == 0, capsys.readouterr().err
    assert (run / "curves.png").is_file()
    rl = tmp_path / "rl"
    rl.mkdir()
    rows = [{"step": 1, "reward": 1.0, "kl": "x"}, {"step": 2, "reward": 2.0, "kl": 0.1}]
    (rl / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["plot", str(rl)]) == 0, capsys.readouterr().err
