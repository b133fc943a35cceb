"""Every user-facing error and warning of the implicit solvers, triggered."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import neuralode
from neuralode.solvers import get_tableau
from neuralode.solvers.implicit import ImplicitRK

F64 = torch.float64
T01 = torch.tensor([0.0, 1.0], dtype=F64)
Y0 = torch.tensor([1.0], dtype=F64)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(linear_solver="lu"), "linear_solver must be one of"),
        (dict(max_iters=0), "max_iters must be a positive integer"),
        (dict(newton_tol=0.0), "newton_tol must lie in"),
        (dict(krylov_rtol=2.0), "krylov_rtol must lie in"),
        (dict(krylov_restart=0), "krylov_restart must be a positive integer"),
    ],
)
def test_invalid_implicit_options(options, match):
    with pytest.raises(ValueError, match=match):
        get_tableau("kvaerno5").with_options(**options)


def test_implicit_rk_needs_an_implicit_tableau():
    with pytest.raises(TypeError, match="ImplicitTableau"):
        ImplicitRK(get_tableau("dopri5"))


def test_rosenbrock_has_no_newton_options():
    with pytest.raises(ValueError, match="no option"):
        get_tableau("rodas4").with_options(linear_solver="krylov")


def test_fixed_step_implicit_method_with_tolerances_raises():
    with pytest.raises(ValueError, match="fixed-step method"):
        neuralode.solve(lambda t, y: -y, Y0, T01, solver="radauIIA5", rtol=1e-6)
    with pytest.raises(ValueError, match="no embedded error estimate"):
        neuralode.solve(lambda t, y: -y, Y0, T01, solver="gl4", controller=neuralode.PIController())


def test_unknown_method_lists_the_implicit_ones():
    with pytest.raises(ValueError, match="kvaerno5"):
        neuralode.solve(lambda t, y: -y, Y0, T01, solver="radau5")


def test_fixed_step_newton_failure_subdivides_then_warns():
    # f is NaN past t = 0.5: no subdivision of the steps there can converge.
    def f(t, y):
        return torch.where(t > 0.5, torch.full_like(y, math.nan), -y)

    with pytest.warns(RuntimeWarning, match="even split into 64 substeps"):
        with pytest.raises(neuralode.NonFiniteError):
            neuralode.solve(f, Y0, T01, solver="implicit_euler", dt=0.5)


def _hard(t, y):
    # Stiff (lambda ~ -3e3 y^2) and nonlinear, started far off the slow manifold y^3 = cos t.
    return -1e3 * (y**3 - torch.cos(t))


def _hard_reference(y0=3.0):
    return neuralode.solve(
        _hard, torch.tensor([y0], dtype=F64), T01, solver="kvaerno5", rtol=1e-10, atol=1e-12
    ).ys[-1, 0]


def test_fixed_step_newton_uses_fresh_jacobians_on_a_hard_step():
    # One step of h = 1/4 from y = 3: the simplified iteration with the Jacobian at the step
    # start is too slow; Jacobians at the iterates (Newton proper) make it converge.
    sol = neuralode.solve(_hard, torch.tensor([3.0], dtype=F64), T01, solver="radauIIA5", dt=0.25)
    assert sol.stats["n_jac"] > sol.stats["n_steps"] and "n_substeps" not in sol.stats
    assert float(sol.ys[-1, 0]) == pytest.approx(float(_hard_reference()), abs=1e-5)


def test_fixed_step_subdivision_on_a_hard_step():
    # An ESDIRK's explicit first stage puts its stages far out on this transient (h f(y0) is
    # -600): even Newton proper fails, and the first steps are taken in halves (only the first
    # failure warns; every substep converges).
    y0 = torch.tensor([1.5], dtype=F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol = neuralode.solve(_hard, y0, T01, solver="kvaerno5", dt=0.25)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "smaller substeps" in messages[0]
    assert 1 <= sol.stats["n_substeps"] <= 10
    assert float(sol.ys[-1, 0]) == pytest.approx(float(_hard_reference(1.5)), abs=1e-5)


def test_adaptive_newton_failures_are_rejections_not_errors():
    sol = neuralode.solve(
        _hard, torch.tensor([3.0], dtype=F64), T01, solver="kvaerno5", rtol=1e-6, atol=1e-9
    )
    assert sol.success
    assert float(sol.ys[-1, 0]) == pytest.approx(math.cos(1.0) ** (1 / 3), abs=1e-3)
