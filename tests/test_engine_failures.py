"""Solves that cannot reach the final time: what is raised, what is said, what is returned."""

from __future__ import annotations

import math

import pytest
import torch

import neuralode
from neuralode import NonFiniteError, PIController, SolveError, StepSizeUnderflowError
from neuralode.solvers import ADAPTIVE

F64 = torch.float64


def _blowup(t, y):
    return y**2  # y(0) = 1: y = 1 / (1 - t), a singularity at t = 1


@pytest.mark.parametrize("method", ADAPTIVE)
def test_blow_up_raises_step_size_underflow_near_the_singularity(method):
    with pytest.raises(StepSizeUnderflowError) as ei:  # default tolerances rtol=1e-6, atol=1e-8
        neuralode.solve(
            _blowup, torch.ones(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64), solver=method
        )
    e = ei.value
    assert isinstance(e, SolveError) and isinstance(e, RuntimeError)
    assert e.status == "dt_underflow"
    assert abs(e.t - 1.0) < 1e-3
    assert e.step > 10 and 0 < e.h < 1e-10
    msg = str(e)
    assert f"step size underflow at t={e.t:.17g} after {e.step} step attempts" in msg
    assert f"step size {e.h:.3g} is below the resolution of t" in msg
    assert "blow up" in msg and "Try:" in msg


def test_blow_up_with_throw_false_returns_the_partial_solution():
    t = torch.tensor([0.0, 0.5, 0.9, 1.5, 2.0], dtype=F64)
    sol = neuralode.solve(_blowup, torch.ones(1, dtype=F64), t, throw=False, rtol=1e-8, atol=1e-10)
    assert sol.status == "dt_underflow" and not sol.success
    assert abs(sol.t_final - 1.0) < 1e-3
    torch.testing.assert_close(sol.ys[:3, 0], 1 / (1 - t[:3]), rtol=1e-6, atol=0)
    assert bool(torch.isnan(sol.ys[3:]).all())
    assert sol.message.startswith(f"step size underflow at t={sol.t_final:.17g}")
    with pytest.raises(StepSizeUnderflowError) as ei:
        neuralode.solve(_blowup, torch.ones(1, dtype=F64), t, rtol=1e-8, atol=1e-10)
    assert str(ei.value) == sol.message


def test_dense_output_of_a_partial_solution_stops_where_the_solve_stopped():
    t = torch.tensor([0.0, 2.0], dtype=F64)
    sol = neuralode.solve(_blowup, torch.ones(1, dtype=F64), t, throw=False)
    assert float(sol.evaluate(0.5)[0]) == pytest.approx(2.0, rel=1e-5)
    with pytest.raises(ValueError, match="outside the solved interval"):
        sol.evaluate(1.5)


def _nan_from(t0: float):
    def f(t, y):
        return -y if float(t) < t0 else y * math.nan

    return f


@pytest.mark.parametrize("method", ADAPTIVE)
def test_nan_appearing_during_the_solve_raises_non_finite(method):
    with pytest.raises(NonFiniteError, match=r"func returned non-finite values") as ei:
        neuralode.solve(
            _nan_from(0.5),
            torch.ones(1, dtype=F64),
            torch.tensor([0.0, 2.0], dtype=F64),
            solver=method,
            max_steps=10_000,
        )
    assert abs(ei.value.t - 0.5) < 1e-6
    assert ei.value.status == "nonfinite"


def test_nan_from_the_first_evaluation_raises_non_finite():
    """f is NaN already at t0 (so Hairer's initial step size is NaN too). max_steps only keeps a
    regression from hanging the test: the solve must stop by itself with NonFiniteError."""
    with pytest.raises(NonFiniteError):
        neuralode.solve(
            _nan_from(-1.0),
            torch.ones(1, dtype=F64),
            torch.tensor([0.0, 2.0], dtype=F64),
            max_steps=5_000,
        )


def test_nan_from_the_first_evaluation_with_given_first_step():
    with pytest.raises(NonFiniteError):
        neuralode.solve(
            _nan_from(-1.0),
            torch.ones(1, dtype=F64),
            torch.tensor([0.0, 2.0], dtype=F64),
            controller=PIController(dt0=0.1),
            max_steps=5_000,
        )


def test_nan_with_throw_false_reports_status():
    t = torch.tensor([0.0, 0.25, 1.0, 2.0], dtype=F64)
    sol = neuralode.solve(_nan_from(0.5), torch.ones(1, dtype=F64), t, throw=False)
    assert sol.status == "nonfinite" and abs(sol.t_final - 0.5) < 1e-6
    assert float(sol.ys[1, 0]) == pytest.approx(math.exp(-0.25), rel=1e-6)
    assert bool(torch.isnan(sol.ys[2:]).all())


def test_fixed_step_non_finite_state_raises():
    with pytest.raises(
        NonFiniteError, match=r"non-finite \(NaN/inf\) during a fixed-step solve"
    ) as ei:
        neuralode.solve(
            _blowup,
            torch.ones(1, dtype=F64),
            torch.tensor([0.0, 2.0], dtype=F64),
            solver="rk4",
            dt=0.25,
        )
    assert "use a smaller step, an adaptive method" in str(ei.value)
    assert ei.value.t == 2.0 and ei.value.step == 8 and ei.value.h == 0.25
    sol = neuralode.solve(
        _blowup,
        torch.ones(1, dtype=F64),
        torch.tensor([0.0, 2.0], dtype=F64),
        solver="rk4",
        dt=0.25,
        throw=False,
    )
    assert sol.status == "nonfinite" and sol.message == str(ei.value)


def test_rtol_inf_is_rejected_instead_of_hanging():
    """An infinite tolerance makes the error scale 0 * inf = NaN for a zero state."""
    with pytest.raises(ValueError, match="rtol"):
        neuralode.solve(
            lambda t, y: y,
            torch.zeros(2, dtype=F64),
            torch.tensor([0.0, 1.0], dtype=F64),
            controller=PIController(rtol=math.inf),
            max_steps=1_000,
        )
