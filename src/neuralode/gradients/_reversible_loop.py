"""The forward loop of the reversible Runge--Kutta scheme (McCallum & Foster 2024) and its
one step, forward and inverted; :mod:`neuralode.gradients.reversible` differentiates it."""

from __future__ import annotations

import math
import warnings

import torch

from .._failures import stops_here
from .._loop import LoopResult, _all_finite, _gather_outputs, _start_outputs, _values_at
from .._norms import ErrorNorm, initial_norm, user_scaled_norm
from ..controllers.base import stuck_error
from ..controllers.step_size import time_beside
from ..errors import NonFiniteError
from ..solvers.explicit_rk import RKStepper
from ..solvers.tableau import ButcherTableau
from ._common import Run

__all__ = ["Scheme", "integrate_reversible", "gap_norm", "anchor_interval"]

_EPS64 = 2.220446049250313e-16
_ENGINE = "reversible solve"  # named in the engine's failure messages

# The inverse step divides by the coupling, so a reconstruction error (rounding) in a slowly
# varying mode grows by about 1 / lam per step walked back (lam / R(h mu)**2 in general; R ~ 1
# for slow modes). The forward pass stores an anchor pair every anchor_interval(lam) steps, so
# that this growth stays below _ANCHOR_GROWTH between two exactly known pairs: at lam = 0.999
# every 9,205 steps (most solves store none), at 0.9 every 87, at 0.5 every 13.
_ANCHOR_GROWTH = 1e4


def anchor_interval(lam: float) -> int | None:
    """Steps between two anchor pairs: the largest ``K`` with ``lam**-K <= 1e4`` (None when
    ``lam = 1``: no growth)."""
    if lam >= 1.0:
        return None
    return max(1, int(math.log(_ANCHOR_GROWTH) / -math.log(lam)))


# ---------------------------------------------------------------------------- one step
class Scheme:
    """The reversible step for one solve: the tableau's stages, the coupling, and a stage
    buffer reused by every graph-free increment (a fresh stage matrix per increment costs more
    than the arithmetic for small fields).

    ``increment(t, h, t_first, t_last, x)`` is ``Psi``, the increment of one step of the tableau
    from ``(t, x)`` over ``h`` (``x`` flat ``(B, M)``; ``h`` may be negative); ``t_first`` and
    ``t_last`` are the times of the stages at the step's two ends (one-sided limits at a
    discontinuity). With ``err`` it also returns the embedded error estimate. An FSAL tableau's
    last stage (f at the new state) only serves the error estimate: it is skipped when none is
    wanted. Under grad mode the stages are stacked (a graph); otherwise they are written into the
    buffer (the result is a fresh tensor either way).
    """

    def __init__(self, tab: ButcherTableau, f, lam: float, like: torch.Tensor):
        st = RKStepper(tab, like.dtype, like.device)
        self.f, self.lam = f, lam
        self.rows, self.c = st.rows, st.c
        self.b_err = st.b_err
        self.S = st.S
        self.S_plain = st.S - 1 if (st.fsal and tab.b[-1] == 0.0) else st.S
        self.b = {n: st.T["b"][:n] for n in {self.S, self.S_plain}}
        self.K: torch.Tensor | None = None

    def _buffers(self, xv):
        K = self.K
        if K is None or K.shape[1] != xv.numel() or K.dtype != xv.dtype:
            K = self.K = torch.empty((self.S, xv.numel()), dtype=xv.dtype, device=xv.device)
            self.prefix = [K[:i].T for i in range(self.S + 1)]
            shape = getattr(self.f, "_shape", None)
            self.krows = list(K)
            self.kshaped = [r.view(shape) for r in K] if shape is not None else [None] * self.S
        return K

    def increment(self, t: float, h: float, t_first: float, t_last: float, x, err=False):
        shape, f, rows, c = x.shape, self.f, self.rows, self.c
        xv = x.reshape(-1)
        S = self.S if err else self.S_plain
        if torch.is_grad_enabled():
            ks = [f.flat(t_first, xv)]
            for i in range(1, S):
                xi = torch.addmv(xv, torch.stack(ks).T, rows[i], alpha=h)
                ks.append(f.flat(t_last if c[i] == 1.0 else t + c[i] * h, xi))
            K = torch.stack(ks).T  # (N, S), laid out as the buffer's (bitwise the same sums)
        else:
            self._buffers(xv)
            krows, kshaped, prefix = self.krows, self.kshaped, self.prefix
            f.into(t_first, xv, kshaped[0], krows[0])
            for i in range(1, S):
                xi = torch.addmv(xv, prefix[i], rows[i], alpha=h)
                f.into(t_last if c[i] == 1.0 else t + c[i] * h, xi, kshaped[i], krows[i])
            K = prefix[S]
        inc = torch.mv(K, self.b[S]).mul_(h).view(shape)
        if not err:
            return inc, None
        return inc, torch.mv(K.detach(), self.b_err).mul_(h).view(shape)

    def forward_half(self, t, t_new, t_first, t_last, y, z, err=False):
        """``y_{n+1} = lam y_n + (1 - lam) z_n + Psi(t_n, z_n, h)``; returns ``(y_{n+1}, Psi,
        error estimate)``."""
        F, e = self.increment(t, t_new - t, t_first, t_last, z, err)
        return torch.mul(y, self.lam).add_(z, alpha=1.0 - self.lam).add_(F), F, e

    def backward_half(self, t, t_new, t_first, t_last, y_new):
        """``Psi(t_{n+1}, y_{n+1}, -h)``: the increment of the step from ``t_new`` back to
        ``t`` (``z_{n+1} = z_n - `` this)."""
        return self.increment(t_new, t - t_new, t_last, t_first, y_new)[0]

    def invert(self, rec, y_new, z_new):
        """``(y_n, z_n)`` from ``(y_{n+1}, z_{n+1})``: the algebraic inverse of one step."""
        t, t_new, t_first, t_last = rec
        z = z_new + self.backward_half(t, t_new, t_first, t_last, y_new)
        F, _ = self.increment(t, t_new - t, t_first, t_last, z)
        return self.unmix(y_new, z, F), z

    def unmix(self, y_new, z, F):
        """``y_n = (y_{n+1} - (1 - lam) z_n - Psi(t_n, z_n, h)) / lam``."""
        return torch.sub(y_new, F).sub_(z, alpha=1.0 - self.lam).div_(self.lam)


# ---------------------------------------------------------------------------- forward loop
def _landings(prob) -> list[float]:
    """Times every step lands on: output times, the controller's step_t and jump_t."""
    ctrl, d, t0, t1 = prob.controller, prob.direction, prob.t0, prob.t_end
    pts = {x for x in (*prob.out_t, *ctrl.step_t, *ctrl.jump_t) if d * (x - t0) > 0}
    pts = {x for x in pts if d * (t1 - x) > 0}
    return sorted(pts, reverse=d < 0)


# Adaptive solves restart when the gap |y - z| exceeds restart_gap tolerances (the solve's
# rtol/atol: the user's accuracy request); fixed-step solves have no tolerance and use the
# growth test (GapGrowth) instead. Rounding alone moves y and z apart by up to a few hundred ulps over long solves (measured in
# float32: 3e-4 relative at 1,000 steps of an MLP field), which must not cause restarts: the gap
# tolerances are floored at 1000 ulps (relative) and 10 ulps (absolute); in float64 the floor
# is 2.2e-13, below any tolerance in use.
_ULPS_REL, _ULPS_ABS = 1000.0, 10.0


def gap_tolerances(prob, dtype: torch.dtype):
    """``(rtol, atol)`` that scale the gap of an adaptive solve: the solve's, floored by the
    rounding level of ``dtype``."""
    rtol, atol = prob.rtol, prob.atol
    eps = torch.finfo(dtype).eps
    lo_r, lo_a = _ULPS_REL * eps, _ULPS_ABS * eps
    if isinstance(rtol, torch.Tensor):
        rtol = rtol.clamp(min=lo_r)
    else:
        rtol = max(rtol, lo_r)
    if isinstance(atol, torch.Tensor):
        atol = atol.clamp(min=lo_a)
    else:
        atol = max(atol, lo_a)
    return rtol, atol


def gap_norm(y, z, rtol, atol, work=None) -> float:
    """``max_i |y_i - z_i| / (atol_i + rtol_i * max(|y_i|, |z_i|))``: the distance of the two
    states in units of the tolerance (max norm: one row going astray is not averaged away).
    ``atol`` is positive (floored by :func:`gap_tolerances`); ``work``, two tensors shaped like
    ``y``, spares the allocations."""
    if work is None or y.is_complex():
        scale = torch.maximum(y.abs(), z.abs()).mul_(rtol).add_(atol)
        return float((y - z).abs().div_(scale).max())
    a, b = work
    scale = torch.maximum(torch.abs(y, out=a), torch.abs(z, out=b), out=a).mul_(rtol).add_(atol)
    return float(torch.sub(y, z, out=b).abs_().div_(scale).max())


# The growth test's baseline is floored at this many ulps of the dtype (relative to the state):
# rounding alone moves y - z by about one ulp per step (measured on MLP fields in float32 and
# float64), which must not count as growth; a lower floor protects small components further.
_GROWTH_FLOOR_ULPS = 10.0


class GapGrowth:
    """The restart test of fixed-step solves: restart when the parasitic mode grows.

    ``q = max|y - z| / max|y|`` (relative, max norms; scale-free) is measured after every step.
    Its value one step after a (re)start, ``s`` (floored at 10 ulps), is the defect of one
    step and its inverse, the size of the local errors that feed the gap. While the parasitic
    mode is damped (or neutral) each step adds about one such defect to ``q``; when it is
    excited (a decaying mode with ``|h mu|`` above about ``1 - lam``) ``q`` grows geometrically,
    by about ``(lam / R(h mu)**2 - 1) q`` per step, and perturbs the solution by about
    ``|R - lam| / R`` times ``q`` per step: the one-step growth of ``q`` estimates (from above)
    that perturbation. :meth:`restart` says when the growth exceeds ``factor * s``: when the
    gap's effect on the solution exceeds ``factor`` local errors, whatever the scale of the
    state or the step.
    """

    def __init__(self, factor: float, dtype: torch.dtype):
        self.factor = factor
        self.floor = _GROWTH_FLOOR_ULPS * torch.finfo(dtype).eps
        self.prev, self.base = 0.0, None
        self.nonfinite = False  # set when the measured gap or state is NaN/inf: the solve stops

    def restart(self, y, z, work) -> bool:
        a, b = work
        if y.is_complex():
            d, m = (y - z).abs().max(), y.abs().max()
        else:
            d = torch.sub(y, z, out=a).abs_().max()
            m = torch.abs(y, out=b).max()
        d, m = torch.stack((d, m)).tolist()  # one host read
        q = d / m if m > 0 else (0.0 if d == 0 else math.inf)
        if not math.isfinite(m) or not math.isfinite(d):
            self.nonfinite = True
            return False
        if self.base is None:
            self.base, self.prev = max(q, self.floor), q
            return False
        grown, self.prev = q - self.prev, q
        if grown > self.factor * self.base:
            self.prev, self.base = 0.0, None
            return True
        return False


def integrate_reversible(
    run: Run, lam: float, y0flat, *, restart_gap=None, keep_states: bool = False
):
    """The reversible solve from ``prob.t0`` to ``prob.t_end`` (with a graph if grad mode is on).

    Returns ``(LoopResult, records, z_final, states, restarts, anchors)``: ``records`` holds per
    accepted step ``(t, t_new, t_first, t_last, out_lo, out_hi)``; ``states`` the pairs
    ``(y_n, z_n)`` at every step start when ``keep_states`` (for measuring the reconstruction),
    else None; ``restarts`` maps the index of each accepted step after which ``z`` was reset to
    ``y`` (the gap exceeded ``restart_gap``) to the pair ``(y, z)`` just before the reset;
    ``anchors`` maps the index of every :func:`anchor_interval`-th step since the last stored
    pair to the pair ``(y, z)`` after it (the backward pass restarts its reconstruction there).
    """
    prob = run.prob
    ctrl = prob.controller
    f = run.vector_field()
    sch = Scheme(prob.tableau, f, lam, y0flat)
    direction, t0, t_end = prob.direction, prob.t0, prob.t_end
    adaptive = ctrl.adaptive
    jumps = set(ctrl.jump_t)
    landings = _landings(prob)
    samples = run.samples_all
    n_out = len(prob.out_t)
    # The engine's start: outputs at t0, the first stage's time (past a jump_t at t0) and the
    # controller's initial step (Hairer's selection for adaptive control).
    out_vals, p = _start_outputs(prob, y0flat, samples)
    y = z = y0flat
    t = t0
    t_first = ctrl.first_time(t0, t_end, f.time_dtype)
    nrm = k1 = k_order = None
    if adaptive:
        k_order = prob.tableau.error_order()
        work = ErrorNorm(y0flat, prob.spec, prob.norm_components)
        norm = user_scaled_norm if prob.norm is not None else work
        if t_end != t0:
            nrm = initial_norm(work, y0flat, prob.rtol, prob.atol, prob.atol_zero, prob=prob)
            with torch.no_grad():
                k1 = f(t_first, y0flat)
    prev_err = 1.0
    h = (
        0.0
        if t_end == t0
        else ctrl.first_step(nrm, f, t0, y0flat, k1, direction, abs(t_end - t0), k_order)
    )
    li = 0
    records, states = [], [] if keep_states else None
    restarts, anchors = {}, {}
    anchor_every, since_stored = anchor_interval(lam), 0
    gap_work = growth = None
    if restart_gap is not None:  # measured without a graph (the restart decision is discrete)
        gap_work = (torch.empty_like(y0flat), torch.empty_like(y0flat))
        if adaptive:
            g_rtol, g_atol = gap_tolerances(prob, y0flat.dtype)
        else:
            growth = GapGrowth(restart_gap, y0flat.dtype)
    attempts = n_acc = n_rej = 0
    last_nonfinite, h_last = False, 0.0
    state = {"status": "success", "message": ""}
    fail = {"throw": run.throw, "state": state, "engine": _ENGINE}
    # The pair after the last step that holds outputs: where the backward pass starts if the
    # solve stops early (throw=False), so that it never walks back through the failure.
    last_out = None

    while direction * (t_end - t) > 0:
        # The controller bounds the step (to [dt_min, dt_max] with force_dt_min); the step
        # limit, a non-finite step size or one below dt_min or the resolution of t end the solve.
        h_abs = ctrl.bounded(float(abs(h)), last_nonfinite)  # (adapt may return a 0-d tensor)
        if stops_here(ctrl, h_abs, t, attempts, prob.max_steps, nonfinite=last_nonfinite,
                      t_end=t_end, n_acc=n_acc, n_rej=n_rej, **fail):  # fmt: skip
            break
        # A step of (nearly) zero length is not the identity here (it still mixes y and z), so
        # grid points and landings a few ulps apart are merged instead of leaving a sliver step.
        tiny = 8 * _EPS64 * max(abs(t), abs(t_end), h_abs if math.isfinite(h_abs) else 0.0)
        t_new = ctrl.propose(t, h_abs, t0, t_end, direction)  # (ConstantStep: on its grid)
        if direction * (t_new - t) <= 0:  # (the engine's rule: Controller.land)
            raise stuck_error(ctrl, t, t_new)
        if direction * (t_new - t) <= tiny < h_abs:  # a grid point a few ulps ahead: the next
            t_new = ctrl.propose(t_new, h_abs, t0, t_end, direction)
        clipped = False
        while li < len(landings) and direction * (landings[li] - t) <= tiny:
            li += 1
        land = landings[li] if li < len(landings) else None
        if land is not None and direction * (t_new - land) >= -tiny:
            t_new, clipped = land, True
        if direction * (t_new - t_end) >= -tiny:
            t_new, clipped, land = t_end, True, None
        is_jump = clipped and land is not None and t_new == land and land in jumps
        # At a discontinuity the last stage sees the left limit and the next step's first stage
        # the right limit: the nearest time f tells apart (float32 time included).
        t_last = time_beside(t_new, t, f.time_dtype) if is_jump else t_new
        attempts += 1
        h_last = abs(t_new - t)
        y_new, F, e_est = sch.forward_half(t, t_new, t_first, t_last, y, z, adaptive)
        if adaptive:
            e = norm(prob, e_est, z, z + F)
            last_nonfinite = not math.isfinite(e)
            if not (e <= 1.0 or ctrl.accepts(e, min(h_abs, h_last))):
                n_rej += 1
                # Shrink from the step the controller asked for when the sliver rule above
                # stretched it to the next grid point (a step a few ulps long near t's
                # resolution): shrinking the stretched step gave the same step again, forever,
                # instead of reaching the underflow rule (a blow-up ran to max_steps).
                h_try = min(h_last, h_abs)
                h, _ = ctrl.adapt(h_try, h_abs, e, prev_err, k_order, False, clipped)
                continue
        n_acc += 1
        if keep_states:
            states.append((y, z))
        z = torch.sub(z, sch.backward_half(t, t_new, t_first, t_last, y_new))
        lo = p
        while p < n_out and direction * (prob.out_t[p] - t_new) <= 0:
            p += 1
        if p > lo:
            out_vals.append(_values_at(y_new, samples, lo, p))
        records.append((t, t_new, t_first, t_last, lo, p))
        if restart_gap is not None:
            with torch.no_grad():
                if growth is not None:
                    restart = growth.restart(y_new, z, gap_work)
                    if growth.nonfinite:  # stop where the state became NaN/inf (reported below)
                        t, y = t_new, y_new
                        break
                else:
                    restart = gap_norm(y_new, z, g_rtol, g_atol, gap_work) > restart_gap
            if restart:
                # The parasitic mode y - z has grown: keep the pair for the backward pass and
                # restart the second state from the solution (z = y is differentiable: the
                # backward pass adds z's cotangent to y's there).
                restarts[len(records) - 1] = (y_new, z)
                z = y_new
                since_stored = -1
        if p > lo:  # (z as the next step sees it: after a restart, y)
            last_out = (len(records) - 1, y_new, z)
        since_stored += 1
        if anchor_every is not None and since_stored >= anchor_every:
            anchors[len(records) - 1] = (y_new, z)
            since_stored = 0
        if adaptive:
            h, prev_err = ctrl.adapt(h_last, h_abs, e, prev_err, k_order, True, clipped)
        t, y = t_new, y_new
        t_first = time_beside(t_new, t_new + direction, f.time_dtype) if is_jump else t_new

    status, message = state["status"], state["message"]
    if status == "success" and not (_all_finite(y) and _all_finite(z)):
        # A fixed-step solve with restarts stops at the first non-finite state (the growth test
        # reads it every step); otherwise this is checked once, at the end.
        status = NonFiniteError.status
        first = " first" if growth is not None and growth.nonfinite else ""
        message = (
            f"the state of the reversible solve{first} became non-finite (NaN/inf) at t={t:.17g} "
            f"after {n_acc} steps (last step size {h_last:.3g}); with coupling={lam} the "
            "scheme damps decaying modes only for |h * eigenvalue| below about -log(coupling), "
            "and a stiff problem (fast decaying modes; integrated backward in time, decaying "
            "modes grow) exceeds that or the method's own stability limit: take smaller steps, "
            "use an adaptive solver (e.g. solver='dopri5'), keep restarts on "
            "(Reversible(restart_gap=10.0), the default) or lower it, use gradient='checkpoint' "
            "with an implicit solver for a stiff problem, or check func for NaN/inf"
        )
        if run.throw:
            raise NonFiniteError(message, t=t, step=attempts, h=h_last)
    ys = _gather_outputs(prob, out_vals, p, y0flat, samples)  # missing outputs (stopped early): NaN
    res = LoopResult(
        ys=ys,
        y_final=y,
        t_reached=t,
        status=status,
        message=message,
        n_accepted=n_acc,
        n_rejected=n_rej,
    )
    run.result, run.f = res, f
    run.extra["reversible_scheme"] = sch
    run.extra["reversible_last_output"] = last_out
    run.stats["nfe"] = f.nfe
    with torch.no_grad():
        gap = float((y - z).abs().max() / y.abs().max().clamp_min(1e-300))
    run.stats["reversible_gap"] = gap
    run.stats["reversible_restarts"] = len(restarts)
    # y and z both approximate the solution; they drift apart only when the parasitic mode
    # grows (a decaying mode too fast for the coupling), so a large gap flags a wrong solution.
    # With restarts the gap stays within restart_gap tolerances by construction.
    if restart_gap is None and status == "success" and math.isfinite(gap) and gap > 0.1:
        warnings.warn(
            f"the two states of the reversible scheme differ by {gap:.2g} (relative, max norm) at "
            f"t={t:.6g}: its parasitic mode has grown and the solution is unreliable. Decaying "
            f"dynamics faster than about (1 - coupling) / step size (coupling={lam}) excite it; "
            "turn restarts on (Reversible(restart_gap=10.0), the default), take smaller steps, or "
            "use gradient='checkpoint'",
            RuntimeWarning,
            stacklevel=5,
        )
    run.stats["reversible_anchors"] = len(anchors)
    return res, records, z, states, restarts, anchors
