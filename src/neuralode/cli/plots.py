"""Figures of a run (PNG through matplotlib's Agg canvas; pyplot's global state is not used)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = [
    "plot_run",
    "plot_training_curves",
    "plot_nfe",
    "plot_spiral",
    "plot_subjects",
    "plot_digits",
]

DPI = 110
#: Resolution of --quick runs (same figures, cheaper to render).
QUICK_DPI = 40


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


_dpi = [DPI]


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=_dpi[0])
    tmp.replace(path)
    return path


def plot_run(task, model, run_dir: Path, metrics: list[dict]) -> list[Path]:
    """Training curves, NFE per epoch and the task's own figures in ``run_dir/plots``."""
    plot_dir = Path(run_dir) / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    _dpi[0] = QUICK_DPI if task.cfg.quick else DPI
    paths = []
    if metrics:
        paths.append(plot_training_curves(plot_dir / "training_curves.png", metrics, task.val_key))
        paths.append(plot_nfe(plot_dir / "nfe.png", metrics))
    model.eval()
    paths += task.plot(model, plot_dir)
    return paths


def plot_training_curves(path: Path, metrics: list[dict], val_key: str) -> Path:
    import pandas as pd

    df = pd.DataFrame(metrics)
    extra = [
        c
        for c in df.columns
        if c.startswith("val_") and c != val_key and pd.api.types.is_numeric_dtype(df[c])
    ]
    fig = _figure(5.0 * (1 + bool(extra)), 3.6)
    axes = fig.subplots(1, 1 + bool(extra), squeeze=False)[0]
    ax = axes[0]
    ax.plot(df["epoch"], df["train_loss"], "o-", ms=3, label="train loss")
    if val_key in df:
        ax.plot(df["epoch"], df[val_key], "s-", ms=3, label=val_key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if (df["train_loss"] > 0).all() and (val_key not in df or (df[val_key] > 0).all()):
        ax.set_yscale("log")
    ax.legend()
    ax.set_title("Training curves")
    if extra:
        ax = axes[1]
        for c in extra:
            ax.plot(df["epoch"], df[c], "o-", ms=3, label=c.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.legend()
        ax.set_title("Validation metrics")
    return _save(fig, path)


def plot_nfe(path: Path, metrics: list[dict]) -> Path:
    import pandas as pd

    df = pd.DataFrame(metrics)
    fig = _figure(10.0, 3.6)
    a, b = fig.subplots(1, 2)
    a.plot(df["epoch"], df["nfe_forward"], "o-", ms=3, label="forward")
    a.plot(df["epoch"], df["nfe_backward"], "s-", ms=3, label="backward")
    a.set_title("NFE per epoch (training steps)")
    b.plot(df["epoch"], df["nfe_forward_per_step"], "o-", ms=3, label="forward")
    b.plot(df["epoch"], df["nfe_backward_per_step"], "s-", ms=3, label="backward")
    b.set_title("NFE per training step")
    for ax in (a, b):
        ax.set_xlabel("epoch")
        ax.set_ylabel("function evaluations")
        ax.legend()
    return _save(fig, path)


def plot_spiral(
    path: Path,
    *,
    data_t,
    data_y,
    true_t,
    true_y,
    pred_t,
    pred_y,
    t_data_end: float,
    field: Callable,
    true_field: Callable,
) -> Path:
    """Time series, phase portrait and learned vector field of the spiral task."""
    import torch

    data_y, true_y, pred_y = (np.asarray(x, dtype=float) for x in (data_y, true_y, pred_y))
    fig = _figure(15.0, 4.6)
    ax_t, ax_p, ax_f = fig.subplots(1, 3)
    for k, (name, c) in enumerate((("x", "C0"), ("y", "C1"))):
        ax_t.plot(data_t, data_y[:, k], ".", ms=2, color=c, alpha=0.35, label=f"{name} data")
        ax_t.plot(pred_t, pred_y[:, k], "-", color=c, lw=1.4, label=f"{name} learned")
    ax_t.axvline(t_data_end, color="k", ls=":", lw=1)
    ax_t.set_xlabel("t")
    ax_t.set_title("Trajectories (learned from y(0); dotted: end of data)")
    ax_t.legend(ncol=2, fontsize=8)

    ax_p.plot(data_y[:, 0], data_y[:, 1], ".", ms=2, color="0.5", alpha=0.5, label="noisy data")
    ax_p.plot(true_y[:, 0], true_y[:, 1], "-", color="C2", lw=1, label="true")
    ax_p.plot(pred_y[:, 0], pred_y[:, 1], "--", color="C3", lw=1.4, label="learned")
    ax_p.set_aspect("equal")
    ax_p.set_title("Phase portrait")
    ax_p.legend(fontsize=8)

    lim = 1.1 * float(np.abs(data_y).max())
    g = np.linspace(-lim, lim, 25)
    X, Y = np.meshgrid(g, g)
    pts = torch.tensor(np.stack([X.ravel(), Y.ravel()], axis=1))
    with torch.no_grad():
        uv = np.asarray(field(pts), dtype=float)
        uv_true = np.asarray(true_field(pts), dtype=float)
    U, V = uv[:, 0].reshape(X.shape), uv[:, 1].reshape(X.shape)
    speed = np.hypot(U, V)
    ax_f.streamplot(g, g, U, V, color=speed, cmap="viridis", density=1.1, linewidth=0.8)
    step = 3
    ax_f.quiver(
        X[::step, ::step],
        Y[::step, ::step],
        uv_true[:, 0].reshape(X.shape)[::step, ::step],
        uv_true[:, 1].reshape(X.shape)[::step, ::step],
        color="C3",
        alpha=0.6,
        angles="xy",
        label="true field",
    )
    ax_f.set_xlim(-lim, lim)
    ax_f.set_ylim(-lim, lim)
    ax_f.set_aspect("equal")
    ax_f.set_title("Learned vector field (streamlines) and true field (arrows)")
    ax_f.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_subjects(
    path: Path, subjects: list[dict], channels: list, time_unit: str, title: str = ""
) -> Path:
    """Observed points, continuous reconstruction / extrapolation and a ±2 std band.

    Each entry of ``subjects`` has ``id``, ``t_split`` and per channel index ``c``:
    ``obs[c] = (t, y)`` conditioning points, ``target[c] = (t, y)`` held-out points and
    ``curve = (t (Q,), mean (Q, C), std (Q, C))``.
    """
    rows, cols = len(subjects), len(channels)
    fig = _figure(3.0 * cols, 2.3 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, s in enumerate(subjects):
        tq, mean, std = (np.asarray(x, dtype=float) for x in s["curve"])
        for j, (c, name) in enumerate(channels):
            ax = axes[i, j]
            ax.fill_between(tq, mean[:, c] - 2 * std[:, c], mean[:, c] + 2 * std[:, c],
                            color="C0", alpha=0.2, lw=0, label="mean ± 2 std")  # fmt: skip
            ax.plot(tq, mean[:, c], "-", color="C0", lw=1.3, label="model")
            to, yo = s["obs"][c]
            tt, yt = s["target"][c]
            ax.plot(to, yo, "o", color="k", ms=3.5, label="observed (input)")
            ax.plot(tt, yt, "x", color="C3", ms=5, mew=1.5, label="held out")
            ax.axvline(s["t_split"], color="0.4", ls=":", lw=1)
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"subject {s['id']}", fontsize=9)
            if i == rows - 1:
                ax.set_xlabel(time_unit, fontsize=8)
            ax.tick_params(labelsize=7)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_digits(path: Path, images, labels, predicted) -> Path:
    """A grid of test digits titled ``label -> prediction`` (mistakes in red)."""
    images = np.asarray(images, dtype=float)
    n = len(images)
    cols = 8
    rows = (n + cols - 1) // cols
    fig = _figure(1.4 * cols, 1.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if k >= n:
            continue
        ax.imshow(images[k, 0], cmap="gray_r")
        ok = int(labels[k]) == int(predicted[k])
        ax.set_title(f"{int(labels[k])} → {int(predicted[k])}", fontsize=8,
                     color="k" if ok else "C3")  # fmt: skip
    fig.suptitle("Test digits: label → ODE-Net prediction")
    return _save(fig, path)
