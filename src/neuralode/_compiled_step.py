"""The masked per-row step that compiled stepping unrolls (see :mod:`neuralode._compiled`).

One step of an explicit Runge--Kutta method for ``R`` rows of control at once, in tensor
arithmetic only (no host read, no data-dependent Python branch), so that ``torch.compile`` can
unroll ``steps`` of them into one graph. A *row* has its own time, step size, error norm,
accept/reject decision, PI memory, status and output times (all ``(R,)`` or ``(R, ...)``):

- shared control: ``R = 1``, the error norm is taken over the whole batch (the state viewed
  as one row ``(1, B*M)``), ``func`` gets a 0-d time;
- per-sample control: ``R = B``, each row's norm is over its own sample, ``func`` gets the rows'
  times ``(B,)``.

Rows that have finished (or failed) take steps of length zero whose results are masked out with
``torch.where``. Times are float64 and signed (each row's direction ``sdir``), as in the eager
per-row driver; every formula is the engine's own: the controller's landing rule
(:func:`~neuralode.controllers.base.land_rows`, with
:func:`~neuralode.controllers.base.time_beside` at a ``jump_t``), and its step proposal,
bound, underflow rule and adaptation (the methods of its
:meth:`~neuralode.controllers.Controller.step_rule`), the scaled error norm
(:func:`~neuralode._norms.error_scale`, :func:`~neuralode._norms.rms_rows`), the
stage combination (:func:`~neuralode.solvers.explicit_rk.stage_sum`, whose traced lowering
Inductor fuses) and the continuous extension (:func:`~neuralode.solvers.tableau.interpolant_sum`
of :func:`~neuralode.solvers.tableau.weights_at`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._failures import cannot_step
from ._norms import error_scale, rms_rows
from .controllers.base import stuck_error
from .controllers.step_size import Controller, land_rows, time_beside
from .solvers.explicit_rk import stage_sum
from .solvers.tableau import exact_at_step_end, interpolant_sum, weights_at

__all__ = ["Consts", "chunk", "raise_if_stuck"]


class Consts(NamedTuple):
    """Everything the compiled step needs as plain Python values (torch.compile bakes them into
    the kernels and guards on them)."""

    a: tuple  # Butcher tableau rows
    b: tuple
    b_err: tuple  # b - b_hat
    c: tuple
    P: tuple  # interpolant coefficients (Sd, D)
    fsal: bool
    ctrl: Controller  # the controller's step_rule(): proposal, bounds, underflow, adaptation
    order: int  # exponent of the controller (error order + 1)
    time_dtype: torch.dtype
    steps: int  # steps unrolled per call
    layout: tuple  # (kind, keys, shapes, sizes) of the state
    window: int  # output times one step may pass (it lands on the last of them)
    n_dense: int  # dense stages of the interpolant (only f at the step end is supported)
    floor: bool  # some atol is zero: the error scale is floored
    rows: bool  # per-sample control: func gets (B,) times, one norm per sample
    pick: bool  # each output slot holds one sample (shared control with a 2-D t)
    record: bool  # return every step's times, state and stages (dense output)
    jumps: bool  # jump_t: the last stage at the left limit, f afresh at the right limit
    norm_parts: int = 0  # seminorm: only the first components of a tuple state (0: all)
    impulses: bool = False  # the state jumps by (or is set to) k["I"][j] on landing at k["I_t"][j]
    first: bool = False  # evaluate k1 = f(t, y) first (s has no "k1"): saves an eager call
    # per row: the state jumps by k["RI"][r, j] (or is set to it where k["RP"][r, j]) on landing
    # on output slot j (window 1: each output time is landed on; the per-sample backsolve
    # adjoint's stops)
    row_impulses: bool = False
    # PIController(norm=...): a _compiled_norm.CompiledNorm (None: the engine's RMS/mixed norm)
    norm: object = None


def chunk(f, C: Consts, s: dict, k: dict) -> dict:
    """``C.steps`` masked steps of every row; returns the new state ``s`` plus ``report``.

    ``s`` (updated): ``y`` (B, M) state; ``k1`` (B, M) f at the start of the next step; ``t``,
    ``h`` (|next step|), ``prev`` (PI memory) (R,) float64; ``out`` (R, n_slots, n, M) outputs;
    ``p`` (R,) next output slot; ``att``/``nacc`` (R,) attempts/accepted steps; ``st`` (R,)
    status (a code of :data:`neuralode._failures.CAUSES`, 0 while the row can step); ``nf`` (R,) last error non-finite. ``k`` (constant over the solve): ``t_end``,
    ``t0``, ``sdir``, ``lo``, ``hi`` (R,) float64; ``out_t`` (R, n_slots) output times padded
    with ``sdir * inf``; ``pick`` (R, n_slots) sample of each slot (``C.pick``); ``max_att``;
    ``rtol``, ``atol``; ``L`` landing times, ``J`` jump times (sorted float64); ``I_t``
    (n,) float64 impulse times (among the landings), ``I`` (n, M) the jumps of the state
    there, or its values where ``I_put`` (n, M) is nonzero (``C.impulses``: the backsolve
    adjoint's jumps at output times and the forward's state there, one row); ``RI``
    (R, n_slots, M) the jump of each row's state on landing on each output slot, or its value
    where ``RP`` (R, n_slots, M) bool is True (``C.row_impulses``, ``R = B``: the per-sample
    backsolve adjoint's stops, y put back to the forward's output there).
    """
    kind, keys, shapes, sizes = C.layout
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    y, t, h, prev = s["y"], s["t"], s["h"], s["prev"]
    out, p, att, nacc, st, nf = s["out"], s["p"], s["att"], s["nacc"], s["st"], s["nf"]
    t_end, sdir, lo, hi = k["t_end"], k["sdir"], k["lo"], k["hi"]
    R, (B, M) = t.shape[0], y.shape
    n = B // R
    dev = y.device
    win = torch.arange(C.window, device=dev)
    rix = torch.arange(R, device=dev).unsqueeze(1)
    Pm = torch.tensor(C.P, dtype=torch.float64, device=dev)  # (Sd, D)
    J = k["J"] if C.jumps else None
    ctrl = C.ctrl

    def call(tt, yy):  # func on the user's state structure; tt (R,) float64
        tt = tt.to(C.time_dtype) if C.rows else tt[0].to(C.time_dtype)
        if kind == "tensor":
            return f(tt, yy.view(shapes[0])).reshape(yy.shape)
        parts = [yy[:, o : o + m].reshape(sh) for o, m, sh in zip(offs, sizes, shapes)]
        res = f(tt, tuple(parts) if kind == "tuple" else dict(zip(keys, parts)))
        vals = list(res) if kind == "tuple" else [res[key] for key in keys]
        return torch.cat([v.reshape(yy.shape[0], -1) for v in vals], 1)

    k1 = call(t, y) if C.first else s["k1"]

    recs = []
    for _ in range(C.steps):
        # ---- the controller: the eager drivers' "cannot step" rule on the proposed step size
        # (a code of _failures.CAUSES, the row's status), proposal, landings (step_t/jump_t/end)
        h_abs = ctrl.bounded(h)
        code = cannot_step(ctrl, h_abs, t, att, k["max_att"])
        live = (sdir * (t_end - t) > 0) & (st == 0)
        st = torch.where(live, code, st)
        live = live & (code == 0)
        idx = p.unsqueeze(1) + win  # (R, W) the output slots this step may fill
        taus = k["out_t"].gather(1, idx)
        t_try = ctrl.propose(t, h_abs, k["t0"], t_end, sdir)
        # A live row whose proposal does not advance (a subclass's propose) stops with code 5;
        # the host raises stuck_error after the call (raise_if_stuck).
        stuck = live & (sdir * (t_try - t) <= 0)
        st, live = torch.where(stuck, 5, st), live & ~stuck
        t_new, clipped, jump = land_rows(t, t_try, t_end, sdir, k["L"], J)
        # A step passes at most `window` output times: it lands on the last of them.
        past = sdir * (t_new - taus[:, -1]) > 0
        t_new = torch.where(past & live, taus[:, -1], t_new)
        t_new = torch.where(live, t_new, t)  # finished rows: zero steps
        clipped = clipped | past
        # A window full of outputs at the current time (repeated times in a 2-D t) is written
        # by a step of length zero that counts for nothing else.
        zero = t_new == t
        due = zero & (st == 0) & (sdir * (taus[:, 0] - t) <= 0)
        active = live & ~zero
        jump = jump & active & ~past
        h_step = t_new - t
        hs = h_step.to(y.dtype).unsqueeze(1)  # (R, 1): broadcasts over the rows of y
        # At a jump_t the last stage sees the left limit (the next float before it).
        t_last = torch.where(jump, time_beside(t_new, t, C.time_dtype), t_new) if C.jumps else t_new
        # ---- the stages
        ks = [k1]
        yi = y
        for i in range(1, len(C.b)):
            yi = stage_sum(y, hs, C.a[i][:i], ks)
            ti = t_last if C.c[i] == 1.0 else torch.clamp(t + C.c[i] * h_step, lo, hi)
            ks.append(call(ti, yi))
        y_new = yi if C.fsal else stage_sum(y, hs, C.b, ks)
        k_last = ks[-1] if C.fsal else call(t_last, y_new)
        # ---- the scaled error norm of each row and accept/reject
        if ctrl.adaptive:
            err = stage_sum(None, hs, C.b_err, ks)
            scale = error_scale(y.detach().abs(), y_new.detach().abs(), k["rtol"], k["atol"],
                                C.floor)  # fmt: skip
            r = (err.detach() / scale).view(R, n, M)
            if C.norm is None:
                e = rms_rows(r, None if kind == "tensor" else sizes, C.norm_parts or None)
            else:  # the user's norm, as the eager drivers apply it (_compiled_norm)
                e = C.norm(r)
            accept = active & (e <= 1.0)
        else:  # fixed steps: no error estimate, every step is accepted
            e = torch.zeros_like(t)
            accept = active
        # ---- outputs passed by the accepted steps, from each step's continuous extension
        writes = (accept | due).unsqueeze(1)
        inside = writes & (sdir.unsqueeze(1) * (taus - t_new.unsqueeze(1)) <= 0)
        y_end = torch.where(zero.unsqueeze(1), y, y_new)
        Kst = torch.stack(ks + [k_last] if C.n_dense else ks).view(-1, R, n, M)
        if C.pick:  # one sample per slot: only those samples are interpolated
            sel = k["pick"].gather(1, idx)  # (R, W)
            y3, yn3 = y.view(R, n, M)[rix, sel], y_end.view(R, n, M)[rix, sel]  # (R, W, M)
            Kst = Kst[:, rix, sel]  # (Sd, R, W, M)
        else:
            y3, yn3 = y.view(R, 1, n, M), y_end.view(R, 1, n, M)
            Kst = Kst.unsqueeze(2)  # (Sd, R, 1, n, M)
        if C.window > 1:
            # Outside the step theta is 0: masked values must stay finite, or their zero
            # gradients would become NaN.
            step_in = inside & ~zero.unsqueeze(1)
            theta = torch.where(step_in, (taus - t.unsqueeze(1)) / h_step.unsqueeze(1), 0.0)
            # (R, W, Sd) weights of the method's own interpolant: one fused loop per step
            vals = interpolant_sum(y3, h_step, weights_at(theta, Pm), Kst)
            vals = exact_at_step_end(vals, taus, t_new.unsqueeze(1), yn3)
        else:  # the step ended on the output time
            vals = yn3.expand(R, C.window, *yn3.shape[2:])
        if C.pick:
            vals = vals.unsqueeze(2)  # (R, W, 1, M)
        old = out[rix, idx]
        out = out.index_put((rix, idx), torch.where(inside.view(R, -1, 1, 1), vals, old))
        p = p + inside.sum(1)
        if C.record:
            recs.append((t, t_new, accept, y, y_new, torch.stack(ks), k_last))
        # ---- the PI update, then advance the accepted rows
        if ctrl.adaptive:
            h_next, prev = ctrl.adapt(h_step.abs(), h_abs, e, prev, C.order, accept, clipped)
            h = torch.where(active, h_next, h)
        acc2 = accept.unsqueeze(1)
        y = torch.where(acc2, y_new, y)
        if C.impulses:  # a landing on an impulse time: the jump, and f afresh after it
            hit = (t_new.unsqueeze(1) == k["I_t"]) & accept.unsqueeze(1)  # (R, n)
            put = (hit.to(y.dtype) @ k["I_put"]).view(y.shape) != 0  # set there, not added
            y = torch.where(put, 0, y) + (hit.to(y.dtype) @ k["I"]).view(y.shape)
            k_last = torch.where(hit.any(1, keepdim=True), call(t_new, y), k_last)
        if C.row_impulses:  # a row landing on its output slot: the jump (or the value put
            # there), and f afresh after it, at that state
            hit = (inside[:, 0] & accept).unsqueeze(1)  # (R, 1) (window 1)
            at = idx.unsqueeze(2).expand(-1, -1, M)
            jmp = k["RI"].gather(1, at).squeeze(1)  # (R, M) (finite: 0 where nothing happens)
            y = torch.where(k["RP"].gather(1, at).squeeze(1) & hit, jmp, y + jmp * hit)
            k_last = torch.where(hit, call(t_new, y), k_last)
        if C.jumps:  # past a jump_t, f afresh at the right limit (the next float after it)
            # (of the state after an impulse there; for the other accepted rows y is y_new)
            k_jump = call(time_beside(t_new, t_new + sdir, C.time_dtype), y)
            k_last = torch.where(jump.unsqueeze(1), k_jump, k_last)
        k1 = torch.where(acc2, k_last, k1)
        t = torch.where(accept, t_new, t)
        att = att + active.to(att.dtype)
        nacc = nacc + accept.to(nacc.dtype)
        nf = torch.where(active, ~torch.isfinite(e), nf)
    # Rows with steps or outputs left (outputs at the current time: see `due`).
    taus0 = k["out_t"].gather(1, p.unsqueeze(1)).squeeze(1)
    more = (sdir * (t_end - t) > 0) & (att < k["max_att"]) | (sdir * (taus0 - t) <= 0)
    busy = more & (st == 0)
    # What the host reads after the call, in one transfer (counts are exact in float64).
    report = torch.cat([t, h, att.double(), nacc.double(), st.double(), nf.double(),
                        busy.double()])  # fmt: skip
    res = dict(y=y, k1=k1, t=t, h=h, prev=prev, out=out, p=p, att=att, nacc=nacc, st=st, nf=nf)
    res["report"] = report
    if C.record:  # (steps, ...) stacked
        t_o, t_n, acc, y_o, y_n, K, k_n = (torch.stack(x) for x in zip(*recs))
        res["rec"] = dict(t=t_o, t_new=t_n, acc=acc, y=y_o, y_new=y_n, K=K, k_next=k_n)
        res["report"] = torch.cat([report, t_o.reshape(-1), t_n.reshape(-1),
                                   acc.double().reshape(-1)])  # fmt: skip
    return res


def raise_if_stuck(report: list, C: Consts, k: dict) -> None:
    """Raise the eager drivers' ValueError (:func:`~neuralode.controllers.base.stuck_error`,
    naming the controller) when a row of the last call stopped with code 5: its controller's
    ``propose`` did not advance. ``report`` is the call's report as a list (rows' ``t``, ``h``,
    ..., ``st``); the proposal is repeated on the host, for the first such row, to name it."""
    R = k["t0"].shape[0]
    st = report[4 * R : 5 * R]
    if 5 not in st:
        return
    r = st.index(5)
    t, h = report[r], report[R + r]
    t0, t_end, sdir = (float(k[n][r]) for n in ("t0", "t_end", "sdir"))
    raise stuck_error(C.ctrl, t, C.ctrl.propose(t, C.ctrl.bounded(h), t0, t_end, sdir))
