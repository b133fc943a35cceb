"""Per-sample step control: every sample of a batch takes its own steps.

Selected by ``neuralode.solve(..., batch_control="per_sample")``. Each sample ``b`` of the batch
has its own time ``t_b``, step size ``h_b``, PI-controller memory and accept/reject decision,
from its own error norm (RMS over that sample's components), so a sample's solution does not
depend on which other samples share its batch (as in torchode). Unlike torchode, a sample that
has reached its final time stops costing evaluations: the loop works on a *working set* of rows
that it compacts (gathers the unfinished rows) whenever finished rows make up a fraction
``_COMPACT_FRACTION`` of it, so at most that share of any evaluation of ``func`` is spent on
finished samples. ``Solution.stats`` reports the sample-evaluations (rows passed to ``func``)
and how many of them were spent on finished samples.

Everything per sample is a tensor on the state's device: times and step sizes in float64 (step
control runs in double precision whatever the state's dtype), the state as one flat ``(A, M)``
tensor for the ``A`` rows of the working set (see :mod:`neuralode._tree`). The stages of all rows
are combined by the engine's one stepper (:class:`~neuralode.solvers.explicit_rk.RKStepper`
with a ``(A,)`` tensor of step sizes: one matrix-vector product per stage, scaled row-wise); the
error norm, the controller's initial step, proposal (with landings on ``step_t``/``jump_t``) and
PI update, and the failure messages are the shared driver's; no Python loop runs over samples. The host reads one small tensor per step (outputs due, finished and failed rows)
to steer the loop. ``func`` gets ``t`` of shape ``(A,)`` (each row's own time) and the ``A`` rows
of the working set, and is never evaluated outside a sample's interval ``[t0_b, t1_b]``.

Events (each sample's own, located inside its own steps) are in :mod:`._events_rows`, a custom
``PIController(norm=...)`` per sample in :mod:`._norm_rows`. Gradients with respect to ``t``
use the continuous derivatives, as the shared driver: ``y0`` is shifted by ``-f(t0, y0) dt0``
and each output by ``f(t_j, y(t_j)) dt_j`` (zero in value; one more evaluation of f over the
output rows).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ._failures import CAUSES, cannot_step, report_failure
from ._loop import thin_kept
from ._norm_rows import RowUserNorm
from ._norms import ErrorNorm, initial_norm, tolerances
from ._tree import TreeSpec, flatten_state, real_dtype
from .controllers import PIController
from .controllers.base import stuck_error
from .controllers.resolve import resolve_controller
from .controllers.step_size import time_beside
from .gradients._common import capable
from .interpolation.dense_batched import PerSampleDense, step_outputs
from .solvers.explicit_rk import make_stepper

__all__ = ["solve_per_sample", "BatchedField"]

# Compact the working set once finished rows make up this share of it. Every evaluation of func
# then spends less than this share on finished samples; a smaller value compacts more often
# (each compaction gathers ~20 small per-row tensors, about the cost of one or two stages).
_COMPACT_FRACTION = 1 / 16

_T_ROWS_NOTE = (
    "neuralode: under batch_control='per_sample' func gets t of shape ({A},), one time per row "
    "of the state ({A} rows in this call): broadcast it against an (A, M) state as t[:, None]."
)


class BatchedField:
    """``func`` on rows of the flat state: ``f(t (A,), y (A, M)) -> (A, M)``.

    Counts calls (``nfe``), rows evaluated (``sample_evals``) and rows evaluated that belong to
    samples which had already finished (``wasted``: the driver sets ``idle``). With ``lo``/``hi``
    set (each row's interval), stage times are clamped into them, so rounding in ``t + c h``
    never evaluates func outside a sample's interval.
    """

    def __init__(self, func, spec: TreeSpec, time_dtype: torch.dtype):
        self.func, self.spec, self.time_dtype = func, spec, time_dtype
        self.nfe = self.sample_evals = self.wasted = self.idle = 0
        self.lo = self.hi = None
        self._rest = spec.shapes[0][1:] if spec.kind == "tensor" else None
        self._specs: dict[int, TreeSpec] = {}

    def _spec(self, A: int) -> TreeSpec:
        spec = self._specs.get(A)
        if spec is None:
            shapes = tuple(torch.Size((A, *s[1:])) for s in self.spec.shapes)
            spec = self._specs[A] = dataclasses.replace(self.spec, shapes=shapes, batch=A)
        return spec

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        A = y.shape[0]
        self.nfe += 1
        self.sample_evals += A
        self.wasted += self.idle
        if self.lo is not None and self.lo.shape[0] == A:
            t = torch.clamp(t, self.lo, self.hi)
        tt = t if t.dtype == self.time_dtype else t.to(self.time_dtype)
        try:
            if self._rest is not None:  # fast path: a single tensor state
                shape = (A, *self._rest)
                out = self.func(tt, y.view(shape))
                if (type(out) is torch.Tensor and out.shape == shape
                        and out.dtype == self.spec.dtype):  # fmt: skip
                    return out.reshape(A, -1)
            else:
                out = self.func(tt, self._spec(A).unflatten(y))
        except RuntimeError as e:
            if "size of tensor" in str(e) or "broadcast" in str(e):
                e.add_note(_T_ROWS_NOTE.format(A=A))
            raise
        return self._spec(A).flatten(out, what="the derivative returned by func")

    def flat(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """f on the 1-D state ``(A*M,)`` of the rows at times ``t`` (A,); returns 1-D."""
        return self(t, y.view(t.shape[0], -1)).reshape(-1)


@dataclasses.dataclass
class _Rows:
    """The working set: per-row state of the samples being integrated (row r is sample idx[r])."""

    idx: torch.Tensor  # (A,) sample index
    y: torch.Tensor  # (A, M) state
    k1: torch.Tensor  # (A, M) first stage of the next step
    t: torch.Tensor  # (A,) float64 time reached
    h: torch.Tensor  # (A,) float64 |step size| of the next attempt (at most dt_max)
    prev: torch.Tensor  # (A,) float64 previous accepted error (PI control)
    e: torch.Tensor  # (A,) last scaled error (NaN/inf: func returned non-finite values)
    t_end: torch.Tensor  # (A,) final time (set to t when a sample fails with throw=False)
    lo: torch.Tensor  # (A,) lower end of the sample's interval
    hi: torch.Tensor  # (A,) upper end
    sdir: torch.Tensor  # (A,) float64 direction of integration, +1 or -1
    tau: torch.Tensor  # (A, T) output times
    stau: torch.Tensor  # (A, T) output times times sdir (non-decreasing)
    nxt: torch.Tensor  # (A,) long: index of the next output not yet written
    att: torch.Tensor  # (A,) long step attempts
    nacc: torch.Tensor  # (A,) long accepted steps
    done: torch.Tensor  # (A,) bool: reached the final time (or failed)
    stale: torch.Tensor  # (A,) bool: k1 must be evaluated (non-FSAL methods after a step)
    tf: torch.Tensor  # (A,) float64 time at which k1 was evaluated (just past t after a jump)
    rtol: float | torch.Tensor  # float or (A, M)
    atol: float | torch.Tensor

    def take(self, keep: torch.Tensor) -> _Rows:
        """The rows ``keep`` (a long tensor) of every per-row field."""
        rows = {k: v.index_select(0, keep) if isinstance(v, torch.Tensor) else v
                for k, v in vars(self).items()}  # fmt: skip
        return _Rows(**rows)


def time_layout(tau: torch.Tensor):
    """``(sdir, stau, n0)`` of output times ``tau`` (B, T) float64: each row's direction of
    integration (B,) (+1.0 or -1.0), ``sdir * tau`` (non-decreasing along each row) and how
    many of its outputs lie at its initial time (B,) long."""
    sdir = torch.where(tau[:, -1] >= tau[:, 0], 1.0, -1.0).to(torch.float64)
    stau = (sdir.unsqueeze(1) * tau).contiguous()
    return sdir, stau, torch.searchsorted(stau, stau[:, :1].contiguous(), right=True).squeeze(1)


def _handle_failures(w: _Rows, code, ctrl, max_steps, throw: bool, state: dict, used) -> None:
    """Raise for the failing sample of lowest index, or (throw=False) stop the failing samples.
    ``code`` (A,): each row's cause (:data:`~neuralode._failures.CAUSES`; 0: none)."""
    fail = code > 0
    rows = fail.nonzero().squeeze(1).tolist()
    rows.sort(key=lambda r: int(w.idx[r]))
    for r in rows:
        b, t, n, h = int(w.idx[r]), float(w.t[r]), int(w.att[r]), float(w.h[r])
        n_acc, cause = int(w.nacc[r]), CAUSES[int(code[r])]
        if used is not None:  # accepted and rejected steps in earlier segments (events)
            n, n_acc = n + int(used[b].sum()), n_acc + int(used[b, 0])
        if cause == "nonfinite_fixed":
            n -= 1  # the failed step is not taken
        report_failure(
            cause, t=t, attempts=n, h=h, dt_min=ctrl.dt_min, nonfinite=not math.isfinite(float(w.e[r])),
            max_steps=max_steps, t_end=float(w.t_end[r]), n_acc=n_acc, n_rej=n - n_acc, sample=b,
            throw=throw, state=state,
        )  # fmt: skip
    w.done = w.done | fail
    w.t_end = torch.where(fail, w.t, w.t_end)  # a failed sample stays where it is


def integrate_per_sample(
    spec, f, stepper, y0, tau, ctrl, rtol, atol, max_steps, throw, record=(), floor=False,
    on_step=None, outputs=True, monitor=None, max_states=None, used=None, on_land=None,
):  # fmt: skip
    """Integrate every sample over its own output times ``tau`` (B, T) float64.

    Returns ``(ys, y_final, t_final, n_acc, n_rej, state, records)``: outputs flat ``(T*B, M)``
    in time-major order (row ``j*B + b``; NaN where a sample failed first), the final states and
    times, per-sample counters, the status dict and the step records. ``record`` names what
    to keep (any of): ``"dense"``, the stages of every iteration (dense output, ``records``);
    ``"replay"``, what a replay of the iteration needs (checkpointed gradients) in
    ``state["replay"]``; ``"times"``, for every output the step that wrote it in
    ``state["out_steps"]`` ((5, T*B) float64: its ``t_old, h, t_new, t_last`` and the time of
    its first stage; NaN for outputs at the initial time or never written) and its start state
    in ``state["out_y"]`` (T*B, M), which the backsolve adjoint replays. ``on_step(acc, t_old, h_step, y_old, calls)`` is
    called after every accept/reject decision with the rows' stage inputs ``f.calls`` (the
    adjoint's parameter integral). ``outputs=False`` skips the outputs between the ends.
    ``on_land(w, landed)`` (with ``outputs=False``): every row's steps land on each of its
    times ``tau`` in turn (``step_t``-like stops: the step is clipped, step-size control goes
    on), and after a row lands on one (``landed``, (A,) bool; its index is ``w.nxt``)
    ``on_land`` may change its state and first stage (``w.y``, ``w.k1``: the backsolve
    adjoint's jumps at output times).
    ``monitor(w, acc, t_old, h_step, y_old, K, t_last)`` (events, see :mod:`._events_rows`)
    sees every iteration's rows after the accepted ones advanced and returns the rows to stop
    where they are (a ``(A,)`` bool mask) or None. ``max_states`` bounds the replay records
    that keep their states (``Checkpointed(max_checkpoints=...)``): past it, every second one
    drops its state (the first is always kept), to be recomputed in the backward pass.
    ``used`` (B, 2) long: the steps each sample accepted and rejected in earlier solves of the
    same solve (segments between events), counted toward ``max_steps``.
    """
    B, T = tau.shape
    dev, track = y0.device, torch.is_grad_enabled()
    k = stepper.tab.error_order() if ctrl.adaptive else None
    f64, i64 = dict(dtype=torch.float64, device=dev), dict(dtype=torch.long, device=dev)
    t0, t_end = tau[:, 0], tau[:, -1]
    sdir, stau, n0 = time_layout(tau)
    ar_T = torch.arange(T, device=dev)
    r, j = (ar_T < n0.unsqueeze(1)).nonzero().unbind(1)  # outputs at t0: the initial state
    pos, vals = [j * B + r], [y0[r]]
    state = {"status": "success", "message": "", "failed": [], "compactions": 0, "iterations": 0,
             "replay": []}  # fmt: skip
    if "times" in record:
        out_steps = state["out_steps"] = torch.full((5, T * B), math.nan, **f64)
        out_y = state["out_y"] = y0.new_full((T * B, y0.shape[1]), math.nan)  # y_old per output
    tfin, nacc, nrej = t0.clone(), torch.zeros(B, **i64), torch.zeros(B, **i64)
    finals_pos, finals = [], []

    def flush(w: _Rows, d: torch.Tensor) -> None:  # record the final values of rows d
        finals_pos.append(w.idx[d])
        finals.append(w.y[d])
        tfin[w.idx[d]], nacc[w.idx[d]], nrej[w.idx[d]] = w.t[d], w.nacc[d], (w.att - w.nacc)[d]

    zeros, no = torch.zeros(B, **f64), torch.zeros(B, dtype=torch.bool, device=dev)
    # The working set starts as the samples with a non-empty interval.
    w = _Rows(
        idx=torch.arange(B, device=dev), y=y0, k1=y0, t=t0, h=zeros, prev=zeros + 1.0, e=zeros,
        t_end=t_end, lo=torch.minimum(t0, t_end), hi=torch.maximum(t0, t_end), sdir=sdir,
        tau=tau, stau=stau, nxt=n0, att=nacc, nacc=nacc, done=no, stale=no, tf=t0, rtol=rtol,
        atol=atol,
    ).take((t_end != t0).nonzero().squeeze(1))  # fmt: skip
    A = w.idx.shape[0]
    stepper.bind_rows(w.rtol, w.atol)  # per-row state of implicit steppers (Newton tolerances)
    records, kept = [], []  # (kept: the replay records that keep their state y_old)
    n_done = n_stale = 0
    user = ctrl.norm  # PIController(norm=...): see _norm_rows
    norm = ErrorNorm(y0[:1], spec) if user is None else RowUserNorm(user, spec)
    landings = torch.tensor(ctrl.merged_landings(), **f64)
    # Attempts in earlier segments (events) count toward max_steps. Every live row makes one
    # per iteration: from it_max on, some row may have used them all (no host read before).
    used_att = used.sum(1) if used is not None else torch.zeros(B, **i64)
    it_max = None if max_steps is None else max_steps - int(used_att.max())
    if A:
        f.lo, f.hi = w.lo, w.hi  # every evaluation stays inside its sample's interval
        w.tf = ctrl.first_time(w.t, w.t_end, f.time_dtype)  # (past a jump_t at t0)
        w.k1 = f(w.tf, w.y)
        nrm = initial_norm(norm, w.y, w.rtol, w.atol, floor, rows=True)
        h0 = ctrl.first_step(nrm, f, w.t, w.y, w.k1, w.sdir, (w.t_end - w.t).abs(), k, True)
        w.h = ctrl.bounded(torch.zeros(A, **f64) + h0)  # (fixed-step controllers give a float)
        code = cannot_step(ctrl, w.h, w.t, used_att[w.idx], max_steps)  # (used: events)
        if bool(code.any()):
            _handle_failures(w, code, ctrl, max_steps, throw, state, used)
            n_done = int(w.done.sum())
    while A and n_done < A:
        state["iterations"] += 1
        f.lo, f.hi, f.idle = w.lo, w.hi, n_done
        if n_stale:  # non-FSAL methods: f at the start of the steps that follow accepted ones
            w.k1 = torch.where(w.stale.unsqueeze(1), f(w.t, w.y), w.k1)
        # ---- propose: each row's step, clipped to its final time (finished rows: zero steps)
        t_start = w.tau[:, 0]  # (each row's initial time: ConstantStep's grid starts there)
        t_stop = w.t_end  # the next time to land on: the end, or (on_land) the next of tau
        if on_land is not None:
            t_stop = w.tau.gather(1, w.nxt.clamp(max=T - 1).unsqueeze(1)).squeeze(1)
        t_try = ctrl.propose(w.t, w.h, t_start, t_stop, w.sdir)
        t_new, clipped, jump = ctrl.land(w.t, t_try, t_stop, w.sdir, landings)
        # A live row whose proposal does not advance (a subclass's propose): read with the
        # iteration's one host read below, raised there.
        stuck = ~w.done & (w.sdir * (t_try - w.t) <= 0)
        t_new = torch.where(w.done, w.t_end, t_new)  # finished rows: zero steps
        clipped, jump = clipped | w.done, jump & ~w.done
        at_end = t_new == w.t_end
        h_step = t_new - w.t
        # At a jump_t the last stage sees the left limit (the next float before it).
        t_last = torch.where(jump, time_beside(t_new, w.t, f.time_dtype), t_new)
        if on_step is not None:
            f.calls = []
        y_new, err, K = stepper.step(f, w.t, h_step, w.y, w.k1, t_last, track)
        K = K.view(-1, *w.y.shape)
        f.idle = 0
        # ---- per-sample error norm (over the sample's components) and accept/reject
        live = ~w.done
        if ctrl.adaptive:
            e, nonfin = norm.rows(err, w.y, y_new, w.rtol, w.atol, floor), None
            acc = live & (e <= 1.0)
        else:  # fixed steps make no error test: a row whose step came out non-finite fails
            e, nonfin = torch.zeros(A, **f64), live & ~torch.isfinite(y_new).all(1)
            acc = live & ~nonfin
        w.att += live
        w.nacc += acc
        h_next, prev = ctrl.adapt(h_step.abs(), w.h, e, w.prev, k, acc, clipped)
        w.h = ctrl.bounded(torch.where(live, h_next, w.h))
        w.prev, w.e = prev, e
        if on_step is not None:
            on_step(acc, w.tf, h_step, w.y, f.calls)  # (k1's time: one-sided at a jump_t)
        # ---- advance the accepted rows
        t_old, y_old, acc1 = w.t, w.y, acc.unsqueeze(1)
        w.t = torch.where(acc, t_new, w.t)
        w.y = torch.where(acc1, y_new, w.y)
        if stepper.fsal:
            w.k1 = torch.where(acc1, stepper.last_stage(K), w.k1)
        else:
            w.stale = acc
        w.done = w.done | (acc & at_end)
        if monitor is not None:  # events: rows whose event fired stop at their step's end
            stop = monitor(w, acc, t_old, h_step, y_old, K, t_last)
            if stop is not None:
                w.done, w.t_end = w.done | stop, torch.where(stop, w.t, w.t_end)
        jumped = acc & jump
        # The rows that cannot step on (the step limit from it_max on: no row reaches it before).
        lim = max_steps if it_max is not None and state["iterations"] >= it_max else None
        att = None if lim is None else w.att + used_att[w.idx]
        code = cannot_step(ctrl, w.h, w.t, att, lim).masked_fill_(w.done, 0)
        if nonfin is not None:
            code.masked_fill_(nonfin, 4)  # (CAUSES[4]: a fixed step that came out non-finite)
        cnt = torch.searchsorted(w.stau, (w.sdir * w.t).unsqueeze(1), right=True).squeeze(1)
        n_out, n_done, n_fail, n_acc, n_jump, n_stuck = torch.stack(
            [(cnt - w.nxt).sum(), w.done.sum(), code.count_nonzero(), acc.sum(), jumped.sum(),
             stuck.sum()]
        ).tolist()  # fmt: skip
        if n_stuck:
            r = int(stuck.nonzero()[0, 0])
            raise stuck_error(ctrl, float(t_old[r]), float(t_try[r]))
        tf_old, w.tf = w.tf, torch.where(acc, w.t, w.tf)
        if n_jump:  # past a jump_t, f afresh at the right limit (the next float after it)
            t_first = time_beside(w.t, w.t + w.sdir, f.time_dtype)
            w.k1 = torch.where(jumped.unsqueeze(1), f(t_first, w.y), w.k1)
            w.stale = w.stale & ~jumped
            w.tf = torch.where(jumped, t_first, w.tf)
        if "dense" in record and n_acc:
            records.append((w.idx, acc, t_old, w.t, h_step, y_old, w.y, K, t_last))
        # ---- outputs inside the accepted steps, from each step's continuous extension
        r = tau_j = None
        if n_out and outputs:
            r, j = ((ar_T >= w.nxt.unsqueeze(1)) & (ar_T < cnt.unsqueeze(1))).nonzero().unbind(1)
            tau_j = w.tau[r, j]
            v, k_end = step_outputs(stepper, f, K, t_old, h_step, w.t, y_old, w.y, w.lo, w.hi,
                                    cnt > w.nxt, r, tau_j, t_last)  # fmt: skip
            if k_end is not None:  # f at the step end (a dense stage): the next k1 ...
                u, k_u = k_end
                if n_jump:  # ... except past a jump_t: there k1 is f at the right limit
                    keep = (~jumped[u]).nonzero().squeeze(1)
                    u, k_u = u[keep], k_u[keep]
                w.k1 = w.k1.index_put((u,), k_u)
                w.stale = w.stale & ~(cnt > w.nxt)
            pos.append(j * B + w.idx[r])
            vals.append(v)
            if "times" in record:
                at = (t_old, h_step, w.t, t_last, tf_old)
                out_steps[:, j * B + w.idx[r]] = torch.stack([x[r] for x in at])
                out_y[j * B + w.idx[r]] = y_old[r]
            w.nxt = cnt
        elif n_out and on_land is not None:
            on_land(w, cnt > w.nxt)
            w.nxt = cnt
        if "replay" in record and n_acc:
            for rep in thin_kept(kept, max_states):
                rep[7] = None  # its state is recomputed in the backward pass
            kept.append([w.idx, acc, tf_old, t_old, w.t, t_last, h_step, y_old, w.lo, w.hi, r,
                         tau_j, None if r is None else j])  # fmt: skip
            state["replay"].append(kept[-1])
        if n_fail:
            _handle_failures(w, code, ctrl, max_steps, throw, state, used)
            n_done = int(w.done.sum())
        # ---- compaction: drop finished rows once they are a noticeable share of the working set
        if n_done and n_done < A and n_done >= _COMPACT_FRACTION * A:
            flush(w, w.done.nonzero().squeeze(1))
            keep = (~w.done).nonzero().squeeze(1)
            w = w.take(keep)
            stepper.take_rows(keep)
            state["compactions"] += 1
            A, n_done = A - n_done, 0
        n_stale = 0 if stepper.fsal else int(w.stale.sum())
    if A:
        flush(w, torch.arange(A, device=dev))

    # ---- assemble: outputs never written (failed samples) stay NaN
    ys = y0.new_full((T * B, y0.shape[1]), math.nan)
    ys = ys.index_put((torch.cat(pos),), torch.cat(vals))
    y_final = y0.index_put((torch.cat(finals_pos),), torch.cat(finals)) if finals else y0
    return ys, y_final, tfin, nacc, nrej, state, records


@dataclasses.dataclass
class RowsRun:
    """One per-sample solve: what a gradient method needs to run and differentiate it."""

    spec: TreeSpec
    func: object
    time_dtype: torch.dtype
    f: BatchedField
    stepper: object
    tau: torch.Tensor  # (B, T) float64 output times
    ctrl: PIController
    rtol: float | torch.Tensor
    atol: float | torch.Tensor
    max_steps: int | None
    throw: bool
    dense: bool
    floor: bool
    stats: dict = dataclasses.field(default_factory=dict)
    result: tuple | None = None  # (y_final, t_final, n_acc, n_rej, state, records)
    # steps in earlier segments of the solve (events; see integrate_per_sample)
    used: torch.Tensor | None = None

    compile: bool = False  # solve(..., compile=True): compiled chunks (neuralode._compiled)

    def integrate(self, y0, record=(), max_states=None):
        """The forward solve; fills ``result`` and returns the outputs flat (T*B, M).
        ``record``: what to keep besides the dense output's stages (see
        :func:`integrate_per_sample`)."""
        if self.compile:
            from ._compiled_rows import run_rows

            return run_rows(self, y0, record, max_states)
        ys, *rest = integrate_per_sample(
            self.spec, self.f, self.stepper, y0, self.tau, self.ctrl, self.rtol, self.atol,
            self.max_steps, self.throw, (*record, *(("dense",) if self.dense else ())),
            self.floor, max_states=max_states, used=self.used,
        )  # fmt: skip
        self.result = tuple(rest)
        return ys


# ---------------------------------------------------------------------------- the entry point
def solve_per_sample(
    func, y0, t, *, tab, controller, rtol, atol, dt, gradient, max_steps, dense_output, throw,
    time_dtype, event, _used=None, compile=False, _stats=None,
):  # fmt: skip
    """``neuralode.solve(..., batch_control="per_sample")``: validate, integrate, wrap up.
    ``_used``: see :func:`integrate_per_sample` (the event driver's segments); ``_stats``: the
    dict to fill as ``Solution.stats`` (the event driver's segments gather its backward
    counters)."""
    from ._solve import default_dense, leaves, solution, wants_t_grad

    opt = "batch_control='per_sample'"
    ctrl = resolve_controller(tab, controller, rtol, atol, dt)
    from .solvers.implicit.rows import check_per_sample  # implicit: per-row blocks, or refused

    if not capable(gradient, "per_sample"):
        from .gradients.rows import refuse_per_sample

        refuse_per_sample(gradient, tab)
    check_per_sample(tab, ctrl, gradient)
    t_grad = wants_t_grad(t)
    comps = leaves(y0)
    leads = {c.shape[0] if isinstance(c, torch.Tensor) and c.dim() else None for c in comps}
    if None in leads or len(leads) != 1 or 0 in leads:
        raise ValueError(
            f"{opt} needs a state whose components share a non-empty leading batch dimension B "
            f"(one sample per row); got shapes {[tuple(getattr(c, 'shape', ())) for c in comps]}"
        )
    spec, y0flat = flatten_state(y0, batched=True)
    tau = _check_times(t, spec.batch, opt).to(spec.device)
    f = BatchedField(func, spec, time_dtype)
    stepper = make_stepper(tab, y0flat.dtype, y0flat.device)
    rt, at, floor = tolerances(spec, ctrl, 1.0)  # (1.0: no error norm with fixed steps)
    ctrl.check_span(float(tau.min()), float(tau.max()))
    direct = capable(gradient, "exact_autograd")
    dense = default_dense(dense_output, gradient, compile)
    run = RowsRun(spec, func, time_dtype, f, stepper, tau, ctrl, rt, at, max_steps, throw, dense,
                  floor, {} if _stats is None else _stats, used=_used, compile=compile)  # fmt: skip
    if event is not None:  # located per sample, then a differentiable solve to each event
        from ._events_rows import solve_rows_with_event

        kw = dict(tab=tab, controller=controller, rtol=rtol, atol=atol, dt=dt,
                  gradient=gradient, max_steps=max_steps, throw=throw, time_dtype=time_dtype)  # fmt: skip
        return solve_rows_with_event(solve_per_sample, run, y0, t, event, kw)
    y_start = y0flat
    if t_grad:  # dL/dt by the continuous derivatives: y0 moves with t0 by -f(t0, y0) dt0
        shift = per_row_times(t - t.detach(), spec.batch, tau.device)  # 0, carrying d/dt
        f0 = BatchedField(func, spec, time_dtype)(tau[:, 0], y0flat)
        y_start = y0flat - shift[:, :1].to(real_dtype(y0flat.dtype)) * f0
    ys = gradient.run_rows(run, y_start)
    if t_grad:
        ys, n_t = _output_time_shift(func, spec, time_dtype, shift, tau, ys)
        run.stats["nfe_t_gradient"] = n_t + 1
    y_final, tfin, nacc, nrej, state, records = run.result
    stats = run.stats  # the same dict: a backward pass adds its counters (nfe_backward)
    stats.update({
        "nfe": f.nfe,
        "sample_evals": f.sample_evals,
        "wasted_sample_evals": f.wasted,
        "wasted_share": f.wasted / max(f.sample_evals, 1),
        "n_iterations": state["iterations"],
        "n_compactions": state["compactions"],
    })  # fmt: skip
    if state["failed"]:
        stats["failed_samples"] = sorted(state["failed"])
        state["message"] += f" (failed samples: {stats['failed_samples']})"
    dense_obj = (
        PerSampleDense(records, stepper, f, spec, y_start, y_final, tau, tfin) if dense else None
    )
    return solution(
        t, spec, ys, run, direct, stats, stepper, nacc, nrej, state["status"], tfin,
        state["message"], dense_obj, True,
    )  # fmt: skip


def per_row_times(t: torch.Tensor, B: int, device) -> torch.Tensor:
    """``t`` (T,) or (B, T) as (B, T) float64 on ``device`` (a 1-D t serves every sample),
    keeping its graph."""
    tt = t.to(device=device, dtype=torch.float64)
    return tt.unsqueeze(0).expand(B, -1) if tt.dim() == 1 else tt


def _output_time_shift(func, spec, time_dtype, shift, tau, ys):
    """Add ``(t_bj - t_bj.detach()) f(t_bj, y_bj)`` to every output (flat ``(T*B, M)``,
    time-major): ``dy(t_j)/dt_j = f(t_j, y(t_j))``. With the shift of y0 by ``-f(t0, y0) dt0``
    this gives the continuous derivatives (an output at t0 is then unmoved by t0). One
    evaluation of f over the ``T*B`` output rows; rows that are NaN (a failed sample) get none.
    Returns the outputs and the number of evaluations of f."""
    fv = BatchedField(func, spec, time_dtype)
    ok = torch.isfinite(ys).all(1)
    fy = fv(tau.T.reshape(-1), torch.where(ok.unsqueeze(1), ys, torch.zeros_like(ys)))
    d = torch.where(ok, shift.T.reshape(-1), torch.zeros_like(shift.T.reshape(-1)))
    return ys + d.to(real_dtype(ys.dtype)).unsqueeze(1) * fy, fv.nfe


def _check_times(t: torch.Tensor, B: int, opt: str) -> torch.Tensor:
    """Validate ``t`` (T,) or (B, T) and return it as (B, T) float64 on the CPU."""
    from ._solve import check_batch, host_times

    tl = host_times(t)
    if isinstance(tl, list):
        return torch.tensor(tl, dtype=torch.float64).unsqueeze(0).expand(B, -1).contiguous()
    check_batch(tl, B)
    d = tl[:, 1:] - tl[:, :-1]
    bad = ~((d >= 0).all(1) | (d <= 0).all(1))
    if bool(bad.any()):
        raise ValueError(
            f"with {opt} each row of a 2-D t must be monotone (rows may start at different "
            f"times and run in either direction); rows {bad.nonzero().squeeze(1).tolist()[:8]} "
            "are not"
        )
    return tl.contiguous()
