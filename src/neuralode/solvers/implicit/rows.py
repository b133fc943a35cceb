"""Per-sample control (``batch_control="per_sample"``) for Rosenbrock and diagonally implicit steps.

Under per-sample control every row ``b`` of the flat state ``(A, M)`` is its own ODE with its own
step size ``h_b`` (:mod:`neuralode._loop_batched`). The Jacobian of the batch is then block
diagonal, one ``M x M`` block ``J_b = df_b/dy_b`` per row, and every linear system of a step
splits into ``A`` independent ones: the iteration matrices ``I - h_b gamma J_b`` (Rosenbrock:
``I / (h_b gamma) - J_b``) are factorised as one ``(A, M, M)`` stack (``torch.linalg.lu_factor``)
and solved batched. The blocks come from ``M`` vector-Jacobian products of the batched func
(one per component, each giving that row of every block; vectorised with
``is_grads_batched`` past ``M = 32``), so a Jacobian costs the same as for one sample.

The stage formulas are the shared steppers' own (:meth:`RosenbrockStepper.stages
<neuralode.solvers.implicit.rosenbrock.RosenbrockStepper.stages>`; the tableau rows, stage
predictors and the implicit-function-theorem rebuild of :class:`ImplicitRKStepper
<neuralode.solvers.implicit.irk.ImplicitRKStepper>`); what is here is per row:

- the Jacobian blocks and their reuse. Rosenbrock: a row that retries from the same point (a
  rejected step) keeps its block. Diagonally implicit methods: Hairer & Wanner's policy of the
  shared stepper, applied to each row on its own -- a row keeps its (old) block until its Newton
  iteration converged slowly (rate above 1e-3 after more than two iterations) or failed; its
  iteration matrix is refactorised when its block or its ``h_b gamma`` changes;
- the simplified Newton iteration (:func:`.rows_newton.newton_rows`): the convergence tests of
  :func:`neuralode.solvers.implicit.newton.newton` on each row's scaled RMS norm, rows leaving
  the iteration as they converge or fail; a row that fails is retried once with a fresh block at
  its step start and unextrapolated starting values, and if it fails again its step is rejected
  (scaled error ``1.8^k``, so the controller halves it) -- the shared stepper's rules;
- the stage times: clamped into each sample's interval (against rounding in ``t + c h``) except
  for ``kvaerno5``, whose node ``c = 1.23`` is evaluated past the step end (on a sample's last
  step past its final time) as with shared control: clamping it would change the method;
- the rows with a zero step (samples that finished, kept in the working set until the next
  compaction) take no Jacobian, factorisation or stage evaluation.

A sample therefore takes the same steps, with the same Jacobian evaluations and values (to
rounding), as when it is solved alone with shared control. ``stats["n_jac"]`` and
``stats["n_lu"]`` count row blocks (the sum over samples of what each would count alone);
``n_newton`` counts row-iterations.

Gradients: Rosenbrock steps are explicit formulas (autograd through them, including the
dependence of the blocks on the state and parameters: ``Direct``, ``Checkpointed``); the
diagonally implicit stages are attached by the implicit function theorem to one differentiable
evaluation of their stage equations (``Direct``), as in the shared stepper, with the adjoint
systems preconditioned by the rows' factorisations.

References
----------
Hairer, Wanner. Solving Ordinary Differential Equations II, 2nd ed., 1996, sec. IV.7
(Rosenbrock methods) and IV.8 (simplified Newton iterations, their stopping criteria and
Jacobian reuse).
"""

from __future__ import annotations

import copy
import math

import torch

from .linalg import LUSolve, _Reattach

__all__ = ["block_jacobian", "rosenbrock_rows_step", "check_per_sample"]

# Past this many components per row the M vector-Jacobian products are vectorised.
_LOOP_MAX = 32


def _restricted(f, idx, count: bool, clamp: bool = True):
    """``f`` for the rows ``idx`` of its current rows (their intervals, for the clamping of stage
    times; ``clamp=False``: none, for methods with nodes past 1); a copy whose counters are
    discarded unless ``count``."""
    g = f if count else copy.copy(f)
    lo, hi = f.lo, f.hi
    if not clamp:
        lo = hi = None
    elif idx is not None and lo is not None:
        lo, hi = lo[idx], hi[idx]

    def call(t, y):
        saved = g.lo, g.hi
        g.lo, g.hi = lo, hi
        try:
            return g(t, y)
        finally:
            g.lo, g.hi = saved

    return call


def block_jacobian(f, t, y, idx=None, *, with_t: bool = False, create_graph: bool = False):
    """The blocks ``J_b = df_b/dy_b`` ``(n, M, M)`` of rows ``y`` ``(n, M)`` at times ``t`` (n,)
    (and ``df_b/dt_b`` ``(n, M)`` with ``with_t``), for a batched field ``f`` whose rows are
    independent. ``idx`` selects the rows of ``f``'s current intervals. With ``create_graph`` the
    blocks are differentiable in ``y`` and func's parameters (double backward). Evaluations of
    func made here are not counted as NFE."""
    n, M = y.shape
    g = _restricted(f, idx, count=False)
    yl = y.detach().requires_grad_()
    tl = t.detach().to(torch.float64).clone().requires_grad_(with_t)
    with torch.enable_grad():
        out = g(tl, yl)
    if not out.requires_grad:  # func hides its dependence on the state: forward differences
        return _block_fd(g, tl.detach(), y.detach(), out.detach(), with_t)
    inputs = [yl, tl] if with_t else [yl]
    grads = None
    if M > _LOOP_MAX:
        E = torch.eye(M, dtype=out.dtype, device=out.device).unsqueeze(1).expand(M, n, M)
        try:
            with torch.enable_grad():
                grads = torch.autograd.grad(
                    out, inputs, E, retain_graph=True, create_graph=create_graph,
                    allow_unused=True, is_grads_batched=True,
                )  # fmt: skip
            grads = [None if q is None else q.movedim(0, 1) for q in grads]  # (n, M, ...)
        except Exception:  # e.g. operations vmap cannot batch: one product per component
            grads = None
    if grads is None:
        rows_y, rows_t = [], []
        with torch.enable_grad():
            for i in range(M):
                e = torch.zeros_like(out)
                e[:, i] = 1
                q = torch.autograd.grad(
                    out, inputs, e, retain_graph=True, create_graph=create_graph,
                    allow_unused=True,
                )  # fmt: skip
                rows_y.append(q[0] if q[0] is not None else torch.zeros_like(yl))
                if with_t:
                    rows_t.append(q[1] if q[1] is not None else torch.zeros_like(tl))
        grads = [torch.stack(rows_y, 1), torch.stack(rows_t, 1) if with_t else None]
    J = grads[0] if grads[0] is not None else torch.zeros(n, M, M, dtype=y.dtype, device=y.device)
    ft = None
    if with_t:
        ft = grads[1] if grads[1] is not None else torch.zeros(n, M, dtype=torch.float64)
        ft = ft.to(device=y.device, dtype=y.dtype)
    if J.is_complex():  # autograd's products of a holomorphic function are conjugated
        J = J.conj()
        ft = ft.conj() if ft is not None else None
    outs = (J,) if ft is None else (J, ft)
    if not create_graph:
        outs = tuple(o.detach() for o in outs)
    elif y.requires_grad:
        outs = _Reattach.apply(y, yl, *outs)
    return outs if with_t else outs[0]


def _block_fd(g, t, y, f0, with_t):
    """Forward differences, one evaluation per component (every row at once), no graph."""
    real = y.real if y.is_complex() else y
    eps = torch.finfo(real.dtype).eps
    cols = []
    with torch.no_grad():
        for j in range(y.shape[1]):
            d = math.sqrt(eps) * torch.clamp(real[:, j].abs(), min=1.0)
            yp = y.clone()
            yp[:, j] += d
            cols.append((g(t, yp) - f0) / d.unsqueeze(1))
        J = torch.stack(cols, 2)
        if not with_t:
            return J
        dt = math.sqrt(eps) * torch.clamp(t.abs(), min=1.0)
        ft = (g(t + dt, y) - f0) / dt.to(y.dtype).unsqueeze(1)
    return J, ft


def _on_live_rows(step, f, t, h, y, k1, S: int):
    """Run ``step(rows, sub)`` on the rows with a non-zero step and assemble the full
    ``(y_new, err, K)``: finished rows (zero steps) keep their state, error 0, stages ``k1``/0.
    ``rows`` indexes the working set (the per-row state of the stepper); ``sub`` the same rows
    of the step's inputs (None: all of them, in order)."""
    A, M = y.shape
    live = h != 0
    n = int(live.sum())
    if n == A:
        return step(torch.arange(A, device=y.device), None)
    sub = live.nonzero().squeeze(1)
    if n:
        ys, es, Ks = step(sub, sub)
        S = Ks.shape[0]
    K = torch.cat([k1.reshape(1, A, M), torch.zeros((S - 1, A, M), dtype=y.dtype, device=y.device)])
    if not n:
        return y, torch.zeros_like(y), K.view(S, -1)
    y_new = y.index_copy(0, sub, ys)
    err = torch.zeros_like(y).index_copy(0, sub, es)
    K = K.index_copy(1, sub, Ks.view(S, n, M))
    return y_new, err, K.view(S, -1)


def _per_component(h, shape, dtype):
    """Row step sizes ``(n,)`` laid out per component of the flat state ``(n*M,)``."""
    return h.to(dtype).unsqueeze(1).expand(shape).reshape(-1)


# ---------------------------------------------------------------------------- Rosenbrock
class _RowJacobians:
    """Blocks and ``df/dt`` of the working set's rows, kept while a row retries from its point."""

    def __init__(self, A: int):
        self.A, self.t, self.y, self.J, self.ft, self.track = A, None, None, None, None, None

    def take(self, keep) -> None:
        self.A = keep.shape[0]
        if self.t is not None:
            self.t, self.y, self.J, self.ft = (v[keep] for v in (self.t, self.y, self.J, self.ft))

    def get(self, f, rows, sub, t, y, track: bool, counts: dict):
        yd = y.detach()
        if self.t is None or self.track != track:
            need = torch.ones(rows.shape[0], dtype=torch.bool, device=y.device)
        else:
            need = ~((self.t[rows] == t) & (self.y[rows] == yd).all(1))
        k = int(need.sum())
        if k:
            q = need.nonzero().squeeze(1)
            fi = q if sub is None else sub[q]  # rows of f's current intervals
            with torch.set_grad_enabled(track):
                J, ft = block_jacobian(f, t[q], y[q], fi, with_t=True, create_graph=track)
            counts["n_jac"] += k
            if k == self.A:  # every row anew: no chain of graphs through earlier caches
                self.t, self.y, self.J, self.ft, self.track = t, yd, J, ft, track
                return J, ft
            if self.t is None or self.track != track:
                A, M = self.A, y.shape[1]
                self.t = torch.full((A,), math.nan, dtype=torch.float64, device=y.device)
                self.y = torch.zeros((A, M), dtype=y.dtype, device=y.device)
                self.J = torch.zeros((A, M, M), dtype=J.dtype, device=y.device)
                self.ft = torch.zeros((A, M), dtype=ft.dtype, device=y.device)
                self.track = track
            r = rows[q]
            self.t, self.y = self.t.index_copy(0, r, t[q]), self.y.index_copy(0, r, yd[q])
            self.J, self.ft = self.J.index_copy(0, r, J), self.ft.index_copy(0, r, ft)
        return self.J[rows], self.ft[rows]


def rosenbrock_rows_step(st, f, t, h, y, k1, t_last, track_grad: bool):
    """One Rosenbrock step per row (``h``, ``t``, ``t_last`` ``(A,)``): block Jacobians, one
    batched factorisation of ``I / (h_b gamma) - J_b``, the shared stage formulas."""
    track_grad = track_grad and (y.requires_grad or k1.requires_grad)
    if not track_grad:
        y, k1 = y.detach(), k1.detach()
    if st._rows is None or st._rows.A != y.shape[0]:
        st._rows = _RowJacobians(y.shape[0])
    cache = st._rows

    def step(rows, sub):
        tr, hr, yr, kr = (v if sub is None else v[sub] for v in (t, h, y, k1))
        tl = t_last if sub is None else t_last[sub]
        n, M = yr.shape
        J, ft = cache.get(f, rows, sub, tr, yr, track_grad, st.counts)
        W = J * -1.0
        W.diagonal(dim1=-2, dim2=-1).add_((1.0 / (hr * st.gamma)).to(W.dtype).unsqueeze(1))
        LU, piv = torch.linalg.lu_factor(W.detach())
        st.counts["n_lu"] += n

        def solve(rhs):
            r = rhs.view(n, M)
            if track_grad:
                return LUSolve.apply(W, r, LU, piv).reshape(-1)
            return torch.linalg.lu_solve(LU, piv, r.unsqueeze(-1)).reshape(-1)

        fr = _RowsField(f, sub)
        hv = _per_component(hr, (n, M), yr.dtype)
        return st.stages(fr, tr, hr, hv, yr.reshape(-1), kr.reshape(-1), tl, ft.reshape(-1),
                         solve, track_grad, yr.shape)  # fmt: skip

    return _on_live_rows(step, f, t, h, y, k1, st.S)


class _RowsField:
    """``f.flat`` on a subset of the working set's rows (counted; their intervals)."""

    def __init__(self, f, sub, clamp: bool = True):
        self.f, self.call = f, _restricted(f, sub, count=True, clamp=clamp)

    def flat(self, t, y):
        return self.call(t, y.view(t.shape[0], -1)).reshape(-1)

    def rows(self, t, y):
        return self.call(t, y)


def check_per_sample(method, ctrl, gradient) -> None:
    """Raise ValueError, naming the method and why, for what per-sample control does not run:
    fully implicit and matrix-free methods, Newton methods on fixed steps, Newton methods with
    checkpointed gradients, backsolve adjoints whose backward solver is not an explicit
    Runge--Kutta method, and methods of other kinds (Adams)."""
    from ...gradients.adjoint import Backsolve
    from .. import get_tableau
    from ..tableau import ButcherTableau
    from .irk import ImplicitRK
    from .rosenbrock import Rosenbrock

    opt = "batch_control='per_sample'"
    name = getattr(method, "name", type(method).__name__)
    shared = f"or batch_control='shared' for {name!r}"
    if isinstance(gradient, Backsolve):
        back = method if gradient.solver is None else get_tableau(gradient.solver)
        if not isinstance(back, ButcherTableau):
            raise ValueError(
                f"{opt} with Backsolve integrates the adjoint system backward per sample with an "
                f"explicit Runge-Kutta method (its parameter integral uses the stage weights), "
                f"got backward solver {getattr(back, 'name', back)!r}; pass one "
                "(Backsolve(solver='dopri5')), or use gradient='direct'"
            )
    if isinstance(method, (ButcherTableau, Rosenbrock)):
        return
    if not isinstance(method, ImplicitRK):
        raise ValueError(
            f"{opt} does not run solver {name!r}: only explicit Runge-Kutta, Rosenbrock "
            "('rodas4') and adaptive diagonally implicit methods ('kvaerno5', 'trbdf2') take one "
            "step size per sample (a multistep method keeps one history of past steps for the "
            f"whole batch); use one of those, {shared}"
        )
    if not method.tableau.diagonally_implicit:
        raise ValueError(
            f"{opt} does not run the fully implicit method {name!r} (its Newton system couples "
            "all stages: per sample an s*M-dimensional complex-split system that is not "
            f"implemented per row); use 'kvaerno5', 'trbdf2' or 'rodas4', {shared}"
        )
    if method.linear_solver != "dense":
        raise ValueError(
            f"{opt} runs {name!r} with linear_solver='dense' only (per-row Jacobian blocks and "
            f"batched factorisations), got linear_solver={method.linear_solver!r}; use "
            f"linear_solver='dense', {shared}"
        )
    if not ctrl.adaptive:
        raise ValueError(
            f"{opt} runs Newton-based methods on adaptive steps only: a fixed step whose Newton "
            f"iteration fails cannot be rejected (the shared driver splits it); got {name!r} with "
            f"{type(ctrl).__name__}. Use an adaptive method ('kvaerno5', 'trbdf2') with a "
            f"PIController, 'rodas4' (no Newton iteration) for fixed steps, {shared}"
        )
    if not (getattr(type(gradient), "exact_autograd", False) or isinstance(gradient, Backsolve)):
        raise ValueError(
            f"{opt} with the Newton-based method {name!r} does not support "
            f"gradient={type(gradient).__name__}(...): a replay of its steps would redo the "
            "Newton iterations with another history of Jacobians (not the forward's values); "
            f"use 'direct', Backsolve(solver='dopri5'), or 'rodas4', {shared}"
        )
