"""Empirical convergence of every implicit method on fixed steps, of its dense output, and of the
matrix-free (Krylov) path; the 800-dimensional heat equation.

The convergence problem is mildly stiff and linear with forcing, started off its slow manifold:
``y' = A (y - g(t)) + g'(t)`` with eigenvalues of ``A`` near -10.1 and -1.9, so
``y(t) = g(t) + exp(A t) (y0 - g(0))``. Step sizes keep ``h |lambda| <= 1`` (asymptotic regime:
no order reduction); the slopes quoted were measured when the tests were written.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import neuralode
from neuralode.solvers import IMPLICIT, get_tableau

F64 = torch.float64
A = torch.tensor([[-10.0, 1.0], [1.0, -2.0]], dtype=F64)
Y0 = torch.tensor([1.0, 0.5], dtype=F64)
T = 1.0


def _g(t):
    return torch.stack([torch.sin(t), torch.cos(2 * t)], -1)


def _dg(t):
    return torch.stack([torch.cos(t), -2 * torch.sin(2 * t)], -1)


def _forced(t, y):
    return (y - _g(t)) @ A.T + _dg(t)


def _exact(t: float) -> torch.Tensor:
    tt = torch.tensor(t, dtype=F64)
    return _g(tt) + torch.linalg.matrix_exp(A * t) @ (Y0 - _g(torch.tensor(0.0, dtype=F64)))


def _slope(ns, errs) -> float:
    return -float(np.polyfit(np.log(ns), np.log(errs), 1)[0])


# Observed slopes for n = (10, 20, 40): implicit_euler 0.97/0.98, midpoint/trapezoid/trbdf2 2.00,
# sdirk2 2.08/2.04, radauIIA3 2.98/2.99, radauIIA5 4.92/4.95, gl4 4.02/4.00, kvaerno5 4.96/4.99,
# rodas4 3.99/3.98; gl6 6.06/6.01 for n = (5, 10, 20) (errors reach 1e-10).
STEPS = {1: (10, 20, 40), 2: (10, 20, 40), 3: (10, 20, 40), 4: (10, 20, 40), 5: (10, 20, 40)}
STEPS[6] = (5, 10, 20)


def _errors(method, ns):
    errs = []
    for n in ns:
        sol = neuralode.solve(
            _forced, Y0, torch.tensor([0.0, T], dtype=F64), solver=method, dt=T / n
        )
        errs.append(float((sol.ys[-1] - _exact(T)).abs().max()))
    return errs


@pytest.mark.parametrize("method", IMPLICIT)
def test_fixed_step_global_error_converges_at_the_stated_order(method):
    order = get_tableau(method).order
    ns = STEPS[order]
    errs = _errors(method, ns)
    assert _slope(ns, errs) == pytest.approx(order, abs=0.3), errs


@pytest.mark.parametrize("method", ["sdirk2", "radauIIA5", "gl4", "kvaerno5"])
def test_krylov_path_converges_like_the_dense_one(method):
    mf = get_tableau(method).with_options(linear_solver="krylov", krylov_rtol=1e-10)
    ns = STEPS[mf.order]
    errs = _errors(mf, ns)
    assert _slope(ns, errs) == pytest.approx(mf.order, abs=0.3), errs
    dense = _errors(method, ns)
    np.testing.assert_allclose(errs, dense, rtol=1e-3, atol=1e-12)


@pytest.mark.parametrize("method, factor", [("kvaerno5", 20), ("rodas4", 20), ("trbdf2", 100)])
def test_adaptive_methods_reach_their_tolerance(method, factor):
    # Global error within a multiple of the local tolerance; the second-order trbdf2 takes
    # ~500 steps at rtol = 1e-7 and accumulates more (measured: 60x).
    for rtol in (1e-4, 1e-7):
        sol = neuralode.solve(
            _forced, Y0, torch.tensor([0.0, T], dtype=F64), solver=method, rtol=rtol, atol=rtol
        )
        err = float((sol.ys[-1] - _exact(T)).abs().max())
        assert err < factor * rtol, (method, rtol, err)


# --------------------------------------------------------------------------- dense output
# Cubic Hermite dense output (interpolant order q = 3): global error at interior points
# O(h^min(p, q + 1)), as for the explicit methods (tests/test_engine_convergence.py).
# y' = -2 t y^2, y(0) = 1 on [0, 2]: y = 1 / (1 + t^2).
DENSE_T = 2.0
THETAS = (0.3, 0.7)


@pytest.mark.parametrize("method", IMPLICIT)
def test_dense_output_converges_at_min_of_order_and_four(method):
    tab = get_tableau(method)
    q = min(tab.order, tab.interpolant_order + 1)
    ns = (16, 32, 64)
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
        errs.append(float((sol.evaluate(tq)[:, 0] - 1 / (1 + tq**2)).abs().max()))
    assert _slope(ns, errs) == pytest.approx(q, abs=0.3), errs


@pytest.mark.parametrize("method", ["kvaerno5", "rodas4", "radauIIA5", "gl4"])
def test_dense_output_reproduces_the_step_states(method):
    f = lambda t, y: torch.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])  # noqa: E731
    kw = {"rtol": 1e-6, "atol": 1e-8} if get_tableau(method).adaptive else {"dt": 0.1}
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    sol = neuralode.solve(f, y0, torch.tensor([0.0, 3.0], dtype=F64), solver=method, **kw)
    steps = sol.step_times
    again = neuralode.solve(f, y0, torch.tensor(steps, dtype=F64), solver=method, **kw)
    assert again.step_times == steps
    dense = sol.evaluate(torch.tensor(steps, dtype=F64))
    torch.testing.assert_close(dense, again.ys, rtol=0, atol=1e-13)
    inner = torch.tensor(steps[1:-1], dtype=F64)
    jump = (sol.evaluate(inner - 1e-9) - sol.evaluate(inner + 1e-9)).abs().max()
    assert float(jump) < 2e-8  # continuous across steps


# --------------------------------------------------------------------------- large states
def _heat(n: int, d: float = 1e-3):
    dx = 1.0 / (n + 1)

    def f(t, u):
        up = torch.nn.functional.pad(u, (1, 1))
        return d * (up[2:] - 2 * up[1:-1] + up[:-2]) / dx**2

    x = torch.arange(1, n + 1, dtype=F64) * dx
    lam = d * (2 - 2 * np.cos(np.pi * dx)) / dx**2  # the discrete decay rate of sin(pi x)
    return f, torch.sin(np.pi * x), lam


@pytest.mark.parametrize("method", ["implicit_euler", "kvaerno5", "radauIIA5"])
def test_matrix_free_heat_equation_800_states_is_fast_and_right(method):
    """torchdiffeq's implicit methods take ~14 s for two steps of this size (dense Jacobians by
    Broyden updates); the matrix-free path costs a few dozen Jacobian-vector products. The cost
    is asserted as work (no matrix formed, bounded JVPs), not time: timings live in
    benchmarks/stiff.py (measured there: 0.04-0.3 s of CPU for two steps)."""
    f, u0, lam = _heat(800)
    mf = get_tableau(method).with_options(linear_solver="krylov")
    t = torch.tensor([0.0, 0.2], dtype=F64)
    sol = neuralode.solve(f, u0, t, solver=mf, dt=0.1)
    # No N x N matrix is ever formed: the cost is a few hundred Jacobian-vector products.
    assert sol.stats["n_steps"] == 2 and sol.stats["n_jac"] == 0 and sol.stats["n_lu"] == 0
    assert 0 < sol.stats["n_jvp"] < 500
    exact = np.exp(-lam * 0.2) * u0
    tol = 2e-4 if method == "implicit_euler" else 1e-9
    assert float((sol.ys[-1] - exact).abs().max()) < tol
    dense = neuralode.solve(f, u0, t, solver=method, dt=0.1)
    torch.testing.assert_close(sol.ys, dense.ys, rtol=0, atol=1e-8)


# --------------------------------------------------------------------------- engine features
@pytest.mark.parametrize("method", ["kvaerno5", "rodas4", "implicit_adams"])
def test_events_and_per_sample_grids_work_with_stiff_and_multistep_methods(method):
    f = lambda t, y: -y  # noqa: E731
    ev = neuralode.Event(lambda t, y: y[..., 0] - 0.5)
    sol = neuralode.solve(
        f,
        torch.tensor([1.0], dtype=F64),
        torch.tensor([0.0, 2.0], dtype=F64),
        solver=method,
        rtol=1e-9,
        atol=1e-11,
        event=ev,
    )
    assert float(sol.event_t) == pytest.approx(np.log(2.0), abs=1e-8)
    y0 = torch.tensor([[1.0], [2.0]], dtype=F64)
    t = torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.3, 0.6]], dtype=F64)
    sol = neuralode.solve(f, y0, t, solver=method, rtol=1e-8, atol=1e-10)
    # Interior outputs come from the dense output (fourth order for kvaerno5's quartic).
    err = (sol.ys[:, :, 0] - y0[:, 0] * torch.exp(-t.T)).abs().max()
    assert float(err) < 2e-6


@pytest.mark.parametrize("method", ["kvaerno5", "rodas4", "radauIIA5"])
def test_complex_and_float32_states(method):
    kw = {"rtol": 1e-8, "atol": 1e-10} if get_tableau(method).adaptive else {"dt": 0.01}
    sol = neuralode.solve(
        lambda t, y: 1j * y,
        torch.tensor([1.0 + 0j], dtype=torch.complex128),
        torch.tensor([0.0, 1.0], dtype=F64),
        solver=method,
        **kw,
    )
    assert abs(complex(sol.ys[-1, 0]) - complex(np.cos(1.0), np.sin(1.0))) < 1e-6
    kw32 = {"rtol": 1e-5, "atol": 1e-7} if get_tableau(method).adaptive else {"dt": 0.01}
    sol = neuralode.solve(
        lambda t, y: -y, torch.tensor([1.0]), torch.tensor([0.0, 1.0]), solver=method, **kw32
    )
    assert sol.ys.dtype == torch.float32
    assert abs(float(sol.ys[-1, 0]) - np.exp(-1.0)) < 1e-5
