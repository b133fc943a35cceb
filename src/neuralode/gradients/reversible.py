"""Reversible gradients: exact gradients of an algebraically reversible Runge--Kutta scheme in
memory that does not grow with the number of steps (McCallum & Foster 2024)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .._loop import LoopResult
from .._norms import ErrorNorm, initial_norm, user_scaled_norm
from ..controllers import ConstantStep, PIController
from ..errors import MaxStepsError, NonFiniteError, StepSizeUnderflowError
from ..solvers.explicit_rk import RKStepper
from ..solvers.tableau import ButcherTableau
from ._common import Run, check_params, find_params

__all__ = ["Reversible"]

_EPS64 = 2.220446049250313e-16


@dataclass(frozen=True)
class Reversible:
    r"""Make the explicit Runge--Kutta method reversible and differentiate it exactly in
    constant memory.

    The solve carries a pair of states ``(y, z)``, both starting at ``y0``. With ``Psi(t, x, h)``
    the increment of one step of the chosen explicit Runge--Kutta method (``x + Psi`` is its step
    from ``(t, x)`` over ``h``; ``h`` may be negative), a step from ``t_n`` to ``t_{n+1} = t_n + h``
    is::

        y_{n+1} = lam * y_n + (1 - lam) * z_n + Psi(t_n, z_n, h)
        z_{n+1} = z_n - Psi(t_{n+1}, y_{n+1}, -h)

    and ``y`` is the solution returned. The step is inverted algebraically (no solve)::

        z_n = z_{n+1} + Psi(t_{n+1}, y_{n+1}, -h)
        y_n = (y_{n+1} - (1 - lam) * z_n - Psi(t_n, z_n, h)) / lam

    The forward pass keeps no graph and stores only the step times and the final pair. The
    backward pass walks the steps in reverse: it reconstructs ``(y_n, z_n)`` from
    ``(y_{n+1}, z_{n+1})`` with the inverse above, and backpropagates through that step with the
    vector field's vector-Jacobian products (``torch.autograd.grad`` on the two increments of one
    step). The gradient is the exact gradient of the reversible scheme (equal to autograd
    through it, to rounding), autograd memory is one step's graph whatever the number of steps,
    and the backward pass costs about twice the forward (the increments are re-evaluated with a
    graph, then differentiated).

    **The solution is the reversible scheme's**, not the plain method's at the same steps: the
    two differ by the method's local errors, and the reversible solution converges at the order
    of the wrapped method (measured in ``tests/test_reversible.py``: slopes 2, 3, 4 for midpoint,
    heun3, rk4). Each step costs two steps of the method (``2 * stages`` evaluations of f; one
    fewer per half for FSAL methods without error control, whose last stage only serves the
    error estimate). On DETEST problems with dopri5 at rtol 1e-6 (outputs at t = 0, 1, ..., 20)
    its global error is 0.05-16x the plain method's on A3, A4, the two-body orbits D1, D3 and
    the forced Duffing E3, but it is wrong on the dissipative chain C1 (error 3e6), on the
    predator-prey B1 (error 12) and on van der Pol E2 (steps collapse), whose strongly
    contracting phases excite the parasitic mode: see ``coupling``. ``stats["reversible_gap"]``
    is ``max|y - z| / max|y|`` at the end; both states approximate the solution, so a gap above
    0.1 means the parasitic mode has taken over and a RuntimeWarning says so.

    Steps: fixed (:class:`~neuralode.ConstantStep`, :class:`~neuralode.StepToGrid`) or adaptive
    (:class:`~neuralode.PIController`, from the method's embedded error estimate of the
    ``Psi(t_n, z_n, h)`` half of the step, checked before the second half is computed; its
    ``dt_min``, ``dt_max`` and ``force_dt_min`` hold as in the other gradient methods). Every
    output time is a landing point (steps are clipped to end on it): there is no dense output,
    and the value at an output time is the scheme's state there.

    Parameters
    ----------
    coupling : float, default 0.999
        The coupling ``lam`` in (0, 1] (McCallum & Foster's default is 0.999). Linearised, each
        eigenvalue ``mu`` of the Jacobian of f gives two modes: the solution, multiplied by about
        ``R(h mu)`` per step (``R`` the method's stability function), and a parasitic mode of the
        difference ``y - z``, multiplied by about ``lam / R(h mu)``. *Forward stability* needs
        ``|lam / R(h mu)| < 1``: oscillatory modes (``mu`` imaginary) are damped at any
        ``lam < 1``, but a decaying mode only while roughly ``|h mu| < -log(lam)`` (0.001 at the
        default); beyond it the parasitic mode grows from the local errors. *Backward accuracy*:
        the reconstruction multiplies rounding errors, relative to the state, by about
        ``max(|lam / R(h mu)**2|, |R(h mu)**2 / lam|)`` per step, close to 1 while
        ``|h mu|`` is small against ``1 - lam``. A smaller ``lam`` damps more in the forward
        solve; a larger one keeps the reconstruction accurate over more steps; ``lam = 1`` does
        not damp ``y - z`` at all. So the scheme suits dynamics whose decay over one step is small
        against ``1 - lam`` (non-stiff, oscillatory or mildly dissipative fields); fast decay
        needs smaller steps, or a coupling matched to it (``lam = R(h mu)**2``, which only one
        decay rate can match). Roughly, local errors are amplified by ``exp(a T)`` over a solve of
        length ``T`` with a mode decaying like ``exp(-a t)`` once ``a h > 1 - lam``: harmless for
        ``a T`` of a few units (a neural ODE on [0, 1]), fatal for long dissipative solves.
        Measured on ``y' = -50 y`` over [0, 10] with rk4 and
        ``dt = 0.005`` (``tests/test_reversible.py``): the default overflows (NonFiniteError);
        ``lam = R(h mu)**2 = 0.6065`` solves and reconstructs the states to about 1e-9; 1 %
        away from it the reconstruction error is about 1e-6 and the solution is wrong.
    params : sequence of Tensor, optional
        Tensors to differentiate besides ``y0``. Default: the parameters of ``func`` when it is
        an ``nn.Module``.

    Raises
    ------
    ValueError
        For a coupling outside (0, 1], a solver that is not an explicit Runge--Kutta tableau, or
        ``dense_output=True`` (the scheme has no continuous extension).

    Notes
    -----
    Gradients of gradients (``create_graph=True``) replay the whole reversible solve with a
    graph (memory then grows with the steps, as with :class:`~neuralode.Direct`).
    Gradients with respect to ``t`` use the continuous derivatives, as for the other methods.

    References
    ----------
    S. McCallum and J. Foster, "Efficient, accurate and stable gradients for neural ODEs",
    arXiv:2410.11648, 2024 (the reversible scheme for any explicit Runge--Kutta method, its
    coupling parameter and the default 0.999; their adaptive version sums the error estimates of
    both halves, this one uses the first half's, so that a rejected step costs one half).
    P. Kidger, J. Foster, X. Li and T. Lyons, "Efficient and accurate gradients for neural SDEs",
    NeurIPS 2021 (the reversible Heun method that this generalises).
    J. Zhuang, N. Dvornek, S. Tatikonda and J. Duncan, "MALI: a memory efficient and reverse
    accurate integrator for neural ODEs", ICLR 2021 (asynchronous leapfrog).
    """

    coupling: float = 0.999
    restart_gap: float | None = 10.0
    params: tuple | None = None

    def __post_init__(self):
        lam = self.coupling
        if isinstance(lam, torch.Tensor) and lam.numel() == 1:
            lam = float(lam)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam <= 1:
            raise ValueError(
                f"Reversible(coupling=...) must be a number in (0, 1], got {self.coupling!r}; "
                "the default 0.999 suits non-stiff problems, smaller values damp decaying modes"
            )
        object.__setattr__(self, "coupling", float(lam))
        gap = self.restart_gap
        if gap is not None and (
            isinstance(gap, bool) or not isinstance(gap, (int, float)) or not gap > 0
        ):
            raise ValueError(
                f"Reversible(restart_gap=...) must be a positive number or None, got {gap!r}; "
                "the default 10 restarts when the two states differ by 10 tolerances"
            )
        if gap is not None:
            object.__setattr__(self, "restart_gap", float(gap))

    def run(self, run: Run, y0flat: torch.Tensor):
        tab = run.prob.tableau
        if not isinstance(tab, ButcherTableau):
            raise ValueError(
                f"gradient=Reversible() needs an explicit Runge--Kutta solver, got "
                f"{getattr(tab, 'name', type(tab).__name__)!r}; use e.g. solver='dopri5' or 'rk4', "
                "or gradient='checkpoint' for implicit and multistep methods"
            )
        if run.dense:
            raise ValueError(
                "dense_output=True is not available with gradient=Reversible(): the reversible "
                "scheme has no continuous extension; put the times you need in t (steps land on "
                "every output time) or use gradient='direct'"
            )
        params = find_params(run.func, self.params, "Reversible(params=...)")
        if torch.is_grad_enabled():
            check_params(run, y0flat, params, "reversible")
        return _ReversibleFn.apply(run, self, y0flat, *params)


# ---------------------------------------------------------------------------- one step
def _increment(st: RKStepper, f, t: float, h: float, t_first: float, t_last: float, x, err):
    """The increment ``Psi`` of one step of the tableau from ``(t, x)`` over ``h`` (``x`` flat
    ``(B, M)``); with ``err`` also the embedded error estimate. ``t_first``/``t_last`` are the
    times of the stages at the step's two ends (one-sided limits at a discontinuity). An FSAL
    tableau's last stage (f at the new state) only serves the error estimate: it is skipped
    when none is wanted."""
    shape = x.shape
    xv = x.reshape(-1)
    S = st.S - 1 if (st.fsal and st.tab.b[-1] == 0.0 and not err) else st.S
    ks = [f.flat(t_first, xv)]
    for i in range(1, S):
        ci = st.c[i]
        xi = torch.addmv(xv, torch.stack(ks, 1), st.rows[i], alpha=h)
        ks.append(f.flat(t_last if ci == 1.0 else t + ci * h, xi))
    K = torch.stack(ks, 1)  # (N, S)
    inc = torch.mv(K, st.T["b"][:S]).mul(h).view(shape)
    if not err:
        return inc, None
    e = torch.mv(K.detach(), st.b_err).mul_(h).view(shape)
    return inc, e


def _forward_half(st, f, lam, t, t_new, t_first, t_last, y, z, err=False):
    """``y_{n+1}`` from ``(y_n, z_n)`` (and the error estimate of the increment)."""
    F, e = _increment(st, f, t, t_new - t, t_first, t_last, z, err)
    return lam * y + (1.0 - lam) * z + F, F, e


def _backward_half(st, f, t, t_new, t_first, t_last, y_new):
    """``Psi(t_{n+1}, y_{n+1}, -h)``: the increment of the step from ``t_new`` back to ``t``."""
    G, _ = _increment(st, f, t_new, t - t_new, t_last, t_first, y_new, False)
    return G


def _invert(st, f, lam, rec, y_new, z_new):
    """``(y_n, z_n)`` from ``(y_{n+1}, z_{n+1})``: the algebraic inverse of one step."""
    t, t_new, t_first, t_last = rec
    z = z_new + _backward_half(st, f, t, t_new, t_first, t_last, y_new)
    F, _ = _increment(st, f, t, t_new - t, t_first, t_last, z, False)
    return (y_new - (1.0 - lam) * z - F) / lam, z


# ---------------------------------------------------------------------------- forward loop
def _landings(prob) -> list[float]:
    """Times every step lands on: output times, the controller's step_t and jump_t."""
    ctrl, d, t0, t1 = prob.controller, prob.direction, prob.t0, prob.t_end
    pts = {x for x in (*prob.out_t, *ctrl.step_t, *ctrl.jump_t) if d * (x - t0) > 0}
    pts = {x for x in pts if d * (t1 - x) > 0}
    return sorted(pts, reverse=d < 0)


# Tolerances that scale the gap |y - z| when steps are fixed (no rtol/atol given): the solve's
# default tolerances, so that a fixed-step solve keeps the two states as close as an adaptive
# solve at the defaults would.
_FIXED_RTOL, _FIXED_ATOL = 1e-6, 1e-8


def gap_norm(y, z, rtol, atol) -> float:
    """``max_i |y_i - z_i| / (atol_i + rtol_i * max(|y_i|, |z_i|))``: the distance of the two
    states in units of the tolerance (max norm: one row going astray is not averaged away)."""
    scale = torch.maximum(y.abs(), z.abs()).mul_(rtol).add_(atol)
    scale.clamp_(min=torch.finfo(scale.dtype).tiny)
    return float((y - z).abs_().div_(scale).max())


def integrate_reversible(
    run: Run, lam: float, y0flat, *, restart_gap=None, keep_states: bool = False
):
    """The reversible solve from ``prob.t0`` to ``prob.t_end`` (with a graph if grad mode is on).

    Returns ``(LoopResult, records, z_final, states, restarts)``: ``records`` holds per accepted
    step ``(t, t_new, t_first, t_last, out_lo, out_hi)``; ``states`` the pairs ``(y_n, z_n)`` at
    every step start when ``keep_states`` (for measuring the reconstruction), else None;
    ``restarts`` maps the index of each accepted step after which ``z`` was reset to ``y`` (the
    gap exceeded ``restart_gap``) to the pair ``(y, z)`` just before the reset.
    """
    prob = run.prob
    ctrl = prob.controller
    f = run.vector_field()
    st = RKStepper(prob.tableau, y0flat.dtype, y0flat.device)
    direction, t0, t_end = prob.direction, prob.t0, prob.t_end
    adaptive = isinstance(ctrl, PIController)
    constant = isinstance(ctrl, ConstantStep)
    jumps = set(ctrl.jump_t)
    landings = _landings(prob)
    samples = run.samples_all
    n_out = len(prob.out_t)

    def out_rows(y, lo, hi):
        if samples is None:
            return y.unsqueeze(0).expand(hi - lo, *y.shape)
        return y[samples[lo:hi]]

    out_vals, p = [], 0
    while p < n_out and prob.out_t[p] == t0:
        p += 1
    if p:
        out_vals.append(out_rows(y0flat, 0, p))
    y = z = y0flat
    t, t_first = t0, t0
    if adaptive:
        k_order = prob.tableau.error_order()
        work = ErrorNorm(y0flat, prob.spec)
        norm = user_scaled_norm if prob.norm is not None else work
        if t_end == t0:
            h = 0.0
        else:
            nrm = initial_norm(work, y0flat, prob.rtol, prob.atol, prob.atol_zero, prob=prob)
            with torch.no_grad():
                k1 = f(t0, y0flat)
            h = ctrl.initial_step(nrm, f, t0, y0flat, k1, direction, abs(t_end - t0), k_order)
        prev_err = 1.0
    else:
        h = ctrl.dt if constant else math.inf
    k_grid, li = 1, 0
    records, states = [], [] if keep_states else None
    restarts = {}
    if adaptive:
        g_rtol, g_atol = prob.rtol, prob.atol
    else:
        g_rtol, g_atol = _FIXED_RTOL, _FIXED_ATOL
    attempts = n_acc = n_rej = 0
    last_nonfinite = False
    status, message = "success", ""

    def fail(cls, msg, hh):
        nonlocal status, message
        if run.throw:
            raise cls(msg, t=t, step=attempts, h=hh)
        status, message = cls.status, msg

    while direction * (t_end - t) > 0:
        if prob.max_steps is not None and attempts >= prob.max_steps:
            fail(
                MaxStepsError,
                f"reached max_steps={prob.max_steps} step attempts at t={t:.17g} (accepted "
                f"{n_acc}, rejected {n_rej}) before the final time {t_end:.17g}; raise max_steps "
                "or loosen rtol/atol",
                h,
            )
            break
        # The controller bounds the step (to [dt_min, dt_max] with force_dt_min).
        h_abs = ctrl.bounded(abs(h), last_nonfinite) if adaptive else abs(h)
        if adaptive and (
            not math.isfinite(h_abs) or h_abs < ctrl.dt_min or t + direction * h_abs == t
        ):
            cls = StepSizeUnderflowError if math.isfinite(h_abs) else NonFiniteError
            fail(
                cls,
                f"step size underflow or non-finite error estimate at t={t:.17g} after "
                f"{attempts} step attempts (step size {h_abs:.3g}) in the reversible solve; check "
                "func for NaN/inf, loosen rtol/atol, or, if the problem has fast decaying modes, "
                "keep restarts on (Reversible(restart_gap=10.0), the default) or lower it",
                h_abs,
            )
            break
        # A step of (nearly) zero length is not the identity here (it still mixes y and z), so
        # grid points and landings a few ulps apart are merged instead of leaving a sliver step.
        tiny = 8 * _EPS64 * max(abs(t), abs(t_end), h_abs if math.isfinite(h_abs) else 0.0)
        if constant:
            while direction * (t0 + direction * k_grid * h_abs - t) <= tiny:
                k_grid += 1
            t_new = t0 + direction * k_grid * h_abs
            if abs(t_end - t_new) <= tiny:
                t_new = t_end
        else:
            t_new = t + direction * h_abs
        clipped = False
        while li < len(landings) and direction * (landings[li] - t) <= tiny:
            li += 1
        land = landings[li] if li < len(landings) else None
        if land is not None and direction * (t_new - land) >= -tiny:
            t_new, clipped = land, True
        if direction * (t_new - t_end) >= -tiny:
            t_new, clipped, land = t_end, True, None
        is_jump = clipped and land is not None and t_new == land and land in jumps
        t_last = math.nextafter(t_new, t) if is_jump else t_new
        attempts += 1
        y_new, F, e_est = _forward_half(st, f, lam, t, t_new, t_first, t_last, y, z, adaptive)
        if adaptive:
            e = norm(prob, e_est, z, z + F)
            last_nonfinite = not math.isfinite(e)
            if not (e <= 1.0 or ctrl.accepts(e, min(h_abs, abs(t_new - t)))):
                n_rej += 1
                h = abs(t_new - t) * ctrl.reject_factor(e, k_order)
                continue
        n_acc += 1
        if keep_states:
            states.append((y, z))
        z = z - _backward_half(st, f, t, t_new, t_first, t_last, y_new)
        lo = p
        while p < n_out and direction * (prob.out_t[p] - t_new) <= 0:
            p += 1
        if p > lo:
            out_vals.append(out_rows(y_new, lo, p))
        records.append((t, t_new, t_first, t_last, lo, p))
        if restart_gap is not None:
            with torch.no_grad():
                gap = gap_norm(y_new, z, g_rtol, g_atol)
            if gap > restart_gap:
                # The parasitic mode y - z has grown: keep the pair for the backward pass and
                # restart the second state from the solution (z = y is differentiable: the
                # backward pass adds z's cotangent to y's there).
                restarts[len(records) - 1] = (y_new, z)
                z = y_new
        if adaptive:
            h_next = abs(t_new - t) * ctrl.factor(e, prev_err, k_order)
            h = max(h_abs, h_next) if clipped else h_next
            prev_err = max(e, 1e-4)
        t, y = t_new, y_new
        t_first = math.nextafter(t_new, t_new + direction) if is_jump else t_new

    if status == "success" and not (
        bool(torch.isfinite(y).all()) and bool(torch.isfinite(z).all())
    ):
        status = NonFiniteError.status
        message = (
            f"the reversible solve became non-finite (NaN/inf) by t={t:.17g} after {n_acc} steps; "
            f"with coupling={lam} the scheme damps decaying modes only for |h * eigenvalue| below "
            "about -log(coupling): check func for NaN/inf, keep restarts on "
            "(Reversible(restart_gap=10.0), the default) or lower it, or take smaller steps"
        )
        if run.throw:
            raise NonFiniteError(message, t=t, step=attempts, h=h)
    if p < n_out:  # stopped early (throw=False): missing outputs are NaN
        shape = y0flat.shape if samples is None else y0flat.shape[1:]
        out_vals.append(
            torch.full((n_out - p, *shape), math.nan, dtype=y0flat.dtype, device=y0flat.device)
        )
    ys = torch.cat(out_vals) if out_vals else y0flat.new_zeros((0, *y0flat.shape))
    if prob.out_order is not None:
        ys = ys[prob.out_order]
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
    run.stepper = st
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
    return res, records, z, states, restarts


# ---------------------------------------------------------------------------- autograd
class _ReversibleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: Run, cfg: Reversible, y0flat, *params):
        with torch.no_grad():
            res, records, z, _, restarts = integrate_reversible(
                run, cfg.coupling, y0flat.detach(), restart_gap=cfg.restart_gap
            )
        ctx.run, ctx.cfg, ctx.records = run, cfg, records
        ctx.n_params, ctx.restart_at = len(params), list(restarts)
        # Saved for backward: the final pair, the pairs at restarts (and the inputs, to replay
        # for double backward).
        pairs = [x for pair in restarts.values() for x in pair]
        ctx.save_for_backward(res.y_final, z, y0flat, *params, *pairs)
        return res.ys

    @staticmethod
    def backward(ctx, g_ys):
        run, lam = ctx.run, ctx.cfg.coupling
        y, z, y0flat, *rest = ctx.saved_tensors
        params, pairs = rest[: ctx.n_params], rest[ctx.n_params :]
        restarts = {k: (pairs[2 * i], pairs[2 * i + 1]) for i, k in enumerate(ctx.restart_at)}
        if torch.is_grad_enabled():
            # create_graph=True: replay the whole reversible solve with a graph.
            y0g = y0flat if y0flat.requires_grad else y0flat.detach().requires_grad_()
            res, _, _, _, _ = integrate_reversible(run, lam, y0g, restart_gap=ctx.cfg.restart_gap)
            grads = torch.autograd.grad(
                res.ys, [y0g, *params], g_ys, create_graph=True, allow_unused=True
            )
            return (
                None,
                None,
                *[
                    g if g is not None else torch.zeros_like(x)
                    for g, x in zip(grads, [y0flat, *params])
                ],
            )
        prob, samples = run.prob, run.samples_all
        g = g_ys if prob.out_order is None else torch.empty_like(g_ys)
        if prob.out_order is not None:
            g[prob.out_order] = g_ys
        f = run.vector_field()
        st = run.stepper
        ay = torch.zeros_like(y)
        az = torch.zeros_like(z)
        gp = [torch.zeros_like(q) for q in params]

        def add_outputs(a, lo, hi):
            if hi <= lo:
                return a
            if samples is None:
                return a + g[lo:hi].sum(0)
            return a.index_add(0, samples[lo:hi], g[lo:hi])

        def accumulate(grads):
            for i, gq in enumerate(grads):
                if gq is not None:
                    gp[i] = gp[i] + gq

        for k in range(len(ctx.records) - 1, -1, -1):
            t, t_new, t_first, t_last, lo, hi = ctx.records[k]
            pair = restarts.get(k)
            if pair is not None:  # z was reset to y after this step: restore the stored pair
                ay, az = ay + az, torch.zeros_like(az)
                y, z = pair
            ay = add_outputs(ay, lo, hi)
            # z_{n+1} = z_n - G(y_{n+1}): the cotangent of z_{n+1} flows into y_{n+1}.
            with torch.enable_grad():
                y1 = y.detach().requires_grad_()
                G = _backward_half(st, f, t, t_new, t_first, t_last, y1)
            gy, *gG = torch.autograd.grad(G, [y1, *params], -az, allow_unused=True)
            accumulate(gG)
            ay_tot = ay + gy if gy is not None else ay
            z_prev = z + G.detach()
            # y_{n+1} = lam y_n + (1 - lam) z_n + F(z_n).
            with torch.enable_grad():
                z0 = z_prev.detach().requires_grad_()
                F, _ = _increment(st, f, t, t_new - t, t_first, t_last, z0, False)
            gz, *gF = torch.autograd.grad(F, [z0, *params], ay_tot, allow_unused=True)
            accumulate(gF)
            y = (y - (1.0 - lam) * z_prev - F.detach()) / lam
            z = z_prev
            az = az + (1.0 - lam) * ay_tot
            if gz is not None:
                az = az + gz
            ay = lam * ay_tot
        n0 = ctx.records[0][4] if ctx.records else len(prob.out_t)
        a = add_outputs(ay + az, 0, n0)  # y_0 = z_0 = y0
        run.stats["nfe_backward"] = f.nfe
        return (None, None, a, *gp)


def reconstruction_error(
    func, y0, t, *, coupling: float = 0.999, restart_gap: float | None = 10.0, **solve_kwargs
):
    """How exactly the backward pass reconstructs the states: a diagnostic.

    Solves with ``gradient=Reversible(coupling)`` (``solve_kwargs`` go to :func:`neuralode.solve`),
    keeping every state pair ``(y_n, z_n)`` of the forward solve, then walks back from the final
    pair with the algebraic inverse, as the backward pass does. Returns ``(err, solution)`` with
    ``err = max_n max(|y_n' - y_n|, |z_n' - z_n|) / max(|y_n|, |z_n|)`` (max norms; primes are the
    reconstructed states).
    """
    from .._solve import solve

    probe = _Probe(coupling=coupling, restart_gap=restart_gap)
    sol = solve(func, y0, t, gradient=probe, **solve_kwargs)
    return sol.stats["reconstruction_error"], sol


@dataclass(frozen=True)
class _Probe(Reversible):
    """Reversible with the reconstruction measured (see :func:`reconstruction_error`)."""

    def run(self, run: Run, y0flat: torch.Tensor):
        lam = self.coupling
        with torch.no_grad():
            res, records, z, states, restarts = integrate_reversible(
                run, lam, y0flat, restart_gap=self.restart_gap, keep_states=True
            )
            y = res.y_final
            f, st = run.vector_field(), run.stepper
            worst = 0.0
            for k in range(len(records) - 1, -1, -1):
                y, z = restarts.get(k, (y, z))
                ys, zs = states[k]
                y, z = _invert(st, f, lam, records[k][:4], y, z)
                scale = max(float(ys.abs().max()), float(zs.abs().max()))
                if scale > 0:
                    err = max(float((y - ys).abs().max()), float((z - zs).abs().max()))
                    worst = max(worst, err / scale)
        run.stats["reconstruction_error"] = worst
        return res.ys
