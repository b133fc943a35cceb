"""The fixed-step path of the host-float driver (``_loop._integrate_fixed``) against the general
loop: fixed steps without dense output or a monitor take the lean path (stages as a list in the
state's own shape, the controller's step plan cached), and must give the same steps, the same
evaluations, the same values (to rounding: the stage sums are fused differently) and the same
failures as the general loop, which ``dense_output=True`` selects."""

from __future__ import annotations

import math

import pytest
import torch

import neuralode
from neuralode import ConstantStep, MaxStepsError, NonFiniteError, StepToGrid
from neuralode.solvers import FIXED_STEP

F64 = torch.float64
METHODS = [*FIXED_STEP, "dopri5", "tsit5", "fehlberg2", "dopri8", "bosh3"]


def _vdp(t, y):
    return torch.stack([y[..., 1], (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1)


class Recorder:
    """A vector field that records the times it is evaluated at."""

    def __init__(self, f):
        self.f, self.times = f, []

    def __call__(self, t, y):
        self.times.append(float(t))
        return self.f(t, y)


def _both(func, y0, t, **kw):
    """(lean, general): the same solve through the fixed-step path and through the loop."""
    out = []
    for dense in (False, True):
        rec = Recorder(func)
        sol = neuralode.solve(rec, y0, t, dense_output=dense, **kw)
        out.append((sol, rec.times))
    return out


def _close(a, b, rel=1e-12):
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * float(b.abs().max()))


@pytest.mark.parametrize("method", METHODS)
def test_fixed_path_matches_the_general_loop(method):
    y0 = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.5, -1.0]], dtype=F64)
    # Outputs on step ends (0.5, 1.5) and inside steps (0.33, 1.05, 2.2): interpolated.
    t = torch.tensor([0.0, 0.33, 0.5, 1.05, 1.5, 2.2, 3.0], dtype=F64)
    (lean, t_lean), (loop, t_loop) = _both(_vdp, y0, t, solver=method, dt=0.1)
    assert t_lean == t_loop  # the same evaluations, in the same order
    assert lean.stats["nfe"] == loop.stats["nfe"] == len(t_loop)
    assert lean.stats["n_accepted"] == loop.stats["n_accepted"] == 30
    _close(lean.ys, loop.ys)
    assert lean.t_final == loop.t_final == 3.0 and lean.success


@pytest.mark.parametrize("method", ["euler", "rk4", "fehlberg2"])
def test_fixed_path_backward_in_time_tuple_state_and_grid(method):
    y0 = (torch.tensor([2.0], dtype=F64), torch.tensor([0.0], dtype=F64))

    def f(t, y):
        return (y[1], (1 - y[0] ** 2) * y[1] - y[0] + torch.sin(t))

    t = torch.tensor([1.0, 0.7, 0.0, -0.55], dtype=F64)
    ctrl = StepToGrid(torch.linspace(-0.6, 1.0, 17, dtype=F64))
    (lean, t_lean), (loop, t_loop) = _both(f, y0, t, solver=method, controller=ctrl)
    assert t_lean == t_loop
    for a, b in zip(lean.ys, loop.ys):
        _close(a, b)


def test_fixed_path_jump_times_are_approached_from_inside():
    def f(t, y):
        return torch.where(t < 0.45, -y, 2.0 * y)

    y0 = torch.ones(4, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ctrl = ConstantStep(0.1, jump_t=[0.45])
    (lean, t_lean), (loop, t_loop) = _both(f, y0, t, solver="rk4", controller=ctrl)
    assert t_lean == t_loop
    assert 0.45 not in t_lean and math.nextafter(0.45, 0) in t_lean
    assert math.nextafter(0.45, 1) in t_lean
    _close(lean.ys, loop.ys)
    # The jump is honoured (no step straddles it): rk4's error with dt = 0.1 is ~1e-5.
    assert float(lean.ys[-1, 0]) == pytest.approx(math.exp(-0.45) * math.exp(2 * 0.55), rel=1e-4)


def test_fixed_path_per_sample_output_grids():
    y0 = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=F64)
    t = torch.tensor([[0.0, 0.25, 1.0], [0.0, 0.6, 1.3]], dtype=F64)  # (B, T), shared steps
    (lean, t_lean), (loop, t_loop) = _both(_vdp, y0, t, solver="midpoint", dt=0.1)
    assert t_lean == t_loop
    _close(lean.ys, loop.ys)


def test_fixed_path_gradients_equal_the_general_loop():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    net = net.double()
    y0 = torch.randn(5, 3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    grads = []
    for dense in (False, True):
        sol = neuralode.solve(lambda t, y: net(y), y0, t, solver="rk4", dt=0.1, dense_output=dense)
        g = torch.autograd.grad(sol.ys.square().sum(), [y0, *net.parameters()])
        grads.append(g)
    for a, b in zip(*grads):
        _close(a, b, 1e-11)


def test_fixed_path_failures_match_the_general_loop():
    def blowup(t, y):
        return y**2

    y0, t = torch.ones(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64)
    errs = []
    for dense in (False, True):
        with pytest.raises(NonFiniteError, match=r"non-finite \(NaN/inf\)") as ei:
            neuralode.solve(blowup, y0, t, solver="rk4", dt=0.25, dense_output=dense)
        errs.append(ei.value)
    assert (errs[0].t, errs[0].step, errs[0].h) == (errs[1].t, errs[1].step, errs[1].h)
    assert (errs[0].t, errs[0].step, errs[0].h) == (2.0, 8, 0.25)

    for dense in (False, True):
        with pytest.raises(MaxStepsError, match=r"reached max_steps=7 step attempts at t=") as ei:
            neuralode.solve(_vdp, y0.new_tensor([2.0, 0.0]), t, dt=0.1, solver="rk4",
                            max_steps=7, dense_output=dense)  # fmt: skip
        assert ei.value.step == 7 and ei.value.t == pytest.approx(0.7, abs=1e-12)
        sol = neuralode.solve(_vdp, y0.new_tensor([2.0, 0.0]), torch.linspace(0, 2, 5, dtype=F64),
                              dt=0.1, solver="rk4", max_steps=7, dense_output=dense, throw=False)  # fmt: skip
        assert sol.status == "max_steps" and sol.t_final == pytest.approx(0.7, abs=1e-12)
        assert bool(torch.isfinite(sol.ys[:2]).all()) and bool(torch.isnan(sol.ys[2:]).all())


def test_fixed_path_plan_cache_is_keyed_on_the_controller_and_interval():
    y0 = torch.ones(2, dtype=F64)
    f = Recorder(lambda t, y: -y)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    for dt, n in ((0.1, 10), (0.25, 4), (0.1, 10)):
        f.times.clear()
        sol = neuralode.solve(f, y0, t, solver="euler", dt=dt, dense_output=False)
        assert sol.stats["nfe"] == n and len(f.times) == n
        assert float(sol.ys[-1, 0]) == pytest.approx((1 - dt) ** n, rel=1e-12)
    f.times.clear()
    sol = neuralode.solve(f, y0, torch.tensor([0.0, 2.0], dtype=F64), solver="euler", dt=0.25,
                          dense_output=False)  # fmt: skip
    assert f.times == [0.25 * k for k in range(8)]
    assert float(sol.ys[-1, 0]) == pytest.approx(0.75**8, rel=1e-12)


def test_fixed_steps_without_dense_output_take_the_fixed_path(monkeypatch):
    from neuralode import _loop

    calls = []
    inner = _loop._integrate_fixed
    monkeypatch.setattr(_loop, "_integrate_fixed", lambda *a: calls.append(1) or inner(*a))
    y0, t = torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    neuralode.solve(lambda t, y: -y, y0, t, solver="rk4", dt=0.1, dense_output=False)
    assert calls == [1]
    neuralode.solve(lambda t, y: -y, y0, t, solver="rk4", dt=0.1, dense_output=True)
    neuralode.solve(lambda t, y: -y, y0, t, solver="dopri5", dense_output=False)
    assert calls == [1]
    ys = neuralode.odeint(lambda t, y: -y, y0, t, method="euler", options=dict(step_size=0.5))
    assert calls == [1, 1] and float(ys[-1, 0]) == pytest.approx(0.25, rel=1e-14)


@pytest.mark.parametrize("method", ["euler", "rk4", "dopri5"])
def test_fixed_path_scalar_state(method):
    y0 = torch.tensor(1.0, dtype=F64)  # a 0-d state, kept 0-d by the fixed path
    t = torch.tensor([0.0, 0.35, 1.0], dtype=F64)
    (lean, t_lean), (loop, t_loop) = _both(
        lambda t, y: -y * torch.cos(t), y0, t, solver=method, dt=0.05
    )
    assert t_lean == t_loop and lean.ys.shape == (3,)
    _close(lean.ys, loop.ys)
    assert float(lean.ys[-1]) == pytest.approx(
        math.exp(-math.sin(1.0)), rel=0.05 if method == "euler" else 1e-5
    )


def test_fixed_path_plans_longer_than_the_cache_run_uncached():
    from neuralode import _loop_fixed

    n = _loop_fixed._PLAN_CACHED + 500
    y0, t = torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    for _ in range(2):  # the second call finds the cache's "too long" answer
        sol = neuralode.solve(
            lambda t, y: -y, y0, t, solver="euler", dt=1.0 / n, dense_output=False
        )
        assert sol.stats["nfe"] == n and sol.t_final == 1.0
        assert float(sol.ys[-1, 0]) == pytest.approx((1 - 1.0 / n) ** n, rel=1e-10)
