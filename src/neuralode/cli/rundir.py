"""The layout of a run directory (its file names), the device and model a run is built on, and
its per-epoch metrics: what training, evaluation and the command line share."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import distributed
from .checkpoint import BEST_NAME, CHECKPOINT_NAME
from .config import RunConfig
from .errors import CLIError
from .tasks import get_task
from .tasks.base import Task

__all__ = ["build", "read_metrics", "resolve_device"]

METRICS_NAME = "metrics.jsonl"
RESULTS_NAME = "results.json"
SUMMARY_NAME = "summary.txt"
PLOT_DIR = "plots"
#: Files a fresh run (same configuration, no --resume) replaces.
RUN_FILES = (METRICS_NAME, CHECKPOINT_NAME, BEST_NAME, RESULTS_NAME, SUMMARY_NAME,
             "results_last.json", "summary_last.txt")  # fmt: skip


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise CLIError("--device cuda: no CUDA device is available; use --device cpu.")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def build(cfg: RunConfig, dist: distributed.Dist | None = None) -> tuple[Task, nn.Module]:
    """Load the data and build the (seeded) model of ``cfg`` on its device."""
    dist = dist or distributed.Dist()
    device = resolve_device(cfg.device, dist.local_rank)
    task = get_task(cfg.task)(cfg, device, dist)
    task.load_data()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = task.build_model().to(device=device, dtype=task.dtype)
    return task, model


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of ``metrics.jsonl``; a last row cut short (a crash while it was appended) is
    left out: its epoch has no checkpoint either and is trained again on ``--resume``."""
    path = run_dir / METRICS_NAME
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
            if number == len(lines) and not text.endswith("\n"):
                break
        if not isinstance(row, dict) or "epoch" not in row:
            raise CLIError(
                f"{path}, line {number}: not a row of per-epoch metrics ({line[:40]!r}); the "
                "file is damaged: delete that line (the plots and the summary's training time "
                "use the others)."
            )
        rows.append(row)
    return rows
