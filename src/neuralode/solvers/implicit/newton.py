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
- the first iteration uses the rate of the previous solve (``eta = max(eta_old, eps)^0.8``),
  where that rate is the *slowest* one measured in the solve, not the last: the contraction of
  a simplified Newton iteration need not be uniform (it can be nilpotent, e.g. a linear
  component that converges in one iteration driving a nonlinear one), so the last increments
  can shrink to rounding level and report a rate of ~1e-10 that the next solve's first
  iteration, starting from a predictor, does not have (a solve accepted after one iteration
  measures no rate and reports 0; the stepper then keeps the carried one).

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

from ..explicit_rk import _combiner
from .linalg import flat_func, gmres

__all__ = ["newton", "NewtonResult", "IFTSolve", "ift_attach", "IFTStages"]


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
    worst = 0.0  # the slowest rate measured with the current iteration matrix
    measured = False  # whether worst holds one (a refresh starts afresh)
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
            # The slowest rate is carried, not the last (see the module docstring): a last
            # increment of zero or at rounding level says nothing of the next first iteration.
            worst = max(worst, theta) if measured else theta
            measured = True
            if refreshes and theta > 0.3:
                # Slow or diverging: a Jacobian at the better of the last two iterates.
                refreshes -= 1
                if theta >= 1.0:
                    x_new = x
                solve = refresh(x_new)
                # Unmeasured with the new matrix until two more increments: if it converges
                # before, the rate that triggered the refresh is reported (and carried).
                x, prev, eta, measured = x_new, None, 1.0, False
                continue
            if theta >= 0.99:
                return NewtonResult(x_new, False, k + 1, theta, True)
            eta = theta / (1.0 - theta)
            remaining = max_iters - 1 - k
            if early_exit and remaining > 0 and theta**remaining / (1.0 - theta) * dn > kappa:
                # Hairer & Wanner's test: at this rate the tolerance is out of reach.
                return NewtonResult(x, False, k + 1, worst, True)
        x = x_new
        if dn == 0.0 or eta * dn <= kappa:
            rate = worst if measured else (theta if theta is not None else 0.0)
            return NewtonResult(x, True, k + 1, rate, False)
        prev = dn
    rate = worst if measured else (theta if theta is not None else 1.0)
    return NewtonResult(x, False, max_iters, rate, False)


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


class IFTStages:
    """Mixin of :class:`~neuralode.solvers.implicit.irk.ImplicitRKStepper`: the step rebuilt with
    a graph from its converged stages, each stage solve attached by :func:`ift_attach` (the
    shared driver's float step size, or the per-sample driver's per-row step sizes)."""

    def _differentiable(self, f, t, h, y, k1, t_last, stages, shape):
        """Rebuild the step with a graph: each stage solve is attached by the implicit function
        theorem to one differentiable evaluation of its stage equations."""
        T = self.tableau
        yv = y.reshape(-1)
        k1v = k1.reshape(-1)
        fx = f.flat
        g_un = _uncounted(f)
        if self.dirk:
            gs = [h * T.a[i][i] for i in range(T.n_stages)]

            def precond(i):
                return None if self.krylov else self._solver(gs[i]).solve_adjoint

            K, y_new = self._dirk_graph(
                fx, g_un, precond, t, h, gs, yv, k1v, t_last, stages["Y"], _combiner(yv, h, None)
            )
        else:
            s = T.n_stages
            ts = [self._stage_time(t, h, t_last, ci) for ci in T.c]
            Ystar = stages["Y"]
            A = self.A
            u = yv + h * (A @ torch.stack([fx(ts[i], Ystar[i]) for i in range(s)]))
            precond = None if self.krylov else self._solver(h).solve_adjoint

            def phi(X):
                return h * (A @ torch.stack([g_un(ts[i], X[i]) for i in range(s)]))

            Y_out = ift_attach(Ystar, u, phi, precond, self.counts, self._ift_rtol())
            K = (self.A_inv @ (Y_out - yv)) / h
            y_new = Y_out[-1] if self.fsal else torch.addmv(yv, K.T, self.b, alpha=h)
        err = None
        if self.b_err is not None:
            err = (h * (self.b_err @ K.detach())).view(shape)
        k_end = K[-1] if self.fsal else None
        return y_new.view(shape), err, self.pack(k1v, (y_new - yv) / h, k_end, K)

    def _dirk_graph(self, fx, g_un, precond, t, h, gs, yv, k1v, t_last, Ystars, comb):
        """The diagonally implicit stages with a graph, each stage solve attached by the
        implicit function theorem to one differentiable evaluation of its stage equation
        ``Y_i = e_i + g_i f(t_i, Y_i)``. ``gs[i]`` is ``h a_ii`` (a float, or per component of
        the flat state for per-row steps), ``precond(i)`` the adjoint solve of stage ``i``'s
        iteration matrix (or None), ``comb(K, w) = yv + h K w``. Returns ``(K, y_new)``."""
        T = self.tableau
        s = T.n_stages
        ks = [None] * s
        for i in range(s):
            if i == 0 and T.explicit_first_stage:
                ks[0] = k1v
                continue
            g = gs[i]
            e = yv if i == 0 else comb(torch.stack(ks[:i], 1), self.a_rows[i])
            ti = self._stage_time(t, h, t_last, T.c[i])
            Ystar = Ystars[i]
            u = e + g * fx(ti, Ystar)

            def phi(X, g=g, ti=ti):
                return g * g_un(ti, X)

            Y_out = ift_attach(Ystar, u, phi, precond(i), self.counts, self._ift_rtol())
            ks[i] = (Y_out - e) / g
            if i == s - 1:
                Y_last = Y_out
        K = torch.stack(ks)
        y_new = Y_last if self.fsal else comb(K.T, self.b)
        return K, y_new

    def _ift_rtol(self) -> float:
        return max(1e-12, 100 * self.eps)


def _uncounted(f):
    """``(t, y1d) -> f(t, y1d)`` without counting NFE (products inside the backward pass)."""
    cache: dict = {}

    def g(t, y):
        fn = cache.get(t)
        if fn is None:
            fn = cache[t] = flat_func(f, t)
        return fn(y)

    return g
