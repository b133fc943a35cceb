"""What a task provides to the generic training loop (:mod:`neuralode.cli.train`)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import RunConfig
from ..distributed import Dist

__all__ = ["Task", "model_nfe"]


def model_nfe(model: nn.Module) -> tuple[int, int]:
    """``(nfe_forward, nfe_backward)`` of the model's most recent forward/backward pass.

    The models of :mod:`neuralode.models` expose ``nfe_forward`` / ``nfe_backward`` (``None``
    before a pass); missing values count as 0.
    """
    f = getattr(model, "nfe_forward", None)
    b = getattr(model, "nfe_backward", None)
    return int(f or 0), int(b or 0)


class Task(abc.ABC):
    """A training task: data, model, loss, validation, evaluation, plots and summary.

    The loop calls, in order: :meth:`load_data` (raise :class:`~neuralode.cli.CLIError` for
    bad data, before anything is written), :meth:`build_model`, then per epoch
    :meth:`epoch_batches` and per step :meth:`train_loss`, then :meth:`validate`; after
    training :meth:`evaluate`, :meth:`summary` and :meth:`plot`.

    Attributes
    ----------
    name : str
        The task's command-line name.
    datasets : tuple of str
        Accepted ``--data`` kinds; the first is the default.
    defaults : dict
        Default top-level settings (epochs, batch_size, lr, method, rtol, atol, step_size).
    quick : dict
        Overrides of ``defaults`` and ``options`` for ``--quick``.
    options : dict
        Task-specific settings and their defaults (``--set KEY=VALUE``).
    """

    name: ClassVar[str] = ""
    summary_line: ClassVar[str] = ""
    description: ClassVar[str] = ""
    datasets: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict] = {}
    quick: ClassVar[dict] = {}
    options: ClassVar[dict] = {}
    #: Allowed values of each option (:mod:`neuralode.cli.options`), checked before anything
    #: is written.
    option_rules: ClassVar[dict] = {}
    #: Name of the validation metric used to pick ``best.pt`` (lower is better).
    val_key: ClassVar[str] = "val_loss"

    def __init__(self, cfg: RunConfig, device: torch.device, dist: Dist) -> None:
        self.cfg = cfg
        self.opt = cfg.options
        self.device = device
        self.dtype = getattr(torch, cfg.dtype)
        self.dist = dist

    # -- configuration --------------------------------------------------------------------
    @classmethod
    def resolved_defaults(cls, quick: bool) -> dict:
        """Top-level defaults and ``options`` for this task (with the ``--quick`` overrides)."""
        top = dict(cls.defaults)
        opts = dict(cls.options)
        if quick:
            for k, v in cls.quick.items():
                (opts if k in opts else top)[k] = v
        top["options"] = opts
        return top

    @classmethod
    def check_options(cls, options: dict, data: str) -> None:
        """Raise :class:`~neuralode.cli.CLIError` for an option value outside its rule, or one
        that has no effect with the dataset ``data``."""
        from ..options import check_options

        check_options(options, cls.option_rules, cls.name)

    # -- to implement ---------------------------------------------------------------------
    @abc.abstractmethod
    def load_data(self) -> None:
        """Load and split the data (rank 0 and every worker alike)."""

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The model, on ``self.device`` in ``self.dtype``."""

    @abc.abstractmethod
    def epoch_batches(self, generator: torch.Generator) -> Sequence[torch.Tensor]:
        """The global batches of one epoch, as index tensors, drawn from ``generator`` only."""

    @abc.abstractmethod
    def train_loss(
        self, model: nn.Module, indices: torch.Tensor, epoch: int, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss over the samples ``indices`` and scalars to log (floats)."""

    @abc.abstractmethod
    def validate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics; must contain :attr:`val_key`. Runs under ``torch.no_grad``."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Held-out results (JSON-ready) for ``results.json`` and :meth:`summary`."""

    @abc.abstractmethod
    def summary(self, results: dict[str, Any], metrics: list[dict]) -> str:
        """A short, human-readable report of :meth:`evaluate`'s results."""

    def export(self) -> dict[str, Any]:
        """What, besides the configuration and the weights, rebuilds the model and applies it to
        new data without the training data (e.g. channel names, the fitted normaliser).

        Tensors and plain data only (saved in every checkpoint, read with
        ``weights_only=True``); :meth:`restore` takes it back. Default: nothing.
        """
        return {}

    def restore(self, exported: dict[str, Any]) -> None:
        """Take :meth:`export`'s output in place of :meth:`load_data`, so that
        :meth:`build_model` works without the data (:func:`neuralode.load_run`). Default: a
        task whose model needs nothing but the configuration ignores it."""
        del exported

    def plot(self, model: nn.Module, plot_dir: Path) -> list[Path]:
        """Task-specific figures (PNG) in ``plot_dir``; return their paths."""
        return []

    # -- helpers --------------------------------------------------------------------------
    def nfe(self, model: nn.Module) -> tuple[int, int]:
        """NFE (forward, backward) of the last training step."""
        return model_nfe(model)

    def make_scheduler(self, optimizer: torch.optim.Optimizer):
        """The learning-rate scheduler, stepped once per epoch: ``lr * lr_decay**epoch`` when the
        task has an ``lr_decay`` option below 1, none otherwise."""
        gamma = self.opt.get("lr_decay", 1.0)
        if not 0 < gamma <= 1:
            from ..errors import CLIError

            raise CLIError(f"--set lr_decay must be in (0, 1]; got {gamma}.")
        if gamma == 1.0:
            return None
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma)
