"""A new controller is one class: the Controller protocol through every driver.

Two controllers written here, outside the library, as a user would:

- ``Geometric``: fixed steps ``h0, q h0, q^2 h0, ...`` from the start time (a grid computed from
  ``t0``, as ConstantStep's, so that output times and landings do not shift it);
- ``HalvingI``: an adaptive I controller subclassing :class:`Controller` directly (not
  PIController), with its own first step and factor limits.

Each runs through the shared eager solve, per-sample control, compiled stepping (one small
compile) and the Direct / Checkpointed / Backsolve gradients, against the closed form of
``y' = a cos(t) y`` (``y(t) = y0 exp(a sin t)``) and, for the fixed grid, against the
controller's own step count and the same grid given as StepToGrid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import neuralode
from neuralode import PIController, StepToGrid
from neuralode.controllers import Controller
from neuralode.controllers.step_size import maximum, minimum, where

F64 = torch.float64
T_END = 2.0


@dataclass(frozen=True)
class Geometric(Controller):
    """Fixed steps ``h0 q^i`` from the start time: grid point ``k`` lies ``h0 (q^k - 1) /
    (q - 1)`` from ``t0``."""

    h0: float
    q: float
    step_t: tuple = ()
    jump_t: tuple = ()

    def _point(self, k):
        return self.h0 * (self.q**k - 1) / (self.q - 1)

    def _index(self, dist):  # the grid point at or below the distance from t0
        tensor = isinstance(dist, torch.Tensor)
        log1p, floor = (torch.log1p, torch.floor) if tensor else (math.log1p, math.floor)
        return floor(log1p(dist * (self.q - 1) / self.h0) / math.log(self.q))

    def initial_step(self, norm, f, t0, y0, k1, direction, span, order):
        return self.h0

    def propose(self, t, h, t0, t_end, direction):
        k = self._index(direction * (t - t0)) + 1
        t_new = t0 + direction * self._point(k)
        return where(direction * (t_new - t) <= 0, t0 + direction * self._point(k + 1), t_new)

    def step_count(self, t0, t_end):
        n = math.ceil(math.log1p(abs(t_end - t0) * (self.q - 1) / self.h0) / math.log(self.q))
        return n + len(self.landing_times(t0, t_end))

    def grid(self, t0, t_end):
        """The step ends from ``t0`` to ``t_end`` (increasing times)."""
        n = self.step_count(t0, t_end)
        return [t0 + self._point(k) for k in range(n)] + [t_end]


@dataclass(frozen=True)
class HalvingI(Controller):
    """I control ``h * clip(safety e^(-1/k), 1/2, 2)`` (never an increase after a rejection),
    a fixed first step ``h0``."""

    rtol: float = 1e-6
    atol: float = 1e-8
    h0: float = 1e-3
    safety: float = 0.8
    adaptive = True

    def initial_step(self, norm, f, t0, y0, k1, direction, span, order):
        return minimum(self.h0 + 0.0 * span, span)

    def adapt(self, h, h_prop, e, prev, k, accept, clipped):
        fac = minimum(2.0, maximum(0.5, self.safety * maximum(e, 1e-100) ** (-1.0 / k)))
        h_acc = where(clipped, maximum(h_prop, h * fac), h * fac)
        return where(accept, h_acc, h * minimum(fac, 1.0)), prev


# The same formulas as a PIController (the step counts must agree).
SAME_AS_HALVING = dict(safety=0.8, ifactor=2.0, dfactor=0.5, dt0=1e-3)
GEOM = Geometric(h0=0.01, q=1.2)  # 21 steps over [0, 2], the last one clipped to 2


def _field(a):
    def f(t, y):  # t: 0-d (shared) or (A,) (per-sample); y: (A, 1)
        return a * torch.cos(t).to(y.dtype).reshape(-1, 1) * y

    return f


def _exact(y0, a, t):
    return y0 * torch.exp(a * torch.sin(t))


def _problem():
    y0 = torch.tensor([[1.0], [0.5]], dtype=F64)
    t = torch.tensor([0.0, 0.7, 1.3, T_END], dtype=F64)
    return y0, t


@pytest.mark.parametrize("ctrl", [GEOM, HalvingI(rtol=1e-8, atol=1e-10)], ids=["geom", "halving"])
@pytest.mark.parametrize("control", ["shared", "per_sample"])
def test_values_against_closed_form(ctrl, control):
    y0, t = _problem()
    solver = "rk4" if not ctrl.adaptive else "dopri5"
    sol = neuralode.solve(_field(1.0), y0, t, solver=solver, controller=ctrl, batch_control=control)
    ref = _exact(y0, 1.0, t).transpose(0, 1).unsqueeze(-1)  # (T, B, 1)
    assert torch.allclose(sol.ys, ref.reshape(sol.ys.shape), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("control", ["shared", "per_sample"])
def test_geometric_steps_are_its_own_grid(control):
    """The step count is the controller's, and the values are those of the same grid given as
    StepToGrid (outputs between grid points are interpolated: they do not shift the grid)."""
    y0, t = _problem()
    kw = dict(solver="rk4", batch_control=control)
    sol = neuralode.solve(_field(1.0), y0, t, controller=GEOM, **kw)
    n = GEOM.step_count(0.0, T_END)
    assert n == 21
    grid = GEOM.grid(0.0, T_END)
    assert abs(grid[-2] - T_END) > 0.05  # no sliver step at the end
    steps = torch.as_tensor(sol.stats["n_accepted"])
    assert bool((steps == n).all()), sol.stats["n_accepted"]
    ref = neuralode.solve(_field(1.0), y0, t, controller=StepToGrid(grid), **kw)
    assert torch.allclose(sol.ys, ref.ys, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("control", ["shared", "per_sample"])
def test_adaptive_subclass_matches_the_equivalent_pi_controller(control):
    y0, t = _problem()
    kw = dict(solver="dopri5", batch_control=control)
    mine = neuralode.solve(_field(1.0), y0, t, controller=HalvingI(rtol=1e-7, atol=1e-9), **kw)
    pi = PIController(rtol=1e-7, atol=1e-9, **SAME_AS_HALVING)
    ref = neuralode.solve(_field(1.0), y0, t, controller=pi, **kw)
    for key in ("n_accepted", "n_rejected"):
        assert torch.equal(torch.as_tensor(mine.stats[key]), torch.as_tensor(ref.stats[key]))
    assert torch.allclose(mine.ys, ref.ys, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gradient", ["direct", "checkpoint", "backsolve"])
@pytest.mark.parametrize("ctrl", [GEOM, HalvingI(rtol=1e-9, atol=1e-11)], ids=["geom", "halving"])
def test_gradients_against_closed_form(ctrl, gradient):
    """d y(T)/d a = sin(T) y(T) and d y(T)/d y0 = exp(a sin T), through each gradient method
    (the backsolve adjoint builds its backward controller with ``adjoint_rule``)."""
    a = torch.tensor(0.8, dtype=F64, requires_grad=True)
    y0 = torch.tensor([[1.0], [0.5]], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, T_END], dtype=F64)
    solver = "rk4" if not ctrl.adaptive else "dopri5"

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(a.detach().clone())

        def forward(self, t, y):
            return _field(self.a)(t, y)

    f = F()
    sol = neuralode.solve(f, y0, t, solver=solver, controller=ctrl, gradient=gradient)
    sol.ys[-1].sum().backward()
    ga, gy0 = f.a.grad, y0.grad
    yT = _exact(y0.detach(), 0.8, torch.tensor(T_END, dtype=F64))
    s = math.sin(T_END)
    assert torch.allclose(ga, (s * yT).sum(), rtol=1e-4)
    assert torch.allclose(gy0, torch.full_like(y0, math.exp(0.8 * s)), rtol=1e-4)


def test_compiled_geometric_grid():
    """compile=True: the same steps (the controller's count) and values as the eager solve."""
    y0, t = _problem()
    kw = dict(solver="rk4", controller=GEOM)
    eager = neuralode.solve(_field(1.0), y0, t, **kw)
    comp = neuralode.solve(_field(1.0), y0, t, compile=True, **kw)
    assert comp.stats["compiled"]
    assert comp.stats["n_accepted"] == eager.stats["n_accepted"] == 21
    assert torch.allclose(comp.ys, eager.ys, rtol=1e-12, atol=1e-14)


def test_default_step_rule_drops_the_per_solve_data():
    """Compiled stepping keys its cache on ``step_rule()``: by default the tolerances and
    landing times of a subclass are reset, so solves that differ only in them share a
    compilation (and tensor tolerances still hash)."""
    assert Geometric(h0=0.01, q=1.2, step_t=(1.1,), jump_t=(0.3,)).step_rule() == GEOM
    tensor_tols = HalvingI(rtol=torch.tensor([1e-6, 1e-7]), atol=1e-9, h0=0.01)
    rule = tensor_tols.step_rule()
    assert rule == HalvingI(rtol=1.0, atol=1.0, h0=0.01)
    hash(rule)


def test_anything_else_is_refused():
    y0, t = _problem()
    with pytest.raises(TypeError, match=r"controller must be a Controller .* got dict"):
        neuralode.solve(_field(1.0), y0, t, controller={"rtol": 1e-6})
