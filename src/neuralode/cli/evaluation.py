"""Evaluation of a run's model on its held-out data (``neuralode evaluate``, the end of
``neuralode train``): rebuild the task and model, write ``results.json`` / ``summary.txt``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import BEST_NAME, CHECKPOINT_NAME, check_belongs, load_checkpoint
from .config import read_run_config
from .errors import CLIError
from .rundir import PLOT_DIR, RESULTS_NAME, SUMMARY_NAME, build, read_metrics
from .tasks.base import Task

__all__ = ["open_run", "report"]


def open_run(
    run_dir: Path, which: str = "best", device: str | None = None
) -> tuple[Task, nn.Module, Path]:
    """The task (with its data) and the model of a run, with the weights of ``best.pt`` or
    ``checkpoint.pt`` (for ``neuralode evaluate`` / ``plot``).

    ``which="best"`` falls back to ``checkpoint.pt`` for a run interrupted before its first
    validation. ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``) replaces the run's own.
    """
    cfg = read_run_config(run_dir)
    if device is not None:
        cfg = cfg.replace(device=device)
    path = run_dir / (BEST_NAME if which == "best" else CHECKPOINT_NAME)
    if which == "best" and not path.is_file():
        path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise CLIError(f"{run_dir} holds no checkpoint yet; train it first (neuralode train).")
    ck = load_checkpoint(path)
    check_belongs(ck, cfg, path)
    task, model = build(cfg)
    stored = ck.get("data", {}).get("channels")
    if stored is not None and list(stored) != list(task.export()["channels"]):
        raise CLIError(
            f"the data of {run_dir} has changed since training: channels "
            f"{list(task.export()['channels'])} now, {list(stored)} in {path.name}; evaluate "
            "on the data the model was trained on."
        )
    changed = _changed(ck.get("data"), task.export())
    if changed:
        raise CLIError(
            f"the data of {run_dir} has changed since training: {', '.join(changed)} of the "
            f"training split differ from those stored in {path.name}, so the split or the "
            "scaling would not be the model's; evaluate on the data the model was trained on."
        )
    model.load_state_dict(ck["model"])
    model.eval()
    return task, model, path


def _changed(stored, now, prefix: str = "") -> list[str]:
    """Names of the entries of a task's :meth:`~Task.export` (channels, normaliser statistics,
    ...) stored in the checkpoint that differ from those of the data loaded now (entries an
    older version did not store are not compared)."""
    if stored is None:
        return []
    if isinstance(stored, dict) and isinstance(now, dict):
        out = []
        for key in sorted(stored):  # what the checkpoint recorded (older ones record less)
            if key not in now:
                out.append(prefix + key)
            else:
                out += _changed(stored[key], now[key], f"{prefix}{key}.")
        return out
    name = prefix.rstrip(".") or "data"
    if isinstance(stored, torch.Tensor) or isinstance(now, torch.Tensor):
        a, b = torch.as_tensor(stored).double(), torch.as_tensor(now).double()
        # The same data gives the same statistics up to the summation order of the machine.
        same = a.shape == b.shape and torch.allclose(a, b, rtol=1e-9, atol=1e-12, equal_nan=True)
        return [] if same else [name]
    if isinstance(stored, float) and isinstance(now, float):
        return [] if math.isclose(stored, now, rel_tol=1e-9, abs_tol=1e-12) else [name]
    return [] if stored == now else [name]


def report(
    task: Task,
    model: nn.Module,
    run_dir: Path,
    ckpt: Path,
    *,
    plots=True,
    stdout=None,
    tag: str | None = None,
):
    """Evaluate ``model`` (loaded from ``ckpt``) on the held-out data; write ``results.json``,
    ``summary.txt`` and (``plots=True``) the figures; print the summary to ``stdout``.

    ``tag="last"`` writes ``results_last.json`` / ``summary_last.txt`` beside the best model's
    files instead of over them.
    """
    model.eval()
    results = task.evaluate(model)
    results["checkpoint"] = ckpt.name
    metrics = read_metrics(run_dir)
    from .report import time_line

    text = task.summary(results, metrics) + "\n" + time_line(metrics)
    if plots:
        from .plots import plot_run

        made = plot_run(task, model, run_dir, metrics)
        results["plots"] = [str(p) for p in made]
        text += f"\nPlots: {run_dir / PLOT_DIR}/ ({', '.join(p.name for p in made)})"
    elif (run_dir / PLOT_DIR).is_dir():
        text += f"\nPlots: {run_dir / PLOT_DIR}/ (neuralode plot {run_dir} redraws them)"
    text += f"\nRun directory: {run_dir} (model: {ckpt.name})"
    results_name, summary_name = RESULTS_NAME, SUMMARY_NAME
    if tag:
        results_name = results_name.replace(".json", f"_{tag}.json")
        summary_name = summary_name.replace(".txt", f"_{tag}.txt")
    tmp = run_dir / f".{results_name}.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    tmp.replace(run_dir / results_name)
    (run_dir / summary_name).write_text(text + "\n")
    if stdout is not None:
        print(text, file=stdout, flush=True)
    return results


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
