"""Events: root finding on an event function during a solve.

An event function ``g(t, y)`` returns a 0-d tensor (one event for the whole state) or a tensor of
shape ``(B,)`` (one event per sample of a batch whose state components all start with ``B``). An
event happens where ``g`` crosses zero in the chosen direction. A zero of ``g`` at the initial time
is not an event (the crossing must happen after ``t0``).

How it is located: after every accepted step ``g`` is evaluated at the step end and at two interior
points of the step's continuous extension (cheap: no evaluation of f beyond what dense output
needs); a sign change in any of the three sub-intervals is refined by the Illinois method (regula
falsi with Illinois modification) on the continuous extension, to about machine precision in the
step fraction. A pair of crossings that both fall between two of those check points (the function
crosses and crosses back within a third of a step) is not seen: this cannot be guaranteed by any
method that samples ``g``; shorten steps (``dt_max``) if such events matter.

Gradients: the state at the event comes from a second, differentiable solve ending at the located
time (with whatever gradient method the solve uses), and the event time is re-attached to the graph
by the implicit function theorem: ``t* = t*_0 - g(t*_0, y*) / D`` with
``D = dg/dt + dg/dy . f(t*, y*)`` held constant, so that ``dt*/dp = -(dg/dp) / D`` for every ``p``
that ``g(t*, y*)`` depends on -- ``y0``, the parameters of ``func`` through ``y*``, and the
parameters of ``g`` itself. The event state is ``y* + f(t*, y*) (t* - t*_0)`` for the same reason.

Dense output: each segment's solve keeps its own, joined at the event times (right-continuous: at
an event time, the state after the reset); see :meth:`neuralode.Solution.evaluate`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._tree import TreeSpec
from .gradients._common import collect_runs, hold_outputs

__all__ = ["Event"]

#: Said by ``Solution.evaluate`` past the end of a solve that terminal events stopped.
TERMINAL_NOTE = "a terminal event stops the solve there"


@dataclass(frozen=True)
class Event:
    """An event function and what to do when it fires.

    Parameters
    ----------
    fn : callable
        ``fn(t, y) -> Tensor``: a 0-d tensor, or shape ``(B,)`` for per-sample events. ``t`` is a
        0-d time tensor and ``y`` the state in y0's structure. May use autograd internally and
        may hold parameters (gradients w.r.t. them are returned). Under
        ``batch_control="per_sample"`` it is called like ``func`` there: ``t`` of shape
        ``(A,)`` (each row's own time), ``y`` the ``A`` rows being integrated, and it returns
        shape ``(A,)``; each value may depend on its own row only.
    direction : {0, 1, -1}, default 0
        1: only rising crossings (``g`` from negative to non-negative); -1: only falling; 0: both.
    terminal : bool, default True
        Terminal events stop the solve (per-sample events stop their sample: its state stays at
        the event state for later output times). Non-terminal events are recorded and the solve
        continues (whole-state events, or any event under ``batch_control="per_sample"``, where
        ``Solution.event_t`` is ``(K, B)``: event ``k`` of sample ``b``, NaN-padded). The solve's
        ``max_steps`` counts the step attempts of all segments between events together.
    reset : callable, optional
        ``reset(t, y) -> y`` applied at each non-terminal event before continuing (e.g. a bouncing
        ball's velocity flip). Needs ``terminal=False``. Under ``batch_control="per_sample"``
        it gets the ``n`` rows whose event fired and their times ``(n,)``.
    max_events : int, default 100
        Limit on non-terminal events: at the ``max_events``-th event the solve (under
        ``batch_control="per_sample"``, that sample) stops there as at a terminal event, with
        ``Solution.status == "max_events"`` and a message saying so; later outputs hold the
        state at that event (before any reset), ``t_final`` is its time.
    constant_ok : bool, default False
        What to do when gradients are recorded but the event function's value at the event
        depends on nothing differentiable (neither t, the state nor a parameter, e.g. it calls
        ``float()``): False raises RuntimeError, since the event time's gradient would silently
        be zero; True treats the event time as a constant with a UserWarning (the torchdiffeq
        face, where event functions such as ``zeros_like(t)`` past a horizon are common).

    Raises
    ------
    ValueError
        For an invalid direction, a reset on a terminal event, or ``max_events < 1``.
    """

    fn: Callable
    direction: int = 0
    terminal: bool = True
    reset: Callable | None = None
    max_events: int = 100
    constant_ok: bool = False

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(
                f"Event(fn=...) must be callable as fn(t, y), got {type(self.fn).__name__}"
            )
        if self.direction not in (-1, 0, 1):
            raise ValueError(f"Event(direction=...) must be -1, 0 or 1, got {self.direction!r}")
        if self.reset is not None and self.terminal:
            raise ValueError(
                "Event(reset=...) needs terminal=False: a terminal event stops the solve"
            )
        if self.reset is not None and not callable(self.reset):
            raise TypeError("Event(reset=...) must be callable as reset(t, y) -> y")
        if not (isinstance(self.max_events, int) and self.max_events >= 1):
            raise ValueError(
                f"Event(max_events=...) must be a positive integer, got {self.max_events!r}"
            )


def _crossed(ga: torch.Tensor, gb: torch.Tensor, direction: int) -> torch.Tensor:
    rising = (ga < 0) & (gb >= 0)
    falling = (ga > 0) & (gb <= 0)
    if direction > 0:
        return rising
    if direction < 0:
        return falling
    return rising | falling


class EventMonitor:
    """Stepping-loop monitor that locates events (see the module docstring)."""

    # Interior check points of each step (fractions), besides its end.
    CHECKS = (1.0 / 3.0, 2.0 / 3.0)

    def __init__(
        self, event: Event, spec: TreeSpec, time_dtype, per_sample: bool, g0: torch.Tensor
    ):
        self.event, self.spec, self.time_dtype = event, spec, time_dtype
        self.per_sample = per_sample
        self.g_prev = g0
        n = g0.shape[0]
        self.fired = torch.zeros(n, dtype=torch.bool)
        self.t_event = torch.full((n,), float("nan"), dtype=torch.float64)
        self.active = torch.ones(
            n, 1, dtype=spec.dtype if not spec.dtype.is_complex else spec.dtype.to_real()
        )
        self.n_g = 0

    def g(self, t: float, yflat: torch.Tensor) -> torch.Tensor:
        """Event values as a float64 CPU vector (B,) or (1,)."""
        self.n_g += 1
        tt = torch.scalar_tensor(t, dtype=self.time_dtype, device=self.spec.device)
        with torch.no_grad():
            out = self.event.fn(tt, self.spec.unflatten(yflat))
        return (
            check_event_output(out, self.per_sample, self.g_prev.shape[0])
            .detach()
            .to("cpu", torch.float64)
        )

    def __call__(self, view) -> bool:
        dtype = torch.float64
        device = view.y.device
        thetas = list(self.CHECKS)
        pts = view.at(torch.tensor(thetas, dtype=dtype, device=device))  # (m, B, M)
        h = view.t_new - view.t
        gs = [self.g_prev]
        for th, yq in zip(thetas, pts):
            gs.append(self.g(view.t + th * h, yq))
        gs.append(self.g(view.t_new, view.y_new))
        grid = [0.0, *thetas, 1.0]
        todo = ~self.fired
        hit_any = False
        for b in torch.nonzero(todo).flatten().tolist():
            for i in range(len(grid) - 1):
                ga, gb = gs[i][b], gs[i + 1][b]
                if bool(_crossed(ga, gb, self.event.direction)):
                    th = self._refine(view, b, grid[i], grid[i + 1], float(ga), float(gb))
                    self.t_event[b] = view.t + th * h if th < 1.0 else view.t_new
                    self.fired[b] = True
                    self.active[b] = 0.0
                    hit_any = True
                    break
        self.g_prev = gs[-1]
        if not self.per_sample:
            return hit_any
        return bool(self.fired.all())

    def _refine(self, view, b: int, a: float, c: float, ga: float, gc: float) -> float:
        """The first crossing of sample ``b`` in step fractions ``[a, c]``: where ``g`` leaves
        the sign it has at ``a`` (``ga != 0``). Illinois iteration while ``g`` takes the other
        sign at the bracket's end; bisection once it is exactly zero there, since ``g`` may stay
        zero after it gets there (``torch.zeros_like(t)`` past a horizon, a clamp): the event is
        then where ``g`` reaches zero, as in torchdiffeq, not wherever a zero was sampled."""
        side = 0
        h = view.t_new - view.t
        for _ in range(200):
            if c - a <= 1e-14 or abs(h) * (c - a) <= 4 * 2.2e-16 * max(
                abs(view.t), abs(view.t_new)
            ):
                break
            m = 0.5 * (a + c) if gc == 0.0 else (a * gc - c * ga) / (gc - ga)
            if not (a < m < c):
                m = 0.5 * (a + c)
            ym = view.at(torch.tensor([m], dtype=torch.float64, device=view.y.device))[0]
            gm = float(self.g(view.t + m * h, ym)[b])
            if gm == 0.0 or (gm > 0) != (ga > 0):  # crossed by m
                c, gc = m, gm
                if side == 1:
                    ga *= 0.5
                side = 1
            else:
                a, ga = m, gm
                if side == -1 and gc != 0.0:
                    gc *= 0.5
                side = -1
        return c


def check_event_output(out, per_sample: bool, n: int) -> torch.Tensor:
    """Validate an event function's output: 0-d (whole state) or (B,) (per sample)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"the event function returned {type(out).__name__}; it must return a tensor"
        )
    if per_sample:
        if n == 1 and out.numel() == 1:
            # A batch of one: shape () and (1,) say the same (torchdiffeq accepts both, and
            # event functions that return torch.zeros_like(t) past a horizon rely on it).
            out = out.reshape(1)
        if out.shape != (n,):
            raise ValueError(
                f"the event function returned shape {tuple(out.shape)}; per-sample events need shape ({n},)"
            )
        return out.real if out.is_complex() else out
    if out.numel() != 1:
        raise ValueError(
            f"the event function returned shape {tuple(out.shape)}; it must return a 0-d tensor (one "
            "event for the whole state) or shape (B,) with B the batch size of y0 (per-sample events)"
        )
    return (out.real if out.is_complex() else out).reshape(1)


# ---------------------------------------------------------------------------- solving with events
def _leading(y0) -> int | None:
    x = (
        y0
        if isinstance(y0, torch.Tensor)
        else next(iter(y0.values() if isinstance(y0, dict) else y0))
    )
    return x.shape[0] if x.dim() else None


def _map(state, fn):
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: fn(v) for k, v in state.items()}
    return tuple(fn(v) for v in state)


def _zip_map(fn, *states):
    first = states[0]
    if isinstance(first, torch.Tensor):
        return fn(*states)
    if isinstance(first, dict):
        return {k: fn(*(s[k] for s in states)) for k in first}
    return tuple(fn(*parts) for parts in zip(*states))


def solve_with_event(solve_fn, func, y0, t: torch.Tensor, event: Event, kwargs: dict):
    """Solve with an event (see the module docstring). ``solve_fn`` is :func:`neuralode.solve`."""
    if t.dim() != 1:
        raise ValueError(
            "solve(..., event=...) needs a 1-D t (shared output times) with "
            "batch_control='shared'; for a 2-D t (one grid per sample) use "
            "batch_control='per_sample', where each sample locates its own events"
        )
    time_dtype = kwargs.get("time_dtype", torch.float64)
    tl = t.detach().to("cpu", torch.float64).tolist()
    t0 = tl[0]
    lead = _leading(y0)
    with torch.no_grad():
        g0 = event.fn(torch.scalar_tensor(t0, dtype=time_dtype), _map(y0, torch.Tensor.detach))
    if not isinstance(g0, torch.Tensor):
        raise TypeError(f"the event function returned {type(g0).__name__}; it must return a tensor")
    per_sample = (
        g0.dim() == 1
        and lead is not None
        and g0.shape[0] == lead
        and not (g0.numel() == 1 and lead == 1 and False)
    )
    if g0.dim() >= 1 and not per_sample and g0.numel() != 1:
        check_event_output(g0, False, 1)  # raises with the explanation
    if per_sample and not event.terminal:
        raise ValueError(
            "non-terminal events and resets act on the whole state: return a 0-d tensor from the "
            "event function (per-sample events of shape (B,) must be terminal), or solve with "
            "batch_control='per_sample', where each sample has its own non-terminal events"
        )
    from ._events_segments import non_terminal

    # The inner solves' runs are collected and held by the final outputs' own nodes: slices
    # and stacks of the inner outputs would hide holders of their own from the garbage
    # collector (a module keeping its own output; see gradients._common.structured_outputs).
    with collect_runs() as runs:
        if event.terminal:
            sol = _terminal(solve_fn, func, y0, t, tl, event, kwargs, per_sample, time_dtype)
        else:
            sol = non_terminal(solve_fn, func, y0, t, tl, event, kwargs, time_dtype)
    return held_solution(sol, runs)


def held_solution(sol, runs: list):
    """``sol`` with its outputs (``ys``, ``event_t``, ``event_y``) each the only output of a
    node holding ``runs``, the runs of the custom-gradient solves they were computed from
    (:func:`~neuralode.gradients._common.collect_runs`); ``sol`` itself when there are none."""
    if not runs:
        return sol
    ys, event_t, event_y = hold_outputs((sol.ys, sol.event_t, sol.event_y), runs)
    return dataclasses.replace(sol, ys=ys, event_t=event_t, event_y=event_y)


def _flow_derivative(
    func, event, spec, t: float, yflat, per_sample: bool, time_dtype
) -> torch.Tensor:
    """``dg/dt`` along the solution at ``(t, y)``: ``dg/dt + dg/dy . f`` per sample (CPU float64).

    One reverse pass through a scalar shift ``s`` of time and state, and one more to separate
    the samples (``d/du <u, dg/ds>``), so the event function is called once.
    """
    B = spec.batch if per_sample else 1
    tt = torch.scalar_tensor(t, dtype=time_dtype, device=spec.device)
    with torch.enable_grad():
        fy = spec.flatten(func(tt, spec.unflatten(yflat)), what="func").detach()
        s = torch.zeros((), dtype=time_dtype, device=spec.device, requires_grad=True)
        real = yflat.real.dtype if yflat.is_complex() else yflat.dtype
        g = check_event_output(
            event.fn(tt + s, spec.unflatten(yflat.detach() + s.to(real) * fy)), per_sample, B
        )
        if not g.requires_grad:
            return torch.zeros(B, dtype=torch.float64)
        u = torch.zeros(B, dtype=g.dtype, device=g.device, requires_grad=True)
        (gs,) = torch.autograd.grad(g, s, u, create_graph=True, allow_unused=True)
        if gs is None or not gs.requires_grad:
            return torch.zeros(B, dtype=torch.float64)
        (D,) = torch.autograd.grad(gs, u, allow_unused=True)
    return torch.zeros(B, dtype=torch.float64) if D is None else D.detach().to("cpu", torch.float64)


def _locate(
    solve_fn, func, y0, t_start, t_end, event, kwargs, per_sample, time_dtype, restart=False
):
    """Phase 1 (no graph): the event time(s) in [t_start, t_end], NaN where none.

    Where ``g`` is zero at the start (or, on a ``restart`` after an event, only rounding noise
    away from zero), the sign that counts as "before" is the sign in which ``g`` moves along the
    solution, so a zero at the start is never an event and the next crossing is not missed.
    """
    from ._tree import flatten_state

    y0d = _map(y0, torch.Tensor.detach)
    spec, y0flat = flatten_state(y0d, batched=per_sample)
    B = spec.batch if per_sample else 1
    with torch.no_grad():
        g0 = check_event_output(
            event.fn(torch.scalar_tensor(t_start, dtype=time_dtype, device=spec.device), y0d),
            per_sample,
            B,
        ).to("cpu", torch.float64)
    if restart and event.reset is None:
        flat = torch.ones(B, dtype=torch.bool)  # g is continuous through the event: it is ~0
    else:
        flat = (g0 == 0) | (restart & (g0.abs() <= 1e-12))
    if bool(flat.any()):
        D = _flow_derivative(func, event, spec, t_start, y0flat, per_sample, time_dtype)
        # "Before" is the sign g takes just after the start in the direction of integration:
        # g(t0 + s) ~ s D, with s < 0 backward in time.
        sdir = 1.0 if t_end >= t_start else -1.0
        g0 = torch.where(flat, sdir * torch.sign(D), g0)
    # The monitor sees the solve's own flat layout: t is 1-D here, so the state is one row
    # (components concatenated whole), not the per-sample rows of ``spec``.
    solve_spec = spec if not per_sample else flatten_state(y0d, batched=False)[0]
    mon = EventMonitor(event, solve_spec, time_dtype, per_sample, g0)
    if per_sample:
        # Samples whose event has fired stop moving (f masked to zero), so their error no longer
        # shortens the steps of the others.
        def masked(tt, y):
            active = mon.active.view(-1).to(spec.device)
            return _map(
                func(tt, y), lambda d: d * active.view(-1, *([1] * (d.dim() - 1))).to(d.dtype)
            )

        f1 = masked
    else:
        f1 = func
    kw = {k: v for k, v in kwargs.items() if k not in ("gradient", "dense_output")}
    with torch.no_grad():
        sol = solve_fn(
            f1,
            y0d,
            torch.tensor([t_start, t_end], dtype=torch.float64),
            gradient="direct",
            dense_output=False,
            _monitor=mon,
            **kw,
        )
    return mon.t_event, sol.stats, mon.n_g


def _reroute(func, event, t_star: list[float], y_star, per_sample: bool, time_dtype):
    """Implicit-function-theorem re-attachment of the event time(s) and state(s) to the graph.

    Returns ``t* - g(t*, y*) / D`` (one Newton step on the differentiable solve's own solution,
    so the value moves by the residual of ``g`` there, about the solve's tolerance) and the
    state ``y* + f(t*, y*) (t_event - t*)``, with ``D`` held constant.
    """
    from ._tree import flatten_state

    spec, yflat = flatten_state(y_star, batched=per_sample)
    device = spec.device
    t_out, rows = [], []
    for b, ts in enumerate(t_star):
        if ts != ts:  # NaN: no event for this sample
            t_out.append(torch.tensor(float("nan"), dtype=time_dtype, device=device))
            rows.append(yflat[b] if per_sample else yflat[0])
            continue
        tt = torch.scalar_tensor(ts, dtype=time_dtype, device=device)
        with torch.enable_grad():
            s = torch.zeros((), dtype=time_dtype, device=device, requires_grad=True)
            fy = spec.flatten(func(tt, spec.unflatten(yflat.detach())), what="func at the event")
            shift = torch.zeros_like(yflat)
            if per_sample:
                shift[b] = fy[b].detach()
            else:
                shift = fy.detach()
            ys = (
                yflat.detach()
                + s.to(yflat.real.dtype if yflat.is_complex() else yflat.dtype) * shift
            )
            gs = event.fn(tt + s, spec.unflatten(ys))
            gs = check_event_output(gs, per_sample, len(t_star))[b if per_sample else 0]
            D = torch.autograd.grad(gs, s, allow_unused=True)[0] if gs.requires_grad else None
        g_val = check_event_output(event.fn(tt, spec.unflatten(yflat)), per_sample, len(t_star))
        g_val = g_val[b if per_sample else 0]
        if (D is None or float(D) == 0.0) and not (g_val.requires_grad or yflat.requires_grad):
            t_out.append(tt)  # no gradient wanted: the located time as it is
            rows.append(yflat[b] if per_sample else yflat[0])
            continue
        if D is None and not g_val.requires_grad and event.constant_ok:
            # g's value at the event depends on nothing differentiable (e.g. an event function
            # that returns torch.zeros_like(t) past a horizon): the event time is a constant.
            # torchdiffeq gives it a zero gradient silently; say so, once per call site (the
            # message holds no event time, so a training loop does not repeat it every step).
            warnings.warn(
                "the event function's value at the event does not depend on t, the "
                "state or any parameter through torch operations: the event time is treated as "
                "a constant (zero gradient). If it should depend on them, compute the event "
                "function with differentiable torch operations (no float(), no bool)",
                UserWarning,
                stacklevel=5,
            )
            t_out.append(tt)
            rows.append(yflat[b] if per_sample else yflat[0])
            continue
        if D is None:
            raise RuntimeError(
                f"the event function is not differentiable along the solution at t={ts!r} (its "
                "value does not depend on t or y through torch operations, e.g. it returns a "
                "bool or converts to float), so the event time has no gradient; compute it with "
                "differentiable torch operations, or detach y0 and the parameters"
            )
        if float(D) == 0.0:
            raise RuntimeError(
                f"the event function has zero time derivative along the solution at its root "
                f"t={ts!r}; the event time is not differentiable (a tangential crossing)"
            )
        te = tt - g_val.to(time_dtype) / D.detach()
        dt = (te - tt).to(yflat.real.dtype if yflat.is_complex() else yflat.dtype)
        row = (yflat[b] if per_sample else yflat[0]) + (
            fy[b] if per_sample else fy[0]
        ).detach() * dt
        t_out.append(te)
        rows.append(row)
    t_event = torch.stack(t_out) if per_sample else t_out[0]
    y_event = spec.unflatten(torch.stack(rows) if per_sample else rows[0].unsqueeze(0))
    return t_event, y_event


def _grid(parts, device) -> torch.Tensor:
    """A 1-D float64 grid from pieces that are floats or (differentiable) tensors."""
    out = [
        p.reshape(-1).to(device=device, dtype=torch.float64)
        if isinstance(p, torch.Tensor)
        else torch.tensor([p], dtype=torch.float64, device=device)
        for p in parts
    ]
    return torch.cat(out)


def _time_shift(func, tt: torch.Tensor, y, per_sample: bool):
    """``(tt - tt.detach()) * f(tt, y)``: the first-order effect on ``y`` of moving the time
    ``tt`` along the solution; zero in value, it carries ``d/dtt`` into the graph."""
    d = tt - tt.detach()
    f = func(tt.detach(), y)
    return _map(f, lambda v: d.to(v.real.dtype if v.is_complex() else v.dtype) * v)


def _terminal(solve_fn, func, y0, t, tl, event, kwargs, per_sample, time_dtype):
    from .solution import Solution

    t0, t_end = tl[0], tl[-1]
    direction = 1.0 if t_end >= t0 else -1.0
    t_star, stats1, n_g = _locate(
        solve_fn, func, y0, t0, t_end, event, kwargs, per_sample, time_dtype
    )
    fired = ~torch.isnan(t_star)
    stops = [float(x) if f else t_end for x, f in zip(t_star.tolist(), fired.tolist())]
    T = len(tl)
    t_grad = t.requires_grad and torch.is_grad_enabled()
    if per_sample:
        rows = []
        for s in stops:
            row = [x if direction * (x - s) < 0 else s for x in tl] + [s]
            rows.append(row)
        grid = torch.tensor(rows, dtype=torch.float64)
        # solve() takes no gradient w.r.t. a 2-D t: move t0 by hand (y0 shifted by
        # -(t0 - t0.detach()) f(t0, y0)), and each output before its sample's event below.
        tt = t.to(torch.float64)
        y_start = y0
        if t_grad:
            y_start = _zip_map(
                lambda a, b: a - b, y0, _time_shift(func, tt[0].to(time_dtype), y0, True)
            )
        sol = solve_fn(func, y_start, grid, **kwargs)
        ys_all = sol.ys
        ys = _map(ys_all, lambda v: v[:T])
        y_star = _map(ys_all, lambda v: v[T])
        if t_grad:
            shifts = [_time_shift(func, tt[0].to(time_dtype), y0, True)] + [
                _time_shift(func, tt[j].to(time_dtype), _map(ys, lambda v, j=j: v[j]), True)
                for j in range(1, T)
            ]
            ys = _zip_map(lambda v, *sh: v + torch.stack(sh), ys, *shifts)
    else:
        s = stops[0]
        keep = [x for x in tl if direction * (x - s) < 0]
        n_keep = len(keep)
        # Built from t itself, so that solve() carries the gradients w.r.t. the output times
        # (and t0) that t may require; the stop time is a located value (no graph): its
        # gradient comes back through the implicit function theorem in _reroute.
        parts = [t[:n_keep]] if n_keep else []
        if keep[-1:] != [s]:
            parts.append(s)
        grid = _grid(parts, t.device)
        sol = solve_fn(func, y0, grid, **kwargs)
        y_star = _map(sol.ys, lambda v: v[-1])
        ys_part = _map(sol.ys, lambda v: v[:n_keep])
    t_event, y_event = _reroute(func, event, t_star.tolist(), y_star, per_sample, time_dtype)
    if per_sample:
        after = torch.tensor(
            [[direction * (x - s) > 0 for s in stops] for x in tl], device=t_event.device
        )  # (T, B): output j of sample b lies past its event

        def fill(out, ev):
            m = after.view(*after.shape, *([1] * (out.dim() - 2)))
            return torch.where(m, ev.unsqueeze(0).expand_as(out), out)

        ys = _zip_map(fill, ys, y_event)
        t_event = torch.where(
            fired.to(t_event.device), t_event, torch.full_like(t_event, float("nan"))
        )
    else:
        n_after = T - n_keep
        ys = _zip_map(
            lambda part, ev: torch.cat([part, ev.unsqueeze(0).expand(n_after, *ev.shape)]),
            ys_part,
            y_event,
        )
    stats = sol.stats  # the same dict: a backward pass adds its counters (nfe_backward)
    stats["nfe_event_location"] = stats1.get("nfe", 0)
    stats["n_event_fn"] = n_g
    status = "event" if bool(fired.all()) else "success"
    t_final = max(stops) if direction > 0 else min(stops)
    if sol.status != "success":  # throw=False: the solve failed before its end or event
        status, t_final = sol.status, sol.t_final
    dense = None
    if sol._dense is not None:
        from .interpolation.segmented import terminal

        dense = terminal(sol._dense, t0, t_final, direction, stops, fired, t_event, TERMINAL_NOTE)
    return Solution(
        t=t,
        ys=ys,
        stats=stats,
        status=status,
        t_final=t_final,
        message=sol.message,
        event_t=t_event,
        event_y=y_event,
        _dense=dense,
        _per_sample=per_sample,
        _detached=sol._detached,
    )
