"""Simplified Newton iterations and their gradients by the implicit function theorem.

The stage equations of an implicit step are a fixed point ``X = Phi(X)`` (for a diagonally
implicit stage ``Y_i = e_i + h gamma f(t_i, Y_i)``; for a fully implicit method
``Y = y + h (A kron I) F(Y)`` on all stages at once). They are solved by the simplified Newton
iteration ``M dX = Phi(X) - X`` with a fixed iteration matrix ``M ~ I - dPhi/dX`` built from a
Jacobian that is reused across steps (Hairer & Wanner II, sec. IV.8):

- the convergence rate ``theta_k = ||dX_k|| / ||dX_{k-1}||`` is monitored; the iteration stops
  when the estimated remaining error ``theta / (1 - theta) ||dX_k||`` is below ``kappa`` (in the
  scaled norm of the step-size controller), and gives up as soon as it diverges
  (``theta >= 1``) or cannot reach the tolerance within ``max_iters`` at the observed rate;
- the first iteration uses the rate of the previous solve (``eta = max(eta_old, eps)^0.8``).

Gradients do not backpropagate through the iterations. :class:`IFTSolve` wraps the converged
solution ``X*`` so that the backward pass solves the transposed linear system
``(I - dPhi/dX)^H w = v`` at ``X*`` (GMRES, preconditioned by the forward iteration matrix when
it is a factorised one) and then propagates ``w`` through *one* differentiable evaluation
``u = Phi(X*)`` to the step's inputs and the parameters of func: by the implicit function
theorem ``dX* = (I - dPhi/dX)^-1 dPhi``, so this is the exact derivative of the exact stage
solution, whatever iteration produced it.
"""

from __future__ import annotations

import math

import torch

from .linalg import gmres

__all__ = ["newton", "NewtonResult", "IFTSolve", "ift_attach"]


class NewtonResult:
    __slots__ = ("x", "converged", "iters", "rate", "diverged")

    def __init__(self, x, converged, iters, rate, diverged):
        self.x, self.converged, self.iters, self.rate, self.diverged = (
            x,
            converged,
            iters,
            rate,
            diverged,
        )


def newton(
    residual,
    solve,
    x0,
    norm,
    kappa: float,
    max_iters: int,
    eta0: float,
    early_exit: bool = True,
    refresh=None,
) -> NewtonResult:
    """Simplified Newton iteration for ``residual(x) = Phi(x) - x = 0``.

    Parameters
    ----------
    residual : callable
        ``x -> Phi(x) - x`` (evaluates func).
    solve : callable
        ``r -> M^-1 r`` with the iteration matrix ``M ~ I - dPhi/dx``.
    norm : callable
        ``dx -> float``: the controller's scaled RMS norm.
    kappa : float
        Tolerance on the estimated error of the iterate, in that norm.
    eta0 : float
        ``theta / (1 - theta)`` carried over from the previous solve (first-iteration test).
    early_exit : bool
        Give up as soon as the observed rate cannot reach ``kappa`` within ``max_iters``
        (adaptive steps, which are then retried smaller); fixed steps iterate on while the
        iteration contracts.
    refresh : callable, optional
        ``x -> solve``: a new iteration matrix from the Jacobian at the current iterate, used
        (at most ten times) when the iteration converges slowly (rate above 0.3) or diverges
        -- Newton's method proper instead of the simplified one, for fixed steps that cannot be
        rejected.
    """
    x = x0
    prev = None
    theta = None
    eta = eta0
    refreshes = 10 if refresh is not None else 0
    for k in range(max_iters):
        dx = solve(residual(x))
        if dx is None:  # singular iteration matrix
            return NewtonResult(x, False, k + 1, math.inf, True)
        x_new = x + dx
        dn = norm(dx)
        if not math.isfinite(dn):
            return NewtonResult(x_new, False, k + 1, math.inf, True)
        if prev is not None:
            theta = dn / prev if prev > 0 else 0.0
            if refreshes and theta > 0.3:
                # Slow or diverging: a Jacobian at the better of the last two iterates.
                refreshes -= 1
                if theta >= 1.0:
                    x_new = x
                solve = refresh(x_new)
                x, prev, eta = x_new, None, 1.0
                continue
            if theta >= 0.99:
                return NewtonResult(x_new, False, k + 1, theta, True)
            eta = theta / (1.0 - theta)
            remaining = max_iters - 1 - k
            if early_exit and remaining > 0 and theta**remaining / (1.0 - theta) * dn > kappa:
                # Hairer & Wanner's test: at this rate the tolerance is out of reach.
                return NewtonResult(x, False, k + 1, theta, True)
        x = x_new
        if dn == 0.0 or eta * dn <= kappa:
            return NewtonResult(x, True, k + 1, theta if theta is not None else 0.0, False)
        prev = dn
    return NewtonResult(x, False, max_iters, theta if theta is not None else 1.0, False)


class _Backsolver:
    """The transposed stage system at a converged solution, for :class:`IFTSolve`."""

    def __init__(self, x_star, phi, precond_adjoint, stats, rtol):
        self.x_star = x_star  # detached solution
        self.phi = phi  # x -> Phi(x) with the step's inputs detached (for dPhi/dx products)
        self.precond_adjoint = precond_adjoint  # r -> M^-H r, or None (matrix-free)
        self.stats = stats
        self.rtol = rtol

    def solve_adjoint(self, v):
        with torch.enable_grad():
            x = self.x_star.detach().requires_grad_()
            ph = self.phi(x)

            def matvec(w):
                (vj,) = torch.autograd.grad(ph, x, w, retain_graph=True)
                return w - vj

            w, iters, ok = gmres(
                matvec, v, precond=self.precond_adjoint, rtol=self.rtol, restart=50, maxiter=500
            )
        self.stats["n_adjoint_krylov"] = self.stats.get("n_adjoint_krylov", 0) + iters
        if not ok:
            self.stats["n_adjoint_unconverged"] = self.stats.get("n_adjoint_unconverged", 0) + 1
        return w


class IFTSolve(torch.autograd.Function):
    """Identity in the forward pass (returns the converged ``X*``); in the backward pass maps
    ``v`` to ``w = (I - dPhi/dX)^-H v`` and hands it to ``u = Phi(X*)``."""

    @staticmethod
    def forward(ctx, u, backsolver):
        ctx.backsolver = backsolver
        return backsolver.x_star.clone()

    @staticmethod
    def backward(ctx, v):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "gradients of gradients (create_graph=True) through the Newton solves of implicit "
                "Runge--Kutta steps are not supported; use 'rodas4' (differentiable to any "
                "order) or an explicit method for higher derivatives"
            )
        return ctx.backsolver.solve_adjoint(v), None


def ift_attach(x_star, u, phi, precond_adjoint, stats, rtol: float = 1e-12):
    """``X*`` with gradients by the implicit function theorem.

    ``u`` is ``Phi(X*)`` evaluated differentiably in the step's inputs (and func's parameters)
    with ``X*`` detached; ``phi`` evaluates ``Phi`` at a given ``X`` with the inputs detached.
    Returns ``x_star`` unchanged when ``u`` needs no gradient.
    """
    if not u.requires_grad:
        return x_star
    return IFTSolve.apply(u, _Backsolver(x_star.detach(), phi, precond_adjoint, stats, rtol))
