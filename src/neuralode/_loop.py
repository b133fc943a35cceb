"""The stepping loop: step -> controller -> accept/reject -> record outputs.

Times are plain Python floats (IEEE double) on the host: the controller's arithmetic is exact
double precision whatever the state's dtype, and the only host-device synchronisation per step
is reading the scaled error norm for the accept/reject decision. The state lives on its device
as one flat ``(B, M)`` tensor (see :mod:`neuralode._tree`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ._failures import report_failure, stops_here
from ._norms import ErrorNorm, initial_norm, user_scaled_norm
from ._tree import TreeSpec
from .controllers.step_size import time_beside
from .solvers.explicit_rk import RKStepper, make_stepper
from .solvers.tableau import ButcherTableau

__all__ = ["Problem", "VectorField", "FlatVectorField", "integrate", "replay_step"]
__all__ += ["StepRecord", "LoopResult"]


def _view(x: torch.Tensor, shape) -> torch.Tensor:
    """``x.view(shape)``; the sizes are passed unpacked, which PyTorch parses about twice as
    fast as a ``torch.Size`` (a per-evaluation cost on small states)."""
    return x.view(*shape) if shape else x.view(())


class VectorField:
    """``func`` on the flat state: unflattens, calls, validates and flattens; counts NFE."""

    def __init__(self, func, spec: TreeSpec, time_dtype: torch.dtype):
        self.func = func
        self.spec = spec
        self.time_dtype = time_dtype
        self.device = spec.device
        self.nfe = 0
        # Fast path for the common single-tensor state: a reshape in, a check and reshape out.
        self._shape = spec.shapes[0] if spec.kind == "tensor" else None
        self._dtype = spec.dtype

    def _time(self, t: float) -> torch.Tensor:
        # scalar_tensor fills on the device (no host-to-device copy, so no synchronisation).
        return torch.scalar_tensor(t, dtype=self.time_dtype, device=self.device)

    def checked(self, out, t: float) -> torch.Tensor:
        """func's return value ``out`` validated and flattened to ``(B, M)`` (the slow path:
        raises naming what is wrong)."""
        return self.spec.flatten(out, what="the derivative returned by func", t=t)

    def __call__(self, t: float, y: torch.Tensor) -> torch.Tensor:
        """f at ``(t, y)`` with ``y`` flat ``(B, M)``; returns ``(B, M)``."""
        self.nfe += 1
        shape = self._shape
        if shape is not None:  # a single tensor: a check and a reshape (the first stage)
            # (No view where the shapes agree: with a graph every view is an autograd node.)
            same = y.shape == shape
            out = self.func(self._time(t), y if same else _view(y, shape))
            if type(out) is torch.Tensor and out.shape == shape and out.dtype == self.spec.dtype:
                # (reshape: a view for a contiguous out, a copy for e.g. (A @ y.T).T)
                return out if same else out.reshape(*y.shape)
        else:
            out = self.func(self._time(t), self.spec.unflatten(y))
        return self.checked(out, t)

    def shaped(self, t: float, y: torch.Tensor) -> torch.Tensor:
        """f at ``(t, y)`` with ``y`` in the state's own shape (a single-tensor state); returns
        that shape (the fixed-step driver keeps its state so: no reshapes per evaluation)."""
        self.nfe += 1
        out = self.func(self._time(t), y)
        if type(out) is torch.Tensor and out.shape == self._shape and out.dtype == self.spec.dtype:
            return out
        flat = self.checked(out, t)
        return _view(flat, self._shape)

    def flat(self, t: float, y: torch.Tensor) -> torch.Tensor:
        """f at ``(t, y)`` with ``y`` 1-D ``(B*M,)``; returns 1-D."""
        self.nfe += 1
        shape = self._shape
        if shape is not None:
            out = self.func(self._time(t), _view(y, shape))
            if type(out) is torch.Tensor and out.shape == shape and out.dtype == self.spec.dtype:
                return out.reshape(-1)
        else:
            out = self.func(self._time(t), self.spec.unflatten(y.view(self.spec.batch, -1)))
        return self.checked(out, t).reshape(-1)

    def into(self, t: float, y: torch.Tensor, dst_shaped, dst: torch.Tensor) -> None:
        """f at ``(t, y)`` (``y`` 1-D) written into a stage row ``dst`` (1-D); ``dst_shaped`` is
        the same row viewed in the state's shape (or None), which spares a reshape."""
        shape = self._shape
        if shape is None or dst_shaped is None:
            dst.copy_(self.flat(t, y))
            return
        self.nfe += 1
        # (_time and _view inlined: this is the call of every stage without a graph.)
        tt = torch.scalar_tensor(t, dtype=self.time_dtype, device=self.device)
        out = self.func(tt, y.view(*shape) if shape else y.view(()))
        if type(out) is torch.Tensor and out.dtype == self._dtype and out.shape == shape:
            dst_shaped.copy_(out)
        else:  # validated (raises naming what is wrong) without calling func again
            dst.copy_(self.checked(out, t).reshape(-1))


class FlatVectorField(VectorField):
    """The engine's own vector fields (augmented systems) on the flat state.

    ``flat_fn(t: float, y (B, M)) -> (B, M)`` is called directly: no time tensor, no unflatten,
    no validation. ``func`` (on the structured state, time as a tensor) stays available for the
    code that needs it (Jacobians of the implicit solvers).
    """

    def __init__(self, flat_fn, func, spec: TreeSpec, time_dtype: torch.dtype):
        super().__init__(func, spec, time_dtype)
        self.flat_fn = flat_fn

    def __call__(self, t: float, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.flat_fn(t, y).view(*y.shape)

    def flat(self, t: float, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.flat_fn(t, y).view(-1)

    def into(self, t: float, y: torch.Tensor, dst_shaped, dst: torch.Tensor) -> None:
        dst.copy_(self.flat(t, y))


@dataclass
class Problem:
    """Everything the loop needs, validated and normalised by ``_solve``."""

    spec: TreeSpec
    tableau: ButcherTableau
    controller: object
    t0: float
    t_end: float
    out_t: list[float]  # output times sorted in the direction of integration
    out_sample: list[int] | None  # sample index of each output (per-sample grids) or None
    out_order: torch.Tensor | None  # position of each sorted output in the result, or None
    n_out_rows: int  # number of output rows in the result (T or T*B)
    max_steps: int | None
    rtol: float | torch.Tensor = 0.0
    atol: float | torch.Tensor = 0.0
    norm: object = None  # user norm on the state structure, or None
    norm_components: int | None = None  # seminorm: only the first components enter the norm
    atol_zero: bool = False  # some absolute tolerance is zero (the error scale is floored)
    _out_t_dev: torch.Tensor | None = None

    def samples_on(self, device) -> torch.Tensor | None:
        """The sample index of each sorted output as a long tensor on ``device`` (per-sample
        grids), or None."""
        return None if self.out_sample is None else torch.tensor(self.out_sample, device=device)

    def out_t_on(self, device) -> torch.Tensor:
        """The sorted output times as a float64 tensor on ``device`` (copied once per solve)."""
        if self._out_t_dev is None or self._out_t_dev.device != torch.device(device):
            self._out_t_dev = torch.tensor(self.out_t, dtype=torch.float64, device=device)
        return self._out_t_dev

    @property
    def direction(self) -> float:
        return 1.0 if self.t_end >= self.t0 else -1.0


@dataclass
class StepRecord:
    """One accepted step: enough to replay it exactly."""

    t: float
    t_new: float
    t_first: float  # time at which the first stage was evaluated (perturbed after a jump)
    t_last: float  # time of the last stage at the step end (perturbed before a jump)
    out_lo: int  # outputs recorded in this step: sorted indices [out_lo, out_hi)
    out_hi: int
    y: torch.Tensor | None = None  # state at the step start (checkpointing, replays)
    K: torch.Tensor | None = None  # stages (dense output)
    k_next: torch.Tensor | None = None  # f at the step end (dense output of non-FSAL methods)


@dataclass
class LoopResult:
    ys: torch.Tensor  # (n_out_rows, ...) in result order
    y_final: torch.Tensor
    t_reached: float
    status: str
    message: str
    n_accepted: int
    n_rejected: int
    steps: list[StepRecord] = field(default_factory=list)
    h_next: float = math.nan  # the controller's proposal for a following step
    k1_next: torch.Tensor | None = None  # first stage of a following step, if known (FSAL)


# ---------------------------------------------------------------------------- the loop
def integrate(
    prob: Problem,
    f: VectorField,
    y0: torch.Tensor,
    *,
    track_grad: bool,
    record: str | None = None,
    throw: bool = True,
    stepper: RKStepper | None = None,
    h0: float | None = None,
    max_states: int | None = None,
    k1: torch.Tensor | None = None,
    t_first: float | None = None,
    monitor=None,
) -> LoopResult:
    """Integrate from ``prob.t0`` to ``prob.t_end`` and record the outputs.

    Parameters
    ----------
    record : {None, "times", "states", "dense"}
        Keep per accepted step: nothing; times, y at starts of steps with outputs inside (backsolve
        adjoint); y at every step start (checkpointing); plus the stages (dense output).
    max_states : int, optional
        With ``record="states"``, keep at most this many states: whenever the count is exceeded,
        every second kept state is dropped (the first always stays), so kept states are spread
        over the whole solve and a gap between them never exceeds twice the average.
    h0 : float, optional
        First step size, carried over from an earlier segment (no initial step selection).
    k1, t_first : optional
        f at the start, if already known, and the time at which the first stage is evaluated
        (default ``t0``; just past it when the segment starts at a discontinuity).
    track_grad : bool
        Whether the step is built for autograd (Direct gradients).
    monitor : callable, optional
        ``monitor(view: StepView) -> bool`` called after every accepted step; True stops the
        solve after that step with status ``"event"`` (event location uses this).
    """
    tab, ctrl = prob.tableau, prob.controller
    stepper = stepper or make_stepper(tab, y0.dtype, y0.device)
    # Stages may share one buffer unless steps keep them (dense output) or a graph does.
    stepper.reuse_buffer = record != "dense" and not track_grad
    # The Stepper hooks: bind(prob) at the start of every solve (Newton tolerances from rtol/atol;
    # multistep methods start a fresh history), accept(...) after every accepted step.
    stepper.bind(prob)
    if not ctrl.adaptive and record is None and monitor is None and type(stepper) is RKStepper:
        return _integrate_fixed(prob, f, y0, stepper, k1, t_first, throw)
    direction = prob.direction
    t0, t_end = prob.t0, prob.t_end
    adaptive = ctrl.adaptive
    landings = ctrl.landing_times(t0, t_end)
    n_out = len(prob.out_t)
    samples_all = prob.samples_on(y0.device)
    out_vals, p = _start_outputs(prob, y0, samples_all)

    t, y = t0, y0
    if t_first is None:
        t_first = ctrl.first_time(t0, t_end, f.time_dtype)
    if k1 is None:
        k1 = f(t_first, y0)
    nrm = k_order = None
    if adaptive:  # the scaled error norm of a step, as a float (the step's one host read)
        norm = ErrorNorm(y0, prob.spec, prob.norm_components)
        scaled_norm = user_scaled_norm if prob.norm is not None else norm
        k_order = tab.error_order()
        nrm = initial_norm(norm, y0, prob.rtol, prob.atol, prob.atol_zero, prob=prob)
    if h0 is not None and adaptive:  # carried over from a previous segment: no restart
        h = h0
    elif t_end == t0:
        h = 0.0
    else:
        h = ctrl.first_step(nrm, f, t0, y0, k1, direction, abs(t_end - t0), k_order)
    prev_err = 1.0
    attempts = n_acc = n_rej = 0
    last_nonfinite = False
    steps: list[StepRecord] = []
    kept: list[StepRecord] = []  # the steps that keep their start state (record="states")
    state = {"status": "success", "message": ""}

    while direction * (t_end - t) > 0:
        h_abs = ctrl.bounded(float(abs(h)), last_nonfinite)  # (adapt may return a 0-d tensor)
        # The step limit, a NaN/inf from func (at the start or in the error estimate), or a
        # step below dt_min or the resolution of t: every driver's one rule.
        if stops_here(ctrl, h_abs, t, attempts, prob.max_steps, nonfinite=last_nonfinite,
                      t_end=t_end, n_acc=n_acc, n_rej=n_rej, throw=throw, state=state):  # fmt: skip
            break
        # The controller proposes the step end and lands it on step_t/jump_t and the end.
        t_try = ctrl.propose(t, h_abs, t0, t_end, direction)
        t_new, clipped, is_jump = ctrl.land(t, t_try, t_end, direction, landings)
        h_step = t_new - t
        # At a discontinuity the last stage sees the left limit and the next step's first stage
        # the right limit (the next float on either side, as torchdiffeq's perturb does).
        t_last = time_beside(t_new, t, f.time_dtype) if is_jump else t_new
        if k1 is None:
            k1 = f(t_first, y)
        attempts += 1
        y_new, err, K = stepper.step(f, t, h_step, y, k1, t_last, track_grad)

        if adaptive:
            e = scaled_norm(prob, err, y, y_new)
            last_nonfinite = not math.isfinite(e)
            if not (e <= 1.0 or ctrl.accepts(e, min(h_abs, abs(h_step)))):
                n_rej += 1
                h, _ = ctrl.adapt(abs(h_step), h_abs, e, prev_err, k_order, False, clipped)
                continue

        # ---- accepted: record outputs inside (t, t_new]
        n_acc += 1
        stepper.accept(t, t_new, y, y_new, K)
        lo = p
        while p < n_out and direction * (prob.out_t[p] - t_new) <= 0:
            p += 1
        k_next = None
        Kd = None
        if p > lo:
            vals, Kd, k_next = _step_outputs(
                prob, stepper, f, K, y, y_new, t, t_new, t_last, lo, p, samples_all
            )
            out_vals.append(vals)
        if record is not None:
            inner = p > lo and prob.out_t[lo] != t_new  # outputs inside: a replay needs y
            rec = StepRecord(t, t_new, t_first, t_last, lo, p, y if inner else None)
            if record in ("states", "dense"):
                for r in thin_kept(kept, max_states):
                    r.y = None
                rec.y = y
                kept.append(rec)
            if record == "dense":
                rec.K = K if Kd is None else Kd
                rec.k_next = k_next
            steps.append(rec)
        stop = False
        if monitor is not None:
            view = StepView(stepper, f, t, t_new, t_last, y, y_new, K, Kd, k_next)
            stop = monitor(view)
            k_next = view.k_next
        # ---- advance
        if adaptive:
            h, prev_err = ctrl.adapt(abs(h_step), h_abs, e, prev_err, k_order, True, clipped)
        t, y, t_first = t_new, y_new, t_new
        if is_jump:  # f afresh at the right limit (the next float after t_new)
            k1, t_first = None, time_beside(t_new, t_new + direction, f.time_dtype)
        else:  # (k_next may be None: then evaluated at the next step's start)
            k1 = stepper.carry_fsal(K) if stepper.fsal else k_next
            if k1 is not None and k1.shape != y.shape:
                k1 = k1.view(*y.shape)
        if stop:
            state["status"] = "event"
            break

    if state["status"] == "success" and not adaptive:
        _check_fixed_end(y, t, attempts, h, throw, state)
    ys = _gather_outputs(prob, out_vals, p, y0, samples_all)
    return LoopResult(
        ys=ys,
        y_final=y,
        t_reached=t,
        status=state["status"],
        message=state["message"],
        n_accepted=n_acc,
        n_rejected=n_rej,
        steps=steps,
        h_next=abs(h),
        k1_next=k1 if state["status"] in ("success", "event") else None,
    )


def thin_kept(kept: list, max_states: int | None) -> list:
    """The records that give up their state before one more is kept, so that at most
    ``max_states`` are (the policy of :func:`integrate`'s ``max_states``): none while there is
    room, else every second one but the first, which are removed from ``kept`` (oldest first)."""
    if max_states is None or len(kept) < max_states:
        return []
    dropped = kept[1::2]
    del kept[1::2]
    return dropped


def _start_outputs(prob, y0, samples_all) -> tuple[list, int]:
    """``(values, p)``: the outputs at the initial time (the initial state itself) and how many
    of the sorted outputs they are."""
    p, n_out = 0, len(prob.out_t)
    while p < n_out and prob.out_t[p] == prob.t0:
        p += 1
    return ([_values_at(y0, samples_all, 0, p)], p) if p else ([], 0)


def _values_at(y, samples_all, lo: int, hi: int) -> torch.Tensor:
    """The state ``y`` as the values of the sorted outputs ``lo:hi`` at its time: repeated
    (one grid), or the rows of their samples (per-sample grids)."""
    if samples_all is None:
        return y.unsqueeze(0).expand(hi - lo, *y.shape)
    return y[samples_all[lo:hi]]


def _check_fixed_end(y, t, attempts, h, throw, state) -> None:
    """Fixed steps make no per-step decision, so finiteness is checked once, at the end."""
    if not _all_finite(y):
        report_failure("nonfinite_fixed", t=t, attempts=attempts, h=h, throw=throw, state=state)


def _all_finite(y: torch.Tensor) -> bool:
    """Whether every entry of ``y`` is finite: ``y - y`` is 0 there and NaN at an inf or NaN, so
    its sum is 0 exactly when all are (two passes; ``isfinite(y).all()`` takes several)."""
    y = torch.view_as_real(y.detach()) if y.is_complex() else y.detach()
    return math.isfinite(float((y - y).sum()))


def _gather_outputs(prob, out_vals, p, y0, samples_all) -> torch.Tensor:
    """The recorded outputs in result order; those not reached (stopped early: throw=False)
    are NaN."""
    n_out = len(prob.out_t)
    if p < n_out:
        shape = y0.shape if samples_all is None else y0.shape[1:]
        out_vals.append(y0.new_full((n_out - p, *shape), math.nan))
    ys = torch.cat(out_vals) if out_vals else y0.new_zeros((0, *y0.shape))
    return ys if prob.out_order is None else ys[prob.out_order]


def _step_outputs(prob, stepper, f, K, y, y_new, t, t_new, t_last, lo, hi, samples_all):
    """``(values, Kd, k_next)`` of the sorted outputs ``lo:hi`` in the accepted step ``(t,
    t_new]``: the dense stages ``Kd`` (None when every output is at the step end) and f at the
    step end where the interpolant needed it (the next step's first stage), else None. ``K``:
    the stages ``(S, B*M)``, or a list of them (stacked by ``dense_stages`` when an output needs
    them).

    Outputs that coincide with the step end take the end state exactly (no interpolation
    error); on a GPU theta comes from the output times already on the device (no copy, no sync).
    """
    taus = prob.out_t[lo:hi]
    m = len(taus)  # (those at the step end are the tail of the sorted slice)
    while m and taus[m - 1] == t_new:
        m -= 1
    if not m:
        return _values_at(y_new, samples_all, lo, hi), None, None
    Kd, k_next = _dense(stepper, f, K, y, y_new, t, t_new, t_last, None)
    h = t_new - t
    # Interpolant weights are formed in float64 and cast: high-order P matrices cancel heavily.
    if y.device.type == "cpu":  # theta straight from the host floats (the same IEEE arithmetic)
        theta = torch.from_numpy(np.array([(tau - t) / h for tau in taus[:m]]))
    else:  # from the output times already on the device (no host-to-device copy)
        theta = (prob.out_t_on(y.device)[lo : lo + m] - t) / h
    samples = None if samples_all is None else samples_all[lo : lo + m]
    vals = stepper.interpolate(Kd, y, h, theta, samples)
    if m < len(taus):
        vals = torch.cat([vals, _values_at(y_new, samples_all, lo + m, hi)])
    return vals, Kd, k_next


def _dense(stepper, f, K, y, y_new, t, t_new, t_last, k_next):
    """``(Kd, k_next)``: the stages plus dense stages of the step ``(t, t_new]``, and f at the
    step end where the interpolant needs it (``k_next``, evaluated here unless given), else
    ``k_next`` as given."""
    if k_next is None and not stepper.fsal and stepper.tab.dense_stage_is_next_first:
        k_next = f(t_last, y_new)
    return stepper.dense_stages(f, t, t_new - t, y, K, k_next, t_last), k_next


class StepView:
    """An accepted step as seen by a monitor: its ends and its continuous extension."""

    def __init__(self, stepper, f, t, t_new, t_last, y, y_new, K, Kd, k_next):
        self.stepper, self.f = stepper, f
        self.t, self.t_new, self.t_last = t, t_new, t_last
        self.y, self.y_new = y, y_new
        self._K, self._Kd, self.k_next = K, Kd, k_next

    def dense(self):
        """Stages plus dense stages of the step (evaluated on first use)."""
        if self._Kd is None:
            self._Kd, self.k_next = _dense(
                self.stepper, self.f, self._K, self.y, self.y_new, self.t, self.t_new,
                self.t_last, self.k_next,
            )  # fmt: skip
        return self._Kd

    def at(self, theta: torch.Tensor, samples=None) -> torch.Tensor:
        """State at fractions ``theta`` (m,) of the step (rows of ``samples`` if given)."""
        return self.stepper.interpolate(self.dense(), self.y, self.t_new - self.t, theta, samples)


def sorted_outputs_grad(prob: Problem, g: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the outputs in result order -> in sorted (integration) order.

    The result is ``ys_sorted[out_order]``, so ``g_sorted[out_order] = g``.
    """
    if prob.out_order is None:
        return g
    out = torch.empty_like(g)
    out[prob.out_order] = g
    return out


def replay_step(
    prob: Problem,
    stepper: RKStepper,
    f: VectorField,
    rec: StepRecord,
    y,
    samples_all,
    outputs=True,
    k1=None,
):
    """Recompute an accepted step from its record (with autograd if enabled).

    Returns ``(y_new, outputs, k1)`` where outputs holds the values of the sorted outputs
    ``rec.out_lo:rec.out_hi`` (or None) and ``k1`` is f at the step start. Bitwise the same
    arithmetic as the forward loop.
    """
    if k1 is None:
        k1 = f(rec.t_first, y)
    y_new, _, K = stepper.step(
        f, rec.t, rec.t_new - rec.t, y, k1, rec.t_last, torch.is_grad_enabled()
    )
    if not outputs or rec.out_hi <= rec.out_lo:
        return y_new, None, k1
    vals, _, _ = _step_outputs(
        prob, stepper, f, K, y, y_new, rec.t, rec.t_new, rec.t_last, rec.out_lo, rec.out_hi,
        samples_all,
    )  # fmt: skip
    return y_new, vals, k1


from ._loop_fixed import _integrate_fixed  # noqa: E402  (it builds on the helpers above)
