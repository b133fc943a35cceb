"""Step ends merge with landing times that lie on the ConstantStep grid up to rounding.

``ConstantStep(0.1, step_t=t)`` with ``t = torch.linspace(0, 5, 51)``: the landings are the grid
points ``0.1 k`` rounded to t's dtype (float32: ~1e-9 off the double grid), so without the merge
every landing left a sliver step beside its grid point -- 90 steps instead of 50 in float32 and
61 in float64, and the variable-step Adams formulas gave errors of 1e-1 (float32) and 1e-4
(float64) on them. With the merge the solve takes the 50 steps of the plain grid and matches its
accuracy. A landing genuinely off the grid still gets its own step.
"""

from __future__ import annotations

import math

import pytest
import torch

import neuralode
from neuralode import ConstantStep
from neuralode.controllers.step_size import (
    MERGE_ULPS,
    Controller,
    grid_point,
    land_rows,
    landing_eps,
    landing_tolerance,
)

DTYPES = [torch.float32, torch.float64]


def _decay(t, y):
    return -y


_ROT = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)


def _rotation(t, y):
    return y @ _ROT.to(y.dtype).T


def _exact(problem, t, dtype):
    """Closed forms from y(t0) = 1 (decay) and y(t0) = (1, 0) (rotation by -(t - t0))."""
    s = t.double() - t.double()[0]
    if problem == "decay":
        return torch.exp(-s).unsqueeze(-1).to(dtype)
    return torch.stack([torch.cos(s), -torch.sin(s)], -1).to(dtype)


def _setup(problem, dtype):
    if problem == "decay":
        return _decay, torch.ones(1, dtype=dtype)
    return _rotation, torch.tensor([1.0, 0.0], dtype=dtype)


def _solve(problem, dtype, t, solver, step_t, **kw):
    f, y0 = _setup(problem, dtype)
    ctrl = ConstantStep(0.1, step_t=() if step_t is None else step_t)
    return neuralode.solve(f, y0, t, solver=solver, controller=ctrl, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solver", ["rk4", "fixed_adams"])
@pytest.mark.parametrize("problem", ["decay", "rotation"])
@pytest.mark.parametrize("reverse", [False, True])
def test_landings_on_the_grid_merge(dtype, solver, problem, reverse):
    t = torch.linspace(0, 5, 51, dtype=dtype)
    if reverse:
        t = t.flip(0)
    plain = _solve(problem, dtype, t, solver, None)
    landed = _solve(problem, dtype, t, solver, t)
    assert plain.stats["n_accepted"] == 50
    assert landed.stats["n_accepted"] == 50  # before the fix: 90 (float32), 61-63 (float64)
    exact = _exact(problem, t, dtype)
    err_plain = (plain.ys - exact).abs().max().item()
    err = (landed.ys - exact).abs().max().item()
    # Same steps to a rounding of the step ends: the same error to rounding (float32: a few
    # ulps of the state, float64 errors are the method's, 1e-7 .. 2e-3 here).
    slack = 20 * torch.finfo(dtype).eps * exact.abs().max().item()
    assert err <= 1.01 * err_plain + slack, (err, err_plain)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_sample_landings_on_the_grid_merge(dtype):
    t = torch.linspace(0, 5, 51, dtype=dtype)
    y0 = torch.tensor([[1.0], [2.0], [-0.5]], dtype=dtype)
    kw = dict(solver="rk4", batch_control="per_sample")
    plain = neuralode.solve(_decay, y0, t, controller=ConstantStep(0.1), **kw)
    landed = neuralode.solve(_decay, y0, t, controller=ConstantStep(0.1, step_t=t), **kw)
    assert plain.stats["n_accepted"].tolist() == [50, 50, 50]
    assert landed.stats["n_accepted"].tolist() == [50, 50, 50]  # before: 90 / 61
    exact = torch.exp(-t.double()).reshape(-1, 1, 1) * y0.double()
    err_plain = (plain.ys.double() - exact).abs().max().item()
    err = (landed.ys.double() - exact).abs().max().item()
    slack = 20 * torch.finfo(dtype).eps * 2
    assert err <= 1.01 * err_plain + slack, (err, err_plain)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_sample_output_landings_merge(dtype):
    """A 2-D t (each sample its own times; the steps land on them): samples starting at
    different times, each on its own grid ``t0_b + 0.1 k``, with output times on that grid."""
    base = torch.linspace(0, 2, 21, dtype=torch.float64)
    t = torch.stack([base, base + 0.3, base - 1.7]).to(dtype)  # (3, 21)
    y0 = torch.ones(3, 1, dtype=dtype)
    sol = neuralode.solve(
        _decay, y0, t, solver="rk4", controller=ConstantStep(0.1), batch_control="per_sample"
    )
    assert sol.stats["n_accepted"].tolist() == [20, 20, 20]  # (before: [20, 20, 21] in float32)
    s = t.double() - t.double()[:, :1]
    exact = torch.exp(-s)
    err = (sol.ys.double().reshape(21, 3).T - exact).abs().max().item()
    assert err < 2e-6 + 20 * torch.finfo(dtype).eps


@pytest.mark.parametrize("offset", [1e-3, -1e-3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_landing_off_the_grid_keeps_its_step(offset, dtype):
    t = torch.linspace(0, 1, 11, dtype=dtype)
    land = 0.3 + offset
    sol = neuralode.solve(
        _decay, torch.ones(1, dtype=dtype), t, solver="rk4",
        controller=ConstantStep(0.1, step_t=[land]), dense_output=True,
    )  # fmt: skip
    assert sol.stats["n_accepted"] == 11  # the 10 grid steps and the landing's own
    # Dense output reproduces the solution at the landing, an accepted step end.
    assert abs(sol.evaluate(torch.tensor(land, dtype=dtype)).item() - math.exp(-land)) < 1e-6


def test_landing_a_quarter_step_off_is_never_merged():
    """The tolerance is capped at a quarter step: with dt far below 16 float32 ulps of the span
    a float32 landing beside a grid point keeps its own step."""
    dt = 1e-6  # 16 * eps32 * 2 = 3.8e-6 would swallow several grid points
    landing = float(torch.tensor(1.0 + 2.5 * dt, dtype=torch.float32))  # 1.0000025 +- 6e-8
    ctrl = ConstantStep(dt, step_t=[landing])
    t, ends = 1.0, []
    while t < 1.0 + 5.5 * dt:
        t_try = ctrl.propose(t, dt, 1.0, 2.0, 1.0)
        t, _, _ = ctrl.land(t, t_try, 2.0, 1.0, ctrl.step_t)
        ends.append(t)
    assert landing in ends
    steps = [b - a for a, b in zip([1.0, *ends], ends)]
    assert min(steps) > 0.4 * dt  # no sliver, no merge
    assert len(ends) == 7  # 6 grid points and the landing between two of them


def test_tolerance_formula():
    assert landing_eps(0.1) == pytest.approx(2.220446049250313e-16)
    assert landing_eps(float(torch.tensor(0.1, dtype=torch.float32))) == pytest.approx(
        1.1920928955078125e-07
    )
    assert landing_eps(1e300) == pytest.approx(2.220446049250313e-16)  # beyond float32
    x = torch.tensor(
        [0.1, float(torch.tensor(0.1, dtype=torch.float32)), 1e300], dtype=torch.float64
    )
    assert landing_eps(x).tolist() == [landing_eps(v) for v in x.tolist()]
    assert landing_tolerance(5.0, 0.1, 1.1920928955078125e-07) == pytest.approx(
        MERGE_ULPS * 1.1920928955078125e-07 * 5.0
    )
    assert landing_tolerance(5.0, 1e-7, 1.1920928955078125e-07) == pytest.approx(2.5e-8)
    assert math.isnan(landing_tolerance(5.0, math.nan, 2.2e-16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_rows_agree_with_floats(dtype, direction):
    """The per-row formulas (compiled stepping and the per-sample driver) take the same steps
    as the host-float ones, landing by landing."""
    t = torch.linspace(0, 5, 51, dtype=dtype)
    t0, t_end = (0.0, 5.0) if direction > 0 else (5.0, 0.0)
    ctrl = ConstantStep(0.1, step_t=t)
    landings = ctrl.landing_times(t0, t_end)
    L = torch.tensor(landings, dtype=torch.float64)
    f64 = dict(dtype=torch.float64)
    t_f = t0
    t_r = torch.tensor([t0], **f64)
    n = 0
    while direction * (t_end - t_f) > 0:
        t_try = grid_point(t_f, t0, t_end, direction, 0.1)
        t_f, clip_f, _ = Controller.land(ctrl, t_f, t_try, t_end, direction, landings)
        tr_try = grid_point(t_r, torch.tensor([t0], **f64), torch.tensor([t_end], **f64),
                            torch.tensor([direction], **f64), 0.1)  # fmt: skip
        t_r, clip_r, _ = land_rows(t_r, tr_try, torch.tensor([t_end], **f64),
                                   torch.tensor([direction], **f64), L)  # fmt: skip
        assert t_r.item() == t_f and bool(clip_r) == clip_f
        n += 1
    assert n == 50


@pytest.mark.slow
def test_compiled_stepping_merges():
    """Compiled stepping (the per-row formulas inside the compiled graph), shared and per
    sample: float32 landings on the grid take the 50 steps of the grid (before: 90)."""
    t = torch.linspace(0, 5, 51, dtype=torch.float32)
    y0 = torch.ones(3, 1, dtype=torch.float32)
    exact = torch.exp(-t.double())
    for control in ("shared", "per_sample"):
        sol = neuralode.solve(
            _decay, y0, t, solver="rk4", controller=ConstantStep(0.1, step_t=t),
            batch_control=control, compile=True,
        )  # fmt: skip
        assert sol.stats["compiled"]
        assert torch.as_tensor(sol.stats["n_accepted"]).eq(50).all()
        assert (sol.ys[..., 0, 0].double() - exact).abs().max().item() < 2e-6
