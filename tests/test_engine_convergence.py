"""Empirical convergence of every method on fixed steps, and of its dense output.

Global errors are measured against closed-form solutions in float64. Step sizes were chosen in
the asymptotic regime of each order and well above rounding (the smallest error used is
~1e-12, against ~1e-16 x sqrt(steps) of rounding): the slopes quoted in the comments were
measured when the tests were written.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
import torch

import neuralode
from neuralode.solvers import ADAPTIVE, available, get_tableau

F64 = torch.float64
METHODS = available()


def _slope(ns, errs) -> float:
    """Least-squares slope of log(err) against log(h) = log(T) - log(n): the observed order."""
    return -float(np.polyfit(np.log(ns), np.log(errs), 1)[0])


# --------------------------------------------------------------------------- final-time order
# Logistic equation y' = y (1 - y), y(0) = 1/2 on [0, 4]: y = 1 / (1 + exp(-t)).
# Its error expansion reaches the asymptotic regime early for every order; the non-autonomous
# problems tried (y' = -2 t y^2, y' = t y (1 - y), y' = cos(t) y (1 - y)) keep 5th-order methods
# pre-asymptotic until rounding (error constants that change sign along the solution), so the
# non-autonomous case is covered by the dense-output test below, which measures the maximum
# over the interval.
LOGISTIC_T = 4.0
STEPS_FINAL = {  # number of steps n (h = T / n) per order
    1: (64, 128, 256),  # observed slopes 1.00, 1.00
    2: (64, 128, 256),  # 2.01-2.03
    3: (32, 64, 128),  # 3.03-3.06
    4: (32, 64, 128),  # 4.03-4.07
    5: (16, 32, 64),  # dopri5 4.93/4.98, tsit5 5.27/5.13
    8: (4, 6, 8, 12),  # dopri8 8.05-8.07 (errors 2e-9 .. 3e-13)
}


@pytest.mark.parametrize("method", METHODS)
def test_fixed_step_global_error_converges_at_the_stated_order(method):
    tab = get_tableau(method)
    ns = STEPS_FINAL[tab.order]
    exact = 1.0 / (1.0 + math.exp(-LOGISTIC_T))
    errs = []
    for n in ns:
        sol = neuralode.solve(
            lambda t, y: y * (1 - y),
            torch.tensor([0.5], dtype=F64),
            torch.tensor([0.0, LOGISTIC_T], dtype=F64),
            solver=method,
            dt=LOGISTIC_T / n,
        )
        errs.append(abs(float(sol.ys[-1, 0]) - exact))
    assert _slope(ns, errs) == pytest.approx(tab.order, abs=0.3), errs


# --------------------------------------------------------------------------- dense output order
# y' = -2 t y^2, y(0) = 1 on [0, 2]: y = 1 / (1 + t^2) (nonlinear and non-autonomous).
# The dense output inside a step carries the global error of the step's end points, O(h^p),
# plus the local error of the interpolant, O(h^(q+1)) for an interpolant of order q
# (tableau.interpolant_order). So its global error at interior points is O(h^min(p, q+1)):
# 1 for euler, 2 for the 2nd-order methods, 3 for heun3/bosh3, 4 for rk4/rk38 (cubic Hermite,
# q = 3), 5 for dopri5/tsit5 (q = 4) and 8 for dopri8 (q = 7). (min(p, q) would understate it.)
DENSE_T = 2.0
STEPS_DENSE = {1: (16, 32, 64), 2: (16, 32, 64), 3: (16, 32, 64), 4: (16, 32, 64)}
STEPS_DENSE.update({5: (16, 32, 64), 8: (8, 12, 16, 24)})
THETAS = (0.3, 0.7)  # interior positions inside every step


def _dense_order(tab) -> int:
    return min(tab.order, tab.interpolant_order + 1)


@pytest.mark.parametrize("method", METHODS)
def test_dense_output_converges_at_min_of_order_and_interpolant_order_plus_one(method):
    tab = get_tableau(method)
    q = _dense_order(tab)
    ns = STEPS_DENSE[q]
    errs = []
    for n in ns:
        h = DENSE_T / n
        sol = neuralode.solve(
            lambda t, y: -2 * t * y**2,
            torch.tensor([1.0], dtype=F64),
            torch.tensor([0.0, DENSE_T], dtype=F64),
            solver=method,
            dt=h,
        )
        tq = torch.cat([(torch.arange(n, dtype=F64) + th) * h for th in THETAS])
        err = (sol.evaluate(tq)[:, 0] - 1 / (1 + tq**2)).abs().max()
        errs.append(float(err))
    assert _slope(ns, errs) == pytest.approx(q, abs=0.3), errs


def test_dense_output_order_table_matches_the_interpolants():
    # Guards the expectation above: which methods have their own interpolant.
    orders = {m: _dense_order(get_tableau(m)) for m in METHODS}
    assert orders == {
        "euler": 1,
        "midpoint": 2,
        "heun2": 2,
        "heun3": 3,
        "rk4": 4,
        "rk38": 4,
        "adaptive_heun": 2,
        "fehlberg2": 2,
        "bosh3": 3,
        "dopri5": 5,
        "tsit5": 5,
        "dopri8": 8,
    }


# --------------------------------------------------------------------------- dense = steps
def _vdp(t, y):
    return torch.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])


def _solve_vdp(method, t):
    kw = {"rtol": 1e-6, "atol": 1e-8} if method in ADAPTIVE else {"dt": 0.1}
    return neuralode.solve(_vdp, torch.tensor([2.0, 0.0], dtype=F64), t, solver=method, **kw)


@cache
def _vdp_on_0_3(method):
    """The solve on [0, 3] that the two tests below inspect (they only read it)."""
    return _solve_vdp(method, torch.tensor([0.0, 3.0], dtype=F64))


@pytest.mark.parametrize("method", METHODS)
def test_dense_output_equals_the_states_at_accepted_steps(method):
    sol = _vdp_on_0_3(method)
    steps = sol.step_times
    assert steps[0] == 0.0 and steps[-1] == 3.0 and len(steps) == sol.stats["n_accepted"] + 1
    # Re-solving with outputs exactly at the step ends returns the step states themselves
    # (outputs never shorten steps, so the steps are the same ones).
    again = _solve_vdp(method, torch.tensor(steps, dtype=F64))
    assert again.step_times == steps
    states = again.ys
    torch.testing.assert_close(states[-1], sol.ys[-1], rtol=0, atol=0)
    dense = sol.evaluate(torch.tensor(steps, dtype=F64))
    torch.testing.assert_close(dense, states, rtol=0, atol=1e-14 * float(states.abs().max()))


@pytest.mark.parametrize("method", METHODS)
def test_dense_output_is_continuous_across_step_boundaries(method):
    sol = _vdp_on_0_3(method)
    inner = torch.tensor(sol.step_times[1:-1], dtype=F64)
    eps = 1e-9
    left = sol.evaluate(inner - eps)
    right = sol.evaluate(inner + eps)
    # |y'| <= ~4 on this orbit, so the jump over 2e-9 is at most ~1e-8 unless the pieces differ.
    assert float((left - right).abs().max()) < 2e-8


# --------------------------------------------------------------------------- issue #2, check 10
def test_dopri8_tight_tolerance_endpoint_and_dense_output():
    """y' = cos t, y(0) = 0 on [0, 10] at rtol = atol = 1e-12, output only at t = 10."""
    sol = neuralode.solve(
        lambda t, y: torch.cos(t).to(y.dtype).expand_as(y),
        torch.zeros(1, dtype=F64),
        torch.tensor([0.0, 10.0], dtype=F64),
        solver="dopri8",
        rtol=1e-12,
        atol=1e-12,
    )
    assert abs(float(sol.ys[-1, 0]) - math.sin(10.0)) <= 1e-10
    tq = torch.linspace(0.05, 9.95, 100, dtype=F64)
    err = (sol.evaluate(tq)[:, 0] - torch.sin(tq)).abs().max()
    assert float(err) <= 1e-10
