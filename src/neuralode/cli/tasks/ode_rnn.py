"""ODE-RNN forecaster on irregularly sampled series.

:class:`neuralode.models.ODERNN` gives hidden states at the observed times. To predict at a
query time ``q`` the forecaster takes the state at the last conditioning point strictly before
``q``, lets it follow the ODE-RNN's vector field over the gap (one per-sample solve for all
queries) and maps it to the channels with a small MLP. Training scores every observed entry
from the state before it (one-step-ahead for the conditioning points, further ahead for the
hidden ones); an optional head on the final state predicts the label.

References
----------
Rubanova, Chen, Duvenaud, "Latent ODEs for Irregularly-Sampled Time Series", NeurIPS 2019
(the ODE-RNN, its autoregressive use and its baselines).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neuralode.models import ODERNN, SolverSettings
from neuralode.models.base import NFECounter, solve_tracked

from ..options import integer, number
from .irregular import IrregularTask

__all__ = ["ODERNNTask", "ODERNNForecaster"]


class ODERNNForecaster(nn.Module):
    """ODE-RNN with a readout at arbitrary query times and an optional label head.

    Parameters
    ----------
    n_channels : int
        Channels ``C``.
    hidden : int
        Hidden state size of the ODE-RNN.
    ode_hidden : int
        Width of its MLP vector field.
    classify : bool
        Add a logistic head on the state after the last observation.
    **solver_kw
        Solver settings (see :class:`neuralode.models.ODERNN`).
    """

    def __init__(self, n_channels: int, hidden: int, ode_hidden: int, classify: bool, **solver_kw):
        super().__init__()
        self.rnn = ODERNN(n_channels, hidden, ode_hidden=ode_hidden, **solver_kw)
        self.readout = nn.Sequential(
            nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, n_channels)
        )
        self.classifier = nn.Linear(hidden, 1) if classify else None
        self.settings = SolverSettings(**solver_kw)
        self._counter = NFECounter()

    @property
    def nfe_forward(self) -> int | None:
        """Vector field evaluations of the last call: the ODE-RNN's and the readout's solves."""
        own = self._counter.forward if self._counter.n_solves else None
        parts = [p for p in (self.rnn.nfe_forward, own) if p is not None]
        return sum(parts) if parts else None

    @property
    def nfe_backward(self) -> int | None:
        """The same for the backward pass through the last call."""
        parts = [p for p in (self.rnn.nfe_backward, self._counter.backward) if p is not None]
        return sum(parts) if parts else None

    def forward(self, batch, cond_mask: torch.Tensor, times: torch.Tensor):
        """Predicted means ``(B, Q, C)`` at ``times (B, Q)`` and the final states ``(B, H)``."""
        hs, h_last = self.rnn.forward_batch(batch, mask=cond_mask)
        B, T, H = hs.shape
        t = batch.times.detach().to(torch.float64)
        q = times.detach().to(torch.float64)
        observed = batch.valid & (cond_mask > 0).any(-1)  # (B, T)
        before = observed[:, None, :] & (t[:, None, :] < q[:, :, None])  # (B, Q, T)
        ar = torch.arange(T, device=t.device)
        last = torch.where(before, ar, torch.full_like(ar, -1)).max(dim=-1).values  # (B, Q)
        has = last >= 0
        j = last.clamp_min(0)
        h = torch.gather(hs, 1, j[..., None].expand(-1, -1, H))
        h = torch.where(has[..., None], h, torch.zeros_like(h))
        gap = torch.where(has, q - torch.gather(t, 1, j), torch.zeros_like(q))
        self._counter.reset()
        flat = h.reshape(-1, H)
        gaps = gap.reshape(-1)
        if bool((gaps > 0).any()):
            grid = torch.stack([torch.zeros_like(gaps), gaps], dim=1)
            flat = solve_tracked(self.settings, self._counter, self.rnn.vector_field, flat, grid)[
                -1
            ]
        return self.readout(flat.reshape(B, -1, H)), h_last

    def predict_proba(self, batch) -> torch.Tensor:
        _, h = self.rnn.forward_batch(batch)
        return torch.sigmoid(self.classifier(h).squeeze(-1))


class ODERNNTask(IrregularTask):
    name = "ode-rnn"
    summary_line = "ODE-RNN forecaster on irregular series"
    model_label = "ODE-RNN"
    curve_label = "ODE-RNN prediction (deterministic: no band)"
    defaults = dict(
        epochs=40, batch_size=32, lr=1e-2, method="dopri5", rtol=1e-3, atol=1e-4, step_size=None
    )
    quick = dict(epochs=2, batch_size=16, max_subjects=48, hidden=8, ode_hidden=8)
    options = dict(IrregularTask.common_options, hidden=32, ode_hidden=32, bce_weight=1.0)
    option_rules = dict(
        IrregularTask.common_rules,
        hidden=integer(1),
        ode_hidden=integer(1),
        bce_weight=number(0, strict=False),
    )

    def build_model(self):
        return ODERNNForecaster(
            len(self.channels),
            self.opt["hidden"],
            self.opt["ode_hidden"],
            self.has_labels,
            **self.cfg.solver_kwargs(),
        )

    def model_loss(self, model, batch, cond, epoch, step):
        enc = batch.mask * cond.unsqueeze(-1).to(batch.mask.dtype)
        pred, h_last = model(batch, enc, batch.times)
        n = batch.mask.sum().clamp_min(1)
        mse = ((pred - batch.values) ** 2 * batch.mask).sum() / n
        logs = {"train_mse": float(mse.detach())}
        loss = mse
        if model.classifier is not None:
            labelled = ~torch.isnan(batch.labels)
            y = torch.nan_to_num(batch.labels, 0.0)
            logits = model.classifier(h_last).squeeze(-1)
            bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
            bce = (bce * labelled).sum() / labelled.sum().clamp_min(1)
            loss = loss + self.opt["bce_weight"] * bce
            logs["train_bce"] = float(bce.detach())
        return loss, logs

    def predict(self, model, batch, cond, times, n_samples, generator=None):
        enc = batch.mask * cond.unsqueeze(-1).to(batch.mask.dtype)
        mean, _ = model(batch, enc, times)
        return mean, torch.zeros_like(mean)  # deterministic: no spread

    def predict_label(self, model, batch):
        return model.predict_proba(batch)
