"""Generic CSV data through the command line, the per-subject mean baseline and the figures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from neuralode.cli import baselines  # noqa: E402
from neuralode.cli.main import build_parser, main, resolve_config  # noqa: E402
from neuralode.cli.plots import (  # noqa: E402
    best_epoch,
    nfe_figure,
    subjects_figure,
    training_curves_figure,
)
from neuralode.cli.train import build  # noqa: E402
from neuralode.data import load_csv  # noqa: E402

FAST = ["--no-progress", "--threads", "1"]


def _series_csv(path, n_subjects=30, shuffle=True):
    """Two channels, a 0/1 label column ``relapse``; rows in random order when ``shuffle``."""
    gen = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n_subjects):
        n = 3 + i % 4
        times = torch.cumsum(0.5 + torch.rand(n, generator=gen), 0).tolist()
        level, y = float(torch.randn((), generator=gen)), i % 2
        for t in times:
            rows.append(f"s{i},{t:.3f},a,{level + 0.1 * t:.4f},{y}")
            rows.append(f"s{i},{t:.3f},b,{(-level + y) * t:.4f},{y}")
    if shuffle:
        order = torch.randperm(len(rows), generator=gen).tolist()
        rows = [rows[k] for k in order]
    path.write_text("\n".join(["id,time,variable,value,relapse", *rows]) + "\n")
    return path


def _task(*argv):
    args = build_parser().parse_args(["train", *map(str, argv)])
    return build(resolve_config(args))[0]


def test_cli_and_load_csv_agree_on_unsorted_rows(tmp_path):
    path = _series_csv(tmp_path / "shuffled.csv")
    direct = load_csv(path, label_col="relapse")
    task = _task("ode-rnn", "--quick", "--data", "csv", path, "--set", "label_col=relapse",
                 "--set", "max_subjects=0")  # fmt: skip
    assert task.raw.ids == direct.ids
    for a, b in zip(task.raw, direct):
        assert torch.equal(a.times, b.times) and torch.equal(a.values, b.values)
        assert bool((a.times[1:] > a.times[:-1]).all())


def test_cli_and_load_csv_give_the_same_error_for_negative_times(capsys, tmp_path):
    path = tmp_path / "negative.csv"
    path.write_text("id,time,variable,value\np1,0,HR,80\np1,-0.5,HR,81\n")
    with pytest.raises(ValueError) as info:
        load_csv(path)
    code = main(["train", "ode-rnn", "--quick", "--data", "csv", str(path),
                 "--out", str(tmp_path / "run"), *FAST])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err == f"neuralode: error: {info.value}\n"
    assert not (tmp_path / "run").exists()


def test_csv_run_uses_time_unit_neutral_label_and_subject_mean(capsys, tmp_path):
    path = _series_csv(tmp_path / "series.csv")
    out = tmp_path / "run"
    code = main(["train", "ode-rnn", "--quick", "--data", "csv", str(path), "--out", str(out),
                 "--set", "label_col=relapse", "--set", "time_unit=days",
                 "--set", "max_subjects=0", *FAST])  # fmt: skip
    text, err = capsys.readouterr()
    assert code == 0, err
    assert "time in days" in text and "Mortality" not in text and "mortality" not in text
    assert "Label 'relapse' AUROC on test subjects" in text
    assert "subject mean" in text
    res = json.loads((out / "results.json").read_text())
    assert res["time_unit"] == "days" and res["label"] == "label 'relapse'"
    for setting in ("interpolation", "extrapolation"):
        assert res[setting]["mean"] > 0 and math.isfinite(res[setting]["mean"])
    # The subject mean predicts the channel's own level: channel "a" is level + 0.1 t, so its
    # error is far below the data's spread (standardised: ~1).
    assert res["interpolation"]["mean"] < 1.0


def test_time_unit_is_for_csv_only(capsys, tmp_path):
    code = main(["train", "latent-ode", "--quick", "--set", "time_unit=days",
                 "--out", str(tmp_path / "run"), *FAST])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--set time_unit has no effect with --data pbcseq" in err


def test_subject_mean_baseline():
    t = np.array([0.0, 1.0, 2.0])
    y = np.array([[1.0, 0.0], [2.0, 0.0], [6.0, 5.0]])
    m = np.array([[1, 0], [1, 0], [1, 0]], dtype=float)
    out = baselines.subject_mean(t, y, m, np.array([0.5, 7.0]), fill=-1.0)
    np.testing.assert_array_equal(out, [[3.0, -1.0], [3.0, -1.0]])


METRICS = [
    {"epoch": 1, "train_loss": 3.0, "kl": 0.5, "val_mse": 0.9, "val_mse_interpolation": 0.8,
     "val_auroc": 0.6, "nfe_forward_per_step": 50, "nfe_backward_per_step": 40,
     "mean_step_size": 0.1},
    {"epoch": 2, "train_loss": 2.0, "kl": 0.6, "val_mse": 0.7, "val_mse_interpolation": 0.6,
     "val_auroc": 0.7, "nfe_forward_per_step": 60, "nfe_backward_per_step": 50,
     "mean_step_size": 0.08},
    {"epoch": 3, "train_loss": 1.5, "kl": 0.7, "val_mse": 0.7, "val_mse_interpolation": 0.65,
     "val_auroc": 0.75, "nfe_forward_per_step": 62, "nfe_backward_per_step": 52,
     "mean_step_size": 0.07},
]  # fmt: skip


def _legend(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_training_curves_separate_axes_and_mark_the_best_epoch():
    assert best_epoch(METRICS, "val_mse") == 2  # the first of the tied minima: best.pt's rule
    fig = training_curves_figure(METRICS, "val_mse")
    train_ax, val_ax, score_ax = fig.axes
    assert train_ax.get_title() == "Training loss"
    assert _legend(train_ax) == ["train loss", "kl", "best epoch (2)"]
    assert _legend(val_ax) == ["val mse (picks best.pt)", "val mse interpolation",
                               "best epoch (2)"]  # fmt: skip
    assert _legend(score_ax) == ["val auroc", "best epoch (2)"]
    for ax in fig.axes:
        vlines = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [2, 2]]
        assert len(vlines) == 1
    star = [ln for ln in val_ax.get_lines() if ln.get_marker() == "*"]
    assert len(star) == 1 and list(star[0].get_xdata()) == [2]
    assert list(star[0].get_ydata()) == [0.7]


def test_nfe_figure_has_no_redundant_panel():
    fig = nfe_figure(METRICS)
    nfe_ax, step_ax = fig.axes
    assert _legend(nfe_ax) == ["forward pass", "backward pass"]
    assert [list(ln.get_ydata()) for ln in nfe_ax.get_lines()] == [[50, 60, 62], [40, 50, 52]]
    assert list(step_ax.get_lines()[0].get_ydata()) == [0.1, 0.08, 0.07]
    without_steps = [{k: v for k, v in r.items() if k != "mean_step_size"} for r in METRICS]
    assert len(nfe_figure(without_steps).axes) == 1


def _subject():
    tq = np.linspace(0, 2, 5)
    mean = np.zeros((5, 1))
    return {"id": "s1", "t_split": 1.0, "obs": {0: ([0.0, 1.0], [0.1, 0.2])},
            "target": {0: ([1.5], [0.3])}, "curve": (tq, mean, np.full((5, 1), 0.5))}  # fmt: skip


@pytest.mark.parametrize("band", ["mean ± 2 std over posterior samples", None])
def test_subject_figure_legend_describes_what_is_drawn(band):
    fig = subjects_figure([_subject()], [(0, "a")], "days", curve_label="curve", band_label=band)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "time (days)"
    assert len(ax.collections) == (1 if band else 0)  # the band is a PolyCollection
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    expected = ["curve", "observed, given to the model", "held out, to be predicted",
                "last observation given"]  # fmt: skip
    assert labels == ([band] if band else []) + expected
