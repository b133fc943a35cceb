"""The classic neural ODE demo: learn the dynamics of a 2-D spiral from short noisy windows.

The true system is ``dy/dt = A y^3`` (cube taken elementwise) with
``A = [[-0.1, 2.0], [-2.0, -0.1]]``, ``y(0) = (2, 0)``, sampled at 1000 equally spaced times in
``[0, 25]``; Gaussian noise is added to the samples. The model is a neural ODE whose vector
field is a small MLP of ``y^3`` (the same inductive bias as the torchdiffeq ``ode_demo.py``).
Each step fits a batch of random windows of ``window`` consecutive samples, each integrated
from its first (noisy) sample.

References
----------
Chen, Rubanova, Bettencourt, Duvenaud, "Neural Ordinary Differential Equations", NeurIPS 2018,
and the ``examples/ode_demo.py`` of torchdiffeq (the problem and the model).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

import neuralode
from neuralode.models import NeuralODE

from ..options import integer, number
from .base import Task

__all__ = ["SpiralTask", "SpiralField", "spiral_data"]

TRUE_A = ((-0.1, 2.0), (-2.0, -0.1))
Y0 = (2.0, 0.0)
T_END = 25.0
N_POINTS = 1000
#: Extrapolation horizon of the evaluation: the true system continued past the data.
T_EXTRAP = 30.0


class SpiralField(nn.Module):
    """``f(t, y) = MLP(y^3)`` with one tanh hidden layer; ``y: (..., 2)``."""

    def __init__(self, hidden: int = 50) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.1)
                nn.init.zeros_(m.bias)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y**3)


def _true_field(t, y):
    A = torch.tensor(TRUE_A, dtype=y.dtype)
    return (y**3) @ A.T


@functools.lru_cache(maxsize=4)
def _true_trajectory(t_end: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.linspace(0.0, t_end, n, dtype=torch.float64)
    y0 = torch.tensor(Y0, dtype=torch.float64)
    with torch.no_grad():
        y = neuralode.solve(_true_field, y0, t, rtol=1e-9, atol=1e-11).ys
    return t, y


def spiral_data(noise_std: float, seed: int, t_end: float = T_END, n: int = N_POINTS):
    """``(t, y_true, y_noisy)``: float64 tensors ``(n,)``, ``(n, 2)``, ``(n, 2)``."""
    t, y = (x.clone() for x in _true_trajectory(float(t_end), int(n)))
    g = torch.Generator().manual_seed(10_007 + seed)
    noisy = y + noise_std * torch.randn(y.shape, generator=g, dtype=torch.float64)
    return t, y, noisy


class SpiralTask(Task):
    name = "spiral"
    summary_line = "learn a 2-D spiral's dynamics from noisy samples (the classic demo)"
    description = (
        "Fits a neural ODE f(y) = MLP(y^3) to noisy samples of dy/dt = A y^3 "
        "(A = [[-0.1, 2], [-2, -0.1]], y0 = (2, 0), t in [0, 25], 1000 points) from random "
        "windows of consecutive samples; plots the learned trajectory against the data and the "
        "learned vector field (plots/spiral.png)."
    )
    datasets = ("spiral",)
    defaults = dict(
        epochs=30, batch_size=20, lr=1e-2, method="dopri5", rtol=1e-5, atol=1e-6, step_size=None
    )
    quick = dict(epochs=2, batch_size=8, steps_per_epoch=3, hidden=16)
    options = dict(hidden=50, window=10, steps_per_epoch=50, noise_std=0.02, lr_decay=0.9)
    option_rules = dict(
        hidden=integer(1),
        window=integer(2, N_POINTS),
        steps_per_epoch=integer(1),
        noise_std=number(0, strict=False),
        lr_decay=number(0, maximum=1),
    )

    def load_data(self) -> None:
        t, y, noisy = spiral_data(self.opt["noise_std"], self.cfg.seed)
        self.t = t.to(self.device)
        self.y_true = y.to(self.device, self.dtype)
        self.y = noisy.to(self.device, self.dtype)

    def build_model(self) -> nn.Module:
        return NeuralODE(SpiralField(self.opt["hidden"]), **self.cfg.solver_kwargs())

    def epoch_batches(self, generator):
        n_start = N_POINTS - self.opt["window"] + 1
        starts = torch.randint(
            0, n_start, (self.opt["steps_per_epoch"], self.cfg.batch_size), generator=generator
        )
        return list(starts)

    def train_loss(self, model, indices, epoch, step):
        w = self.opt["window"]
        idx = indices.to(self.device)[None, :] + torch.arange(w, device=self.device)[:, None]
        target = self.y[idx]  # (w, B, 2)
        pred = model(self.y[indices.to(self.device)], self.t[:w] - self.t[0])
        loss = (pred - target).square().mean(dim=(0, 2)).mean()
        return loss, {}

    def _trajectory(self, model, t_end: float, n: int) -> torch.Tensor:
        t = torch.linspace(0.0, t_end, n, dtype=torch.float64, device=self.device)
        return t, model(self.y[0], t)

    def validate(self, model):
        _, pred = self._trajectory(model, T_END, N_POINTS)
        return {"val_loss": float((pred - self.y).square().mean())}

    def evaluate(self, model):
        with torch.no_grad():
            _, pred = self._trajectory(model, T_END, N_POINTS)
            nfe = model.nfe_forward
            t_all, truth = spiral_data(0.0, self.cfg.seed, T_EXTRAP, 1201)[:2]
            _, pred_all = self._trajectory(model, T_EXTRAP, 1201)
        future = t_all > T_END
        err = (pred_all.double().cpu()[future] - truth[future]).square().mean()
        return {
            "task": self.name,
            "trajectory_mse_vs_data": float((pred - self.y).square().mean()),
            "trajectory_mse_vs_truth": float(
                (pred.double() - self.y_true.double()).square().mean()
            ),
            "extrapolation_mse_vs_truth": float(err),
            "noise_variance": self.opt["noise_std"] ** 2,
            "nfe_full_trajectory": nfe,
        }

    def summary(self, results, metrics):
        from ..report import nfe_line

        r = results
        lines = [
            "Spiral: neural ODE f(y) = MLP(y^3) fitted to noisy samples of dy/dt = A y^3",
            f"  full trajectory from y(0), t in [0, {T_END:g}]: MSE vs data "
            f"{r['trajectory_mse_vs_data']:.4g} (noise variance {r['noise_variance']:.4g}), "
            f"MSE vs true trajectory {r['trajectory_mse_vs_truth']:.4g}",
            f"  extrapolation to t = {T_EXTRAP:g}: MSE vs true trajectory "
            f"{r['extrapolation_mse_vs_truth']:.4g}",
            f"  NFE of one full-trajectory solve: {r['nfe_full_trajectory']}",
            nfe_line(metrics),
        ]
        return "\n".join(lines)

    def plot(self, model, plot_dir: Path):
        from ..plots import plot_spiral

        with torch.no_grad():
            t, pred = self._trajectory(model, T_EXTRAP, 1201)
            t_true, truth = spiral_data(0.0, self.cfg.seed, T_EXTRAP, 1201)[:2]
        return [
            plot_spiral(
                plot_dir / "spiral.png",
                data_t=self.t.cpu(),
                data_y=self.y.cpu(),
                true_t=t_true,
                true_y=truth,
                pred_t=t.cpu(),
                pred_y=pred.cpu(),
                t_data_end=T_END,
                field=lambda y: model.func(torch.zeros(()), y.to(self.device, self.dtype)).cpu(),
                true_field=lambda y: _true_field(None, y),
            )
        ]
