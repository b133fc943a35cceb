"""ODE-RNN on irregularly sampled series (placeholder until neuralode.models.ODERNN)."""

from __future__ import annotations

from ..errors import CLIError
from .irregular import IrregularTask

__all__ = ["ODERNNTask"]


class ODERNNTask(IrregularTask):
    name = "ode-rnn"
    summary_line = "ODE-RNN on irregular series"
    model_label = "ODE-RNN"
    defaults = dict(
        epochs=40, batch_size=32, lr=1e-2, method="dopri5", rtol=1e-3, atol=1e-4, step_size=None
    )
    quick = dict(epochs=2, batch_size=16, max_subjects=60, hidden=8)
    options = dict(IrregularTask.common_options, hidden=32)

    def build_model(self):
        raise CLIError("the ODE-RNN model is not available yet.")
