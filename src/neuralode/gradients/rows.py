"""Checkpointed and backsolve gradients of per-sample solves (``batch_control="per_sample"``).

The per-sample driver (:mod:`neuralode._loop_batched`) steps every sample with its own step
size; these are the two memory-saving gradient methods written against it:

- checkpointed: the forward solve (no graph) keeps, per iteration of the driver, the states of
  the rows that took a step; the backward pass replays each iteration with autograd, in reverse,
  for the rows it accepted (the same arithmetic as the forward: equal to Direct to rounding).
  With ``max_checkpoints`` at most that many iterations keep their states (every second one is
  dropped whenever the bound is passed); the backward pass recomputes the others, without a
  graph, from the previous kept one (at most about twice the forward work);
- backsolve adjoint: the forward solve keeps its outputs (a copy) and, for a replay, the times
  and start states of the steps that wrote outputs (no other states); the backward pass integrates ``(y, a)`` per sample from each
  sample's final time back to its initial one, in one continuous solve with the per-sample
  driver itself, and accumulates the parameter integral ``-int a^T df/dtheta dt`` from the
  accepted steps' stages with one vector-Jacobian product per iteration. Memory is flat in
  the number of steps. The backward steps land on each sample's stops like ``step_t`` (the
  step-size control goes on across them, no new initial step), where the adjoint jumps: at
  its output times (``outputs="stop"``), or, per sample with ``"replay"``, at the output
  times that end forward steps and at the start of each forward step holding outputs
  inside it, whose contribution comes from replaying that step's continuous extension with
  autograd (the shared driver's scheme): one stop per forward step rather than per output,
  so the backward cost does not grow with the number of output times (with an explicit
  forward method: after an implicit one the backward solve stops at every output). ``"auto"``
  replays the samples whose inner outputs outnumber 2.5 times the forward steps holding them.
  At every stop y is put back to the forward's value there (the output; the replayed step's
  start state), as under shared control and in compiled chunks (``compile=True``: the compiled
  forward keeps those start states too): y solved backward drifts off the trajectory
  exponentially fast on contracting dynamics.
  A sample that failed (``throw=False``) is solved back from its last written output (the
  backsolve adjoint stopping at each of its outputs, without replay), so both
  methods give, as Direct does, the gradients of its outputs before the failure (the NaN ones
  past it are constants).
"""

from __future__ import annotations

import dataclasses

import torch

from .._loop_batched import BatchedField, integrate_per_sample, time_layout
from .._norms import zero_atol
from .._tree import flatten_state
from ..controllers import ConstantStep
from ..errors import MaxStepsError
from ..interpolation.dense_batched import step_outputs
from ..solvers import get_tableau
from ..solvers.explicit_rk import make_stepper
from ..solvers.tableau import ButcherTableau
from ._common import add_drift, held_run, hold_run, warn_drift

__all__ = ["checkpointed_rows", "backsolve_rows"]


def _sum_into(acc: list, grads) -> None:
    for q, g in enumerate(grads):
        if g is not None:
            acc[q] = acc[q] + g


def _initial_outputs(a, g, tau, B):
    """Add the gradients of outputs at each sample's initial time (they are y0 itself)."""
    n0 = time_layout(tau)[2]
    r, j = (torch.arange(tau.shape[1], device=tau.device) < n0.unsqueeze(1)).nonzero().unbind(1)
    return a.index_add(0, r, g[j * B + r])


# ---------------------------------------------------------------------------- checkpointed
def checkpointed_rows(run, y0flat, params, max_checkpoints=None):
    return _CheckpointRows.apply(run, max_checkpoints, y0flat, *params)


def _recompute(f, st, recs, i: int, j: int, B: int) -> dict:
    """The working-set states of iterations ``j..i`` from the kept state of iteration ``j``
    (no graph): each sample's state advanced by the steps its rows accepted."""
    olds = {j: recs[j][7]}
    if j == i:
        return olds
    Y = torch.empty((B, olds[j].shape[1]), dtype=olds[j].dtype, device=olds[j].device)
    Y[recs[j][0]] = olds[j]
    with torch.no_grad():
        for k in range(j, i):
            idx, acc, tf, t0, _, tl, h, _, lo, hi = recs[k][:10]
            ar = acc.nonzero().squeeze(1)
            yk = olds[k][ar]
            f.lo, f.hi, f.idle = lo[ar], hi[ar], 0
            y_new, _, _ = st.step(f, t0[ar], h[ar], yk, f(tf[ar], yk), tl[ar], False)
            Y[idx[ar]] = y_new
            olds[k + 1] = Y[recs[k + 1][0]]
    return olds


class _CheckpointRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, max_checkpoints, y0flat, *params):
        with torch.no_grad():
            ys = run.integrate(y0flat.detach(), record=("replay",), max_states=max_checkpoints)
        recs = run.result[4]["replay"]
        run.stats["n_checkpoints"] = sum(rec[7] is not None for rec in recs)  # states kept
        hold_run(ctx, run)  # weakly: the outputs' nodes hold it (see structured_outputs)
        ctx.save_for_backward(*params)
        return ys

    @staticmethod
    def backward(ctx, g):
        run, params = held_run(ctx), list(ctx.saved_tensors)
        if torch.is_grad_enabled():
            raise RuntimeError(
                "gradients of gradients (create_graph=True) are not supported by checkpointed "
                "gradients under batch_control='per_sample'; use gradient='direct'"
            )
        f, st = run.f, run.stepper
        state = run.result[4]
        B = run.tau.shape[0]
        a = torch.zeros((B, g.shape[1]), dtype=g.dtype, device=g.device)
        gp = [torch.zeros_like(p) for p in params]
        nfe0 = f.nfe
        recs = state["replay"]
        i = len(recs) - 1
        while i >= 0:  # segments that end at a kept state, from the last
            k0 = i
            while recs[k0][7] is None:
                k0 -= 1
            olds = _recompute(f, st, recs, i, k0, B)
            for k in range(i, k0 - 1, -1):
                a = _replay(f, st, recs[k], olds[k], a, g, B, params, gp)
            i = k0 - 1
        run.stats["nfe_backward"] = f.nfe - nfe0
        return (None, None, _initial_outputs(a, g, run.tau, B), *gp)


def _replay(f, st, rec, y_old, a, g, B, params, gp):
    """One iteration replayed with autograd for its accepted rows: the adjoint of their states
    before it (``a`` updated) and the parameters' gradients (added to ``gp``)."""
    idx, acc, tf, t0, t1, tl, h, _, lo, hi, r, tau_j, j = rec
    ar = acc.nonzero().squeeze(1)
    rows = idx[ar]
    yk = y_old[ar].detach().requires_grad_()
    f.lo, f.hi, f.idle = lo[ar], hi[ar], 0
    with torch.enable_grad():
        k1 = f(tf[ar], yk)  # (just past t0 after a jump_t)
        y_new, _, K = st.step(f, t0[ar], h[ar], yk, k1, tl[ar], True)
        K = K.view(-1, *yk.shape)
        outs, cots = [y_new], [a[rows]]
        if r is not None:
            sub = (torch.cumsum(acc, 0) - 1)[r]  # rows with outputs, within ar
            has = torch.zeros(ar.shape[0], dtype=torch.bool, device=ar.device)
            has[sub] = True
            v, _ = step_outputs(st, f, K, t0[ar], h[ar], t1[ar], yk, y_new, lo[ar],
                                hi[ar], has, sub, tau_j, tl[ar])  # fmt: skip
            outs.append(v)
            cots.append(g[j * B + idx[r]])
        grads = torch.autograd.grad(outs, [yk, *params], cots, allow_unused=True)
    a = a.index_copy(0, rows, grads[0] if grads[0] is not None else torch.zeros_like(yk))
    _sum_into(gp, grads[1:])
    return a


# ---------------------------------------------------------------------------- backsolve
class _AdjointRows(BatchedField):
    """The adjoint system on rows ``(y, a)`` (A, 2M): ``(f, -a^T df/dy)`` per row, one
    vector-Jacobian product per evaluation; keeps its inputs (``calls``) for the parameter
    integral."""

    def __init__(self, inner: BatchedField, spec):
        super().__init__(None, spec, inner.time_dtype)
        self.inner, self.M = inner, sum(inner.spec.sizes)
        self.calls = []

    def __call__(self, t, ya):
        A = ya.shape[0]
        self.nfe += 1
        self.sample_evals += A
        if self.lo is not None and self.lo.shape[0] == A:
            t = torch.clamp(t, self.lo, self.hi)
        self.calls.append((t, ya))
        M = self.M
        with torch.enable_grad():
            yv = ya[:, :M].detach().requires_grad_()
            fy = self.inner(t, yv)
            (vj,) = torch.autograd.grad(fy, yv, -ya[:, M:], allow_unused=True)
        return torch.cat([fy.detach(), vj if vj is not None else torch.zeros_like(yv)], 1)


def backsolve_rows(cfg, run, y0flat, params):
    if cfg.norm is not None:
        raise ValueError(
            "Backsolve(norm=...) is not supported with batch_control='per_sample': the backward "
            "solve measures each sample's (y, a) by its own RMS norm and keeps the parameter "
            "integral out of the state (as seminorm=True), so a norm on the augmented tuple "
            "(y, adj_y, adj_params...) has nothing to act on; leave norm unset"
        )
    if cfg.outputs == "replay" and not isinstance(run.stepper.tab, ButcherTableau):
        raise ValueError(
            f"Backsolve(outputs='replay') with batch_control='per_sample' replays forward steps "
            f"of an explicit Runge-Kutta method, got solver {run.stepper.tab.name!r} (a replay "
            "would redo its Newton iterations); use outputs='stop' or 'auto'"
        )
    tab = get_tableau(cfg.solver) if cfg.solver is not None else run.stepper.tab
    if cfg.dt is not None:  # fixed steps of dt backward from each sample's end
        if tab.adaptive:
            raise ValueError(
                f"Backsolve(dt=...) needs a fixed-step solver for the backward solve (e.g. "
                f"solver='rk4'), got {tab.name!r}"
            )
    elif not tab.adaptive and run.ctrl.adaptive:
        raise ValueError(
            f"Backsolve(solver={tab.name!r}) with batch_control='per_sample' and adaptive "
            "forward steps needs an adaptive method for the backward solve; use e.g. 'dopri5'"
        )
    return _BacksolveRows.apply(run, cfg, y0flat, *params)


def _failed_restart(run, ys):
    """Where the backward solve of each failed sample (``throw=False``) starts, or None.

    A failed sample stops at its failure time; its outputs from there on are NaN constants
    (no gradient), as under Direct. Its backward solve starts at its last written output
    ``L_b`` (the state there is that output, the adjoint its output gradient) instead of the
    end, where the state never got to. Returns ``(rows, L, y_L)``: the failed samples (n,),
    their last written output index (n,) and the states there (n, M).
    """
    failed = run.result[4]["failed"]
    if not failed:
        return None
    tau, tfin = run.tau, run.result[1]
    B, T = tau.shape
    rows = torch.tensor(sorted(failed), dtype=torch.long, device=tau.device)
    tr = tau[rows]
    # Outputs are written at step ends, up to and including the time the sample failed at.
    written = time_layout(tr)[0].unsqueeze(1) * (tr - tfin[rows].unsqueeze(1)) <= 0
    written[:, 0] = True
    L = (written.long() * torch.arange(T, device=tau.device)).amax(1)
    return rows, L, ys[L * B + rows].detach()


@dataclasses.dataclass
class _Stops:
    """Where each sample's backward solve stops and what happens there (see :func:`_stops`)."""

    times: torch.Tensor  # (B, S) float64: the backward solve's start, its stops, its end
    jump: torch.Tensor  # (B*S, M) the adjoint's jump at stop s of sample b (row b*S + s)
    y: torch.Tensor  # (B*S, M) the forward's state there, put back where ``put`` (B*S,) is True
    put: torch.Tensor
    replay: torch.Tensor  # (B*S,) long: the first inner output of the step replayed there, or -1
    inner: torch.Tensor  # (B, T) bool: outputs strictly inside a replayed forward step
    mode: str  # "stop", "replay" or "mixed" (Solution.stats["backsolve_outputs"])


def _stops(run, cfg, failed, g, ys) -> tuple[_Stops, torch.Tensor | None]:
    """The stops of each sample's backward solve, from its end (or last written output) back.

    Every output of a sample that is not at its initial time (those are added at the end)
    makes the adjoint jump at its time, except with replay: outputs strictly inside a forward
    step then enter through that step's continuous extension, replayed with autograd at the
    step's start (one stop per forward step holding outputs, not one per output). A sample
    replays when asked (``outputs="replay"``) or, with ``"auto"``, when such outputs
    outnumber 2.5 times the forward steps holding them (the cheaper of the two, roughly);
    failed samples and implicit methods never replay. Stops at equal times are merged. At
    each stop the reconstructed y is put back to the forward's (its output ``ys``; the start
    of a replayed step, ``state["out_y"]``). Returns the stops and the forward
    steps that wrote each output ((5, B, T), see ``record="times"``; None when not kept)."""
    tau, state = run.tau, run.result[4]
    B, T = tau.shape
    dev = tau.device
    sdir, _, n0 = time_layout(tau)
    live = torch.arange(T, device=dev) >= n0.unsqueeze(1)  # outputs not at the initial time
    start = tau[:, -1].clone()
    if failed is not None:
        rows, L, _ = failed
        start[rows] = tau[rows, L]
        live[rows] &= torch.arange(T, device=dev) <= L.unsqueeze(1)
    steps = state.get("out_steps")
    if steps is None:  # outputs="stop" (or an implicit method): nothing to replay
        inner, rep = torch.zeros_like(live), torch.zeros(B, dtype=torch.bool, device=dev)
    else:
        steps = steps.view(5, T, B).transpose(1, 2)  # (5, B, T): t_old, h, t_new, t_last, tf
        inner = live & (tau != steps[2])
    first = inner.clone()  # the first inner output of each forward step holding some
    t_old = steps[0] if steps is not None else tau
    first[:, 1:] &= ~(inner[:, :-1] & (t_old[:, 1:] == t_old[:, :-1]))
    if steps is not None:
        # "auto", per sample: a stop costs about one backward step per inner output (the step
        # split there, a first stage afresh); a replay one per forward step holding some (its
        # landing) plus the replay of that step with its dense output (about 1.5 steps' worth).
        # Replay when the inner outputs outnumber 2.5 times those forward steps. (The shared
        # driver's rule, inner outputs > forward steps, replayed where stopping was up to 1.45x
        # cheaper: benchmarks/backsolve_outputs.py, oscillator at len(t) = 70 and 100.)
        rep = inner.sum(1) > 2.5 * first.sum(1)
        if cfg.outputs == "replay":
            rep = torch.ones_like(rep)
        if failed is not None:
            rep[failed[0]] = False
        inner &= rep.unsqueeze(1)
        first &= rep.unsqueeze(1)
    at = live & ~inner
    t0 = tau[:, :1]
    # Candidate stops: the start, the outputs, the starts of replayed steps, the end (t0).
    # Those not taken sit at t0 with nothing to do; a stable sort keeps the start first.
    cand = torch.cat(
        [start.unsqueeze(1), torch.where(at, tau, t0), torch.where(first, t_old, t0), t0], 1
    )
    order = torch.sort(sdir.unsqueeze(1) * cand, dim=1, descending=True, stable=True).indices
    ct = cand.gather(1, order)
    new = torch.ones_like(ct, dtype=torch.bool)
    new[:, 1:] = ct[:, 1:] != ct[:, :-1]
    slot = torch.cumsum(new, 1) - 1  # (B, 2T+2)
    S = int(slot.max()) + 1
    times = t0.expand(B, S).clone().scatter_(1, slot, ct)
    key = torch.arange(B, device=dev).unsqueeze(1) * S + slot  # row b*S + s per candidate
    slot_of = torch.empty((B, 2 * T + 2), dtype=torch.long, device=dev).scatter_(1, order, key)
    jump = torch.zeros((B * S, g.shape[1]), dtype=g.dtype, device=g.device)
    b, j = at.nonzero().unbind(1)  # candidate column 1 + j
    jump.index_add_(0, slot_of[b, 1 + j], g[j * B + b])
    y_put, put = torch.zeros_like(jump), torch.zeros(B * S, dtype=torch.bool, device=dev)
    y_put[slot_of[b, 1 + j]], put[slot_of[b, 1 + j]] = ys[j * B + b], True
    replay = torch.full((B * S,), -1, dtype=torch.long, device=dev)
    b, j = first.nonzero().unbind(1)  # candidate column 1 + T + j
    replay[slot_of[b, 1 + T + j]] = j
    if state.get("out_y") is not None:  # (the replayed step's start)
        y_put[slot_of[b, 1 + T + j]], put[slot_of[b, 1 + T + j]] = state["out_y"][j * B + b], True
    n_rep, n_live = int(rep.sum()), int((start != tau[:, 0]).sum())
    mode = "stop" if n_rep == 0 else "replay" if n_rep >= n_live else "mixed"
    return _Stops(times, jump, y_put, put, replay, inner, mode), steps


class _BacksolveRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, cfg, y0flat, *params):
        # compile=True: "auto" stops at every output (the adjoint's jumps are then made inside
        # the compiled backward solve, while replays run eagerly), as with shared control.
        auto = "stop" if run.compile else "replay"
        replays = (cfg.outputs if cfg.outputs != "auto" else auto) == "replay"
        replays = replays and isinstance(run.stepper.tab, ButcherTableau)
        with torch.no_grad():
            ys = run.integrate(y0flat.detach(), record=("times",) if replays else ())
        hold_run(ctx, run)  # weakly: the outputs' nodes hold it (see structured_outputs)
        ctx.cfg = cfg
        ctx.failed = _failed_restart(run, ys)
        ctx.ys = ys.detach().clone()  # the backward solve's y is put back to them (a copy, too)
        ctx.save_for_backward(*params)
        return ys

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "gradients of gradients (create_graph=True) are not supported by the backsolve "
                "adjoint; under batch_control='per_sample' only gradient='direct' supports them "
                "(or use batch_control='shared' with gradient='checkpoint')"
            )
        run, cfg, params = held_run(ctx), ctx.cfg, list(ctx.saved_tensors)
        y_final = run.result[0]
        B, M = y_final.shape
        tau = run.tau
        inner = BatchedField(run.func, run.spec, run.time_dtype)
        aug_spec, _ = flatten_state((y_final, y_final), batched=True, name="adjoint state")
        f = _AdjointRows(inner, aug_spec)
        tab = get_tableau(cfg.solver) if cfg.solver is not None else run.stepper.tab
        stepper = make_stepper(tab, y_final.dtype, y_final.device)
        ctrl = run.ctrl  # fixed steps: the same controller, backward from each sample's end
        if cfg.dt is not None:  # steps of dt backward from each sample's end
            ctrl = ConstantStep(cfg.dt, jump_t=ctrl.jump_t)
        elif ctrl.adaptive:  # no dt_min: a forward step clipped to an output may be shorter
            ctrl = ctrl.adjoint_rule()
        rt = run.rtol if cfg.rtol is None else float(cfg.rtol)
        at = run.atol if cfg.atol is None else float(cfg.atol)
        rt, at = (torch.cat([x, x], 1) if isinstance(x, torch.Tensor) else x for x in (rt, at))
        floor = zero_atol(at)
        b = [float(x) for x in tab.b]
        gp = [torch.zeros_like(p) for p in params]

        def on_step(acc, t_old, h_step, ya_old, calls):
            """The parameter integral over the accepted steps: sum_i b_i h (-a_i^T df/dtheta)
            at the stages, in one evaluation of func over the stacked stages of every row."""
            ar = acc.nonzero().squeeze(1)
            if not params or ar.numel() == 0:
                return
            stages = [(t_old, ya_old)] + [(tc, yc) for tc, yc in calls]
            use = [(i, st) for i, st in enumerate(stages) if b[i] != 0.0]
            ts = torch.cat([st[0][ar] for _, st in use])
            ys = torch.cat([st[1][ar, :M] for _, st in use])
            hs = h_step[ar].to(ys.dtype).unsqueeze(1)
            cot = torch.cat([-(b[i] * hs) * st[1][ar, M:] for i, st in use])
            with torch.enable_grad():
                fy = inner(ts, ys.detach())
                grads = torch.autograd.grad(fy, params, cot, allow_unused=True)
            _sum_into(gp, grads)

        stops, steps = _stops(run, cfg, ctx.failed, g, ctx.ys)
        run.stats["backsolve_outputs"] = stops.mode
        S = stops.times.shape[1]
        nfe_replay = [0]

        def on_land(w, landed):
            """At a stop: the adjoint jumps by the gradients of the outputs there and of those
            inside the forward step replayed from there, y is put back to the forward's; the
            rows' first stage follows (at the y put back)."""
            q = landed.nonzero().squeeze(1)
            key = w.idx[q] * S + w.nxt[q]
            ya = w.y[q]
            a = ya[:, M:] + stops.jump[key]
            put = stops.put[key]
            y = torch.where(put.unsqueeze(1), stops.y[key], ya[:, :M])
            p = put.nonzero().squeeze(1)
            add_drift(drift, ya[p, :M], y[p], run.rtol, run.atol, w.idx[q][p])
            rj = stops.replay[key]
            with torch.enable_grad():
                yk = y.detach().requires_grad_()
                inner.lo, inner.hi = w.lo[q], w.hi[q]
                fy = inner(w.tf[q], yk)
                rp = (rj >= 0).nonzero().squeeze(1)
                if rp.numel():
                    n0 = inner.nfe
                    a = a + _replay_step(run, inner, steps, stops.inner, g, yk, fy, w.tf[q],
                                         w.idx[q], rp, rj[rp], params, gp)  # fmt: skip
                    nfe_replay[0] += inner.nfe - n0
                (va,) = torch.autograd.grad(fy, yk, -a, allow_unused=True)
            inner.lo = inner.hi = None
            w.y = w.y.index_copy(0, q, torch.cat([y, a], 1))
            k1 = torch.cat([fy.detach(), va if va is not None else torch.zeros_like(a)], 1)
            w.k1 = w.k1.index_copy(0, q, k1)
            w.stale = w.stale.index_fill(0, q, False)

        drift = [None]  # the largest distance put back, in forward tolerances (eager only)
        start = torch.arange(B, device=tau.device) * S  # stop 0: the outputs at the start
        y_start = y_final if ctx.failed is None else y_final.index_copy(0, *ctx.failed[::2])
        ya = torch.cat([y_start, stops.jump[start]], 1)
        try:
            done = None
            if run.compile:  # the backward solve in compiled chunks where it can run there
                from .._compiled_rows_adjoint import backward_rows_compiled

                done = backward_rows_compiled(run, tab, ctrl, aug_spec, ya, stops, rt, at, floor,
                                              cfg.max_steps, params, gp, inner)  # fmt: skip
                run.stats["compiled_backward"] = done is not None
            if done is not None:
                ya, nfe = done
                inner.nfe += nfe
            else:
                with torch.no_grad():
                    _, ya, *_ = integrate_per_sample(
                        aug_spec, f, stepper, ya, stops.times, ctrl, rt, at, cfg.max_steps, True,
                        (), floor, on_step=on_step, outputs=False, on_land=on_land,
                    )  # fmt: skip
        except MaxStepsError as e:
            b = e.sample
            raise MaxStepsError(
                f"the backward (adjoint) solve of sample {b} reached Backsolve(max_steps="
                f"{cfg.max_steps}) step attempts (a limit per sample here) at t={e.t:.17g}, "
                f"before it got back to its t0={float(tau[b, 0]):.17g}; raise "
                "Backsolve(max_steps=...) or loosen its rtol/atol",
                t=e.t,
                step=e.step,
                h=e.h,
            ) from e
        if done is None:
            warn_drift(run.stats, drift, run.func, run.rtol, run.atol)
        run.stats["nfe_backward"] = inner.nfe  # func calls (each with a VJP), as forward
        run.stats["nfe_backward_replay"] = nfe_replay[0]
        return (None, None, _initial_outputs(ya[:, M:], g, tau, B), *gp)


def _replay_step(run, inner, steps, is_inner, g, yk, fy, tf, idx, rp, jr, params, gp):
    """The gradients of the outputs inside the forward steps replayed by rows ``rp`` of the
    landed rows (states ``yk`` with ``fy = f(tf, yk)``, samples ``idx``), from the step's own
    continuous extension: the adjoint's jump (len(yk), M); the parameters' part goes to
    ``gp``. ``jr``: each replayed step's first inner output."""
    B = run.tau.shape[0]
    br = idx[rp]
    t_old, h, t_new, t_last, tf_fwd = steps[:, br, jr]
    y, k1, tau = yk[rp], fy[rp], run.tau
    lo, hi = torch.minimum(tau[br, 0], tau[br, -1]), torch.maximum(tau[br, 0], tau[br, -1])
    inner.lo, inner.hi = lo, hi
    other = tf_fwd != tf[rp]  # the step started past a jump_t: f on its far side
    if run.ctrl.jump_t and bool(other.any()):
        k1 = torch.where(other.unsqueeze(1), inner(tf_fwd, y), k1)
    st = run.stepper
    y_new, _, K = st.step(inner, t_old, h, y, k1, t_last, True)
    K = K.view(-1, *y.shape)
    r, j = (is_inner[br] & (steps[0, br] == t_old.unsqueeze(1))).nonzero().unbind(1)
    has = torch.ones(br.shape[0], dtype=torch.bool, device=br.device)
    v, _ = step_outputs(
        st, inner, K, t_old, h, t_new, y, y_new, lo, hi, has, r, tau[br[r], j], t_last
    )
    grads = torch.autograd.grad(v, [yk, *params], g[j * B + br[r]], allow_unused=True,
                                retain_graph=True)  # fmt: skip
    _sum_into(gp, grads[1:])
    return grads[0] if grads[0] is not None else torch.zeros_like(yk)


def refuse_per_sample(gradient, tab) -> None:
    """Raise the ValueError for a gradient method without a per-sample implementation, naming
    why and what works instead with the solver ``tab``."""
    from ..solvers.implicit.irk import ImplicitRK
    from ..solvers.tableau import ButcherTableau

    name = type(gradient).__name__
    explicit = isinstance(tab, ButcherTableau)
    # Newton methods: a replay would redo the Newton iterations (no per-sample Checkpointed)
    works = "'direct'" if isinstance(tab, ImplicitRK) else "'direct', 'checkpoint'"
    why = (
        "the reversible scheme's two states share one step size"
        if name == "Reversible"
        else "it declares no per-sample implementation"
    )
    backsolve = "'backsolve'" if explicit else "Backsolve(solver='dopri5')"
    shared = "batch_control='shared'" + (
        "" if explicit or name != "Reversible" else " with an explicit Runge-Kutta method"
    )
    raise ValueError(
        f"batch_control='per_sample' does not support gradient={name}(...) ({why}); use "
        f"{works} or {backsolve}, or {shared}"
    )
