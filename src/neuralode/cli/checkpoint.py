"""Checkpoints: atomic writes, safe loading and the random number generator states of exact resumes.

A checkpoint holds the model and optimiser states, the position in training (epoch, step, batch
within the epoch), the state of every random number generator that training draws from --
torch's (CPU and CUDA), numpy's, Python's ``random`` and the explicit ``torch.Generator`` that
shuffles the data -- and the running epoch statistics. Restoring all of them makes an
interrupted and resumed run bit-identical to an uninterrupted one on CPU.

Everything in a checkpoint is tensors and plain data (dicts, lists, tuples, str, int, float,
bool, None): the generator states are converted to tensors and ints (:func:`rng_states`), so
files are read with ``torch.load(..., weights_only=True)``, whose unpickler refuses any other
Python object. Opening a run directory someone else made (``neuralode evaluate``/``plot``,
:func:`neuralode.load_run`) therefore never runs code from it.

While a process trains a run, :class:`RunLock` keeps a second one from training the same
directory.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CLIError

__all__ = [
    "atomic_save",
    "load_checkpoint",
    "check_belongs",
    "rng_states",
    "set_rng_states",
]

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


def _advice(path: Path) -> str:
    """What to do when ``path`` cannot be used."""
    run = path.parent
    if path.name == BEST_NAME:
        return (
            f"use the last checkpoint instead (neuralode evaluate {run} --checkpoint last), or "
            "train the run again"
        )
    if path.name == CHECKPOINT_NAME:
        return (
            f"use the best model instead (--checkpoint best), or start the run again without "
            f"--resume (delete {run} or choose another --out)"
        )
    return "use another checkpoint, or train again"


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by :func:`atomic_save` onto the CPU, never running code from it.

    The file is unpickled with ``weights_only=True``: tensors and plain data only.

    Raises
    ------
    CLIError
        If the file is missing; if it holds other Python objects (refused: unpickling them
        could execute code); or if it is damaged (truncated, corrupt, not a checkpoint). The
        message names the file and says what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler names each class or function a pickle would import
        # ("GLOBAL module.name"); any other failure is a damaged or foreign file.
        found = re.findall(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            detail = f" (it would import {found[0]})"
            # Before checkpoint format 2, checkpoint.pt held numpy's RNG state as numpy objects.
            old = (
                " (a checkpoint.pt written by an earlier version of neuralode holds numpy "
                "objects too: start that run again)"
                if found[0].startswith("numpy")
                else ""
            )
            raise CLIError(
                f"refusing to load {path}: it holds Python objects besides tensors and plain "
                f"data{detail}, and unpickling them could execute code. neuralode writes no "
                f"such files{old}; open only checkpoints you trust, or {_advice(path)}."
            ) from None
        raise _damaged(path, exc) from None
    except Exception as exc:  # noqa: BLE001 - any other failure: the file is not readable
        raise _damaged(path, exc) from None
    if not isinstance(ck, dict) or "model" not in ck:
        raise CLIError(f"{path} is not a neuralode checkpoint (no model state); {_advice(path)}.")
    return ck


def check_belongs(ck: dict, cfg, path: str | os.PathLike) -> None:
    """Raise :class:`CLIError` if the checkpoint ``ck`` read from ``path`` was written with
    another configuration than ``cfg`` (the run's ``config.json``).

    A file copied from another run, or an edited ``config.json``, would otherwise end in
    PyTorch's list of mismatched weights, or worse, in a model that loads but is not the one
    described. The number of epochs (``--resume``), the data's path (moved data) and the
    device (another machine) may differ.
    """
    from .config import CONFIG_NAME, RunConfig, config_diff

    path = Path(path)
    saved = ck.get("config")
    if not isinstance(saved, dict):
        return  # not recorded: nothing to compare
    try:
        diff = config_diff(RunConfig.from_dict(saved, source=str(path)), cfg,
                           ignore=("epochs", "data_path", "device"))  # fmt: skip
    except CLIError as exc:
        diff = [str(exc)]
    if diff:
        what = "; ".join(diff[:4]) + ("; ..." if len(diff) > 4 else "")
        raise CLIError(
            f"{path} does not belong to the run in {path.parent}: it was written with another "
            f"configuration than its {CONFIG_NAME} ({what}; checkpoint -> {CONFIG_NAME}). "
            f"Restore the run's {CONFIG_NAME}, or open the run the checkpoint came from."
        )


def _damaged(path: Path, exc: BaseException) -> CLIError:
    # PyTorch's own text (zip reader internals) does not help the user; the size does (a
    # truncated copy, an interrupted transfer, an empty file).
    size = path.stat().st_size
    return CLIError(
        f"checkpoint {path} is damaged (truncated or corrupt, {size} bytes) and cannot be "
        f"read; {_advice(path)}."
    )


def rng_states(generator: torch.Generator | None = None) -> dict:
    """The states of torch (CPU, CUDA), numpy, Python ``random`` and ``generator``.

    As tensors and plain numbers only (so that checkpoints load with ``weights_only=True``);
    :func:`set_rng_states` converts them back.
    """
    key, mt, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": str(key),
            "state": torch.from_numpy(np.asarray(mt, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        # Python's Mersenne Twister words are < 2**32 and fit int64 exactly.
        "python": {
            "version": int(version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        states["generator"] = generator.get_state()
    return states


def set_rng_states(states: dict, generator: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_states` captured."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(
        (
            n["key"],
            n["state"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = states["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if generator is not None and "generator" in states:
        generator.set_state(states["generator"])


class RunLock:
    """An exclusive lock on the run directory while a process trains the run.

    A second ``neuralode train`` on the same ``--out`` (an identical command, ``--resume``)
    would otherwise train into the same files at the same time -- or start the run over,
    deleting them -- and leave a mix of both. The lock is a POSIX advisory lock (``flock``)
    on the directory itself, so nothing is written for it, and the system releases it when
    the process ends, however it ends. Where there is none (Windows, some network file
    systems) training goes on unlocked. A new directory is locked as soon as it exists.
    """

    def __init__(self, out: Path | None) -> None:
        self.out, self.fd = out, None

    def acquire(self) -> None:
        if self.out is None or self.fd is not None or not self.out.is_dir():
            return
        try:
            import fcntl
        except ImportError:  # no advisory locks (Windows)
            return
        fd = os.open(self.out, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise CLIError(
                    f"--out {self.out} is being trained by another neuralode process right "
                    "now; wait for it to finish or stop it (Ctrl-C), or choose another --out."
                ) from None
            return  # the file system has no locks
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None
