"""Gradients through implicit steps: implicit function theorem for the Newton solves (Direct and
Checkpointed), exact differentiation of Rosenbrock steps, and stiff adjoint solves (Backsolve).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neuralode
from neuralode.solvers import IMPLICIT, get_tableau

F64 = torch.float64
T3 = torch.tensor([0.0, 0.2, 0.4], dtype=F64)


class Stiff(nn.Module):
    """``y' = tanh(A y) + b cos t`` with an eigenvalue near -50 (stiff for h = 0.1)."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[-50.0, 1.0, 0.0], [1.0, -2.0, 1.0], [0, 3.0, -0.5]]))
        self.b = nn.Parameter(torch.tensor([0.2, 0.1, -0.3]))
        self.double()

    def forward(self, t, y):
        return torch.tanh(y @ self.A.T) + self.b * torch.cos(t)


A0 = torch.tensor([[-50.0, 1.0, 0.0], [1.0, -2.0, 1.0], [0, 3.0, -0.5]], dtype=F64)
B0 = torch.tensor([0.2, 0.1, -0.3], dtype=F64)
Y0 = torch.tensor([1.0, -0.5, 0.3], dtype=F64)


def _gradcheck(method, gradient, fast_mode=False):
    """gradcheck with respect to A, b and y0 of ``y' = tanh(A y) + b cos t`` (closed over)."""

    def run(A, b, y0):
        return neuralode.solve(
            lambda t, y: torch.tanh(y @ A.T) + b * torch.cos(t),
            y0,
            T3,
            solver=method,
            dt=0.1,
            gradient=gradient(A, b),
        ).ys

    inputs = tuple(x.clone().requires_grad_() for x in (A0, B0, Y0))
    return torch.autograd.gradcheck(run, inputs, atol=1e-7, rtol=1e-5, fast_mode=fast_mode)


@pytest.mark.parametrize("method", IMPLICIT)
def test_gradcheck_direct(method):
    assert _gradcheck(method, lambda A, b: neuralode.Direct())


@pytest.mark.parametrize("method", IMPLICIT)
def test_gradcheck_checkpointed(method):
    assert _gradcheck(method, lambda A, b: neuralode.Checkpointed(params=(A, b)))


@pytest.mark.parametrize("method", ["kvaerno5", "radauIIA5"])
def test_gradcheck_matrix_free(method):
    # The transposed stage systems are solved by GMRES on vector-Jacobian products (no
    # preconditioner without a factorisation); fast mode checks a random projection.
    mf = get_tableau(method).with_options(linear_solver="krylov", krylov_rtol=1e-11)
    assert _gradcheck(mf, lambda A, b: neuralode.Direct(), fast_mode=True)


def test_ift_gradient_is_the_derivative_of_the_exact_stage_solution():
    """With a loose Newton tolerance the forward values are off by ~1e-6, but the gradient by
    the implicit function theorem is that of the exactly solved step: it matches central
    differences of a tightly solved one far better than the forward error."""
    loose = get_tableau("kvaerno5").with_options(newton_tol=1e-6)
    tight = get_tableau("kvaerno5").with_options(newton_tol=1e-14)
    E = torch.zeros(3, 3, dtype=F64)
    E[0, 0] = 1.0
    A_rest = A0 - A0[0, 0] * E

    def final(method, a):
        A = A_rest + a * E
        f = lambda t, y: torch.tanh(y @ A.T) + B0 * torch.cos(t)  # noqa: E731
        return neuralode.solve(f, Y0, T3, solver=method, dt=0.1).ys[-1].sum()

    a = torch.tensor(-50.0, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(final(loose, a), a)
    eps = 1e-5
    with torch.no_grad():
        fd = (final(tight, a + eps) - final(tight, a - eps)) / (2 * eps)
    assert float(g) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)


def test_direct_and_checkpointed_agree_on_adaptive_steps():
    m = Stiff()
    y0 = torch.tensor([1.0, -0.5, 0.3], dtype=F64, requires_grad=True)
    grads = []
    for gradient in ("direct", "checkpoint"):
        for solver in ("kvaerno5", "rodas4"):
            sol = neuralode.solve(
                m, y0, T3, solver=solver, rtol=1e-8, atol=1e-10, gradient=gradient
            )
            grads.append((solver, torch.autograd.grad(sol.ys.sum(), [y0, m.A, m.b])))
    for (s1, g1), (s2, g2) in zip(grads[:2], grads[2:]):
        assert s1 == s2
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


class Linear(nn.Module):
    def __init__(self, lam=-1000.0):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[lam, 1.0], [0.5, -1.0]], dtype=F64))

    def forward(self, t, y):
        return y @ self.A.T


def _exact_grads(m, y0, T):
    yT = torch.linalg.matrix_exp(m.A * T) @ y0
    return torch.autograd.grad(yT.sum(), [y0, m.A])


@pytest.mark.parametrize("solver", ["kvaerno5", "rodas4", "trbdf2"])
def test_adaptive_gradients_match_the_exact_sensitivities(solver):
    m = Linear()
    y0 = torch.tensor([1.0, 1.0], dtype=F64, requires_grad=True)
    exact = _exact_grads(m, y0, 1.0)
    rtol = 1e-7 if solver == "trbdf2" else 1e-10
    sol = neuralode.solve(
        m, y0, torch.tensor([0.0, 1.0], dtype=F64), solver=solver, rtol=rtol, atol=rtol * 1e-2
    )
    got = torch.autograd.grad(sol.ys[-1].sum(), [y0, m.A])
    for g, e in zip(got, exact):
        torch.testing.assert_close(g, e, rtol=1e-4 if solver == "trbdf2" else 1e-7, atol=1e-9)


@pytest.mark.parametrize("adjoint_solver", ["kvaerno5", "rodas4"])
def test_backsolve_with_a_stiff_adjoint_solver(adjoint_solver):
    # Mildly stiff so that the state can be recomputed backward in time (a stiff decay run
    # backward is unstable for any method: that is Backsolve's limitation, not the solver's).
    m = Linear(-50.0)
    y0 = torch.tensor([1.0, 1.0], dtype=F64, requires_grad=True)
    T = 0.3
    exact = _exact_grads(m, y0, T)
    for forward in ("kvaerno5", "dopri5"):
        sol = neuralode.solve(
            m,
            y0,
            torch.tensor([0.0, T / 2, T], dtype=F64),
            solver=forward,
            rtol=1e-9,
            atol=1e-11,
            gradient=neuralode.Backsolve(solver=adjoint_solver, rtol=1e-9, atol=1e-11),
        )
        got = torch.autograd.grad(sol.ys[-1].sum(), [y0, m.A])
        # Backsolve approximates the continuous gradient to its tolerances (dopri5 forward
        # and adjoint: 3e-7 absolute on this problem).
        for g, e in zip(got, exact):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=2e-6)


def test_second_derivatives_through_newton_solves_raise():
    m = Stiff()
    y0 = torch.tensor([1.0, -0.5, 0.3], dtype=F64, requires_grad=True)
    sol = neuralode.solve(m, y0, T3, solver="kvaerno5", dt=0.1)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(sol.ys[-1].sum(), y0, create_graph=True)


def test_second_derivatives_through_rosenbrock_steps():
    # A Rosenbrock step is an explicit formula: double backward works and matches autograd on
    # the closed form y(T) = exp(a T) y0 (fixed steps: compare with the discrete map instead).
    a = torch.tensor(-2.0, dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0], dtype=F64)

    def final(a):
        return neuralode.solve(
            lambda t, y: a * y, y0, torch.tensor([0.0, 1.0], dtype=F64), solver="rodas4", dt=0.05
        ).ys[-1, 0]

    (g,) = torch.autograd.grad(final(a), a, create_graph=True)
    (h,) = torch.autograd.grad(g, a)
    eps = 1e-4
    with torch.no_grad():
        gp = torch.autograd.functional.jacobian(final, a + eps)
        gm = torch.autograd.functional.jacobian(final, a - eps)
    assert float(h) == pytest.approx(float((gp - gm) / (2 * eps)), rel=1e-6)
