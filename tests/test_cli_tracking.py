"""Experiment tracking (``--tensorboard``), solver step statistics and the per-epoch lines."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

from neuralode.cli.main import main, resolve_config  # noqa: E402

FAST = ["--no-progress", "--threads", "1"]
# The spiral task's training windows: 10 samples of 1000 over [0, 25], one solve per step.
WINDOW_SPAN = 9 * 25.0 / 999


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _scalars(logdir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_metrics_rows_hold_solver_steps(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "spiral", "--quick", "--out", str(out), "--no-eval", *FAST]) == 0
    for row in _rows(out):
        # span per solve = mean step size x accepted steps per solve, exactly the window.
        assert row["mean_step_size"] * row["accepted_steps_per_solve"] == pytest.approx(
            WINDOW_SPAN, rel=1e-9
        )
        assert row["accepted_steps_per_solve"] >= 1 and row["rejected_steps_per_solve"] >= 0
        # dopri5 with FSAL: 6 evaluations per step, plus a few for the initial step selection.
        nfe_per_solve = row["nfe_forward_per_step"]
        steps = row["accepted_steps_per_solve"] + row["rejected_steps_per_solve"]
        assert 6 * steps <= nfe_per_solve <= 6 * steps + 3


def test_tensorboard_logs_every_epoch_once(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    base = ["train", "spiral", "--quick", "--out", str(out), "--no-eval", "--tensorboard", *FAST]
    assert main([*base, "--epochs", "1"]) == 0
    assert main([*base, "--epochs", "3", "--resume"]) == 0
    rows = _rows(out)
    tags = _scalars(out / "tensorboard")
    expected = {
        "loss/train_loss": "train_loss",
        "validation/val_loss": "val_loss",
        "nfe/forward": "nfe_forward",
        "nfe/backward": "nfe_backward",
        "nfe/forward_per_step": "nfe_forward_per_step",
        "steps/mean_step_size": "mean_step_size",
        "steps/accepted_per_solve": "accepted_steps_per_solve",
        "optimizer/lr": "lr",
        "time/epoch_s": "time_s",
    }
    for tag, key in expected.items():
        points = tags[tag]
        assert [s for s, _ in points] == [1, 2, 3], tag
        for (_, v), row in zip(points, rows):
            assert v == pytest.approx(row[key], rel=1e-6), tag  # stored as float32


def test_missing_tensorboard_is_one_line_before_anything_is_written(capsys, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    out = tmp_path / "run"
    code = main(["train", "spiral", "--quick", "--out", str(out), "--tensorboard", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'neuralode[tensorboard]'" in err and err.count("\n") == 1
    assert not out.exists()


def test_epoch_lines_stay_when_a_progress_bar_is_shown(capsys, tmp_path):
    from neuralode.cli.main import build_parser
    from neuralode.cli.train import train

    args = build_parser().parse_args(["train", "spiral", "--quick", "--epochs", "3"])
    assert train(resolve_config(args), tmp_path / "run", progress=True, evaluate=False) == 0
    out, err = capsys.readouterr()
    lines = [ln for ln in out.splitlines() if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert "spiral" in err  # the bar itself went to stderr
