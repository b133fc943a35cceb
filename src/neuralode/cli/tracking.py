"""Experiment tracking: ``neuralode train --tensorboard`` (TensorBoard's own event files).

One point per epoch, at ``global_step = epoch``, under ``RUN_DIR/tensorboard``: the training
losses (``loss/...``), the validation metrics (``validation/...``), the NFE of the forward and
backward passes in total and per step (``nfe/...``), the solver's steps (``steps/mean_step_size``,
``steps/accepted_per_solve``, ``steps/rejected_per_solve``), the learning rate and the epoch's
time. View with ``tensorboard --logdir RUN_DIR/tensorboard``. TensorBoard is an optional extra
(``pip install 'neuralode[tensorboard]'``).
"""

from __future__ import annotations

from pathlib import Path

from .errors import CLIError

__all__ = ["TENSORBOARD_DIR", "check_tensorboard", "TensorBoardLog"]

TENSORBOARD_DIR = "tensorboard"

_GROUPS = {
    "nfe_forward": "nfe/forward",
    "nfe_backward": "nfe/backward",
    "nfe_forward_per_step": "nfe/forward_per_step",
    "nfe_backward_per_step": "nfe/backward_per_step",
    "mean_step_size": "steps/mean_step_size",
    "accepted_steps_per_solve": "steps/accepted_per_solve",
    "rejected_steps_per_solve": "steps/rejected_per_solve",
    "lr": "optimizer/lr",
    "time_s": "time/epoch_s",
}


def check_tensorboard() -> None:
    """Raise :class:`CLIError` (before anything is written) when TensorBoard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise CLIError(
            "--tensorboard needs the tensorboard package: pip install 'neuralode[tensorboard]'."
        ) from None


def tag_of(key: str) -> str | None:
    """The TensorBoard tag of a metrics row key (``None``: not logged)."""
    if key in _GROUPS:
        return _GROUPS[key]
    if key.startswith("val_"):
        return f"validation/{key}"
    if key in ("epoch", "step"):
        return None
    return f"loss/{key}"  # train_loss and the task's training terms (train_mse, kl, ...)


class TensorBoardLog:
    """Writes the rows of ``metrics.jsonl`` as TensorBoard scalars.

    Parameters
    ----------
    run_dir : Path
        The run directory; events go to ``run_dir/tensorboard``.
    first_epoch : int
        Epoch the (resumed) run starts from: events of later epochs left by an interrupted
        earlier process are purged, so that each epoch appears once.
    """

    def __init__(self, run_dir: Path, first_epoch: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = first_epoch + 1 if first_epoch else None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=purge)

    def log(self, row: dict) -> None:
        """One epoch's row (``row["epoch"]`` is the global step)."""
        epoch = int(row["epoch"])
        for key, value in row.items():
            tag = tag_of(key)
            if tag is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(tag, float(value), epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
