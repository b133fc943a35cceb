"""Non-terminal whole-state events under the shared driver (see :mod:`neuralode.events`).

The solve runs in segments: each locates the next event from the segment's start, solves up to
it with the chosen gradient method, re-attaches the event time to the graph and applies
``reset``; the last segment ends at the final time. ``max_steps`` limits the step attempts of
the whole solve, across segments (failure messages count them all). At the ``max_events``-th
event the solve stops, as at a terminal event, with status ``"max_events"``.
"""

from __future__ import annotations

import re

import torch

from ._events_rows import SegmentStats, max_events_message
from ._failures import step_failure
from ._tree import flatten_state
from .errors import MaxStepsError, SolveError
from .events import _grid, _locate, _map, _reroute, _zip_map

__all__ = ["non_terminal", "no_event"]


def _whole_solve_limit(message: str, max_steps: int, left: int, stats: dict) -> str:
    """A segment's max_steps message, restated for the whole solve's limit (its accepted and
    rejected counts made whole-solve counts too)."""
    acc, rej = stats["n_accepted"], stats["n_rejected"]

    def whole(m):
        return f"(accepted {int(m[1]) + acc}, rejected {int(m[2]) + rej}"

    message = re.sub(r"\(accepted (\d+), rejected (\d+)", whole, message, count=1)
    note = f" [max_steps counts the whole solve: {acc + rej} step attempts in earlier segments]"
    return message.replace(f"max_steps={left} ", f"max_steps={max_steps} ", 1) + note


def _whole_solve_attempts(message: str, used: int) -> str:
    """A segment's failure message (step size underflow, non-finite values) with the step
    attempts of the whole solve (``used`` in earlier segments) instead of the segment's."""

    def whole(m):
        return f"after {int(m[1]) + used} step attempts"

    return re.sub(r"after (\d+) step attempts", whole, message, count=1)


def non_terminal(solve_fn, func, y0, t, tl, event, kwargs, time_dtype):
    from .solution import Solution

    t_end = tl[-1]
    direction = 1.0 if t_end >= tl[0] else -1.0
    max_steps, throw = kwargs.get("max_steps"), kwargs.get("throw", True)
    # The start of each segment: t[0], then each (differentiable) event time, so that gradients
    # w.r.t. the event times (and through them t0, y0 and the parameters) reach later segments.
    t_s, y_s = t[0], y0
    spec = flatten_state(y0, batched=False)[0]
    out_pieces, ev_t, ev_y = [], [], []
    stats = {"nfe": 0, "n_accepted": 0, "n_rejected": 0, "nfe_event_location": 0, "n_event_fn": 0}
    status, message, t_final = "success", "", t_end
    segments: list = []
    dense: list = []  # (start, end, dense output) of each segment's solve
    j = 0  # next output index
    hold = None  # the state held by the outputs after a stop at max_events
    while True:
        t_star = float("nan")
        ts_f = float(t_s.detach())
        used = stats["n_accepted"] + stats["n_rejected"]  # step attempts of the segments so far
        left = None if max_steps is None else max_steps - used
        if left is not None and left < 1:  # the limit is spent, the final time not reached
            cls, message = step_failure(
                "max_steps", t=ts_f, attempts=used, h=float("nan"), max_steps=max_steps,
                t_end=t_end, n_acc=stats["n_accepted"], n_rej=stats["n_rejected"],
            )  # fmt: skip
            if throw:
                raise cls(message, t=ts_f, step=used, h=float("nan"))
            status, t_final = cls.status, ts_f
            break
        kw = kwargs if left is None else dict(kwargs, max_steps=left)
        try:
            if len(ev_t) < event.max_events:
                ts, st1, n_g = _locate(
                    solve_fn, func, y_s, ts_f, t_end, event, kw, False, time_dtype,
                    restart=bool(ev_t),
                )  # fmt: skip
                t_star = float(ts[0])
                stats["nfe_event_location"] += st1.get("nfe", 0)
                stats["n_event_fn"] += n_g
            seg_end = t_end if t_star != t_star else t_star
            j0 = j
            while j < len(tl) and direction * (tl[j] - seg_end) < 0:
                j += 1
            if t_star != t_star:  # no more events: finish, outputs up to and including t_end
                j = len(tl)
            lead = 1 if (j == j0 or tl[j0] != ts_f) else 0
            parts = ([t_s] if lead else []) + ([t[j0:j]] if j > j0 else [])
            if t_star == t_star:
                parts.append(t_star)
            seg_stats = SegmentStats(stats, segments)  # (gathers the backward's counters)
            grid = _grid(parts, t.device)
            sol = solve_fn(func, y_s, grid, **kw, _stats=seg_stats)
        except MaxStepsError as e:
            if left is None:
                raise
            msg = _whole_solve_limit(str(e), max_steps, left, stats)
            raise MaxStepsError(msg, t=e.t, step=e.step + used, h=e.h) from None
        except SolveError as e:  # the attempts of the whole solve, as per-sample control says
            if not used:
                raise
            msg = _whole_solve_attempts(str(e), used)
            raise type(e)(msg, t=e.t, step=e.step + used, h=e.h) from None
        if sol._dense is not None:
            dense.append((float(grid[0].detach()), sol.t_final, sol._dense))
        seg_before = dict(stats)
        for key in ("nfe", "n_accepted", "n_rejected"):
            stats[key] += sol.stats[key]
        n_in = j - j0
        out_pieces.append(_map(sol.ys, lambda v, lead=lead, n_in=n_in: v[lead : lead + n_in]))
        if sol.status != "success":  # throw=False: the outputs from here on stay NaN
            status, message, t_final = sol.status, sol.message, sol.t_final
            if left is not None and status == MaxStepsError.status:
                message = _whole_solve_limit(message, max_steps, left, seg_before)
            else:
                message = _whole_solve_attempts(message, used)
            break
        if t_star != t_star:
            break
        y_star = _map(sol.ys, lambda v: v[-1])
        te, ye = _reroute(func, event, [t_star], y_star, False, time_dtype)
        ev_t.append(te)
        ev_y.append(ye)
        if len(ev_t) == event.max_events:  # the limit: stop here, as a terminal event would
            status, t_final = "max_events", t_star
            message = max_events_message(event.max_events, f"{t_star:.17g}")
            hold = ye  # (the state at the event, before any reset)
            break
        y_s = ye
        if event.reset is not None:  # checked like y0: same structure, shapes and dtype
            y_s = event.reset(te, ye)
            spec.flatten(y_s, what="the state returned by Event(reset=...)")
        t_s = te
    if j < len(tl) and hold is not None:  # stopped at max_events: the event state
        n = len(tl) - j
        out_pieces.append(_map(hold, lambda v: v.unsqueeze(0).expand(n, *v.shape)))
    elif j < len(tl):  # a failed solve (throw=False): outputs never reached are NaN
        n = len(tl) - j
        out_pieces.append(
            _map(
                y_s,
                lambda v: torch.full((n, *v.shape), float("nan"), dtype=v.dtype, device=v.device),
            )
        )
    stats["n_steps"] = stats["n_accepted"]
    ys = _zip_map(lambda *parts: torch.cat(parts), *out_pieces)
    event_t = torch.stack(ev_t) if ev_t else torch.zeros(0, dtype=time_dtype)
    event_y = _zip_map(lambda *parts: torch.stack(parts), *ev_y) if ev_y else None
    joined = None  # the segments' dense outputs, joined at the event times
    if dense and len(dense) == len(segments):
        from .interpolation.segmented import whole_state

        stop = status == "max_events"
        note = (
            f"the solve stops at its Event(max_events={event.max_events})-th event" if stop else ""
        )
        joined = whole_state(dense, tl[0], t_final, direction, event_t[-1] if stop else None, note)
    return Solution(
        t=t, ys=ys, stats=stats, status=status, t_final=t_final, message=message,
        event_t=event_t, event_y=event_y, _dense=joined,
        _detached=bool(segments) and sol._detached,
    )  # fmt: skip


def no_event(sol, t_end: float) -> None:
    """Raise the :class:`~neuralode.SolveError` of an ``odeint_event`` solve (ending at the
    stand-in horizon ``t_end``) whose event function never changed sign."""
    miss = torch.isnan(sol.event_t.reshape(-1)).nonzero().squeeze(1).tolist()
    who = f" for samples {miss[:8]}" if sol.event_t.numel() > 1 else ""
    n = sol.stats.get("n_accepted", 0) + sol.stats.get("n_rejected", 0)
    raise SolveError(
        f"event_fn did not change sign{who} up to t={t_end:.6g}, where the event solve ends "
        "(the second time only gives the direction); check event_fn (its zero must be "
        "crossed, in its direction), or solve to a finite end with neuralode.solve(func, y0, "
        "t, event=neuralode.Event(event_fn)), which returns event_t = NaN where none fires",
        t=t_end, step=int(torch.as_tensor(n).max()), h=float("nan"),
    )  # fmt: skip
