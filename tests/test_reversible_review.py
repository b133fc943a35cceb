"""Review findings: a blow-up ends a Reversible solve like every other method; Backsolve's
backward grid for a fixed-step controller under each control mode (documented)."""

import math
from dataclasses import dataclass

import pytest
import torch

import neuralode
from neuralode.controllers import Controller
from neuralode.controllers.step_size import where

F64 = torch.float64


class Square(torch.nn.Module):
    """``y' = y**2``: from ``y(0) = 1`` the solution ``1 / (1 - t)`` blows up at ``t = 1``."""

    def forward(self, t, y):
        return y * y


def _blowup(throw: bool):
    t = torch.tensor([0.0, 0.5, 0.9, 1.5], dtype=F64)
    y0 = torch.ones(1, 1, dtype=F64, requires_grad=True)
    sol = neuralode.solve(
        Square(), y0, t, rtol=1e-10, atol=1e-12, throw=throw,
        gradient=neuralode.Reversible(), max_steps=5000,
    )  # fmt: skip
    return sol, y0


def test_blowup_underflows_instead_of_retrying():
    # The rejected-step shrink started from the step stretched by the sliver rule (a step a
    # few ulps long), which gave the same step again: 1265 accepted, 18735 rejected and
    # max_steps at max_steps=20000. Now the step size underflows within a few rejections.
    sol, y0 = _blowup(throw=False)
    assert sol.status == "dt_underflow"
    assert sol.stats["n_rejected"] < 50
    # Stops at the scheme's own blow-up: within the global error (rtol 1e-10) of t = 1.
    assert abs(sol.t_final - 1.0) < 1e-9
    ys = sol.ys.reshape(4)
    torch.testing.assert_close(
        ys[1:3].detach(), torch.tensor([2.0, 10.0], dtype=F64), rtol=1e-7, atol=0
    )
    assert torch.isnan(ys[3])  # not reached
    # d(y(0.5) + y(0.9)) / dy0 = 1 / 0.5**2 + 1 / 0.1**2 = 104, through the reached outputs.
    (ys[1] + ys[2]).backward()
    assert y0.grad.item() == pytest.approx(104.0, rel=1e-6)


def test_blowup_raises_underflow_with_throw():
    with pytest.raises(neuralode.StepSizeUnderflowError, match="step size underflow"):
        _blowup(throw=True)


# ---------------------------------------------------------------- Backsolve with a custom grid
@dataclass(frozen=True)
class Geometric(Controller):
    """Fixed steps ``h0 q^i`` from the start time ``t0`` (a grid anchored at ``t0``)."""

    h0: float = 0.02
    q: float = 1.1
    step_t: tuple = ()
    jump_t: tuple = ()

    def _point(self, k):
        return self.h0 * (self.q**k - 1) / (self.q - 1)

    def initial_step(self, norm, f, t0, y0, k1, direction, span, order):
        return self.h0

    def propose(self, t, h, t0, t_end, direction):
        dist = direction * (t - t0)
        tensor = isinstance(dist, torch.Tensor)
        log1p, floor = (torch.log1p, torch.floor) if tensor else (math.log1p, math.floor)
        k = floor(log1p(dist * (self.q - 1) / self.h0) / math.log(self.q)) + 1
        t_new = t0 + direction * self._point(k)
        return where(direction * (t_new - t) <= 0, t0 + direction * self._point(k + 1), t_new)


class Recorded(torch.nn.Module):
    """``y' = a cos(t) y``, recording the time of every evaluation."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(1.0, dtype=F64))
        self.times = []

    def forward(self, t, y):
        self.times.append(float(t.detach().reshape(-1)[0]))
        return self.a * torch.cos(t).to(y.dtype).reshape(-1, 1) * y


@pytest.mark.parametrize("control", ["shared", "per_sample"])
def test_backsolve_fixed_grid_backward_times(control):
    # The behaviour Backsolve's Notes document: shared control retraces the forward's step
    # times (and stops at the outputs); per-sample control runs the controller backward from the final time (its t0 there),
    # so the geometric grid's first backward step is h0 = 0.02 from t = 2.
    y0 = torch.tensor([[1.0], [0.5]], dtype=F64)
    t = torch.tensor([0.0, 0.7, 1.3, 2.0], dtype=F64)
    fm = Recorded()
    sol = neuralode.solve(
        fm, y0, t, solver="rk4", controller=Geometric(), batch_control=control,
        gradient=neuralode.Backsolve(),
    )  # fmt: skip
    n = len(fm.times)
    sol.ys.sum().backward()
    fwd, bwd = fm.times[:n], fm.times[n:]
    near = lambda x, ts: min(abs(x - s) for s in ts) < 1e-12  # noqa: E731
    if control == "shared":
        grid = [x for x in map(Geometric()._point, range(40)) if x < 2.0]
        assert all(near(x, bwd) for x in grid)  # (the steps holding 0.7, 1.3 split there)
        tol = 1e-5
    else:
        assert near(2.0 - 0.02, bwd) and not near(2.0 - 0.02, fwd)
        tol = 5e-4
    exact = (y0 * torch.sin(t) * torch.exp(torch.sin(t))).sum().item()
    assert fm.a.grad.item() == pytest.approx(exact, abs=tol)
