"""Regression tests for the controller protocol review: a propose that does not advance, the
landing merge scale shared by both controls."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import neuralode
from neuralode.controllers import Controller

F64 = torch.float64


@dataclass(frozen=True)
class _Stuck(Controller):
    back: bool = False

    def initial_step(self, *a):
        return 0.1

    def propose(self, t, h, t0, t_end, direction):
        return t - direction * h if self.back else t


@pytest.mark.parametrize("ctl", ["shared", "per_sample"])
@pytest.mark.parametrize("back", [False, True])
@pytest.mark.parametrize("max_steps", [None, 1000])
def test_propose_that_does_not_advance_raises(ctl, back, max_steps):
    y0 = torch.ones(2, 1, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match=r"_Stuck\.propose returned t_try=.* from t=0\.0"):
        neuralode.solve(lambda t, y: -y, y0, t, solver="rk4", controller=_Stuck(back=back),
                        batch_control=ctl, max_steps=max_steps)  # fmt: skip


def _step_times(y0, t, ctrl, ctl):
    ts = []

    def f(tt, y):
        ts.extend(tt.reshape(-1).tolist())
        return -y

    neuralode.solve(f, y0, t, solver="euler", controller=ctrl, batch_control=ctl)
    return sorted({round(x, 9) for x in ts if x < 10})


def test_landing_scale_ignores_landings_outside_the_interval():
    # A landing far outside sample 0's interval (1e6 + 0.5) must not widen its merge: the grid
    # point 1.0 is kept after 0.9 in both controls, and per-sample equals shared.
    ctrl = neuralode.ConstantStep(0.1, step_t=(0.3125, 1e6 + 0.5))
    expect = [0.0, 0.1, 0.2, 0.3, 0.3125, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    one = torch.ones(1, 1, dtype=F64)
    shared = _step_times(one, torch.tensor([0.0, 1.0], dtype=F64), ctrl, "shared")
    rows = _step_times(one, torch.tensor([0.0, 1.0], dtype=F64), ctrl, "per_sample")
    two = _step_times(torch.ones(2, 1, dtype=F64),
                      torch.tensor([[0.0, 1.0], [1e6, 1e6 + 1]], dtype=F64), ctrl, "per_sample")  # fmt: skip
    assert shared == expect
    assert [x for x in rows if x < 1.0] == expect  # (per-sample may also evaluate f at the end)
    assert [x for x in two if x < 1.0] == expect
