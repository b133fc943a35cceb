"""The host-float driver's path for fixed steps (no error estimate, records or monitor).

A fixed-step solve makes no per-step decision, so its steps are known before it starts: the
controller's plan (its own ``initial_step``/``bounded``/``propose``/``land``, cached), walked with
the stages kept as a list in the state's own shape (:meth:`RKStepper.stages`, the engine's one
stage combination) and no host read until the finiteness check at the end. Flow-matching and
diffusion samplers call such solves in a loop, where the general loop's per-step bookkeeping is
a visible share of the time.
"""

from __future__ import annotations

import functools
import itertools
import math

from ._failures import CAUSES, cannot_step, report_failure
from ._loop import (
    LoopResult,
    VectorField,
    _check_fixed_end,
    _gather_outputs,
    _start_outputs,
    _step_outputs,
    _view,
)
from .controllers.step_size import time_beside

__all__ = ["_integrate_fixed"]


def _fixed_plan(ctrl, t0: float, t_end: float, time_dtype, max_steps: int | None):
    """The steps of a fixed-step controller from ``t0`` to ``t_end``: ``(t, t_new, t_last,
    is_jump)`` per step, from the controller's own ``initial_step``/``bounded``/``propose``/
    ``land`` (the rules the general loop applies step by step), and ``t_last`` just before a
    jump as there. Where no step can be taken (:func:`~neuralode._failures.cannot_step`: the
    step limit, a step size below the resolution of t) the plan ends with ``(t, None, cause,
    h)``. Plans of up to ``_PLAN_CACHED`` steps are cached per (controller, interval, time
    dtype, max_steps): a sampling loop solves the same grid again and again."""
    try:
        plan = _cached_plan(ctrl, t0, t_end, time_dtype, max_steps)
    except TypeError:  # an unhashable (user-defined) controller
        plan = None
    return _plan_steps(ctrl, t0, t_end, time_dtype, max_steps) if plan is None else plan


_PLAN_CACHED = 2048  # steps; 32 plans at most: a few MB in the worst case


@functools.lru_cache(maxsize=32)
def _cached_plan(ctrl, t0, t_end, time_dtype, max_steps):
    steps = _plan_steps(ctrl, t0, t_end, time_dtype, max_steps)
    plan = tuple(itertools.islice(steps, _PLAN_CACHED + 1))
    return plan if len(plan) <= _PLAN_CACHED else None


def _plan_steps(ctrl, t0, t_end, time_dtype, max_steps):
    direction = 1.0 if t_end >= t0 else -1.0
    landings = ctrl.landing_times(t0, t_end)
    h = 0.0 if t_end == t0 else ctrl.first_step(None, None, t0, None, None, direction, 0, 0)
    h_abs = ctrl.bounded(abs(h))
    t, n = t0, 0
    while direction * (t_end - t) > 0:
        cause = cannot_step(ctrl, h_abs, t, n, max_steps)
        if cause:
            yield t, None, CAUSES[cause], h_abs
            return
        t_try = ctrl.propose(t, h_abs, t0, t_end, direction)
        t_new, _, is_jump = ctrl.land(t, t_try, t_end, direction, landings)
        yield t, t_new, time_beside(t_new, t, time_dtype) if is_jump else t_new, is_jump
        t, n = t_new, n + 1


def _integrate_fixed(prob, f, y0, stepper, k1, t_first, throw) -> LoopResult:
    """The host-float driver for fixed steps without records or a monitor (no error estimate,
    no per-step decision, no host read): the controller's plan of steps, the stages as a list
    in the state's own shape (:meth:`RKStepper.stages`, whose stage combination is the
    engine's one), outputs at step ends taken from the state itself and others interpolated.
    Same steps, same evaluations and the same results as the general loop."""
    ctrl, t0, t_end, direction = prob.controller, prob.t0, prob.t_end, prob.direction
    out_t, n_out, max_steps = prob.out_t, len(prob.out_t), prob.max_steps
    flat_shape = y0.shape
    # A single-tensor state in its own shape, f called on it directly; otherwise flat (B, M).
    natural = type(f) is VectorField and f._shape is not None
    fcall = f.shaped if natural else f
    shape = f._shape if natural else flat_shape
    samples_all = prob.samples_on(y0.device)
    out_vals, p = _start_outputs(prob, y0, samples_all)
    if t_first is None:
        t_first = ctrl.first_time(t0, t_end, f.time_dtype)
    y = _view(y0, shape)
    k = None if k1 is None else _view(k1, shape)
    fsal = stepper.fsal
    state = {"status": "success", "message": ""}
    n, t, h = 0, t0, math.nan
    next_out = out_t[p] if p < n_out else None
    for t, t_new, t_last, is_jump in _fixed_plan(ctrl, t0, t_end, f.time_dtype, max_steps):
        if t_new is None:  # no step can be taken: the plan's (t, None, cause, step size)
            report_failure(
                t_last, t=t, attempts=n, h=is_jump, dt_min=ctrl.dt_min, max_steps=max_steps,
                t_end=t_end, n_acc=n, throw=throw, state=state,
            )  # fmt: skip
            break
        h = t_new - t
        n += 1
        if k is None:
            k = fcall(t_first, y)
        y_new, ks = stepper.stages(fcall, t, h, y, k, t_last)
        k_end = ks[-1] if fsal else None
        if next_out is not None and direction * (next_out - t_new) <= 0:
            lo = p
            while p < n_out and direction * (out_t[p] - t_new) <= 0:
                p += 1
            next_out = out_t[p] if p < n_out else None
            yf, yf_new = y.view(*flat_shape), y_new.view(*flat_shape)
            vals, _, k_next = _step_outputs(
                prob, stepper, f, ks, yf, yf_new, t, t_new, t_last, lo, p, samples_all
            )
            out_vals.append(vals)
            if k_next is not None:  # f at the step end, for the interpolant: the next k1
                k_end = _view(k_next, shape)
        y, t = y_new, t_new
        if is_jump:
            k, t_first = None, time_beside(t_new, t_new + direction, f.time_dtype)
        else:
            k, t_first = k_end, t_new
    y = y.view(*flat_shape)
    if state["status"] == "success":
        _check_fixed_end(y, t, n, h, throw, state)
    ys = _gather_outputs(prob, out_vals, p, y0, samples_all)
    return LoopResult(
        ys=ys, y_final=y, t_reached=t, status=state["status"], message=state["message"],
        n_accepted=n, n_rejected=0, h_next=abs(h),
        k1_next=None if k is None or state["status"] != "success" else k.view(*flat_shape),
    )  # fmt: skip
