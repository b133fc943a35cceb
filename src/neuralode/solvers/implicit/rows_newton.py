"""Per-row simplified Newton iterations of diagonally implicit steps under per-sample control.

See :mod:`.rows` for the design (block-diagonal Jacobians, each row its own step size, Jacobian
reuse and Newton tests per row, the same steps as each sample solved alone); here are the
iteration (:func:`newton_rows`), the rows' state (Jacobian blocks, factorisations, carried
rates) and the step (:func:`dirk_rows_step`).

References
----------
Hairer, Wanner. Solving Ordinary Differential Equations II, 2nd ed., 1996, sec. IV.8 (the
simplified Newton iteration, its stopping criteria, starting values and Jacobian reuse).
"""

from __future__ import annotations

import math

import torch

from ..explicit_rk import _combiner
from .rows import _on_live_rows, _per_component, _restricted, _RowsField, block_jacobian

__all__ = ["newton_rows", "dirk_rows_step"]


# ---------------------------------------------------------------------------- Newton per row
def newton_rows(residual, solve, x0, norm, kappa: float, max_iters: int, eta0, active):
    """Simplified Newton iterations on the rows ``active`` of ``x0`` ``(n, M)``, each row on its own.

    The tests are those of :func:`neuralode.solvers.implicit.newton.newton` (adaptive steps:
    give up early), applied per row: ``theta = ||dx_k|| / ||dx_{k-1}||`` (scaled RMS norm of the
    row); stop when ``theta / (1 - theta) ||dx_k|| <= kappa`` (first iteration: the row's
    carried ``eta0`` ``(n,)``), give up when ``theta >= 0.99``, the norm is not finite, or at the observed
    rate the tolerance is out of reach within ``max_iters``. ``residual(idx, x)`` and
    ``solve(idx, r)`` act on the rows ``idx`` (``solve`` returns NaN rows for a singular
    matrix); ``norm(idx, dx)`` gives ``(len(idx),)`` float64.

    Returns ``(x, converged, iters, rate)``, each per row (rows not active: unchanged, not
    converged, zero iterations).
    """
    n = x0.shape[0]
    f64 = dict(dtype=torch.float64, device=x0.device)
    x = x0.clone()
    prev = torch.full((n,), math.nan, **f64)
    theta = torch.full((n,), math.nan, **f64)
    eta = eta0.clone()
    conv = torch.zeros(n, dtype=torch.bool, device=x0.device)
    iters = torch.zeros(n, dtype=torch.long, device=x0.device)
    rate = torch.ones(n, **f64)
    worst = torch.zeros(n, **f64)  # the slowest rate measured per row (see newton.newton)
    run = active.clone()
    for k in range(max_iters):
        idx = run.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        xa = x[idx]
        dx = solve(idx, residual(idx, xa))
        xn = xa + dx
        dn = norm(idx, dx)
        iters[idx] = k + 1
        pv = prev[idx]
        has = ~torch.isnan(pv)
        th = torch.where(has, torch.where(pv > 0, dn / pv, torch.zeros_like(dn)), theta[idx])
        bad = ~torch.isfinite(dn)
        div = has & ~bad & (th >= 0.99)
        eta_a = torch.where(has & ~div, th / (1.0 - th), eta[idx])
        remaining = max_iters - 1 - k
        slow = has & ~bad & ~div & (remaining > 0) & (th**remaining / (1.0 - th) * dn > kappa)
        quit_ = bad | div | slow
        ok = ~quit_ & ((dn == 0) | (eta_a * dn <= kappa))
        x[idx] = torch.where(slow.unsqueeze(1), xa, xn)
        theta[idx], eta[idx], prev[idx] = th, eta_a, dn
        conv[idx] = ok
        wa = torch.where(has, torch.maximum(worst[idx], th), worst[idx])
        worst[idx] = wa
        # The rate reported: the slowest measured one (the last one if the row failed);
        # unmeasured, 0 if converged, else 1.
        unmeasured = torch.where(ok, 0.0, 1.0).to(torch.float64)
        last = torch.where(ok, wa, torch.maximum(wa, th))
        rate[idx] = torch.where(bad, math.inf, torch.where(torch.isnan(th), unmeasured, last))
        run[idx] = ~(quit_ | ok)
    return x, conv, iters, rate


# ---------------------------------------------------------------------------- diagonally implicit
class _DIRKRows:
    """Per-row state of the working set's Newton iterations: each row's Jacobian block and the
    point it was computed at, its refresh flag and carried rate ``eta``, its factorised
    iteration matrix and the ``h gamma`` it was factorised for, its tolerances."""

    def __init__(self, A: int, M: int, dtype, device, tol):
        f64 = dict(dtype=torch.float64, device=device)
        self.A = A
        self.has = torch.zeros(A, dtype=torch.bool, device=device)
        self.refresh = torch.zeros(A, dtype=torch.bool, device=device)
        self.jt = torch.full((A,), math.nan, **f64)
        self.jy = torch.zeros((A, M), dtype=dtype, device=device)
        self.J = torch.zeros((A, M, M), dtype=dtype, device=device)
        self.eta = torch.ones(A, **f64)
        self.lu_g = torch.full((A,), math.nan, **f64)
        self.LU = torch.zeros((A, M, M), dtype=dtype, device=device)
        self.piv = torch.ones((A, M), dtype=torch.int32, device=device)
        self.lu_ok = torch.zeros(A, dtype=torch.bool, device=device)
        self.rtol, self.atol = tol

    _ROWWISE = ("has", "refresh", "jt", "jy", "J", "eta", "lu_g", "LU", "piv", "lu_ok")

    def take(self, keep) -> None:
        self.A = keep.shape[0]
        for name in self._ROWWISE:
            setattr(self, name, getattr(self, name)[keep])
        self.rtol, self.atol = (v[keep] if isinstance(v, torch.Tensor) else v
                                for v in (self.rtol, self.atol))  # fmt: skip

    def tol(self, rows):
        return tuple(v[rows] if isinstance(v, torch.Tensor) else v for v in (self.rtol, self.atol))

    def ensure(self, f, rows, sub, t, y0, force: bool, counts: dict) -> None:
        """Blocks current at the step start ``(t, y0)`` for the rows that need one: forced
        (a failed iteration), none yet, or flagged for refresh (slow convergence)."""
        cur = self.has[rows] & (self.jt[rows] == t) & (self.jy[rows] == y0).all(1)
        need = ~cur & (~self.has[rows] | self.refresh[rows] | force)
        k = int(need.sum())
        if not k:
            return
        q = need.nonzero().squeeze(1)
        r = rows[q]
        with torch.no_grad():
            self.J[r] = block_jacobian(f, t[q], y0[q], q if sub is None else sub[q])
        counts["n_jac"] += k
        self.jt[r], self.jy[r] = t[q], y0[q]
        self.has[r], self.refresh[r] = True, False
        self.eta[r] = 1.0  # a new iteration matrix: measure its rate before trusting it
        self.lu_g[r] = math.nan

    def factorise(self, rows, g, active, counts: dict) -> None:
        """Iteration matrices ``I - g_b J_b`` for the active rows whose ``g_b`` or block changed
        (the same rule as the shared stepper: equal to 1e-12 relative is the same matrix)."""
        same = (self.lu_g[rows] - g).abs() <= 1e-12 * g.abs()
        need = active & ~same
        k = int(need.sum())
        if not k:
            return
        q = need.nonzero().squeeze(1)
        r = rows[q]
        Mq = self.J[r] * (-g[q]).to(self.J.dtype).view(-1, 1, 1)
        Mq.diagonal(dim1=-2, dim2=-1).add_(1.0)
        LU, piv, info = torch.linalg.lu_factor_ex(Mq)
        ok = (info == 0) & torch.isfinite(LU).flatten(1).all(1)
        self.LU[r], self.piv[r], self.lu_ok[r], self.lu_g[r] = LU, piv, ok, g[q]
        counts["n_lu"] += k

    def solve(self, r, rhs, adjoint: bool = False):
        """``(I - g_b J_b)^-1 rhs_b`` for rows ``r`` (``^-H`` with ``adjoint``); NaN rows where
        the matrix is singular (the iteration then fails)."""
        x = torch.linalg.lu_solve(self.LU[r], self.piv[r], rhs.unsqueeze(-1), adjoint=adjoint)
        return torch.where(self.lu_ok[r].unsqueeze(1), x.squeeze(-1), math.nan)

    def update_eta(self, rows, active, iters, rate, eps: float) -> None:
        """The shared stepper's ``_update_eta`` per active row: ``max(eta, eps)^0.8``."""
        measured = iters >= 2
        eta = torch.where(measured & (rate < 1.0), rate / (1.0 - rate), self.eta[rows])
        eta = torch.where(measured & (rate >= 1.0), 1.0, eta)
        self.eta[rows] = torch.where(active, torch.clamp(eta, min=eps) ** 0.8, self.eta[rows])


def _attempt(st, state, f, rows, sub, t, h, t_last, y0, k1d, scale, active, cold: bool):
    """The stages of the active rows (``y0`` ``(n, M)``); returns the stage derivatives and
    values, the new state, and per row: converged, worst rate, most iterations."""
    T, s = st.tableau, st.tableau.n_stages
    n, M = y0.shape
    clamp = max(T.c) <= 1.0  # kvaerno5's node 1.23: evaluated past the step as when shared
    comb = _combiner(y0.reshape(-1), h, (n, M))
    ks, Ys = [None] * s, [None] * s
    ok = active.clone()
    rate = torch.zeros(n, dtype=torch.float64, device=y0.device)
    used = torch.zeros(n, dtype=torch.long, device=y0.device)
    for i in range(s):
        if i == 0 and T.explicit_first_stage:
            ks[0], Ys[0] = k1d, y0
            continue
        g = h * T.a[i][i]
        gv = g.to(y0.dtype).unsqueeze(1)
        e = y0 if i == 0 else comb(torch.stack([k.reshape(-1) for k in ks[:i]], 1), st.a_rows[i])
        e = e.view(n, M)
        ti = st._stage_time(t, h, t_last, T.c[i])
        guess = e if cold else e + gv * st._predict(i, ks, k1d)
        state.factorise(rows, g, ok, st.counts)

        def residual(idx, Y, e=e, gv=gv, ti=ti):
            call = _restricted(f, idx if sub is None else sub[idx], count=True, clamp=clamp)
            return e[idx] + gv[idx] * call(ti[idx], Y) - Y

        def norm(idx, dx):
            return (torch.linalg.vector_norm(dx / scale[idx], dim=1) / math.sqrt(M)).double()

        x, conv, iters, rt = newton_rows(
            residual, lambda idx, r: state.solve(rows[idx], r), guess, norm, st.kappa,
            st.max_iters, state.eta[rows], ok,
        )  # fmt: skip
        st.counts["n_newton"] += int(iters.sum())
        state.update_eta(rows, ok, iters, rt, st.eps)
        ks[i], Ys[i] = (x - e) / gv, x
        rate = torch.where(ok, torch.maximum(rate, rt), rate)
        used = torch.where(ok, torch.maximum(used, iters), used)
        ok = ok & conv
    ks = [k if k is not None else torch.zeros_like(y0) for k in ks]
    res, _, _ = st._finish_dirk(comb, y0.reshape(-1), [k.reshape(-1) for k in ks],
                                [Y.reshape(-1) for Y in Ys], 0, 0)  # fmt: skip
    return ks, Ys, res["y_new"].view(n, M), ok, rate, used


def _merge(mask, new, old):
    m = mask.unsqueeze(1)
    if isinstance(new, list):
        return [torch.where(m, a, b) for a, b in zip(new, old)]
    return torch.where(m, new, old) if new.dim() == 2 else torch.where(mask, new, old)


def dirk_rows_step(st, f, t, h, y, k1, t_last, track_grad: bool):
    """One diagonally implicit step per row (``h``, ``t``, ``t_last`` ``(A,)``): per-row
    Jacobian blocks and Newton iterations, batched factorisations; ``Direct`` gradients by the
    implicit function theorem (the shared stepper's rebuild, preconditioned per row)."""
    track_grad = track_grad and (y.requires_grad or k1.requires_grad)
    A, M = y.shape
    state = st._rows
    if state is None or state.A != A:
        state = st._rows = _DIRKRows(A, M, y.dtype, y.device, st._rows_tol)
    tiny = torch.finfo(y.real.dtype if y.is_complex() else y.dtype).tiny

    def step(rows, sub):
        tr, hr, tl, yr, kr = (v if sub is None else v[sub] for v in (t, h, t_last, y, k1))
        n = yr.shape[0]
        y0, k1d = yr.detach(), kr.detach()
        rtol, atol = state.tol(rows)
        scale = torch.clamp(y0.abs() * rtol + atol, min=tiny)
        state.ensure(f, rows, sub, tr, y0, False, st.counts)
        args = (st, state, f, rows, sub, tr, hr, tl, y0, k1d, scale)
        with torch.no_grad():
            ks, Ys, y_new, ok, rate, used = _attempt(*args, torch.ones_like(hr, dtype=torch.bool),
                                                     False)  # fmt: skip
            if not bool(ok.all()):
                # Retry the failed rows once: blocks at their step start, cold starting values.
                q = (~ok).nonzero().squeeze(1)
                state.ensure(f, rows[q], q if sub is None else sub[q], tr[q], y0[q], True,
                             st.counts)  # fmt: skip
                ks2, Ys2, y2, ok2, rate2, used2 = _attempt(*args, ~ok, True)
                again = ~ok
                ks, Ys = _merge(again, ks2, ks), _merge(again, Ys2, Ys)
                y_new, rate, used = (
                    _merge(again, y2, y_new),
                    _merge(again, rate2, rate),
                    _merge(again, used2, used),
                )
                ok = ok | ok2
        failed = ~ok
        st.counts["n_newton_fail"] += int(failed.sum())
        state.refresh[rows] |= ok & (used > 2) & (rate > 1e-3)
        comb = _combiner(yr.reshape(-1), hr, (n, M))
        hv = comb.hv
        yv, k1v = (
            (yr.reshape(-1), kr.reshape(-1)) if track_grad else (y0.reshape(-1), k1d.reshape(-1))
        )
        K = torch.stack([k.reshape(-1) for k in ks])
        if track_grad:
            Ystars = [None if Y is None else torch.where(failed.unsqueeze(1), y0, Y).reshape(-1)
                      for Y in Ys]  # fmt: skip
            gs = [_per_component(hr * st.tableau.a[i][i], (n, M), y0.dtype) for i in range(len(Ys))]

            def precond(i):
                # The rows' factorisations now: the working set may be compacted before the
                # backward pass runs.
                state.factorise(rows, hr * st.tableau.a[i][i], ok, st.counts)
                LU, piv, good = state.LU[rows], state.piv[rows], state.lu_ok[rows].unsqueeze(1)

                def apply(v):
                    r = v.view(n, M)
                    x = torch.linalg.lu_solve(LU, piv, r.unsqueeze(-1), adjoint=True).squeeze(-1)
                    return torch.where(good, x, r).reshape(-1)  # singular rows: identity

                return apply

            clamp = max(st.tableau.c) <= 1.0
            g_un = _restricted(f, sub, count=False, clamp=clamp)
            K, y_flat = st._dirk_graph(
                _RowsField(f, sub, clamp).flat, lambda ti, X: g_un(ti, X.view(n, M)).reshape(-1),
                precond, tr, hr, gs, yv, k1v, tl, Ystars, comb,
            )  # fmt: skip
            y_new = y_flat.view(n, M)
        err = None
        if st.b_err is not None:
            err = (hv * (st.b_err @ K.detach())).view(n, M)
        slope = (y_new.reshape(-1) - yv) / hv
        k_end = K[-1] if st.fsal else None
        Kout = st.pack(k1v, slope, k_end, K).view(-1, n, M)
        if bool(failed.any()):
            # Rejected with a scaled error of 1.8^k: the controller halves the step (Hairer &
            # Wanner after a Newton failure); the state stays, the slope is zero.
            k = st.method.error_order()
            fm = failed.unsqueeze(1)
            err = torch.where(fm, scale * (1.8**k), err)
            y_new = torch.where(fm, yr, y_new)
            zero = torch.zeros_like(yr)
            rows_K = [kr, zero] + ([kr] if st.fsal else []) + ([zero] if st.quartic else [])
            Kout = torch.stack([torch.where(fm, a, b) for a, b in zip(rows_K, Kout)])
        return y_new, err, Kout.reshape(Kout.shape[0], -1)

    return _on_live_rows(step, f, t, h, y, k1, st.S)
