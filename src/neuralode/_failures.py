"""When a step cannot be taken (:func:`cannot_step`) and the one builder of failure messages:
every driver applies the same rule and names the same cause in the same words."""

from __future__ import annotations

from .controllers.step_size import isfinite, where
from .errors import MaxStepsError, NonFiniteError, StepSizeUnderflowError

__all__ = ["CAUSES", "cannot_step", "step_failure", "report_failure", "stops_here"]

# The causes of :func:`step_failure` by code: 0 (none) ... 4, where code 4 (a fixed step that
# came out non-finite) is the per-row driver's own (the host-float driver checks it at the end),
# and code 5 (a controller's propose that does not advance) compiled stepping's, raised by the
# host as the eager drivers' ValueError (controllers.base.stuck_error), never reported here.
CAUSES = (None, "max_steps", "nonfinite_h", "underflow", "nonfinite_fixed", "stuck")


def cannot_step(ctrl, h, t, attempts, max_steps: int | None):
    """Why the next step, of size ``h`` (already :meth:`~Controller.bounded`) from ``t`` after
    ``attempts`` step attempts, cannot be taken: the code in :data:`CAUSES` (0: it can).

    The rule of every driver, in this order: the step limit ``max_steps``; then, with adaptive
    control, a step size that is not finite (func returned NaN/inf); then the controller's
    underflow rule (below ``dt_min`` or the resolution of ``t``; for fixed steps too, where a
    step that rounds away would otherwise never reach the end). Floats (an int code), or
    ``(A,)`` tensors per row (a long tensor of codes; ``attempts`` then per row too).
    """
    code = where(ctrl.underflows(h, t), 3, 0)
    if ctrl.adaptive:
        code = where(isfinite(h), code, 2)
    if max_steps is not None:
        code = where(attempts >= max_steps, 1, code)
    return code


def step_failure(
    cause: str,
    *,
    t: float,
    attempts: int,
    h: float,
    dt_min: float = 0.0,
    nonfinite: bool = False,
    max_steps: int | None = None,
    t_end: float | None = None,
    n_acc: int = 0,
    n_rej: int = 0,
    sample: int | None = None,
    engine: str = "",
):
    """``(exception class, message)`` for a solve that cannot go on.

    ``cause`` is ``"max_steps"`` (the step limit), ``"nonfinite_h"`` (no finite step size: func
    returned NaN/inf), ``"underflow"`` (the step size fell below ``dt_min`` or the resolution of
    ``t``; with ``nonfinite`` because every trial step was non-finite) or ``"nonfinite_fixed"``
    (the state became non-finite during a fixed-step solve). ``sample`` names the sample under
    per-sample control; ``engine`` (e.g. ``"compiled stepping"``) is added in parentheses.
    """
    tag = f" ({engine})" if engine else ""
    if sample is None:
        where = f"at t={t:.17g} after {attempts} step attempts"
    else:
        where = f"for sample {sample} at t={t:.17g} after {attempts} step attempts of this sample"
    if cause == "max_steps":
        head = (
            f"reached max_steps={max_steps} step attempts at t={t:.17g}"
            if sample is None
            else f"{where[4:]}: reached max_steps={max_steps}"
        )
        limit = " (a limit per sample here)" if sample is not None else ""
        return MaxStepsError, (
            f"{head} (accepted {n_acc}, rejected {n_rej}, last step size {h:.3g}) before "
            f"{'its' if sample is not None else 'the'} final time {t_end:.17g}{tag}; raise "
            f"max_steps{limit}, loosen rtol/atol, or check whether the problem is stiff (an "
            "implicit method would take far fewer steps)"
        )
    if cause == "nonfinite_h":
        return NonFiniteError, (
            f"func returned non-finite values (NaN/inf) {where}{tag}, so no step size can be "
            "chosen; check func and the state for non-finite values (a division by zero, a log "
            "of a negative number, an overflow in float32)"
        )
    if cause == "nonfinite_fixed":
        who = "the state" if sample is None else f"the state of sample {sample}"
        return NonFiniteError, (
            f"{who} became non-finite (NaN/inf) during a fixed-step solve that ended at "
            f"t={t:.17g} after {attempts} steps of size {h:.3g}{tag}; use a smaller step, an "
            "adaptive method, or check func for singularities"
        )
    if cause != "underflow":
        raise AssertionError(f"unknown failure cause {cause!r}")
    why = (
        "func returned non-finite values (NaN/inf) at every trial step"
        if nonfinite
        else "the solution may blow up (a singularity) or change too fast to resolve"
    )
    below = f"dt_min={dt_min:.3g}" if h < dt_min else "the resolution of t"
    cls = NonFiniteError if nonfinite else StepSizeUnderflowError
    return cls, (
        f"step size underflow {where}{tag}: step size {h:.3g} is below {below}; {why}. Try: "
        "loosen rtol/atol, check func for singularities or NaNs near this t, rescale time, or "
        "use an implicit method if the problem is stiff"
    )


def report_failure(cause: str, *, throw: bool, state: dict, **where) -> None:
    """Raise the failure ``cause`` (``throw``) or record it in ``state``: the first failure
    sets ``state["status"]``/``["message"]``; a failing ``sample`` (per-sample control) is also
    listed in ``state["failed"]`` and named by the exception's ``sample`` attribute. ``where``:
    the keywords of :func:`step_failure`."""
    cls, msg = step_failure(cause, **where)
    sample = where.get("sample")
    if throw:
        exc = cls(msg, t=where["t"], step=where["attempts"], h=where["h"])
        if sample is not None:
            exc.sample = sample  # (the backsolve adjoint's message names the sample)
        raise exc
    if sample is not None:
        state["failed"].append(sample)
    if state["status"] == "success":
        state["status"], state["message"] = cls.status, msg


def stops_here(ctrl, h_abs: float, t: float, attempts: int, max_steps, *, nonfinite: bool,
               **where) -> bool:  # fmt: skip
    """The host-float drivers' check before each attempt: :func:`cannot_step`, and on a cause
    :func:`report_failure` (raises with ``throw``, else records it and returns True: the solve
    stops at ``t``). ``where``: ``t_end``, ``n_acc``, ``n_rej``, ``throw``, ``state`` (and any
    other keyword of :func:`report_failure`)."""
    cause = cannot_step(ctrl, h_abs, t, attempts, max_steps)
    if cause:
        report_failure(
            CAUSES[cause], t=t, attempts=attempts, h=h_abs, dt_min=ctrl.dt_min,
            nonfinite=nonfinite, max_steps=max_steps, **where,
        )  # fmt: skip
    return bool(cause)
