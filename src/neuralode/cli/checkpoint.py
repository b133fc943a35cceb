"""Checkpoints: atomic writes and the random number generator states needed for exact resumes.

A checkpoint holds the model and optimiser states, the position in training (epoch, step, batch
within the epoch), the state of every random number generator that training draws from --
torch's (CPU and CUDA), numpy's, Python's ``random`` and the explicit ``torch.Generator`` that
shuffles the data -- and the running epoch statistics. Restoring all of them makes an
interrupted and resumed run bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CLIError

__all__ = ["atomic_save", "load_checkpoint", "rng_states", "set_rng_states"]

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` through a temporary file in the same folder and ``os.replace``.

    A crash or Ctrl-C during the write leaves the previous file intact (``os.replace`` is
    atomic on POSIX and Windows when source and target are on the same file system).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by :func:`atomic_save` onto the CPU.

    Raises
    ------
    CLIError
        If the file is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"checkpoint not found: {path}")
    try:
        # weights_only=False: the file holds RNG states and numpy's state tuple besides tensors;
        # it is our own file, written by atomic_save.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CLIError(f"cannot read checkpoint {path}: {exc}") from None


def rng_states(generator: torch.Generator | None = None) -> dict:
    """The states of torch (CPU, CUDA), numpy, Python ``random`` and ``generator``."""
    states = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        states["generator"] = generator.get_state()
    return states


def set_rng_states(states: dict, generator: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_states` captured."""
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if generator is not None and "generator" in states:
        generator.set_state(states["generator"])
