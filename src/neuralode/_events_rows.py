"""Events under per-sample step control (``solve(..., batch_control="per_sample", event=...)``).

Every sample locates its own event inside its own steps: the event function is evaluated on the
rows being integrated, like ``func`` (``g(t (A,), y) -> (A,)``, each row at its own time), at
the end of every accepted step and at two interior points of the step's continuous extension
(as the shared driver's :class:`~neuralode.events.EventMonitor` does); a sign change in one of
the three sub-intervals is refined, for all rows that crossed at once, by the Illinois method on
that row's continuous extension. A sample whose event fired stops there (its later steps cost
nothing); the others go on.

Then, as in :mod:`neuralode.events`, a second solve with the chosen gradient method runs each
sample up to its located event (a 2-D grid of output times that ends at it), and the event time
is re-attached to the graph by the implicit function theorem, per sample:
``t*_b = s_b - g_b(s_b, y_b) / D_b`` with ``D_b = dg_b/dt + dg_b/dy . f(s_b, y_b)`` held
constant, so that ``dt*_b/dp = -(dg_b/dp) / D_b``; the event state is
``y_b + f(s_b, y_b) (t*_b - s_b)``. Gradients therefore work with every per-sample gradient
method (Direct, Checkpointed, Backsolve), and with respect to ``t``.

Non-terminal events run in segments: each segment locates, for every sample still running, its
next event, solves up to it, applies ``reset`` to the samples whose event fired and starts them
again at their (differentiable) event times; the segments end when no sample has one more
event. Event times and states come back time-major like ``ys``: ``event_t`` of shape
``(K, B)`` with ``K`` the largest number of events of a sample, NaN-padded.

Rows must be independent (as everywhere under per-sample control): ``g_b`` depends on row ``b``
only; ``D`` for all rows comes from one reverse pass through the sum of the rows' values.
"""

from __future__ import annotations

import warnings

import torch

from ._loop_batched import BatchedField, integrate_per_sample, per_row_times, time_layout
from ._tree import real_dtype
from .controllers.step_size import underflows
from .events import TERMINAL_NOTE, _crossed
from .gradients._common import capable
from .interpolation.dense_batched import dense_rows
from .solution import Solution

__all__ = ["solve_rows_with_event"]


class RowEventFn:
    """The event function on flat rows: ``(t (n,) float64, y (n, M)) -> (n,)``, validated."""

    def __init__(self, event, field):
        self.event, self.field, self.calls = event, field, 0

    def _rows_hint(self, n: int) -> str:
        B = self.field.spec.batch
        return (
            f"under batch_control='per_sample' the event function is called like func, on the "
            f"A rows being integrated (here A={n}; the batch has B={B}), so a per-sample "
            f"constant of shape ({B},) captured from outside (e.g. a threshold) does not line up "
            "with them: carry it in the state instead (a component with zero derivative, "
            "returned by func as zeros), where each row brings its own"
        )

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = y.shape[0]
        self.calls += 1
        try:
            out = self.event.fn(t.to(self.field.time_dtype), self.field._spec(n).unflatten(y))
        except RuntimeError as e:
            if n != self.field.spec.batch and "size" in str(e):
                raise ValueError(f"the event function failed ({e}); {self._rows_hint(n)}") from e
            raise
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"the event function returned {type(out).__name__}; it must return a tensor"
            )
        if n == 1 and out.numel() == 1:
            out = out.reshape(1)
        if out.shape != (n,):
            raise ValueError(
                "with batch_control='per_sample' the event function is called like func, with t "
                "of shape (A,) and A rows of the state (the rows being integrated, or points "
                "inside their steps, several per sample, evaluated together), and must return "
                f"shape (A,) (one value per row); got shape {tuple(out.shape)} for A={n}"
                + (f". Note: {self._rows_hint(n)}" if out.shape == (self.field.spec.batch,) else "")
            )
        return out.real if out.is_complex() else out


class RowEventMonitor:
    """Per-row event location inside the accepted steps (see the module docstring)."""

    CHECKS = (1.0 / 3.0, 2.0 / 3.0)

    def __init__(self, gfn: RowEventFn, stepper, f, direction: int, g0: torch.Tensor):
        self.gfn, self.stepper, self.f, self.direction = gfn, stepper, f, direction
        self.g_prev = g0.clone()
        self.t_event = torch.full_like(g0, float("nan"))

    def _at(self, Kd, y, h, theta):
        return self.stepper.interpolate(Kd, y, h, theta)

    def __call__(self, w, acc, t_old, h, y_old, K, t_last):
        ar = acc.nonzero().squeeze(1)
        n = ar.numel()
        if n == 0:
            return None
        t0, hh, t1, y0 = t_old[ar], h[ar], w.t[ar], y_old[ar]
        Kd = dense_rows(self.stepper, self.f, K[:, ar], t0, hh, y0, t_last[ar], w.lo[ar], w.hi[ar])
        pts = [self._at(Kd, y0, hh, hh.new_full((n,), th)) for th in self.CHECKS]
        ts = torch.cat([t0 + th * hh for th in self.CHECKS] + [t1])
        gs = self.gfn(ts, torch.cat([*pts, w.y[ar]])).to(torch.float64).view(-1, n)
        gs = torch.cat([self.g_prev[w.idx[ar]].unsqueeze(0), gs])  # (4, n)
        cross = _crossed(gs[:-1], gs[1:], self.direction)  # (3, n)
        hit = cross.any(0)
        self.g_prev[w.idx[ar]] = gs[-1]
        if not bool(hit.any()):
            return None
        r = hit.nonzero().squeeze(1)
        i = cross[:, r].to(torch.int8).argmax(0)  # the first sub-interval that crossed
        grid = torch.tensor([0.0, *self.CHECKS, 1.0], dtype=torch.float64, device=t0.device)
        c = self._refine(Kd[:, r], y0[r], t0[r], hh[r], t1[r], grid[i], grid[i + 1],
                         gs[i, r], gs[i + 1, r])  # fmt: skip
        self.t_event[w.idx[ar[r]]] = torch.where(c < 1.0, t0[r] + c * hh[r], t1[r])
        stop = torch.zeros_like(acc)
        stop[ar[r]] = True
        return stop

    def _refine(self, Kd, y0, t0, h, t1, a, c, ga, gc):
        """The first crossing of each row in step fractions ``[a, c]`` (``g(a) != 0``): the
        shared monitor's Illinois iteration (bisection once ``g`` is exactly zero at the
        bracket's end), for every row at once; a row stops when its bracket is at the
        resolution of t."""
        side, t_abs = torch.zeros_like(a), torch.maximum(t0.abs(), t1.abs())
        for _ in range(200):
            live = ((c - a) > 1e-14) & ~underflows(h.abs() * (c - a), t_abs, 0.0)
            if not bool(live.any()):
                break
            m = torch.where(gc == 0.0, 0.5 * (a + c), (a * gc - c * ga) / (gc - ga))
            m = torch.where((a < m) & (m < c), m, 0.5 * (a + c))
            gm = self.gfn(t0 + m * h, self._at(Kd, y0, h, m)).to(torch.float64)
            left = live & ((gm == 0.0) | ((gm > 0) != (ga > 0)))  # crossed by m: [a, m]
            right = live & ~left
            ga = torch.where(left & (side == 1), 0.5 * ga, ga)
            gc = torch.where(right & (side == -1) & (gc != 0.0), 0.5 * gc, gc)
            c, gc = torch.where(left, m, c), torch.where(left, gm, gc)
            a, ga = torch.where(right, m, a), torch.where(right, gm, ga)
            side = torch.where(left, 1.0, torch.where(right, -1.0, side))
        return c


class SegmentStats(dict):
    """The stats of one segment's solve (non-terminal events): the counters that its backward
    pass writes (:data:`BACKWARD_KEYS`) are also gathered, over the segments, into the event
    solve's ``stats`` (``outer``): counts summed, ``backsolve_outputs`` one mode or
    ``"mixed"``. ``parts``: the list of every segment's backward counters (this one's are
    appended: a dict of their own, not this object, which would make a reference cycle, i.e.
    garbage for the cyclic collector at every solve)."""

    BACKWARD_KEYS = ("nfe_backward", "nfe_backward_replay", "backsolve_outputs")

    def __init__(self, outer: dict, parts: list):
        super().__init__()
        self.outer, self.parts, self.mine = outer, parts, {}
        parts.append(self.mine)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if key in self.BACKWARD_KEYS:
            self.mine[key] = value
            vals = [p[key] for p in self.parts if key in p]
            if key == "backsolve_outputs":
                self.outer[key] = vals[0] if len(set(vals)) == 1 else "mixed"
            else:
                self.outer[key] = sum(vals)


def _along(field, gfn, t, y):
    """``(f(t, y), D)`` per row: ``D_b = dg_b/dt + dg_b/dy . f`` along each row's solution at
    ``(t_b, y_b)`` from one reverse pass through a shift ``s`` of time and state (rows are
    independent: the sum separates them); None when g does not depend on the shift."""
    with torch.enable_grad():
        fy = field(t, y.detach()).detach()
        s = torch.zeros_like(t, requires_grad=True)
        g = gfn(t + s, y.detach() + s.to(real_dtype(y.dtype)).unsqueeze(1) * fy)
        D = torch.autograd.grad(g.sum(), s, allow_unused=True)[0] if g.requires_grad else None
    return fy, D


def _locate(ctx, gfn, event, y_s, t_s, t_end, restart: bool, used=None):
    """Phase 1 (no graph): each sample's first event in ``[t_s, t_end]``, NaN where none.

    A zero of g at the start (after an event: g near zero) is not an event: the sign that
    counts as "before" is then the sign in which g moves along the solution (as in the shared
    path)."""
    f = BatchedField(ctx.func, ctx.spec, ctx.time_dtype)
    with torch.no_grad():
        g0 = gfn(t_s, y_s).to(torch.float64, copy=True)  # (g may return a view of y)
    if restart and event.reset is None:
        flat = torch.ones_like(g0, dtype=torch.bool)  # g is continuous through the event
    else:
        flat = (g0 == 0) | (restart & (g0.abs() <= 1e-12))
    flat = flat & (t_s != t_end)
    if bool(flat.any()):
        r = flat.nonzero().squeeze(1)
        # "Before" is the sign g takes just after the start in each row's direction of
        # integration: g(t_s + s) ~ s D, with s < 0 for a row solved backward in time.
        sdir = torch.where(t_end[r] >= t_s[r], 1.0, -1.0).to(torch.float64)
        D = _along(f, gfn, t_s[r], y_s[r])[1]
        g0[r] = 0.0 if D is None else sdir * torch.sign(D.to(torch.float64))
    mon = RowEventMonitor(gfn, ctx.stepper, f, event.direction, g0)
    with torch.no_grad():
        integrate_per_sample(
            ctx.spec, f, ctx.stepper, y_s, torch.stack([t_s, t_end], 1), ctx.ctrl, ctx.rtol,
            ctx.atol, ctx.max_steps, ctx.throw, (), ctx.floor, outputs=False, monitor=mon,
            used=used,
        )  # fmt: skip
    return mon.t_event, f.nfe


def _reroute(ctx, gfn, event, t_star, y_star):
    """Implicit-function-theorem re-attachment of the rows' event times and states (rows of
    ``t_star`` (n,) float64, ``y_star`` (n, M) from the differentiable solve)."""
    fy, D = _along(BatchedField(ctx.func, ctx.spec, ctx.time_dtype), gfn, t_star, y_star)
    g_val = gfn(t_star, y_star)
    if (D is None or bool((D == 0).all())) and not (g_val.requires_grad or y_star.requires_grad):
        return t_star, y_star  # no gradient wanted: the located times as they are
    if D is None and not g_val.requires_grad and event.constant_ok:
        warnings.warn(
            "the event function's value at the event does not depend on t, the state or any "
            "parameter through torch operations: the event time is treated as a constant (zero "
            "gradient). If it should depend on them, compute the event function with "
            "differentiable torch operations (no float(), no bool)",
            UserWarning,
            stacklevel=6,
        )
        return t_star, y_star
    if D is None:
        raise RuntimeError(
            f"the event function is not differentiable along the solution at t={t_star.tolist()!r}"
            " (its value does not depend on t or y through torch operations, e.g. it returns a "
            "bool or converts to float), so the event time has no gradient; compute it with "
            "differentiable torch operations, or detach y0 and the parameters"
        )
    if bool((D == 0).any()):
        bad = t_star[D == 0].tolist()
        raise RuntimeError(
            f"the event function has zero time derivative along the solution at its root "
            f"t={bad!r}; the event time is not differentiable (a tangential crossing)"
        )
    te = t_star - g_val.to(torch.float64) / D.detach().to(torch.float64)
    return te, y_star + fy * (te - t_star).to(real_dtype(y_star.dtype)).unsqueeze(1)


def _flat(spec, state, L: int) -> torch.Tensor:
    """A state with a leading dimension ``L`` as ``(L, B, M)``."""
    if spec.kind == "tensor":
        parts = [state]
    else:
        parts = list(state) if spec.kind == "tuple" else [state[k] for k in spec.keys]
    return torch.cat([p.reshape(L, spec.batch, -1) for p in parts], -1)


def max_events_message(n: int, t_last: str, who: str = "the solve") -> str:
    """The message of a solve stopped by ``Event(max_events=n)`` at its n-th event."""
    return (
        f"Event(max_events={n}) reached: {who} stopped at its last allowed event (number {n}, "
        f"t={t_last}); "
        "outputs after it hold the state at that event (as for a terminal event). Raise "
        "max_events to go on; for a Zeno-like accumulation of events, end the solve before it"
    )


def solve_rows_with_event(solve_rows, ctx, y0, t, event, kw: dict) -> Solution:
    """``solve(..., batch_control="per_sample", event=...)``: see the module docstring.

    ``solve_rows`` is :func:`neuralode._loop_batched.solve_per_sample`, ``ctx`` the validated
    :class:`~neuralode._loop_batched.RowsRun` of the solve (no event) and ``kw`` its options.
    """
    from .events import Event

    if not isinstance(event, Event):
        raise TypeError(f"event must be a neuralode.Event, got {type(event).__name__}")
    from ._tree import flatten_state

    _, y0flat = flatten_state(y0, batched=True)
    gfn = RowEventFn(event, ctx.f)
    kw = dict(kw, dense_output=ctx.dense, event=None)  # (dense: each segment's own, joined)
    from .events import held_solution
    from .gradients._common import collect_runs

    with collect_runs() as runs:  # held by the final outputs (see events.solve_with_event)
        if event.terminal:
            sol = _terminal(solve_rows, ctx, gfn, event, y0, y0flat, t, kw)
        else:
            sol = _non_terminal(solve_rows, ctx, gfn, event, y0flat, t, kw)
    return held_solution(sol, runs)


def _terminal(solve_rows, ctx, gfn, event, y0, y0flat, t, kw):
    spec, tau = ctx.spec, ctx.tau
    B, T = tau.shape
    sdir = time_layout(tau)[0]
    t_star, nfe1 = _locate(ctx, gfn, event, y0flat.detach(), tau[:, 0], tau[:, -1], False)
    fired = ~torch.isnan(t_star)
    stops = torch.where(fired, t_star, tau[:, -1])
    # Phase 2: the outputs before its event keep their (possibly differentiable) times, the
    # others sit at the event; one more column ends every row at its event (or its end).
    tt = per_row_times(t, B, tau.device)
    before = (sdir.unsqueeze(1) * (tau - stops.unsqueeze(1)) < 0) | ~fired.unsqueeze(1)
    before[:, 0] = True
    end = torch.where(fired, t_star, tt[:, -1])
    grid = torch.cat([torch.where(before, tt, end.unsqueeze(1)), end.unsqueeze(1)], 1)
    sol = solve_rows(ctx.func, y0, grid, **kw)
    ysf = _flat(spec, sol.ys, T + 1)
    y_star = ysf[T]
    t_event = torch.full((B,), float("nan"), dtype=torch.float64, device=tau.device)
    y_event = y_star
    r = fired.nonzero().squeeze(1)
    if r.numel():
        te, ye = _reroute(ctx, gfn, event, t_star[r], y_star[r])
        t_event = t_event.index_put((r,), te)
        y_event = y_star.index_put((r,), ye)
    after = (sdir.unsqueeze(1) * (tau - stops.unsqueeze(1)) > 0) & fired.unsqueeze(1)  # (B, T)
    ys = torch.where(after.T.unsqueeze(2), y_event.unsqueeze(0), ysf[:T])
    stats = sol.stats  # the same dict: a backward pass adds its counters (nfe_backward)
    stats.update(nfe_event_location=nfe1, n_event_fn=gfn.calls)
    status = sol.status if sol.status != "success" else "event" if bool(fired.all()) else "success"
    t_final = torch.where(fired, stops, sol.t_final)
    dense = [(tau[:, 0], sol.t_final, sol._dense)] if ctx.dense else None
    return _solution(ctx, t, ys, stats, status, t_final, sol.message, t_event, y_event, kw,
                     _joined(dense, tau, t_final, t_event, TERMINAL_NOTE))  # fmt: skip


def _joined(dense, tau, t_final, event_t, note: str = ""):
    """The segments' dense outputs ``(start (B,), end (B,), dense)`` joined (None without);
    ``note``: why a sample's solve may end early (see :class:`SegmentedDense`)."""
    if not dense:
        return None
    from .interpolation.segmented import SegmentedDense, reach

    sdir = time_layout(tau)[0].to(torch.float64)
    last = event_t if event_t.dim() == 1 else _last_event(event_t)
    tf = reach(t_final.to(torch.float64), last, sdir)
    short = (sdir * (tau[:, -1].to(torch.float64) - t_final.to(torch.float64)) > 0).cpu()
    return SegmentedDense(dense, tau[:, 0], tf, sdir, True, note, short)


def _max_events_note(event) -> str:
    return f"a sample's solve stops at its Event(max_events={event.max_events})-th event"


def _last_event(event_t):
    """Each sample's last event time from ``(K, B)`` NaN-padded event times (NaN: none)."""
    n = (~torch.isnan(event_t)).sum(0)
    if event_t.shape[0] == 0:  # no sample had an event
        return event_t.new_full(event_t.shape[1:], torch.nan)
    return event_t.gather(0, (n - 1).clamp(min=0).unsqueeze(0)).squeeze(0).where(n > 0, torch.nan)


def _solution(ctx, t, ys, stats, status, t_final, message, event_t, event_y, kw, dense):
    """The event solve's Solution from flat ``ys`` (T, B, M) and ``event_y`` ((K,) B, M)."""
    return Solution(
        t=t,
        ys=ctx.spec.unflatten(ys, lead=ys.shape[:1]),
        stats=stats,
        status=status,
        t_final=t_final,
        message=message,
        event_t=event_t.to(ctx.time_dtype),
        event_y=ctx.spec.unflatten(event_y, lead=event_y.shape[:-2]),
        _per_sample=True,
        _detached=not capable(kw["gradient"], "exact_autograd"),
        _dense=dense,
    )


def _non_terminal(solve_rows, ctx, gfn, event, y0flat, t, kw):
    spec, tau = ctx.spec, ctx.tau
    B, T = tau.shape
    dev = tau.device
    sdir, stau, _ = time_layout(tau)
    tt = per_row_times(t, B, tau.device)
    t_end = tau[:, -1]
    t_s, y_s = tt[:, 0], y0flat  # each sample's segment start (differentiable)
    nxt = torch.zeros(B, dtype=torch.long, device=dev)  # next output not yet written
    live = t_end != tau[:, 0]
    pos, vals = [], []
    if not bool(live.all()):  # samples with an empty interval: every output is y0
        jj, rr = (~live).expand(T, B).nonzero().unbind(1)
        pos, vals = [jj * B + rr], [y0flat[rr]]
        nxt = torch.where(live, nxt, T)
    ev_t, ev_y = [], []
    stats = {"nfe": 0, "nfe_event_location": 0, "sample_evals": 0, "wasted_sample_evals": 0,
             "n_iterations": 0, "n_compactions": 0}  # fmt: skip
    status, message = "success", ""
    segments: list = []  # the segment solves' stats (SegmentStats)
    dense: list = []  # each segment's (start (B,), end (B,), dense output)
    t_fin, failed = t_end.clone(), set()
    dead = torch.zeros(B, dtype=torch.bool, device=dev)  # samples that failed (throw=False)
    # max_steps limits each sample's step attempts over the whole solve, across segments.
    used = torch.zeros((B, 2), dtype=torch.long, device=dev)  # accepted, rejected
    k = 0
    while bool(live.any()):
        ts_f = t_s.detach().to(torch.float64)
        t_star = torch.full((B,), float("nan"), dtype=torch.float64, device=dev)
        if k < event.max_events:
            seg = torch.where(live, t_end, ts_f)  # finished samples: an empty interval
            t_star, n1 = _locate(ctx, gfn, event, y_s.detach(), ts_f, seg, k > 0, used)
            stats["nfe_event_location"] += n1
        fired = live & ~torch.isnan(t_star)
        # Outputs of this segment: strictly before the event, or all the rest without one.
        q = sdir * torch.where(fired, t_star, t_end)  # (no NaN into searchsorted)
        cnt = torch.searchsorted(stau, q.unsqueeze(1).contiguous()).squeeze(1)
        stop = torch.where(fired, cnt, torch.where(live, T, nxt))
        n_out = int((stop - nxt).max())
        idx = nxt.unsqueeze(1) + torch.arange(n_out, device=dev)
        valid = idx < stop.unsqueeze(1)
        end = torch.where(fired, t_star, torch.where(live, tt[:, -1], t_s))
        outs = torch.where(valid, tt.gather(1, idx.clamp(max=T - 1)), end.unsqueeze(1))
        grid = torch.cat([t_s.unsqueeze(1), outs, end.unsqueeze(1)], 1)
        grid = torch.where(live.unsqueeze(1), grid, t_s.unsqueeze(1))
        seg_stats = SegmentStats(stats, segments)
        sol = solve_rows(ctx.func, spec.unflatten(y_s), grid, **kw, _used=used, _stats=seg_stats)
        if sol._dense is not None:  # a sample's segment k > 0 exists where it is live
            start = grid[:, 0].detach().to(torch.float64)
            dense.append(
                (start if k == 0 else start.where(live, torch.nan), sol.t_final, sol._dense)
            )
        for key in ("nfe", "sample_evals", "wasted_sample_evals", "n_iterations", "n_compactions"):
            stats[key] += sol.stats[key]
        used = used + torch.stack([sol.stats["n_accepted"], sol.stats["n_rejected"]], 1)
        if sol.status != "success" and status == "success":
            status, message = sol.status, sol.message
        if sol.stats.get("failed_samples"):  # throw=False: these stop where they failed
            bad = torch.tensor(sol.stats["failed_samples"], dtype=torch.long, device=dev)
            failed.update(sol.stats["failed_samples"])
            t_fin[bad] = sol.t_final[bad]
            fired = fired.index_put((bad,), torch.tensor(False, device=dev))
            dead[bad] = True
        ysf = _flat(spec, sol.ys, n_out + 2)
        r, c = valid.nonzero().unbind(1)
        pos.append(idx[r, c] * B + r)
        vals.append(ysf[1 + c, r])
        nxt = stop
        y_end = ysf[n_out + 1]
        if not bool(fired.any()):
            break
        rf = fired.nonzero().squeeze(1)
        te, ye = _reroute(ctx, gfn, event, t_star[rf], y_end[rf])
        nan = torch.full((B,), float("nan"), dtype=torch.float64, device=dev)
        ev_t.append(nan.index_put((rf,), te))
        ev_y.append(torch.full_like(y_end, float("nan")).index_put((rf,), ye))  # before reset
        if k + 1 == event.max_events:  # the limit: these samples stop here (as if terminal)
            r, c = (fired.unsqueeze(1) & (torch.arange(T, device=dev) >= nxt.unsqueeze(1))
                    ).nonzero().unbind(1)  # fmt: skip
            pos.append(c * B + r)
            vals.append(y_end.index_put((rf,), ye)[r])  # the state at the event, before reset
            t_fin[rf] = te.detach().to(t_fin.dtype)
            if status == "success":
                status = "max_events"
                message = max_events_message(
                    event.max_events, f"{float(te.detach().max()):.17g} at the latest",
                    f"samples {rf.tolist()[:8]}{' ...' if rf.numel() > 8 else ''} each",
                )  # fmt: skip
            break
        if event.reset is not None:  # reset(t (n,), the n rows) -> the n rows
            n = rf.numel()
            new = event.reset(te.to(ctx.time_dtype), ctx.f._spec(n).unflatten(ye))
            ye = ctx.f._spec(n).flatten(new, what="the state returned by Event(reset=...)")
        t_s = torch.where(fired, nan.index_put((rf,), te), torch.where(live, tt[:, -1], t_s))
        y_s = torch.where(fired.unsqueeze(1), y_end.index_put((rf,), ye), y_end)
        if bool(dead.any()):
            # A failed sample's outputs past its failure are NaN constants (as without events);
            # its NaN end must not start the (empty) segments that follow, where NaN * 0 in
            # their backward would reach the parameters and t: it sits at constants there.
            y_s = torch.where(dead.unsqueeze(1), y0flat.detach(), y_s)
            t_s = torch.where(dead, t_s.detach(), t_s)
        live = fired
        k += 1
    ys = torch.full((T * B, y0flat.shape[1]), float("nan"), dtype=y0flat.dtype, device=dev)
    ys = ys.index_put((torch.cat(pos),), torch.cat(vals)).view(T, B, -1)
    stats["n_event_fn"] = gfn.calls
    stats.update(n_accepted=used[:, 0], n_rejected=used[:, 1], n_steps=used[:, 0].clone())
    stats["wasted_share"] = stats["wasted_sample_evals"] / max(stats["sample_evals"], 1)
    if failed:
        stats["failed_samples"] = sorted(failed)
    event_t = torch.stack(ev_t) if ev_t else t_end.new_zeros((0, B))
    event_y = torch.stack(ev_y) if ev_y else y0flat.new_zeros((0, *y0flat.shape))
    return _solution(ctx, t, ys, stats, status, t_fin, message, event_t, event_y, kw,
                     _joined(dense, tau, t_fin, event_t, _max_events_note(event)))  # fmt: skip
