"""Direct gradients: autograd through the solver's own operations."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._loop import integrate
from ._common import Run

__all__ = ["Direct"]


@dataclass(frozen=True)
class Direct:
    """Differentiate by backpropagating through every operation of the solve.

    The gradient is exact for the discrete solve (step sizes are treated as constants, as they
    are chosen by the controller from detached error norms). Memory grows linearly with the
    number of steps. Gradients of gradients (``create_graph=True``) work.

    Example: fixed-step Euler on ``y' = a y``, one step ``h = 1``: ``y(1) = (1 + a) y0``, so
    ``dy(1)/da = y0 = 1`` exactly, where the continuous sensitivity is ``exp(a)``.
    """

    #: Capabilities (the drivers ask these instead of checking the type): autograd through the
    #: solver's own operations, and a per-sample implementation.
    exact_autograd = True
    per_sample = True

    def run_rows(self, run, y0flat: torch.Tensor):
        """The per-sample solve (``batch_control="per_sample"``) with autograd through it."""
        return run.integrate(y0flat)

    def run(self, run: Run, y0flat: torch.Tensor):
        f = run.vector_field()
        stepper = run.new_stepper(y0flat)
        res = integrate(
            run.prob,
            f,
            y0flat,
            track_grad=torch.is_grad_enabled(),
            record="dense" if run.dense else None,
            throw=run.throw,
            stepper=stepper,
            monitor=run.extra.get("monitor"),
        )
        run.result, run.f, run.stepper = res, f, stepper
        run.stats["nfe"] = f.nfe
        return res.ys
