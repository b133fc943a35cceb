"""Regression tests for small gaps left by issue 12 ("One stepping engine"): a controller
whose ``propose`` does not advance under compiled stepping and the reversible driver; an
``adapt`` that returns a 0-d tensor under shared control.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import neuralode
from neuralode.controllers import Controller
from neuralode.controllers.step_size import maximum, minimum, where

F64 = torch.float64


@dataclass(frozen=True)
class _Stuck(Controller):
    """A fixed-step controller whose proposal stays at ``t`` (or goes back, ``back``)."""

    back: bool = False

    def initial_step(self, *a):
        return 0.1

    def propose(self, t, h, t0, t_end, direction):
        return t - direction * h if self.back else t


def _stuck_solve(back, max_steps, **kw):
    y0 = torch.ones(2, 1, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    return neuralode.solve(lambda t, y: -y, y0, t, solver="rk4", controller=_Stuck(back=back),
                           max_steps=max_steps, **kw)  # fmt: skip


def _stuck_match(back):
    return rf"_Stuck\.propose returned t_try={'-0.1' if back else '0.0'} from t=0\.0: .* fix"


@pytest.mark.parametrize("back", [False, True])
@pytest.mark.parametrize("max_steps", [None, 1000])
def test_reversible_propose_that_does_not_advance_raises(back, max_steps):
    # Before: a zero step forever (max_steps=None: a hang), or MaxStepsError at t=-200.
    with pytest.raises(ValueError, match=_stuck_match(back)):
        _stuck_solve(back, max_steps, gradient="reversible")


@pytest.mark.parametrize(
    ("control", "back"), [("shared", False), ("per_sample", True)], ids=["shared", "per_sample"]
)
def test_compiled_propose_that_does_not_advance_raises(control, back):
    # Before: zero steps forever (back=False: no attempt counted, a hang even with max_steps),
    # or steps backward to MaxStepsError at t=-100. One compile each.
    with pytest.raises(ValueError, match=_stuck_match(back)):
        _stuck_solve(back, 1000, compile=True, batch_control=control)


@dataclass(frozen=True)
class _IControl(Controller):
    """I control ``h clip(0.9 e^(-1/k), 0.2, 5)``; with ``as_tensor`` its ``adapt`` returns the
    step size as a 0-d float64 tensor (under shared control it receives floats)."""

    rtol: float = 1e-7
    atol: float = 1e-9
    as_tensor: bool = False
    adaptive = True

    def initial_step(self, *a):
        return 0.01

    def adapt(self, h, h_prop, e, prev, k, accept, clipped):
        fac = minimum(5.0, maximum(0.2, 0.9 * maximum(e, 1e-100) ** (-1.0 / k)))
        h_next = where(accept, h * fac, h * minimum(fac, 1.0))
        if self.as_tensor and not isinstance(h_next, torch.Tensor):
            h_next = torch.tensor(h_next, dtype=F64)
        return h_next, prev


@pytest.mark.parametrize("gradient", ["direct", "reversible"])
def test_adapt_returning_a_0d_tensor_under_shared_control(gradient):
    # Before: IndexError "Dimension out of range" from the stage combination (the 0-d step size
    # was taken for a per-row one). Now the same steps as the float version.
    y0 = torch.tensor([[1.0], [0.5]], dtype=F64)
    t = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    runs = [
        neuralode.solve(
            lambda t, y: -y, y0, t, controller=_IControl(as_tensor=a), gradient=gradient
        )  # fmt: skip
        for a in (False, True)
    ]
    ref = y0.squeeze(1) * torch.exp(-t).unsqueeze(1)  # (T, B)
    for sol in runs:
        assert torch.allclose(sol.ys.squeeze(-1), ref, rtol=1e-5, atol=1e-8)
    assert runs[1].stats["n_accepted"] == runs[0].stats["n_accepted"] > 5
    assert runs[1].stats["n_rejected"] == runs[0].stats["n_rejected"]
