"""``solve(..., compile=True, batch_control="per_sample")``: the per-sample solve in compiled
chunks of the masked per-row step (:mod:`neuralode._compiled` holds the cache, the host loop
and the shared-control face)."""

from __future__ import annotations

import math

import torch

from ._compiled import (
    STEPS_PER_CALL,
    CompiledCodeMismatch,
    _consts,
    _evals_per_attempt,
    _run_chunks,
    _split,
    failure_cause,
    warn_mismatch,
)
from ._compiled_norm import compiled_norm
from ._compiled_setup import _chunk_inputs
from ._failures import report_failure
from ._loop import thin_kept
from ._loop_batched import time_layout
from ._norm_rows import RowUserNorm
from ._norms import ErrorNorm, initial_norm
from .controllers.step_size import time_beside

__all__ = ["integrate_rows_compiled", "run_rows"]


def integrate_rows_compiled(run, y0: torch.Tensor, *, steps_per_call=None, track_grad=None,
                            record=(), max_states=None, impulses=None, on_steps=None):  # fmt: skip
    """:func:`neuralode._loop_batched.integrate_per_sample` (per-sample control) in compiled
    chunks of steps, for the per-sample run ``run`` (a ``RowsRun``) from the flat ``y0`` (B, M).

    Returns what that function returns: ``(ys (T*B, M) time-major, y_final, t_final, n_acc,
    n_rej, state, records)`` with step records for ``PerSampleDense`` when ``run.dense``.
    ``record`` and ``max_states`` as there: ``"replay"`` keeps, per step, what the eager
    per-sample Checkpointed replays (``state["replay"]``, the same records: one per step
    with all ``B`` rows as its working set), ``"times"`` the step that wrote each output
    (``state["out_steps"]``, for the per-sample backsolve adjoint's replays); both are read
    from the chunk's step records (:class:`_StepKeeper`), with the start state of that step
    (``state["out_y"]``). ``impulses``: a pair ``(jump, put)`` (B, T, M), float and bool: the
    state of row b jumps by ``jump[b, j]`` when its steps land on ``tau[b, j]``, or is set to
    it where ``put[b, j]`` (each output time is then landed on; the repeats of a row's last
    time are not stops; the step goes on from the state after the landing); ``on_steps(rec,
    n)``: called with the records of every call's ``n`` steps (the chunk then records them).
    Fills ``run.f``'s counters (NFE, sample evaluations, evaluations of finished samples).

    Raises
    ------
    CompiledCodeMismatch, RuntimeError
        See :func:`_run_chunks`.
    """
    f, ctrl, tab, spec = run.f, run.ctrl, run.stepper.tab, run.spec
    dev, dtype = y0.device, y0.dtype
    (B, M), tau = y0.shape, run.tau.to(dev)
    T = tau.shape[1]
    n_steps = steps_per_call or STEPS_PER_CALL
    keep = ("replay" in record) or ("times" in record)
    C = _consts(tab, ctrl, f.time_dtype, n_steps, spec, run.floor, rows=True, pick=False,
                record=bool(run.dense) or keep or on_steps is not None,
                n_out=T if impulses is None else 1, row_impulses=impulses is not None)  # fmt: skip
    C = compiled_norm(C, ctrl.norm, spec, rows=True)  # (PIController(norm=...): each sample's)
    W = C.window
    # Dense strides (1,): a column of a (1, T) tau keeps stride T under .contiguous(), and the
    # chunk's t (stride 1) would then fail the compiled code's guards from the second call on.
    t0, t_end = (tau[:, i].clone(memory_format=torch.contiguous_format) for i in (0, -1))
    # Outputs at a sample's initial time (n0 of them) are its initial state.
    sdir, _, n0 = time_layout(tau)
    slots = tau
    if impulses is not None:  # a row's repeats of its last time: no stops (no zero steps)
        again = torch.zeros_like(tau, dtype=torch.bool)
        again[:, 1:] = (tau[:, 1:] == t_end.unsqueeze(1)) & (tau[:, :-1] == t_end.unsqueeze(1))
        slots = torch.where(again, sdir.unsqueeze(1) * math.inf, tau)
    out_t = torch.cat([slots, (sdir * math.inf).unsqueeze(1).expand(B, W)], 1)
    first = torch.arange(T + W, device=dev) < n0.unsqueeze(1)
    out = torch.where(first.view(B, -1, 1, 1), y0.view(B, 1, 1, M),
                      torch.full((), math.nan, dtype=dtype, device=dev))  # fmt: skip
    lo, hi = torch.minimum(t0, t_end), torch.maximum(t0, t_end)
    f.lo, f.hi = lo, hi  # evaluations stay inside each sample's interval
    k1 = f(ctrl.first_time(t0, t_end, f.time_dtype), y0)  # (past a jump_t at t0)
    if track_grad is None:
        track_grad = torch.is_grad_enabled() and k1.requires_grad
    with torch.no_grad():  # the eager driver's initial step, per row
        nrm = order = None
        if ctrl.adaptive:
            work = ErrorNorm(y0[:1], spec) if ctrl.norm is None else RowUserNorm(ctrl.norm, spec)
            nrm = initial_norm(work, y0, run.rtol, run.atol, run.floor, rows=True)
            order = tab.error_order()
        h0 = ctrl.initial_step(nrm, f, t0, y0.detach(), k1.detach(), sdir, (t_end - t0).abs(),
                               order)  # fmt: skip
    s, k = _chunk_inputs(C, ctrl, y0, k1, t0, t_end, sdir, h0, out, n0, out_t, run.max_steps,
                         run.rtol, run.atol, ctrl.merged_landings())  # fmt: skip
    if impulses is not None:
        k["RI"], k["RP"] = (torch.cat([x, x.new_zeros(B, W, M)], 1) for x in impulses)
    state = {"status": "success", "message": "", "failed": [], "compactions": 0,
             "iterations": 0, "replay": []}  # fmt: skip
    records, failed, last = [], set(), {}
    ar = torch.arange(B, device=dev)
    keeper, J = None, k.get("J")
    if keep:
        keeper = _StepKeeper(run, y0, tau, J, record, max_states, state)

    def on_report(report, rec, st_, n_call):
        (t_now, h_now, att, acc, code, nf, busy), rec_t = _split(report, B, n_call)
        if on_steps is not None:
            on_steps(rec, n_call)
        if rec is not None and (keeper is not None or run.dense):
            ok = rec_t[2]
            for i in (i for i in range(n_call) if any(ok[i * B : (i + 1) * B])):
                t_o, t_n, acc_i = rec["t"][i], rec["t_new"][i], rec["acc"][i]
                t_last = (
                    _left_limit(t_o, t_n, acc_i, J, f.time_dtype)
                    if keeper is None
                    else keeper.step(t_o, t_n, acc_i, rec["y"][i])
                )
                if run.dense:
                    records.append((ar, acc_i, t_o, t_n, t_n - t_o, rec["y"][i],
                                    rec["y_new"][i], rec["K"][i], t_last))  # fmt: skip
        ends, dirs = t_end.tolist(), sdir.tolist()
        for b in range(B):  # the sample of lowest index first, as in the eager driver
            reached = dirs[b] * (ends[b] - t_now[b]) <= 0
            cause = None if b in failed else failure_cause(code[b], busy[b], reached)
            if cause is None:
                continue
            n = int(att[b])
            report_failure(
                cause, t=t_now[b], attempts=n, h=h_now[b], dt_min=ctrl.dt_min,
                nonfinite=bool(nf[b]), max_steps=run.max_steps, t_end=ends[b], n_acc=int(acc[b]),
                n_rej=n - int(acc[b]), sample=b, engine="compiled stepping", throw=run.throw,
                state=state,
            )  # fmt: skip
            failed.add(b)
        last["att"] = att
        return not any(busy)

    s = _run_chunks(run.func, C, s, k, track_grad, on_report, adapt=steps_per_call is None)
    if not ctrl.adaptive:  # fixed steps make no per-step decision: finiteness checked at the end
        bad = (~torch.isfinite(s["y"].detach()).all(1)).tolist()
        for b in (b for b in range(B) if bad[b] and b not in failed):
            report_failure(
                "nonfinite_fixed", t=float(s["t"][b]), attempts=int(s["att"][b]),
                h=float(s["h"][b]), sample=b, engine="compiled stepping", throw=run.throw,
                state=state,
            )  # fmt: skip
    atts = [int(a) for a in last["att"]]
    iters = max(atts, default=0)  # every row attempts a step in each iteration until it stops
    per = _evals_per_attempt(tab, C)
    f.nfe += iters * per
    f.sample_evals += iters * per * B
    f.wasted += per * (iters * B - sum(atts))
    state["iterations"] = iters
    ys = s["out"][:, :T, 0].transpose(0, 1).reshape(T * B, M)
    return ys, s["y"], s["t"], s["nacc"], s["att"] - s["nacc"], state, records


def _left_limit(t_o, t_n, acc, J, time_dtype) -> torch.Tensor:
    """Each row's time of a step's last stage (B,): ``t_n``, or just before it where an accepted
    step ends on a ``jump_t`` (``J``; the dense stages then see the left limit, as in the step)."""
    if J is None:
        return t_n
    return torch.where(acc & torch.isin(t_n, J), time_beside(t_n, t_o, time_dtype), t_n)


class _StepKeeper:
    """What the eager per-sample driver keeps for the gradient methods (``record`` ``"replay"``
    and ``"times"`` of :func:`~neuralode._loop_batched.integrate_per_sample`), rebuilt from the
    compiled chunk's records of each step (its times, accepted rows and starting states).

    The chunk does not return the rest of what a step knew, which follows from the times: a
    step ended on a ``jump_t`` (its last stage at the left limit) when it ended on one of the
    jump times (as in :func:`~neuralode.controllers.base.land_rows`; the shared compiled
    driver reads its records the same way), the next step's first stage then at the right
    limit; and the outputs a step wrote are those in ``(t_old, t_new]`` of its row (a step
    of the chunk passes at most its window of outputs and lands on the last; the initial
    time's outputs are the initial state). A step of length zero that writes outputs at the
    current time (repeated times in a 2-D ``t``) accepts nothing: its outputs are those of the
    step that ended there, to which they are assigned here."""

    def __init__(self, run, y0, tau, J, record, max_states, state):
        self.B, self.T = tau.shape
        self.tau, self.J, self.time_dtype = tau, J, run.f.time_dtype
        self.sdir, self.stau, n0 = time_layout(tau)
        self.t0, t_end = tau[:, 0].contiguous(), tau[:, -1].contiguous()
        self.lo, self.hi = torch.minimum(self.t0, t_end), torch.maximum(self.t0, t_end)
        self.later = torch.arange(self.T, device=tau.device) >= n0.unsqueeze(1)
        self.tf = run.ctrl.first_time(self.t0, t_end, self.time_dtype)  # k1's time per row
        self.ar = torch.arange(self.B, device=tau.device)
        self.replay = "replay" in record
        self.max_states, self.kept, self.state = max_states, [], state
        if "times" in record:
            state["out_steps"] = torch.full((5, self.T * self.B), float("nan"),
                                            dtype=torch.float64, device=tau.device)  # fmt: skip
            state["out_y"] = y0.new_full((self.T * self.B, y0.shape[1]), float("nan"))

    def step(self, t_o, t_n, acc, y_o) -> torch.Tensor:
        """Keep one step of the chunk (every row's times ``t_o``, ``t_n`` and state ``y_o``,
        ``acc`` the rows that accepted it); returns its last stage's times (B,)."""
        t_last = _left_limit(t_o, t_n, acc, self.J, self.time_dtype)
        if self.J is not None:
            jumped = acc & torch.isin(t_n, self.J)
            t_next = torch.where(jumped, time_beside(t_n, t_n + self.sdir, self.time_dtype), t_n)
        else:
            t_next = t_n
        tf_old, self.tf = self.tf, torch.where(acc, t_next, self.tf)
        h = t_n - t_o
        sd = self.sdir.unsqueeze(1)
        wrote = (
            acc.unsqueeze(1) & self.later
            & (self.stau > sd * t_o.unsqueeze(1)) & (self.stau <= sd * t_n.unsqueeze(1))
        )  # fmt: skip
        r, j = wrote.nonzero().unbind(1)
        if r.numel() == 0:
            r = j = tau_j = None
        else:
            tau_j = self.tau[r, j]
        if "out_steps" in self.state and r is not None:
            at = torch.stack([x[r] for x in (t_o, h, t_n, t_last, tf_old)])
            self.state["out_steps"][:, j * self.B + r] = at
            self.state["out_y"][j * self.B + r] = y_o[r]  # (its start state, as eagerly)
        if self.replay:
            for rep in thin_kept(self.kept, self.max_states):
                rep[7] = None  # its state is recomputed in the backward pass
            t1 = torch.where(acc, t_n, t_o)
            # (a view of the chunk's stacked states keeps all of them: with a bound on the
            # states kept, each its own copy, so that dropping one frees it)
            y_o = y_o if self.max_states is None else y_o.clone()
            rec = [self.ar, acc, tf_old, t_o, t1, t_last, h, y_o, self.lo, self.hi, r, tau_j, j]
            self.kept.append(rec)
            self.state["replay"].append(rec)
        return t_last


def run_rows(run, y0: torch.Tensor, record=(), max_states=None):
    """``RowsRun.integrate`` under ``compile=True``: the per-sample solve in compiled chunks
    (or eagerly: with a warning when func's compiled code no longer matches it, silently when
    no sample has anything to integrate). ``record``, ``max_states``: see
    :func:`integrate_rows_compiled`."""
    if not bool((run.tau[:, 0] == run.tau[:, -1]).all()):
        try:
            ys, *rest = integrate_rows_compiled(run, y0, record=record, max_states=max_states)
            run.stats["compiled"], run.result = True, tuple(rest)
            return ys
        except CompiledCodeMismatch as why:
            warn_mismatch(why, stacklevel=7)
    run.stats["compiled"], run.compile = False, False
    try:
        return run.integrate(y0, record, max_states)
    finally:
        run.compile = True
