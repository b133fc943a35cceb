"""Implicit Runge--Kutta methods: one engine for every :class:`ImplicitTableau`.

Diagonally implicit tableaux (SDIRK/ESDIRK: ``implicit_euler``, ``implicit_midpoint``,
``trapezoid``, ``sdirk2``, ``trbdf2``, ``kvaerno5``) solve their stages one after the other,
each an ``N``-dimensional system ``Y_i = e_i + h gamma_i f(t_i, Y_i)`` with the explicit part
``e_i = y_n + h sum_{j<i} a_ij k_j``; fully implicit ones (``radauIIA3/5``, ``gl4``, ``gl6``)
solve ``Y = y_n + h (A kron I) F(Y)`` for all stages at once, the Newton system split by the
eigenvalues of ``A``. Stage derivatives come from the stage equations
(``k_i = (Y_i - e_i) / (h gamma_i)``, or ``A^-1 (Y - y_n) / h``), not from extra evaluations of
func, which on stiff problems would amplify the Newton error (Hairer & Wanner II, sec. IV.8).

Linear algebra (``linear_solver``):

- ``"dense"`` (default): the Jacobian ``df/dy`` from autograd (``torch.func.jacrev``), kept
  across steps and recomputed only when the Newton iteration converges slowly (rate above
  1e-3 after more than two iterations) or fails; the iteration matrix is factorised (LU) once
  per step size and Jacobian.
- ``"krylov"``: matrix-free; each Newton iteration solves its linear system by GMRES with
  Jacobian-vector products (``torch.func.jvp``), so memory and cost grow linearly with the
  state size instead of quadratically/cubically.

Gradients (``Direct``, ``Checkpointed``) use the implicit function theorem on the converged
stages (:mod:`.newton`), never backpropagation through Newton iterations.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..explicit_rk import _combiner
from .base import HermiteStepper, MethodFace
from .linalg import JVP, DenseSolver, EigenSolver, gmres, jacobian
from .newton import IFTStages, newton
from .tableaux import ImplicitTableau

__all__ = ["ImplicitRK"]

_LINEAR_SOLVERS = ("dense", "krylov")
# A fixed step whose Newton iteration fails is split in halves, at most this many times.
_MAX_SUBDIVISIONS = 6


@dataclass(frozen=True)
class ImplicitRK(MethodFace):
    """An implicit Runge--Kutta method with its Newton and linear-algebra settings.

    Registered under the tableau's name (``neuralode.solve(..., solver="kvaerno5")``); build
    one with other settings with :meth:`with_options`.

    Parameters
    ----------
    tableau : ImplicitTableau
        The coefficients.
    linear_solver : {"dense", "krylov"}, default "dense"
        Dense factorisations of autograd Jacobians, or matrix-free GMRES on Jacobian-vector
        products (for large states).
    max_iters : int, optional
        Newton iterations per stage solve before giving up. Default 10 on adaptive steps (which
        give up early when the observed rate cannot meet the tolerance, and are then rejected
        and retried smaller); 50 on fixed steps (which iterate while the iteration contracts,
        and warn and keep the last iterate if it does not converge).
    newton_tol : float, optional
        Tolerance of the Newton iteration on fixed steps, relative and absolute (default 1e-12
        in float64, 100 x machine epsilon otherwise). Adaptive steps derive it from the
        controller's rtol/atol (Hairer & Wanner's ``max(10 eps / rtol, min(0.03, rtol^0.5))``
        in the scaled norm).
    krylov_rtol : float, default 1e-4
        Relative residual at which GMRES stops inside a Newton iteration (``"krylov"``).
    krylov_restart : int, default 40
        GMRES restart length (``"krylov"``).

    Raises
    ------
    ValueError
        For an unknown ``linear_solver`` or non-positive ``max_iters``/tolerances.

    Notes
    -----
    Dense output (values at output times inside a step, ``Solution.evaluate``): for
    ``kvaerno5`` and ``radauIIA5`` a quartic of order 4 (``interpolant_order``), the cubic
    Hermite interpolant through ``(y_n, f_n, y_{n+1}, f_{n+1})`` plus
    ``theta^2 (1 - theta)^2 h d`` with ``d`` a fixed combination of the step's stage
    derivatives (no extra evaluation of func); the cubic Hermite (order 3) for the other
    tableaux. Weights, order conditions and sources: ``neuralode.solvers.implicit.tableaux``.

    References
    ----------
    E. Hairer, S. P. Norsett, G. Wanner, Solving Ordinary Differential Equations I, 2nd ed.,
    1993, sec. II.6 (continuous extensions). E. Hairer, G. Wanner, Solving Ordinary
    Differential Equations II, 2nd ed., 1996, sec. IV.8 (the Newton iterations).
    """

    tableau: ImplicitTableau
    linear_solver: str = "dense"
    max_iters: int | None = None
    newton_tol: float | None = None
    krylov_rtol: float = 1e-4
    krylov_restart: int = 40

    def __post_init__(self):
        if not isinstance(self.tableau, ImplicitTableau):
            raise TypeError(
                f"tableau must be an ImplicitTableau, got {type(self.tableau).__name__}"
            )
        if self.linear_solver not in _LINEAR_SOLVERS:
            raise ValueError(
                f"linear_solver must be one of {_LINEAR_SOLVERS}, got {self.linear_solver!r}"
            )
        if self.max_iters is not None and not (
            isinstance(self.max_iters, int) and self.max_iters >= 1
        ):
            raise ValueError(f"max_iters must be a positive integer, got {self.max_iters!r}")
        if self.newton_tol is not None and not (0 < self.newton_tol < 1):
            raise ValueError(f"newton_tol must lie in (0, 1), got {self.newton_tol!r}")
        if not (0 < self.krylov_rtol < 1):
            raise ValueError(f"krylov_rtol must lie in (0, 1), got {self.krylov_rtol!r}")
        if not (isinstance(self.krylov_restart, int) and self.krylov_restart >= 1):
            raise ValueError(
                f"krylov_restart must be a positive integer, got {self.krylov_restart!r}"
            )

    # ---------------------------------------------------------------- what the engine reads
    @property
    def name(self) -> str:
        return self.tableau.name

    @property
    def order(self) -> int:
        return self.tableau.order

    @property
    def embedded_order(self):
        return self.tableau.embedded_order

    @property
    def fsal(self) -> bool:
        return self.tableau.stiffly_accurate

    @property
    def interpolant_order(self) -> int:
        """Order of the dense output: 4 for the quartic of ``kvaerno5`` and ``radauIIA5``, 3
        (cubic Hermite) otherwise (``neuralode.solvers.implicit.tableaux``)."""
        return self.tableau.interpolant_order

    def with_options(self, **options) -> ImplicitRK:
        """A copy with other settings, e.g. ``get_tableau("kvaerno5").with_options(
        linear_solver="krylov")``."""
        return dataclasses.replace(self, **options)

    def make_stepper(self, dtype: torch.dtype, device: torch.device):
        return ImplicitRKStepper(self, dtype, device)

    def __repr__(self) -> str:
        kind = f"{self.order}({self.embedded_order})" if self.adaptive else f"{self.order}"
        return f"ImplicitRK({self.name!r}, order {kind}, linear_solver={self.linear_solver!r})"


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype.to_real() if dtype.is_complex else dtype


class ImplicitRKStepper(IFTStages, HermiteStepper):
    """Per-solve state of an implicit RK method: the Jacobian and factorisations in use, the
    Newton rate, the statistics. Created by :func:`neuralode._loop.make_stepper`."""

    def __init__(self, method: ImplicitRK, dtype: torch.dtype, device: torch.device):
        self.method = method
        self.tab = method
        T = method.tableau
        self.tableau = T
        self.fsal = T.stiffly_accurate
        self.dtype, self.device = dtype, device
        self.eps = torch.finfo(_real_dtype(dtype)).eps
        s = T.n_stages

        def tt(x):
            return torch.tensor(np.asarray(x, dtype=float), dtype=dtype, device=device)

        self.a_rows = [tt(T.a[i][:i]) if i else None for i in range(s)]
        self.A = tt(T.a)
        self.b = tt(T.b)
        self.b_err = tt(np.array(T.b) - np.array(T.b_hat)) if T.b_hat is not None else None
        self.dirk = T.diagonally_implicit
        # Quartic dense output: d = q0 f(t_n, y_n) + q @ k (one more row of K; .tableaux).
        self.quartic = T.b_dense is not None
        if self.quartic:
            self.q0, self.q = float(T.b_dense[0]), tt(T.b_dense[1:])
        if not self.dirk:
            self.A_inv = tt(np.linalg.inv(np.array(T.a)))
        self.krylov = method.linear_solver == "krylov"
        # Tolerances of the Newton iteration (set by bind).
        self.rtol, self.atol, self.kappa, self.adaptive_ctrl = None, None, 1.0, False
        self.max_iters = method.max_iters or 50
        # Per-solve state.
        self._jac = None  # dense J, or a JVP object
        self._jac_at = None  # (t, data_ptr) of the point it was computed at
        self._jac_version = 0
        self._refresh = True
        self._solvers: dict = {}
        self._eta = 1.0
        self._cold_start = False
        self.counts = dict(n_jac=0, n_lu=0, n_newton=0, n_newton_fail=0)
        self._rows, self._rows_tol = None, (None, None)  # per-sample control (see .rows)
        if self.krylov:
            self.counts.update(n_jvp=0, n_krylov=0)

    # ------------------------------------------------------------------ engine hooks
    @property
    def stats(self) -> dict:
        out = dict(self.counts)
        if self.krylov and isinstance(self._jac, JVP):
            out["n_jvp"] = self.counts["n_jvp"] + self._jac.count
        return out

    def bind(self, prob) -> None:
        """Take the Newton tolerances from the problem (called by the loop at each solve)."""
        self.adaptive_ctrl = bool(getattr(prob.controller, "adaptive", False))
        self.max_iters = self.method.max_iters or (10 if self.adaptive_ctrl else 50)
        if self.adaptive_ctrl:
            self.rtol, self.atol = prob.rtol, prob.atol
            self.kappa = self._kappa(self.rtol)
        else:
            tol = self.method.newton_tol
            if tol is None:
                tol = max(1e-12, 100 * self.eps)
            self.rtol = self.atol = tol
            self.kappa = 1.0

    def _kappa(self, rtol) -> float:
        """Newton tolerance in the scaled norm: Hairer & Wanner's ``max(10 eps / rtol,
        min(0.03, rtol^0.5))`` with the largest rtol."""
        r = float(rtol.max()) if isinstance(rtol, torch.Tensor) else float(rtol)
        r = max(r, self.eps)
        return max(10 * self.eps / r, min(0.03, r**0.5))

    def bind_rows(self, rtol, atol) -> None:
        """A per-sample solve starts with rows' tolerances ``rtol``/``atol`` (floats or
        ``(A, M)``): adaptive Newton settings, no per-row state yet."""
        self.adaptive_ctrl = True
        self.max_iters = self.method.max_iters or 10
        self.kappa = self._kappa(rtol)
        self._rows, self._rows_tol = None, (rtol, atol)

    def take_rows(self, keep) -> None:
        """The per-sample working set was compacted to rows ``keep``."""
        if self._rows is not None:
            self._rows.take(keep)

    # ------------------------------------------------------------------ linear algebra
    def _ensure_jacobian(self, f, t: float, y0: torch.Tensor, force: bool) -> bool:
        """Make the Jacobian current at ``(t, y0)`` if forced or flagged; True if it is."""
        key = (t, y0.data_ptr())
        if self._jac_at == key:
            return True
        if self._jac is not None and not (force or self._refresh):
            return False
        if self.krylov:
            if isinstance(self._jac, JVP):
                self.counts["n_jvp"] += self._jac.count
            self._jac = JVP(f, t, y0)
        else:
            with torch.no_grad():
                self._jac = jacobian(f, t, y0)
            self.counts["n_jac"] += 1
        self._jac_at = key
        self._jac_version += 1
        self._solvers = {}
        self._refresh = False
        # A new iteration matrix: measure its rate before trusting a single iteration.
        self._eta = 1.0
        return True

    def _solver(self, key):
        """The iteration matrix for ``h * gamma`` (DIRK, key float) or ``h`` (FIRK)."""
        sol = self._solvers.get(key)
        if sol is None and self._solvers:
            # Fixed steps differ from each other by rounding in the last bits: same matrix.
            (old_key,) = self._solvers
            if abs(old_key - key) <= 1e-12 * abs(key):
                sol = self._solvers[old_key]
        if sol is None:
            if self.krylov:
                sol = self._krylov_solver(key)
            elif self.dirk:
                sol = DenseSolver(self._jac, key)
                self.counts["n_lu"] += 1
            else:
                sol = EigenSolver(self.tableau, self._jac, key)
                self.counts["n_lu"] += sol.n_factorisations
            # Exact factorisations: one step size at a time (steps change h almost always).
            self._solvers = {key: sol}
        return sol

    def _krylov_solver(self, key):
        jvp, rtol, restart, counts = (
            self._jac,
            self.method.krylov_rtol,
            self.method.krylov_restart,
            self.counts,
        )
        if self.dirk:
            g = key

            def matvec(v):
                return v - g * jvp(v)
        else:
            h, A = key, self.A

            def matvec(V):
                return V - h * (A @ torch.stack([jvp(v) for v in V]))

        class _Krylov:
            def solve(self, r):
                x, iters, _ = gmres(matvec, r, rtol=rtol, restart=restart, maxiter=20 * restart)
                counts["n_krylov"] += iters
                return x

            solve_adjoint = None

        return _Krylov()

    # ------------------------------------------------------------------ the step
    def _norm(self, dx: torch.Tensor, scale: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(dx / scale) / math.sqrt(dx.numel()))

    def step(self, f, t, h, y, k1, t_last, track_grad: bool, _depth=0):
        """One step from ``(t, y)`` with first stage ``k1``; returns ``(y_new, err, K)``.

        ``t``, ``h`` and ``t_last`` are floats (one step for the whole state), or ``(A,)``
        float64 tensors for per-sample control with a diagonally implicit method (each row its
        own step, Jacobian block and Newton iteration: :mod:`.rows`).
        """
        if isinstance(h, torch.Tensor):
            from .rows_newton import dirk_rows_step

            return dirk_rows_step(self, f, t, h, y, k1, t_last, track_grad)
        shape = y.shape
        # A graph is needed only if the state or func's parameters require grad (k1 tells).
        track_grad = track_grad and (y.requires_grad or k1.requires_grad)
        y0 = y.reshape(-1).detach()
        k1d = k1.reshape(-1).detach()
        rtol, atol = self.rtol, self.atol
        if rtol is None:  # not bound (direct use of the stepper): fixed-step tolerances
            rtol = atol = max(1e-12, 100 * self.eps)
        if isinstance(rtol, torch.Tensor):
            rtol = rtol.reshape(-1)
        if isinstance(atol, torch.Tensor):
            atol = atol.reshape(-1)
        scale = y0.abs() * rtol + atol
        scale = torch.clamp(scale, min=torch.finfo(_real_dtype(self.dtype)).tiny)
        # Matrix-free: the linearisation point moves with every step (it costs nothing).
        self._ensure_jacobian(f, t, y0, force=self.krylov)
        attempt = self._dirk if self.dirk else self._firk
        with torch.no_grad():  # the iterations never enter the graph (see _differentiable)
            sol = attempt(f, t, h, y0, k1d, t_last, scale)
            if sol is None:
                # Retry once with a Jacobian at this step's start (unless it already is) and
                # starting values that do not extrapolate f(t_n, y_n) (Hairer & Wanner's choice
                # for a first step: on a fast transient the extrapolation can lead Newton astray).
                self._ensure_jacobian(f, t, y0, force=True)
                self._cold_start = True
                try:
                    sol = attempt(f, t, h, y0, k1d, t_last, scale)
                finally:
                    self._cold_start = False
        if sol is None:
            self.counts["n_newton_fail"] += 1
            if self.adaptive_ctrl:
                # Reject with a scaled error of 1.8^k: the controller then halves the step
                # (0.9 * 1.8^-1 = 0.5), as Hairer & Wanner do after a Newton failure.
                k = self.method.error_order()
                err = (scale * (1.8**k)).view(shape)
                K = self.pack(k1d, torch.zeros_like(y0), k1d if self.fsal else None)
                return y.detach().clone(), err, K
            if _depth < _MAX_SUBDIVISIONS:
                # A fixed step cannot be rejected: take it as two half steps instead.
                return self._halves(f, t, h, y, k1, t_last, track_grad, _depth)
            warnings.warn(
                f"{self.method.name}: the Newton iteration did not converge in the fixed step "
                f"from t={t:.17g} with h={h:.3g} (max_iters={self.max_iters}), even split into "
                f"{2**_MAX_SUBDIVISIONS} substeps; the step is inaccurate. Use a smaller step "
                "size or an adaptive method such as 'kvaerno5' or 'rodas4'",
                RuntimeWarning,
                stacklevel=2 + _depth,
            )
            sol = self._last_attempt
        stages, max_rate, max_iters_used = sol
        # Slow convergence: recompute the Jacobian at the next step (Hairer & Wanner IV.8).
        if max_iters_used > 2 and max_rate > 1e-3:
            self._refresh = True
        if track_grad:
            return self._differentiable(f, t, h, y, k1, t_last, stages, shape)
        ks, y_new = stages["k"], stages["y_new"]
        err = None
        if self.b_err is not None:
            err = (h * (self.b_err @ ks)).view(shape)
        k_end = ks[-1] if self.fsal else None
        return y_new.view(shape), err, self.pack(k1d, (y_new - y0) / h, k_end, ks)

    def _halves(self, f, t, h, y, k1, t_last, track_grad, depth):
        """A fixed step whose Newton iteration failed, taken as two half steps (recursively).

        The rows of ``K`` describe the whole step (its end points and derivatives), so the
        dense output stays the cubic Hermite interpolant over the step; with a quartic dense
        output, the quartic through the midpoint state as well.
        """
        self.counts["n_substeps"] = self.counts.get("n_substeps", 0) + 1
        if depth == 0:
            warnings.warn(
                f"{self.method.name}: the Newton iteration did not converge in the fixed step "
                f"from t={t:.17g} with h={h:.3g}; it is taken in smaller substeps (counted in "
                "stats['n_substeps']). A smaller step size avoids this",
                RuntimeWarning,
                stacklevel=3,
            )
        t_mid = t + 0.5 * h
        y_mid, _, K1 = self.step(f, t, t_mid - t, y, k1, t_mid, track_grad, depth + 1)
        k_mid = K1[2] if K1.shape[0] > 2 else f.flat(t_mid, y_mid.reshape(-1))
        y_new, _, K2 = self.step(
            f, t_mid, t + h - t_mid, y_mid, k_mid.view(y.shape), t_last, track_grad, depth + 1
        )
        k_end = K2[2] if (self.fsal and K2.shape[0] > 2) else None
        yv = y.reshape(-1) if track_grad else y.reshape(-1).detach()
        slope = (y_new.reshape(-1) - yv) / h
        K = self.pack(k1.reshape(-1), slope, k_end)
        if self.quartic:
            # The quartic's bubble through y_mid: Hermite(1/2) + h d / 16 = y_mid.
            k0 = k1.reshape(-1)
            mid = (y_mid.reshape(-1) - yv) / h - 0.125 * k0 - 0.5 * slope + 0.125 * k_end
            K = torch.cat([K[:3], (16.0 * mid).unsqueeze(0)])
        return y_new, None, K

    def _update_eta(self, res) -> None:
        """Carry ``eta = theta / (1 - theta)`` to the next solve, raised to the power 0.8 so that
        a solve accepted after one iteration (rate unmeasured) makes the next one more
        cautious, until a second iteration measures the rate again (Hairer & Wanner IV.8)."""
        if res.iters >= 2 and res.rate < 1.0:
            # res.rate is the slowest rate of the solve (newton.newton), not its last one.
            eta = res.rate / (1.0 - res.rate)
        elif res.iters >= 2:
            eta = 1.0
        else:
            eta = self._eta
        self._eta = max(eta, self.eps) ** 0.8

    def _refresher(self, f, t_stage: float, key: float, last: bool = False):
        """For fixed steps: ``x -> solve`` with the Jacobian at the current stage iterate (the
        last stage's for a fully implicit method), i.e. Newton's method proper when the
        simplified iteration is too slow. The new Jacobian is kept for the following stages
        and steps."""

        def refresh(x):
            yj = (x[-1] if last else x).detach()
            self._ensure_jacobian(f, t_stage, yj, force=True)
            self._jac_at = None  # not at a step start: a failure still retries with one
            return self._solver(key).solve

        return refresh

    def _stage_time(self, t, h, t_last, ci):
        return t_last if ci == 1.0 else t + ci * h

    def _dirk(self, f, t, h, y0, k1d, t_last, scale):
        T = self.tableau
        s = T.n_stages
        ks, Ys = [None] * s, [None] * s
        rate, used = 0.0, 0
        norm = lambda dx: self._norm(dx, scale)  # noqa: E731
        comb = _combiner(y0, h, None)
        for i in range(s):
            if i == 0 and T.explicit_first_stage:
                ks[0], Ys[0] = k1d, y0
                continue
            g = h * T.a[i][i]
            e = y0 if i == 0 else comb(torch.stack(ks[:i], 1), self.a_rows[i])
            ti = self._stage_time(t, h, t_last, T.c[i])
            # Starting value: extrapolated stage derivatives; after a failure, the explicit part
            # alone (k_i = 0), which is safer in fast transients.
            guess = e if self._cold_start else e + g * self._predict(i, ks, k1d)
            solver = self._solver(g)

            def residual(Y, e=e, g=g, ti=ti):
                return e + g * f.flat(ti, Y) - Y

            res = newton(
                residual,
                solver.solve,
                guess,
                norm,
                self.kappa,
                self.max_iters,
                self._eta,
                early_exit=self.adaptive_ctrl,
                refresh=None if self.adaptive_ctrl else self._refresher(f, ti, g),
            )
            self.counts["n_newton"] += res.iters
            self._update_eta(res)
            ks[i] = (res.x - e) / g
            Ys[i] = res.x
            rate, used = max(rate, res.rate), max(used, res.iters)
            if not res.converged:
                self._last_attempt = self._finish_dirk(comb, y0, ks, Ys, rate, used)
                return None
        return self._finish_dirk(comb, y0, ks, Ys, rate, used)

    def _predict(self, i: int, ks, k1d):
        """Starting value of stage derivative ``k_i``: the polynomial (degree <= 2) through the
        first stage derivatives with distinct nodes, extrapolated to ``c_i`` -- for Kvaerno5
        the stage predictors of OrdinaryDiffEq.jl's implementation. ``f(t_n, y_n)`` serves as
        the node-0 value for methods without an explicit first stage."""
        T = self.tableau
        pts: list[tuple[float, torch.Tensor]] = []
        if not T.explicit_first_stage:
            pts.append((0.0, k1d))
        for j in range(i):
            if len(pts) == 3:
                break
            if all(abs(T.c[j] - cj) > 1e-12 for cj, _ in pts):
                pts.append((T.c[j], ks[j]))
        x = T.c[i]
        out = None
        for j, (cj, kj) in enumerate(pts):
            w = 1.0
            for m, (cm, _) in enumerate(pts):
                if m != j:
                    w *= (x - cm) / (cj - cm)
            out = kj * w if out is None else out + kj * w
        return out

    def _finish_dirk(self, comb, y0, ks, Ys, rate, used):
        """``comb(K, w) = y0 + h K w`` (one step size, or one per row: explicit_rk._combiner)."""
        s = self.tableau.n_stages
        ks = [k if k is not None else torch.zeros_like(y0) for k in ks]
        K = torch.stack(ks)
        if self.fsal:
            y_new = Ys[s - 1] if Ys[s - 1] is not None else y0
        else:
            y_new = comb(K.T, self.b)
        return dict(k=K, Y=Ys, y_new=y_new), rate, used

    def _firk(self, f, t, h, y0, k1d, t_last, scale):
        T = self.tableau
        s = T.n_stages
        ts = [self._stage_time(t, h, t_last, ci) for ci in T.c]
        c = torch.tensor(T.c, dtype=self.dtype, device=self.device)
        guess = y0 + (h * c)[:, None] * (torch.zeros_like(k1d) if self._cold_start else k1d)
        solver = self._solver(h)
        A = self.A
        norm = lambda dx: self._norm(dx, scale)  # noqa: E731

        def residual(Y):
            F = torch.stack([f.flat(ts[i], Y[i]) for i in range(s)])
            return y0 + h * (A @ F) - Y

        res = newton(
            residual,
            solver.solve,
            guess,
            norm,
            self.kappa,
            self.max_iters,
            self._eta,
            early_exit=self.adaptive_ctrl,
            refresh=None if self.adaptive_ctrl else self._refresher(f, ts[-1], h, last=True),
        )
        self.counts["n_newton"] += res.iters
        self._update_eta(res)
        out = self._finish_firk(h, y0, res.x), res.rate, res.iters
        if not res.converged:
            self._last_attempt = out
            return None
        return out

    def _finish_firk(self, h, y0, Y):
        K = (self.A_inv @ (Y - y0)) / h
        y_new = Y[-1] if self.fsal else torch.addmv(y0, K.T, self.b, alpha=h)
        return dict(k=K, Y=Y, y_new=y_new)
