"""The backward solve of the backsolve adjoint (:class:`~neuralode.gradients.Backsolve`): where
it starts (:func:`backward_start`, :func:`state_at`) and the solve of the augmented system
``(y, a, g)`` from there back to the initial time (:func:`backward_solve`), with its stops at
output times or replays of the forward steps holding them. The autograd Function that calls it
and the method's settings are in :mod:`neuralode.gradients.adjoint`."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING

import torch

from .._compiled_adjoint import compiled_backward
from .._loop import (
    FlatVectorField,
    Problem,
    VectorField,
    integrate,
    make_stepper,
    replay_step,
    sorted_outputs_grad,
)
from .._tree import flatten_state
from ..controllers import ConstantStep, PIController, StepToGrid
from ..controllers.step_size import time_beside, underflows
from ..errors import MaxStepsError
from ..solvers import get_tableau
from ._common import Run, add_drift, warn_drift
from .checkpoint import add_initial_outputs, n_initial_outputs

if TYPE_CHECKING:
    from .adjoint import Backsolve

__all__ = ["backward_start", "state_at", "backward_solve"]


def backward_start(run: Run, res) -> tuple[float, torch.Tensor | None]:
    """``(t_start, y_start)``: where the backward solve starts, and the state there. After a
    solve that stopped early (``throw=False``) the adjoint is zero past the last output
    reached, so it starts at that output (not where the forward failed), from its value; with
    per-sample output grids (an output is one sample's row) None: see :func:`state_at`."""
    prob, steps = run.prob, res.steps
    if res.status in ("success", "event"):
        return (steps[-1].t_new if steps else prob.t0), res.y_final
    n_reached = steps[-1].out_hi if steps else 0
    if n_reached <= n_initial_outputs(prob):  # no output past t0: nothing to integrate
        return prob.t0, res.y_final
    if prob.out_sample is not None:
        return prob.out_t[n_reached - 1], None
    y_out = res.ys[n_reached - 1].reshape(res.y_final.shape)  # (1-D t: sorted = result order)
    return prob.out_t[n_reached - 1], y_out


def state_at(run: Run, y0flat: torch.Tensor, t_end: float) -> torch.Tensor:
    """The state at ``t_end`` (reached by the forward), solved for again without a graph."""
    prob = dataclasses.replace(
        run.prob,
        t_end=t_end,
        out_t=[],
        out_sample=None,
        out_order=None,
        n_out_rows=0,
        _out_t_dev=None,
    )
    with torch.no_grad():
        return integrate(prob, run.vector_field(), y0flat, track_grad=False).y_final


def backward_solve(run: Run, cfg: Backsolve, params, y_final, t_start: float, g_ys, ys):
    prob = run.prob
    spec = prob.spec
    B, M = y_final.shape
    dtype, device = y_final.dtype, y_final.device
    steps = run.result.steps
    direction = prob.direction
    samples = run.samples_all
    g_sorted = sorted_outputs_grad(prob, g_ys)
    out_t = prob.out_t
    # Where the adjoint jumps, the reconstructed y is put back to the forward's own value (its
    # outputs; the start of a replayed step): y solved backward drifts off the forward's
    # trajectory, exponentially fast on contracting dynamics (torchdiffeq restarts from the
    # forward's outputs likewise). Under a 2-D t an output sets its own sample's row only.
    ys_sorted = sorted_outputs_grad(prob, ys)

    drift = [None]  # the largest distance put back, in units of the forward's tolerance

    def put_back(y, idx):
        rows = None if samples is None else samples[idx]
        fwd = ys_sorted[idx[0]].view(B, M) if rows is None else ys_sorted[idx].view(-1, M)
        mine = y.view(B, M) if rows is None else y.view(B, M)[rows]
        add_drift(drift, mine, fwd, prob.rtol, prob.atol, rows)
        if rows is None:
            return fwd.reshape(-1)
        return y.view(B, M).index_copy(0, rows, fwd).reshape(-1)

    # The backward solve stops where the adjoint jumps: at outputs exactly on a forward step
    # boundary, and at the start of each forward step holding outputs (added through that step's
    # own continuous extension). When it runs at the forward's tolerances it visits every forward
    # boundary and proposes each forward step as its backward step over the same interval (the
    # adjoint shares the forward's time scales), so the stops cost no extra steps; the error of
    # every backward step is still controlled. With looser adjoint tolerances it stops only where
    # the adjoint jumps and carries its step size across the stops.
    mode = cfg.outputs
    if mode == "auto":
        # Stopping at outputs inside steps costs about one backward step each; take it when
        # they are no more than the forward steps (the cost at most doubles, and the gradient
        # follows the continuous problem more closely), else replay (cost flat in outputs).
        n_inner = sum(
            sum(tau != rec.t_new for tau in out_t[rec.out_lo : rec.out_hi]) for rec in steps
        )
        # Compiled stepping (compile=True) stops at every output: its jumps are then made
        # inside the compiled chunks, while replays would run eagerly.
        # A multistep forward method cannot replay one step out of its history: stop.
        replayable = getattr(prob.tableau, "single_step_replay", True)
        few = n_inner <= len(steps)
        mode = "stop" if few or run.stats.get("compiled") or not replayable else "replay"
    run.stats["backsolve_outputs"] = mode
    actions: dict[float, list[tuple[str, int]]] = {}
    for k, rec in enumerate(steps):
        taus = out_t[rec.out_lo : rec.out_hi]
        if mode == "stop":  # a stop at every output time: the adjoint jumps there
            for j, tau in enumerate(taus):
                actions.setdefault(tau, []).append(("at", rec.out_lo + j))
            continue
        if any(tau == rec.t_new for tau in taus):
            actions.setdefault(rec.t_new, []).append(("end", k))
        if any(tau != rec.t_new for tau in taus):
            actions.setdefault(rec.t, []).append(("inner", k))
    follow_forward = cfg.rtol is None and cfg.atol is None and cfg.dt is None
    boundaries = {*(r.t for r in steps), *(r.t_new for r in steps)} if follow_forward else actions
    points = sorted(
        # (past t_start only when the forward stopped early: no output there, a zero adjoint)
        {x for x in (t_start, prob.t0, *boundaries, *actions) if direction * (t_start - x) >= 0},
        key=lambda x: -direction * x,
    )

    # The augmented state (y, a, g_1..g_P), flat, integrated by the same engine.
    p_sizes = [p.numel() for p in params]
    y = y_final.reshape(-1)
    a = torch.zeros_like(y)
    gs = [torch.zeros(n, dtype=dtype, device=device) for n in p_sizes]
    aug_spec, _ = flatten_state((y, a, *gs), batched=False, name="augmented state")

    check = run.extra.get("param_check")
    inner_f = VectorField(run.func, spec, run.time_dtype)  # inside the augmented dynamics
    fwd_f = VectorField(run.func, spec, run.time_dtype)  # replays of forward steps

    # The last evaluation of the augmented dynamics, with its graph kept: a segment ends with
    # an FSAL stage at its end point, so a replay starting there can reuse f(t_n, y_n).
    last: dict = {}

    def aug_parts(tf: float, yy, aa) -> list:
        """(f, -a^T df/dy, -a^T df/dtheta_1, ...) at time ``tf``, each flat."""
        with torch.enable_grad():
            yv = yy.detach().requires_grad_()
            fy = inner_f(tf, yv)
            if check is not None:
                check(fy, yv)
            if fy.requires_grad:
                vj = torch.autograd.grad(
                    fy, [yv, *params], -aa, allow_unused=True, retain_graph=True
                )
                last.update(t=tf, y=yv, f=fy)
            else:
                vj = [None] * (1 + len(params))
        out = [fy.detach().reshape(-1)]
        out.append(vj[0].reshape(-1) if vj[0] is not None else torch.zeros_like(aa).reshape(-1))
        for v, n in zip(vj[1:], p_sizes):
            out.append(
                v.reshape(-1).to(dtype)
                if v is not None
                else torch.zeros(n, dtype=dtype, device=device)
            )
        return out

    def aug_func(t, aug):  # on the structured augmented state (the implicit solvers' Jacobians)
        return tuple(aug_parts(_t_float(t), aug[0].view(B, M), aug[1].view(B, M)))

    def aug_flat(tf: float, v):  # on the flat (1, W) augmented state: no unflatten/validation
        v = v.view(-1)
        return torch.cat(aug_parts(tf, v[: B * M].view(B, M), v[B * M : 2 * B * M].view(B, M)))

    aug_f = FlatVectorField(aug_flat, aug_func, aug_spec, run.time_dtype)
    tab = get_tableau(cfg.solver) if cfg.solver is not None else prob.tableau
    ctrl = prob.controller
    rtol = cfg.rtol if cfg.rtol is not None else prob.rtol
    atol = cfg.atol if cfg.atol is not None else prob.atol
    if tab.adaptive and ctrl.adaptive:
        # The controller's own tolerances are placeholders: the augmented problem carries the
        # tolerances laid out over (y, a, params) (aug_rtol/aug_atol below).
        # No dt_min: the forward's last step may be shorter than it (clipped to the end).
        actrl = ctrl.adjoint_rule()
    elif tab.adaptive and cfg.solver is not None:  # fixed-step forward, adaptive backward
        actrl = PIController(
            rtol=1e-6 if cfg.rtol is None else cfg.rtol, atol=1e-8 if cfg.atol is None else cfg.atol
        )
        rtol, atol = actrl.rtol, actrl.atol
    elif cfg.dt is not None:  # a fixed step of its own
        actrl = ConstantStep(cfg.dt, jump_t=ctrl.jump_t)
        if tab.adaptive:
            raise ValueError("Backsolve(dt=...) needs a fixed-step solver (e.g. solver='rk4')")
    else:  # a fixed-step method: the forward's steps, backward
        grid = sorted({prob.t0, *(r.t_new for r in steps)})
        actrl = StepToGrid(grid if len(grid) >= 2 else [prob.t0, prob.t_end], jump_t=ctrl.jump_t)
        if tab.adaptive:
            tab = get_tableau("rk4")
    aug_rtol = _aug_tol(rtol, B, M, p_sizes, dtype, device)
    aug_atol = _aug_tol(atol, B, M, p_sizes, dtype, device)

    # A norm object with resolve() decides only now (the torchdiffeq face's adjoint_options).
    norm = cfg.norm.resolve() if hasattr(cfg.norm, "resolve") else cfg.norm
    # compile=True: the backward solve in compiled chunks where the augmented field can be
    # traced (else None: the eager driver).
    compiled = compiled_backward(run, params, (B, M), tab, norm, aug_f, follow_forward)

    def aug_problem(t0, t_end, controller, max_steps):
        return Problem(
            spec=aug_spec, tableau=tab, controller=controller, t0=t0, t_end=t_end, out_t=[],
            out_sample=None, out_order=None, n_out_rows=0, max_steps=max_steps, rtol=aug_rtol,
            atol=aug_atol, norm=norm, norm_components=2 if cfg.seminorm else None,
        )  # fmt: skip

    replay_gp = [torch.zeros_like(p) for p in params]
    aug_stepper = None
    jumps = set(ctrl.jump_t)
    if (
        compiled is not None
        and len(points) > 1
        and mode == "stop"
        and not jumps
        and not isinstance(actrl, ConstantStep)
    ):
        # The whole solve at once, the adjoint's jumps at the outputs inside the chunks.
        h0 = _step_containing(steps, points[0], points[1], direction) if follow_forward else None
        with torch.no_grad(), _max_steps_error(cfg, 0, prob.t0):
            got = compiled.whole(
                lambda t0, t_end, c: aug_problem(t0, t_end, c, cfg.max_steps), actrl, points,
                actions, g_sorted, samples, torch.cat([y, a, *gs]).unsqueeze(0), h0, ys_sorted,
            )  # fmt: skip
        if got is not None:
            parts = aug_spec.components(got[0])
            y, a = parts[0].reshape(-1), parts[1].reshape(-1)
            gs = [c.reshape(-1) for c in parts[2:]]
            points = []  # (nothing left for the segments below)
    k1_next = None  # the first stage for the next segment, when it is already known
    h_carry = None
    used = 0  # step attempts of the backward solve so far (all segments)
    for i, point in enumerate(points):
        acted = False
        for kind, k in actions.get(point, ()):
            acted = True
            if kind == "at":
                y = put_back(y, [k])
                g = g_sorted[k]
                if samples is None:
                    a = a + g.reshape(-1)
                else:
                    a = a.view(B, M).index_add(0, samples[k : k + 1], g.unsqueeze(0)).reshape(-1)
                continue
            rec = steps[k]
            taus = out_t[rec.out_lo : rec.out_hi]
            if kind == "end":
                idx = [rec.out_lo + j for j, tau in enumerate(taus) if tau == rec.t_new]
                y = put_back(y, idx)
                g = g_sorted[idx]
                if samples is None:
                    a = a + g.sum(0).reshape(-1)
                else:
                    a = a.view(B, M).index_add(0, samples[idx], g).reshape(-1)
                continue
            k1 = None
            if rec.y is not None:  # (kept by the forward for the steps with outputs inside)
                y = rec.y.reshape(-1)
            if _last_at(last, rec.t_first, y.view(B, M)):
                yk, k1 = last["y"], last["f"]  # reuse the segment's final FSAL stage
            else:
                yk = y.view(B, M).detach().requires_grad_()
                last.clear()
            with torch.enable_grad():
                _, vals, k1r = replay_step(prob, run.stepper, fwd_f, rec, yk, samples, k1=k1)
                gout = g_sorted[rec.out_lo : rec.out_hi].clone()
                at_end = [j for j, tau in enumerate(taus) if tau == rec.t_new]
                if at_end:
                    gout[at_end] = 0
                keep = rec.t_first == point and k1r.requires_grad
                vj = torch.autograd.grad(
                    vals, [yk, *params], gout, allow_unused=True, retain_graph=keep
                )
            if keep:
                last.update(t=point, y=yk, f=k1r)
            if vj[0] is not None:
                a = a + vj[0].reshape(-1)
            for q, v in enumerate(vj[1:]):
                if v is not None:
                    replay_gp[q] = replay_gp[q] + v
        if i + 1 == len(points):
            break
        nxt = points[i + 1]
        # max_steps bounds the whole backward solve, over all its segments.
        aug_prob = aug_problem(
            point, nxt, actrl, None if cfg.max_steps is None else max(cfg.max_steps - used, 0)
        )
        if aug_stepper is None:
            aug_stepper = make_stepper(tab, dtype, device)
        flat = torch.cat([y, a, *gs]).unsqueeze(0)
        if point in jumps:
            k1_aug = None
        elif acted:
            # The adjoint jumped here. If f(t_n, y_n) with its graph is at hand at the same y
            # (the replay's first stage; the previous segment's last one only where y was not
            # put back), the augmented first stage costs one vector-Jacobian product with the
            # new adjoint, and no evaluation of f; else f is evaluated at the y put back.
            k1_aug = None
            if _last_at(last, point, y.view(B, M)):
                k1_aug = _aug_stage(last, params, a.view(B, M), p_sizes, dtype, device)
        else:
            k1_aug = k1_next  # FSAL across the boundary: nothing changed here
        # Starting at a discontinuity, the first stage sees the limit from the side integrated.
        t_first = time_beside(point, nxt, run.time_dtype) if point in jumps else None
        h0 = _step_containing(steps, point, nxt, direction) if follow_forward else h_carry
        if h0 is None and underflows(abs(nxt - point), point, 0.0):
            # A first segment a rounding long (the ends of two samples' grids): the forward
            # step as the proposal, clipped to the segment (a step selected for it underflows).
            h0 = _step_containing(steps, point, nxt, direction)
        with torch.no_grad(), _max_steps_error(cfg, used, prob.t0):
            res = (
                None if compiled is None else compiled.segment(aug_prob, flat, h0, k1_aug, t_first)
            )
            if res is None:
                res = integrate(
                    aug_prob, aug_f, flat, track_grad=False, stepper=aug_stepper, h0=h0,
                    k1=k1_aug, t_first=t_first,
                )  # fmt: skip
        used += res.n_accepted + res.n_rejected
        k1_next = res.k1_next
        h_carry = res.h_next
        if last.get("t") != nxt:  # only a stage at the segment's end point can be reused
            last.clear()
        parts = aug_spec.components(res.y_final)
        y, a = parts[0].reshape(-1), parts[1].reshape(-1)
        gs = [c.reshape(-1) for c in parts[2:]]

    a = add_initial_outputs(a.view(B, M), g_sorted, n_initial_outputs(prob), samples)
    # Each augmented evaluation calls func once (plus one vector-Jacobian product); replays of
    # forward steps holding outputs call it once per stage.
    warn_drift(run.stats, drift, run.func, prob.rtol, prob.atol)
    run.stats["nfe_backward"] = aug_f.nfe + fwd_f.nfe
    run.stats["nfe_backward_replay"] = fwd_f.nfe
    grads_p = []
    for p, g, extra in zip(params, gs, replay_gp):
        g = g.view(p.shape)
        if g.is_complex() and not p.is_complex():
            g = g.real
        grads_p.append(g.to(p.dtype) + extra)
    return [a, *grads_p]


@contextlib.contextmanager
def _max_steps_error(cfg: Backsolve, used: int, t0: float):
    """A MaxStepsError of the backward solve says which limit it reached (``used``: the step
    attempts of the earlier segments)."""
    try:
        yield
    except MaxStepsError as e:
        raise MaxStepsError(
            f"the backward (adjoint) solve reached Backsolve(max_steps={cfg.max_steps}) "
            f"step attempts at t={e.t:.17g}, before it got back to t0={t0:.17g}; raise "
            "Backsolve(max_steps=...) or loosen its rtol/atol",
            t=e.t,
            step=used + e.step,
            h=e.h,
        ) from e


def _step_containing(steps, point: float, nxt: float, direction: float) -> float:
    """The length of the forward step that holds the backward segment from ``point`` to ``nxt``
    (proposed as the backward step: the segment ends it when it is a piece of the step, e.g.
    between two output times a few ulps apart, without a step size below the resolution)."""
    lo, hi = 0, len(steps)
    mid_t = 0.5 * (point + nxt)
    while lo < hi:  # the first step whose end lies beyond the segment's midpoint
        m = (lo + hi) // 2
        if direction * (steps[m].t_new - mid_t) < 0:
            lo = m + 1
        else:
            hi = m
    if lo < len(steps):
        return abs(steps[lo].t_new - steps[lo].t)
    return abs(nxt - point)


def _last_at(last: dict, t: float, y) -> bool:
    """Whether the kept evaluation of f was made at exactly (t, y)."""
    return last.get("t") == t and torch.equal(last["y"], y)


def _aug_stage(last: dict, params, a, p_sizes, dtype, device):
    """The augmented vector field at the kept evaluation, for adjoint ``a``: (f, -a^T df/dy,
    -a^T df/dtheta), flat (1, W)."""
    fy, yk = last["f"], last["y"]
    with torch.enable_grad():
        vj = torch.autograd.grad(fy, [yk, *params], -a, allow_unused=True, retain_graph=True)
    parts = [fy.detach().reshape(-1)]
    for v, n in zip(vj, [a.numel(), *p_sizes]):
        z = torch.zeros(n, dtype=dtype, device=device)
        parts.append(v.reshape(-1).to(dtype) if v is not None else z)
    return torch.cat(parts).unsqueeze(0)


def _t_float(t) -> float:
    return float(t) if not isinstance(t, torch.Tensor) else t.item()


def _aug_tol(tol, B, M, p_sizes, dtype, device):
    """Tolerances for (y, a, params...): the state's for y and a, the smallest for params."""
    if not isinstance(tol, torch.Tensor):
        return tol
    real = dtype.to_real() if dtype.is_complex else dtype
    t = tol.to(real).expand(B, M).reshape(-1)
    rest = [torch.full((n,), float(t.min()), dtype=real, device=device) for n in p_sizes]
    return torch.cat([t, t, *rest]).unsqueeze(0)
