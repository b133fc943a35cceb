"""Latent ODE on irregularly sampled series (placeholder until neuralode.models.LatentODE)."""

from __future__ import annotations

from ..errors import CLIError
from .irregular import IrregularTask

__all__ = ["LatentODETask"]


class LatentODETask(IrregularTask):
    name = "latent-ode"
    summary_line = "latent ODE (ODE-RNN encoder) on irregular series: the demo"
    model_label = "latent ODE"
    defaults = dict(
        epochs=60, batch_size=32, lr=1e-2, method="dopri5", rtol=1e-3, atol=1e-4, step_size=None
    )
    quick = dict(epochs=2, batch_size=16, max_subjects=60, latent_dim=4, hidden=8, n_samples=4)
    options = dict(IrregularTask.common_options, latent_dim=16, hidden=32)

    def build_model(self):
        raise CLIError("the latent ODE model is not available yet.")
