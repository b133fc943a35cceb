"""Orders of the implicit methods on a smooth *nonlinear* coupled problem, dense against Krylov.

``y0' = -y0``, ``y1' = y0^2`` from ``(1, 0)``: ``y0 = exp(-t)``, ``y1(1) = (1 - exp(-2)) / 2``.
The simplified Newton iteration of each stage contracts nilpotently here (the linear ``y0``
converges in one iteration and then drives ``y1``), so the last increment of a stage solve is
exactly zero or at rounding level. The solver used to carry that "rate" (0 or ~1e-10) into the
next stage solve, which then accepted its first iterate unchecked: with the (stale) dense
Jacobian the stages were never converged and every method lost its order -- kvaerno5 and
radauIIA5 dropped to about second order (radauIIA5's error at dt = 0.05 was 1.2e-4, not 2.4e-11),
while the matrix-free path, whose linearisation point moves with each step, was mostly spared.

Errors quoted below were measured when the tests were written (float64). The bounds on the
fixed-step errors leave 20%: the errors lie far above rounding and the Newton tolerance, and
the dense solver's trbdf2/sdirk2 errors were 20-40% too large before the fix (right order, wrong
stages).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import neuralode
from neuralode.solvers import get_tableau
from neuralode.solvers.implicit.newton import newton

F64 = torch.float64
Y0 = torch.tensor([1.0, 0.0], dtype=F64)
T = torch.tensor([0.0, 1.0], dtype=F64)
Y1_EXACT = (1.0 - math.exp(-2.0)) / 2.0


def _f(t, y):
    return torch.stack([-y[0], y[0] ** 2])


def _errors(solver, dts):
    out = []
    for dt in dts:
        y = neuralode.solve(_f, Y0, T, solver=solver, dt=dt).ys[-1]
        out.append(max(abs(float(y[0]) - math.exp(-1.0)), abs(float(y[1]) - Y1_EXACT)))
    return out


def _slope(dts, errs) -> float:
    return float(np.polyfit(np.log(dts), np.log(errs), 1)[0])


DTS = (0.2, 0.1, 0.05)
# name: (order, error at dt = 0.05 as measured after the fix; before it, with the dense
# solver: kvaerno5 1.8e-7 (slope ~3), radauIIA5 1.2e-4 (slope ~2), trbdf2 1.75e-4, sdirk2 1.1e-4).
CASES = {
    "kvaerno5": (5, 2.8e-10),
    "radauIIA5": (5, 2.4e-11),
    "trbdf2": (2, 1.45e-4),
    "sdirk2": (2, 7.9e-5),
    "rodas4": (4, 3.9e-9),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixed_step_order_on_nonlinear_coupled_problem(name):
    order, err_005 = CASES[name]
    errs = _errors(name, DTS)
    slope = _slope(DTS, errs)
    assert abs(slope - order) <= 0.5, (name, slope, errs)
    assert errs[-1] <= 1.2 * err_005, (name, errs)


@pytest.mark.parametrize("name", ["kvaerno5", "radauIIA5", "trbdf2", "sdirk2"])
def test_dense_and_krylov_converge_to_the_same_stages(name):
    # Both solve the same stage equations to the fixed-step Newton tolerance (1e-12): the
    # results may differ only by that, whatever Jacobian each iteration uses.
    krylov = get_tableau(name).with_options(linear_solver="krylov")
    for dt in DTS:
        a = neuralode.solve(_f, Y0, T, solver=name, dt=dt).ys[-1]
        b = neuralode.solve(_f, Y0, T, solver=krylov, dt=dt).ys[-1]
        assert float((a - b).abs().max()) <= 1e-9, (dt, a, b)
    # And the dense result does not depend on the Newton tolerance beyond it.
    tight = get_tableau(name).with_options(newton_tol=1e-14)
    a = neuralode.solve(_f, Y0, T, solver=name, dt=0.1).ys[-1]
    b = neuralode.solve(_f, Y0, T, solver=tight, dt=0.1).ys[-1]
    assert float((a - b).abs().max()) <= 1e-10


@pytest.mark.parametrize("linear_solver", ["dense", "krylov"])
@pytest.mark.parametrize("rtol", [1e-7, 1e-9, 1e-10])
def test_adaptive_kvaerno5_meets_its_tolerance(linear_solver, rtol):
    # Measured global errors of y1: 3.0e-8, 3.5e-10, 3.8e-11 (both solvers); before the fix the
    # dense solver gave 1.0e-6, 3.6e-8, 7.4e-9 (10 to 70 times rtol).
    solver = get_tableau("kvaerno5").with_options(linear_solver=linear_solver)
    sol = neuralode.solve(_f, Y0, T, solver=solver, rtol=rtol, atol=1e-12)
    err = abs(float(sol.ys[-1][1]) - Y1_EXACT)
    assert err <= 2 * rtol, err


def test_integral_nonlinear_in_the_state_keeps_kvaerno5_order():
    # The integral of y^2 for y' = -y is one more (nonlinear) component of the state.
    errs = []
    for dt in DTS:
        sol = neuralode.solve(
            lambda t, y: -y,
            torch.tensor([1.0], dtype=F64),
            T,
            solver="kvaerno5",
            dt=dt,
            integral=lambda t, y: y**2,
        )
        errs.append(abs(float(sol.integral[-1].reshape(-1)[0]) - Y1_EXACT))
    assert abs(_slope(DTS, errs) - 5) <= 0.5, errs
    assert errs[-1] <= 1e-9, errs


def test_newton_rate_is_the_slowest_measured_not_a_zero_last_increment():
    # Phi(x) = (p, q + c x0) with the iteration matrix I (stale): x0 is exact after one
    # iteration, x1 after two, the third increment is exactly zero. The rate reported (and
    # carried to the next solve) is the measured ||dx2|| / ||dx1||, not 0.
    p, q, c = 2.0, 1.0, 0.5
    x0 = torch.zeros(2, dtype=F64)

    def residual(x):
        return torch.stack([torch.tensor(p, dtype=F64), q + c * x[0]]) - x

    def norm(dx):
        return float(torch.linalg.vector_norm(dx))

    res = newton(
        residual, lambda r: r, x0, norm, kappa=1e-300, max_iters=10, eta0=1.0, early_exit=False
    )
    assert res.converged and res.iters == 3
    assert torch.equal(res.x, torch.tensor([p, q + c * p], dtype=F64))
    dx1 = math.hypot(p, q)
    dx2 = c * p
    assert res.rate == pytest.approx(dx2 / dx1, rel=1e-12)
