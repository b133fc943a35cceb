"""Figures of a run (PNG through matplotlib's Agg canvas; pyplot's global state is not used)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = [
    "plot_run",
    "best_epoch",
    "training_curves_figure",
    "nfe_figure",
    "plot_training_curves",
    "plot_nfe",
    "plot_spiral",
    "plot_subjects",
    "subjects_figure",
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


#: Validation metrics where higher is better: drawn on an axis of their own.
_SCORES = ("auroc", "accuracy")


def best_epoch(metrics: list[dict], val_key: str) -> int | None:
    """The epoch whose model is ``best.pt``: the first with the lowest ``val_key``."""
    best, value = None, float("inf")
    for r in metrics:
        v = r.get(val_key)
        if isinstance(v, (int, float)) and v < value:
            best, value = r["epoch"], v
    return best


def training_curves_figure(metrics: list[dict], val_key: str):
    """Losses, validation errors and validation scores on axes of their own, best epoch marked.

    Panels: the training loss and its terms (``train_*``, ``kl``); the validation errors
    (``val_key`` -- the metric that picks ``best.pt`` -- and the other ``val_*`` of its kind);
    the scores (AUROC, accuracy; only when there are any). A dotted vertical line in
    each panel and a star on ``val_key`` mark the best epoch.
    """
    epochs = [r["epoch"] for r in metrics]

    def series(key):
        return [r.get(key, np.nan) if r.get(key) is not None else np.nan for r in metrics]

    keys = {k for r in metrics for k, v in r.items() if isinstance(v, (int, float))}
    train_keys = ["train_loss"] + sorted(k for k in keys if k.startswith("train_") and
                                         k != "train_loss" and not _is_score(k))  # fmt: skip
    train_keys += [k for k in ("kl",) if k in keys]
    val_keys = [val_key] + sorted(
        k for k in keys if k.startswith("val_") and k != val_key and not _is_score(k)
    )
    score_keys = sorted(k for k in keys if _is_score(k) and k.startswith(("val_", "train_")))
    # (title, keys, y label, log scale when all values are positive)
    panels = [
        ("Training loss", train_keys, "loss", True),
        ("Validation error", val_keys, "error", True),
    ]
    if score_keys:
        panels.append(("Accuracy / AUROC", score_keys, "score (higher is better)", False))
    fig = _figure(4.6 * len(panels), 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    best = best_epoch(metrics, val_key)
    for ax, (title, ks, ylabel, log) in zip(axes, panels):
        for k in ks:
            if k not in keys:
                continue
            label = k.replace("_", " ") + (" (picks best.pt)" if k == val_key else "")
            ax.plot(epochs, series(k), "o-", ms=3, label=label)
        values = np.array([v for k in ks if k in keys for v in series(k)], dtype=float)
        if log and values.size and np.all(values[np.isfinite(values)] > 0):
            ax.set_yscale("log")
        if best is not None:
            ax.axvline(best, color="0.4", ls=":", lw=1, label=f"best epoch ({best})")
        if best is not None and title == "Validation error":
            ax.plot([best], [series(val_key)[epochs.index(best)]], "*", color="C3", ms=12)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
    return fig


def _is_score(key: str) -> bool:
    return any(s in key for s in _SCORES)


def plot_training_curves(path: Path, metrics: list[dict], val_key: str) -> Path:
    """:func:`training_curves_figure` saved as PNG."""
    return _save(training_curves_figure(metrics, val_key), path)


def nfe_figure(metrics: list[dict]):
    """NFE per training step (forward and backward pass) and, when recorded, the solver's mean
    accepted step size, per epoch."""
    epochs = [r["epoch"] for r in metrics]
    has_steps = any("mean_step_size" in r for r in metrics)
    fig = _figure(4.8 * (1 + has_steps), 3.6)
    axes = fig.subplots(1, 1 + has_steps, squeeze=False)[0]
    a = axes[0]
    a.plot(epochs, [r["nfe_forward_per_step"] for r in metrics], "o-", ms=3,
           label="forward pass")  # fmt: skip
    a.plot(epochs, [r["nfe_backward_per_step"] for r in metrics], "s-", ms=3,
           label="backward pass")  # fmt: skip
    a.set_title("Function evaluations per training step")
    a.set_xlabel("epoch")
    a.set_ylabel("NFE per step (mean over the epoch)")
    a.legend(fontsize=8)
    if has_steps:
        b = axes[1]
        b.plot(epochs, [r.get("mean_step_size", np.nan) for r in metrics], "o-", ms=3,
               label="mean accepted step (forward solves)")  # fmt: skip
        b.set_title("Solver step size")
        b.set_xlabel("epoch")
        b.set_ylabel("step size (model time units)")
        b.legend(fontsize=8)
    return fig


def plot_nfe(path: Path, metrics: list[dict]) -> Path:
    """:func:`nfe_figure` saved as PNG."""
    return _save(nfe_figure(metrics), path)


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
        ax_t.plot(data_t, data_y[:, k], ".", ms=2, color=c, alpha=0.35,
                  label=f"{name}: noisy data")  # fmt: skip
        ax_t.plot(pred_t, pred_y[:, k], "-", color=c, lw=1.4,
                  label=f"{name}: learned ODE from y(0)")  # fmt: skip
    ax_t.axvline(t_data_end, color="k", ls=":", lw=1)
    ax_t.set_xlabel("t")
    ax_t.set_title("Trajectories (learned from y(0); dotted: end of data)")
    ax_t.legend(ncol=2, fontsize=8)

    ax_p.plot(data_y[:, 0], data_y[:, 1], ".", ms=2, color="0.5", alpha=0.5, label="noisy data")
    ax_p.plot(true_y[:, 0], true_y[:, 1], "-", color="C2", lw=1, label="true trajectory")
    ax_p.plot(pred_y[:, 0], pred_y[:, 1], "--", color="C3", lw=1.4,
              label="learned trajectory from y(0)")  # fmt: skip
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
    path: Path,
    subjects: list[dict],
    channels: list,
    time_unit: str,
    title: str = "",
    curve_label: str = "model prediction",
    band_label: str | None = "mean ± 2 std",
) -> Path:
    """:func:`subjects_figure` saved as PNG."""
    fig = subjects_figure(subjects, channels, time_unit, title, curve_label, band_label)
    return _save(fig, path)


def subjects_figure(
    subjects: list[dict],
    channels: list,
    time_unit: str,
    title: str = "",
    curve_label: str = "model prediction",
    band_label: str | None = "mean ± 2 std",
):
    """Observed points, the model's continuous prediction and (``band_label``) a ±2 std band.

    Each entry of ``subjects`` has ``id``, ``t_split`` and per channel index ``c``:
    ``obs[c] = (t, y)`` conditioning points, ``target[c] = (t, y)`` held-out points and
    ``curve = (t (Q,), mean (Q, C), std (Q, C))``. ``band_label=None`` (a deterministic
    model) draws no band.
    """
    rows, cols = len(subjects), len(channels)
    fig = _figure(3.0 * cols, 2.3 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, s in enumerate(subjects):
        tq, mean, std = (np.asarray(x, dtype=float) for x in s["curve"])
        for j, (c, name) in enumerate(channels):
            ax = axes[i, j]
            if band_label is not None:
                ax.fill_between(tq, mean[:, c] - 2 * std[:, c], mean[:, c] + 2 * std[:, c],
                                color="C0", alpha=0.2, lw=0, label=band_label)  # fmt: skip
            ax.plot(tq, mean[:, c], "-", color="C0", lw=1.3, label=curve_label)
            to, yo = s["obs"][c]
            tt, yt = s["target"][c]
            ax.plot(to, yo, "o", color="k", ms=3.5, label="observed, given to the model")
            ax.plot(tt, yt, "x", color="C3", ms=5, mew=1.5, label="held out, to be predicted")
            ax.axvline(s["t_split"], color="0.4", ls=":", lw=1, label="last observation given")
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"subject {s['id']}", fontsize=9)
            if i == rows - 1:
                ax.set_xlabel(f"time ({time_unit})", fontsize=8)
            ax.tick_params(labelsize=7)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


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
