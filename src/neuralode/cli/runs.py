"""Trained models from Python: :func:`load_run` opens a run directory of ``neuralode train``.

The model is rebuilt from the run's ``config.json`` and what the checkpoint stores besides the
weights (channel names, the normaliser fitted on the training split, whether it has a
classification head), so neither the training data nor the task's code paths are needed, and
the model is exactly the one that was trained. Checkpoints are read with
``torch.load(..., weights_only=True)``: opening a run never executes code from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import BEST_NAME, CHECKPOINT_NAME, check_belongs, load_checkpoint
from .config import CONFIG_NAME, RunConfig, read_run_config
from .errors import CLIError

__all__ = ["TrainedRun", "load_run", "normalizer_state", "normalizer_from_state"]

CHECKPOINTS = {"best": BEST_NAME, "last": CHECKPOINT_NAME}


def normalizer_state(normalizer) -> dict[str, Any]:
    """A :class:`~neuralode.data.Normalizer` as tensors and plain data (for checkpoints)."""
    return {
        "method": normalizer.method,
        "channels": list(normalizer.channels),
        "shift": normalizer.shift.detach().cpu(),
        "scale": normalizer.scale.detach().cpu(),
        "time_scale": float(normalizer.time_scale),
        "static_names": list(normalizer.static_names),
        "static_shift": normalizer.static_shift,
        "static_scale": normalizer.static_scale,
    }


def normalizer_from_state(state: dict[str, Any]):
    """The :class:`~neuralode.data.Normalizer` that :func:`normalizer_state` described."""
    from neuralode.data import Normalizer

    return Normalizer(
        state["method"],
        tuple(state["channels"]),
        state["shift"],
        state["scale"],
        state["time_scale"],
        tuple(state["static_names"]),
        state["static_shift"],
        state["static_scale"],
    )


@dataclass(frozen=True, eq=False)
class TrainedRun:
    """A trained model and everything needed to apply it to new data.

    Returned by :func:`load_run`.

    Attributes
    ----------
    model : torch.nn.Module
        The trained model in eval mode, on the requested device, in the run's dtype
        (``config.dtype``): :class:`~neuralode.models.LatentODE` (task ``latent-ode``), the
        ODE-RNN forecaster (``ode-rnn``), :class:`~neuralode.models.NeuralODE` (``spiral``),
        :class:`~neuralode.models.ODENetClassifier` (``odenet``) or
        :class:`~neuralode.models.CNF` (``cnf``, on data standardised with the training split's
        mean and std).
    config : RunConfig
        The run's configuration (its ``config.json``).
    normalizer : Normalizer or None
        Fitted on the training split (series tasks; ``None`` otherwise): the model works in its
        units, ``normalizer.transform`` maps new data in, ``inverse_transform`` maps
        predictions back to physical units; times are divided by ``normalizer.time_scale``.
    channels : tuple of str or None
        Channel names, in the order of the model's last dimension (series tasks).
    time_unit : str or None
        Unit of the data's time axis (e.g. ``"years"``; series tasks).
    checkpoint : pathlib.Path
        The file the weights came from.
    epoch : int
        Training epochs completed when that file was written.
    metrics : dict or None
        The validation metrics of that epoch (``best.pt``), ``None`` for ``checkpoint.pt``.
    """

    model: nn.Module
    config: RunConfig
    normalizer: Any
    channels: tuple[str, ...] | None
    time_unit: str | None
    checkpoint: Path
    epoch: int
    metrics: dict | None

    def prepare(self, data):
        """New series in physical units -> a normalised batch on the model's device and dtype.

        Parameters
        ----------
        data : IrregularDataset or sequence of SubjectSeries
            Values ``(n_i, C)`` with ``C = len(channels)`` in the order of :attr:`channels`
            (``NaN`` = not observed), times in :attr:`time_unit` from the start of each series.
            A dataset's channel names must equal :attr:`channels`. Static covariates are
            ignored (the models do not use them).

        Returns
        -------
        IrregularBatch
            Normalised values, times divided by ``normalizer.time_scale``; feed it to the
            model's ``predict`` / ``predict_proba``.

        Raises
        ------
        TypeError
            If ``data`` is neither a dataset nor a sequence of ``SubjectSeries``.
        ValueError
            If the run has no normaliser (a task without series), the channels differ, or
            ``data`` is empty.
        """
        from neuralode.data import IrregularDataset, SubjectSeries, collate_series

        if self.normalizer is None:
            raise ValueError(
                f"prepare() is for series tasks; the {self.config.task!r} model takes tensors "
                "directly."
            )
        if not isinstance(data, IrregularDataset):
            iterable = hasattr(data, "__iter__") and not isinstance(data, (str, bytes))
            items = list(data) if iterable else None
            if items is None or not all(isinstance(r, SubjectSeries) for r in items):
                raise TypeError(
                    "prepare() takes an IrregularDataset or a list of SubjectSeries (times and "
                    f"values (n_i, {len(self.channels)}) in physical units); got "
                    f"{type(data).__name__}. Wrap each series: SubjectSeries(id, times=..., "
                    "values=...)."
                )
            data = items
        if len(data) == 0:
            raise ValueError("prepare() needs at least one series; got none.")
        if isinstance(data, IrregularDataset):
            channels, unit = data.channels, data.time_unit
        else:
            channels, unit = self.channels, self.time_unit or "unspecified"
        data = IrregularDataset([replace(r, static=None) for r in data], channels, time_unit=unit)
        norm = replace(self.normalizer, static_names=(), static_shift=None, static_scale=None)
        p = next(self.model.parameters())
        return collate_series(list(norm.transform(data)), dtype=p.dtype, device=p.device)


def load_run(
    run_dir: str | os.PathLike,
    checkpoint: str = "best",
    device: str | torch.device = "cpu",
) -> TrainedRun:
    """Open a run directory written by ``neuralode train``: the trained model, ready to use.

    Parameters
    ----------
    run_dir : path
        The run directory (holds ``config.json`` and ``best.pt`` / ``checkpoint.pt``).
    checkpoint : {"best", "last"}, default ``"best"``
        ``"best"``: the model of the best validation epoch (``best.pt``); ``"last"``: the most
        recent checkpoint (``checkpoint.pt``, e.g. of an interrupted run).
    device : str or torch.device, default ``"cpu"``
        Where the model is put (``"cuda"``, ``"cuda:1"``, ...).

    Returns
    -------
    TrainedRun
        ``model`` (eval mode, on ``device``), ``config``, ``normalizer``, ``channels``,
        ``time_unit``, ``checkpoint``, ``epoch``, ``metrics``, and
        :meth:`TrainedRun.prepare` to turn new series into a batch for the model.

    Raises
    ------
    TypeError
        If ``device`` is not a str, int or torch.device.
    FileNotFoundError
        If ``run_dir``, its ``config.json`` or the checkpoint does not exist.
    ValueError
        If ``checkpoint`` is not ``"best"``/``"last"``; if ``device`` is not a device name or
        names a CUDA device that is not there; if the checkpoint is damaged, holds
        anything but tensors and plain data (refused: loading it could execute code) or was
        written by an older version; if it was written with another configuration than
        ``config.json`` (a file from another run, an edited ``config.json``); if
        ``config.json`` is invalid.

    Examples
    --------
    >>> run = neuralode.load_run("runs/demo")                      # doctest: +SKIP
    >>> batch = run.prepare(new_series)                            # doctest: +SKIP
    >>> mean, std = run.model.predict(batch, times, n_samples=32)  # doctest: +SKIP
    """
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be 'best' or 'last'; got {checkpoint!r}.")
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a neuralode run directory (no {CONFIG_NAME}); pass the --out "
            "folder of 'neuralode train'."
        )
    path = run_dir / CHECKPOINTS[checkpoint]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; the run has not finished an epoch yet"
            + (" (try checkpoint='last')." if checkpoint == "best" else ".")
        )
    try:
        cfg = read_run_config(run_dir)
        ck = load_checkpoint(path)
        check_belongs(ck, cfg, path)
    except CLIError as exc:
        raise ValueError(str(exc)) from None
    dev = _device(device)
    task, model = build_from_checkpoint(cfg, ck, path, dev)
    model.eval()
    return TrainedRun(
        model=model,
        config=cfg,
        normalizer=getattr(task, "normalizer", None),
        channels=getattr(task, "channels", None),
        time_unit=getattr(task, "time_unit", None),
        checkpoint=path,
        epoch=int(ck.get("epoch", 0)),
        metrics=ck.get("metrics"),
    )


def _device(device) -> torch.device:
    """``device`` as a :class:`torch.device`, checked before anything is loaded onto it."""
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(
            f"device must be a str such as 'cpu' or 'cuda:0', or a torch.device; got "
            f"{type(device).__name__} {device!r}."
        )
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"device must name a device such as 'cpu', 'cuda' or 'cuda:1'; got {device!r}."
        ) from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device={device!r}: no CUDA device is available; use device='cpu'.")
        if dev.index is not None and dev.index >= n:
            raise ValueError(
                f"device={device!r}: there are {n} CUDA device(s) (cuda:0 to cuda:{n - 1}); "
                "choose one of them or device='cpu'."
            )
    return dev


def build_from_checkpoint(cfg: RunConfig, ck: dict, path: Path, device: torch.device):
    """The task (restored from ``ck["data"]``, no data loaded) and the model with the weights."""
    from .distributed import Dist
    from .tasks import get_task

    if "data" not in ck:
        raise ValueError(
            f"{path} was written by an older neuralode (checkpoint format "
            f"{ck.get('format', 1)}) and lacks the data settings the model needs; train the run "
            "again."
        )
    task = get_task(cfg.task)(cfg, device, Dist())
    task.restore(ck["data"])
    model = task.build_model().to(device=device, dtype=task.dtype)
    model.load_state_dict(ck["model"])
    return task, model
