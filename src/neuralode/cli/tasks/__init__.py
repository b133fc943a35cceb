"""The tasks ``neuralode train`` knows, by command-line name."""

from __future__ import annotations

from ..errors import CLIError
from .base import Task

__all__ = ["TASKS", "get_task", "Task"]

#: name -> "module:Class", imported on first use (keeps ``neuralode --help`` fast).
TASKS = {
    "cnf": "neuralode.cli.tasks.cnf:CNFTask",
    "latent-ode": "neuralode.cli.tasks.latent_ode:LatentODETask",
    "ode-rnn": "neuralode.cli.tasks.ode_rnn:ODERNNTask",
    "odenet": "neuralode.cli.tasks.odenet:ODENetTask",
    "spiral": "neuralode.cli.tasks.spiral:SpiralTask",
}


def get_task(name: str) -> type[Task]:
    """The :class:`Task` subclass of ``name``."""
    if name not in TASKS:
        raise CLIError(f"unknown task {name!r}; choose one of {sorted(TASKS)}.")
    import importlib

    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)
