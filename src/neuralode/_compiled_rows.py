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
from ._compiled_setup import _chunk_inputs
from ._failures import report_failure
from ._loop_batched import time_layout
from ._norms import ErrorNorm, initial_norm
from .controllers.base import time_beside

__all__ = ["integrate_rows_compiled", "run_rows"]


def integrate_rows_compiled(run, y0: torch.Tensor, *, steps_per_call=None, track_grad=None):
    """:func:`neuralode._loop_batched.integrate_per_sample` (per-sample control) in compiled
    chunks of steps, for the per-sample run ``run`` (a ``RowsRun``) from the flat ``y0`` (B, M).

    Returns what that function returns: ``(ys (T*B, M) time-major, y_final, t_final, n_acc,
    n_rej, state, records)`` with step records for ``PerSampleDense`` when ``run.dense``.
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
    C = _consts(tab, ctrl, f.time_dtype, n_steps, spec, run.floor, rows=True, pick=False,
                record=bool(run.dense), n_out=T)  # fmt: skip
    W = C.window
    # Dense strides (1,): a column of a (1, T) tau keeps stride T under .contiguous(), and the
    # chunk's t (stride 1) would then fail the compiled code's guards from the second call on.
    t0, t_end = (tau[:, i].clone(memory_format=torch.contiguous_format) for i in (0, -1))
    # Outputs at a sample's initial time (n0 of them) are its initial state.
    sdir, _, n0 = time_layout(tau)
    out_t = torch.cat([tau, (sdir * math.inf).unsqueeze(1).expand(B, W)], 1)
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
            nrm = initial_norm(ErrorNorm(y0[:1], spec), y0, run.rtol, run.atol, run.floor,
                               rows=True)  # fmt: skip
            order = tab.error_order()
        h0 = ctrl.initial_step(nrm, f, t0, y0.detach(), k1.detach(), sdir, (t_end - t0).abs(),
                               order)  # fmt: skip
    s, k = _chunk_inputs(C, ctrl, y0, k1, t0, t_end, sdir, h0, out, n0, out_t, run.max_steps,
                         run.rtol, run.atol, ctrl.merged_landings())  # fmt: skip
    state = {"status": "success", "message": "", "failed": [], "compactions": 0,
             "iterations": 0, "replay": []}  # fmt: skip
    records, failed, last = [], set(), {}
    ar = torch.arange(B, device=dev)
    J = torch.tensor(ctrl.jump_t, dtype=torch.float64, device=dev) if ctrl.jump_t else None

    def on_report(report, rec, st_, n_call):
        (t_now, h_now, att, acc, code, nf, busy), rec_t = _split(report, B, n_call)
        if rec is not None:
            ok = rec_t[2]
            for i in (i for i in range(n_call) if any(ok[i * B : (i + 1) * B])):
                t_o, t_n = rec["t"][i], rec["t_new"][i]
                # A step ending on a jump_t: its dense stages at the left limit, as in the step.
                t_c1 = t_n if J is None else torch.where(
                    torch.isin(t_n, J), time_beside(t_n, t_o, f.time_dtype), t_n)  # fmt: skip
                records.append((ar, rec["acc"][i], t_o, t_n, t_n - t_o, rec["y"][i],
                                rec["y_new"][i], rec["K"][i], t_c1))  # fmt: skip
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


def run_rows(run, y0: torch.Tensor, record=None):
    """``RowsRun.integrate`` under ``compile=True``: the per-sample solve in compiled chunks
    (or eagerly: with a warning when func's compiled code no longer matches it, silently when
    no sample has anything to integrate)."""
    if not bool((run.tau[:, 0] == run.tau[:, -1]).all()):
        try:
            ys, *rest = integrate_rows_compiled(run, y0)
            run.stats["compiled"], run.result = True, tuple(rest)
            return ys
        except CompiledCodeMismatch as why:
            warn_mismatch(why, stacklevel=7)
    run.stats["compiled"], run.compile = False, False
    try:
        return run.integrate(y0, record)
    finally:
        run.compile = True
