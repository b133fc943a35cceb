"""Regression tests for small gaps left by issue 12 ("One stepping engine"): a controller
whose ``propose`` does not advance under compiled stepping and the reversible driver.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import neuralode
from neuralode.controllers import Controller

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
