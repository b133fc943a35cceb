"""Dense output of a solve made of segments (events): the segments' own dense outputs, joined.

An event solve runs in segments -- up to a terminal event, or from event to event with a reset
of the state between them (:mod:`neuralode.events`, :mod:`neuralode._events_rows`). Each
segment's solve keeps its own dense output (:class:`~neuralode.interpolation.DenseOutput`, or
the per-sample one); :class:`SegmentedDense` routes every query to the segment that holds it by
a binary search over the segment starts, so no interpolation formula is written here.

Convention at an event time (a segment start): the value there is the *next* segment's, i.e.
the state after the reset (right-continuous in the direction of integration), as ``Solution.ys``
reports an output time equal to an event time.
"""

from __future__ import annotations

import torch

from .dense_batched import query_rows

__all__ = ["SegmentedDense", "reach", "terminal", "whole_state"]


class SegmentedDense:
    """Dense output over the segments of an event solve, per row of the flat state.

    Parameters
    ----------
    parts : list of (start, end, dense)
        Per segment, in order: its start and end times, ``(R,)`` float64 tensors (a start is NaN
        for a row that has no such segment: a sample with fewer events), and its dense output
        (anything with ``evaluate_flat(times, samples) -> (m, M)`` and ``spec``). Segment 0
        starts at ``t0`` for every row.
    t0, t_final : Tensor
        ``(R,)`` float64: each row's solved interval ``[t0, t_final]`` (the reach of the solve).
    direction : Tensor
        ``(R,)`` float64, +1 or -1: the direction of integration of each row.
    per_sample : bool
        Whether the segments' dense outputs have step times per sample (per-sample control) or
        shared ones (``step_times``: one list per sample, or one list).
    note : str, optional
        Added to the message of a query past the end of the solved interval (why it ends),
        for the rows in ``stopped``.
    stopped : Tensor, optional
        ``(R,)`` bool: the rows whose solve ended early, for the reason in ``note`` (default:
        every row).

    Not for direct construction: used through :meth:`neuralode.Solution.evaluate`.
    """

    def __init__(self, parts, t0, t_final, direction, per_sample: bool, note="", stopped=None):
        self._dense = [p[2] for p in parts]
        self.spec = self._dense[0].spec
        dev = self.spec.device
        self._starts = torch.stack([p[0] for p in parts]).to(dev, torch.float64)  # (K, R)
        self._ends = torch.stack([p[1] for p in parts]).to(dev, torch.float64)
        self._t0, self._t_final, self._sdir = (
            x.to(dev, torch.float64) for x in (t0, t_final, direction)
        )
        self._per_sample, self._note, self._stopped = per_sample, note, stopped
        # Sort keys (direction * start); +inf where a row has no such segment.
        key = direction.unsqueeze(0) * self._starts
        self._keys = torch.where(torch.isnan(key), float("inf"), key)

    @property
    def step_times(self):
        """Accepted step boundaries of all segments in order (an event time once): a list, or
        with per-sample rows one list per sample."""
        if not self._per_sample:
            out = []
            for k, d in enumerate(self._dense):
                st = list(d.step_times)
                out.extend(st if k == 0 else st[1:])
            return out
        rows = [[] for _ in range(self._t0.shape[0])]
        for k, d in enumerate(self._dense):
            per = d.step_times
            for b, row in enumerate(rows):
                if not bool(torch.isnan(self._starts[k, b])):
                    row.extend(per[b] if k == 0 else per[b][1:])
        return rows

    def evaluate_flat(self, times: list[float], samples: torch.Tensor | None = None):
        """Values at ``times``: ``(m, R, M)`` for every row, or ``(m, M)`` for ``samples``.

        Raises
        ------
        ValueError
            If a time lies outside the queried row's solved interval ``[t0, t_final]``.
        """
        dev = self.spec.device
        R, m = self._t0.shape[0], len(times)

        def note(t: float, b: int) -> str:  # why the interval ends: a query past an early stop
            past = float(self._sdir[b] * (t - self._t_final[b])) > 0
            why = self._stopped is None or bool(self._stopped[b])
            return self._note if past and why else ""

        tq, s = query_rows(times, samples, self._t0, self._t_final, note, name_sample=R > 1)
        # The segment of each query: the last one that starts at or before it (an event time
        # belongs to the segment it starts: the state after the reset).
        seg = (self._keys[:, s] <= (self._sdir[s] * tq).unsqueeze(0)).sum(0) - 1
        seg = seg.clamp(min=0)
        pieces, order = [], []
        for k in torch.unique(seg).tolist():
            sel = (seg == k).nonzero().squeeze(1)
            sk = s[sel]
            a, b = self._starts[k, sk], self._ends[k, sk]
            # The next segment starts at the event time re-attached to the graph, which differs
            # from where this one ended (the located time) by about the solve's tolerance:
            # clamp into the segment's own interval rather than extrapolate across the gap.
            tk = torch.minimum(torch.maximum(tq[sel], torch.minimum(a, b)), torch.maximum(a, b))
            pieces.append(self._dense[k].evaluate_flat(tk.tolist(), sk))
            order.append(sel)
        out = torch.cat(pieces)
        inv = torch.empty_like(seg)
        inv[torch.cat(order)] = torch.arange(seg.shape[0], device=dev)
        out = out[inv.to(out.device)]
        return out.view(m, R, -1) if samples is None else out


def reach(t_final: torch.Tensor, event_t: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """The end of each row's valid query interval: ``t_final``, or the event time where that
    lies further (``Solution.event_t`` is the located time re-attached to the graph, which moves
    it by about the solve's tolerance; ``evaluate(sol.event_t)`` then gives the state there)."""
    e = event_t.detach().to(t_final.device, torch.float64).reshape(t_final.shape)
    further = ~torch.isnan(e) & (direction * (e - t_final) > 0)
    return torch.where(further, e, t_final)


def whole_state(parts, t0: float, t_final: float, direction: float, event_t=None, note=""):
    """A :class:`SegmentedDense` over the shared driver's whole-state segments (one row):
    ``parts`` of ``(start, end, dense)`` with float times; ``event_t`` (optional, the last
    event's time) may extend the reach (see :func:`reach`); ``note``: see the class."""

    def one(x):
        return torch.tensor([float(x)], dtype=torch.float64)

    sdir, tf = one(direction), one(t_final)
    if event_t is not None:
        tf = reach(tf, torch.as_tensor(event_t), sdir)
    rows = [(one(a), one(b), d) for a, b, d in parts]
    return SegmentedDense(rows, one(t0), tf, sdir, False, note)


def terminal(dense, t0: float, t_final: float, direction: float, stops, fired, t_event, note):
    """The dense output of the shared driver's terminal event solve (``dense`` that of its
    solve up to the event): each sample's ends at its own event (``stops``, floats; ``fired``
    (B,) bool; ``t_event`` 0-d for a whole-state event, else ``(B,)``), as under per-sample
    control."""
    B = len(stops)

    def full(x):
        return torch.full((B,), float(x), dtype=torch.float64)

    stop, sdir = torch.tensor(stops, dtype=torch.float64), full(direction)
    if t_event.dim() == 0:  # a whole-state event: the solve's reach
        stop = full(t_final)
    stop = torch.where(sdir * (stop - t_final) > 0, t_final, stop)  # (a failed solve: its reach)
    tf = reach(stop, torch.where(fired.to(t_event.device), t_event, torch.nan), sdir)
    return SegmentedDense([(full(t0), stop, dense)], full(t0), tf, sdir, False, note, fired.cpu())
