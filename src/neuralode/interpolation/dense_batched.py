"""Dense output of a solve with per-sample step control: each sample's own accepted steps,
and the continuous extension of a set of rows' steps (outputs, events, replays)."""

from __future__ import annotations

import torch

from ..solvers.tableau import exact_at_step_end

__all__ = ["PerSampleDense", "dense_rows", "step_outputs"]


def dense_rows(stepper, f, K, t_old, h, y_old, t_c1, lo, hi) -> torch.Tensor:
    """The stages and dense stages ``(Sd, n, M)`` of ``n`` rows' steps from their stages ``K``
    (S, n, M) (``t_c1``: the time of a stage at c = 1), with f kept inside the rows' intervals
    ``[lo, hi]`` (f's own bounds are restored after)."""
    if stepper.Sd == stepper.S:
        return K
    saved, (f.lo, f.hi) = (f.lo, f.hi), (lo, hi)
    Kd = stepper.dense_stages(f, t_old, h, y_old, K, None, t_c1)
    f.lo, f.hi = saved
    return Kd.view(-1, *y_old.shape)


def step_outputs(stepper, f, K, t_old, h, t_new, y_old, y_new, lo, hi, has, r, tau_j, t_c1=None):
    """Values at the output times ``tau_j`` inside the steps of rows ``r`` (rows ``has`` hold
    outputs): the step's continuous extension, and the end state exactly at a step's end.
    ``t_c1`` (default ``t_new``): the time of a stage at c = 1 (the left limit of a step that
    ends on a ``jump_t``). Returns ``(values (n, M), k_end)`` where ``k_end = (rows, f at their
    step ends)`` when the dense stages evaluated it (the next step's first stage), else None."""
    Kd, kr, k_end = K, r, None
    t_c1 = t_new if t_c1 is None else t_c1
    if stepper.Sd > stepper.S:  # dense stages, only for the rows with outputs
        u = has.nonzero().squeeze(1)
        Kd = dense_rows(stepper, f, K[:, u], t_old[u], h[u], y_old[u], t_c1[u], lo[u], hi[u])
        kr = (torch.cumsum(has, 0) - 1)[r]
        if stepper.tab.dense_stage_is_next_first:
            k_end = (u, Kd[stepper.S])
    g3 = torch.stack([t_old, h, t_new], 1)[r]
    v = stepper.interpolate(Kd[:, kr], y_old[r], g3[:, 1], (tau_j - g3[:, 0]) / g3[:, 1])
    return exact_at_step_end(v, tau_j, g3[:, 2], y_new[r]), k_end


class PerSampleDense:
    """Continuous extension over every sample's accepted steps (``batch_control="per_sample"``).

    The loop keeps, per step of its working set, references to the rows, the accepted mask, the
    step ends, the states and the stages (no copies during the solve). The first evaluation
    gathers the accepted rows into one table sorted by sample and time; a query ``(b, tau)``
    then finds sample ``b``'s step containing ``tau`` by a batched binary search and evaluates
    that step's interpolant (the method's own, or cubic Hermite). Dense stages that the solve did
    not need are evaluated for the queried steps on use.

    Not for direct construction: used through :meth:`neuralode.Solution.evaluate`.
    """

    def __init__(self, records, stepper, f, spec, y0, y_final, tau, t_final):
        self._records, self._stepper, self._f = records, stepper, f
        self.spec = spec
        self._y0, self._y_final = y0, y_final
        t0, t_end = tau[:, 0], tau[:, -1]
        self._t0, self._t_final = t0, t_final
        self._sdir = torch.where(t_end >= t0, 1.0, -1.0).to(torch.float64)
        self._lo, self._hi = torch.minimum(t0, t_end), torch.maximum(t0, t_end)
        self._table = None

    def _build(self):
        if self._table is not None:
            return self._table
        cols = [[] for _ in range(8)]
        for idx, acc, t_old, t_new, h, y_old, y_new, K, *t_c1 in self._records:
            a = acc.nonzero().squeeze(1)
            # (t_c1: the time of a stage at c = 1, the left limit of a step ending on a jump_t)
            for col, x in zip(cols, (idx, t_old, t_new, h, y_old, y_new, (t_c1 or [t_new])[0])):
                col.append(x[a])
            cols[7].append(K[:, a])
        self._records = None
        B = self._t0.shape[0]
        dev = self._y0.device
        if not cols[0]:
            self._table = (None, torch.zeros(B, dtype=torch.long, device=dev), None, None)
            return self._table
        sid, tlo, thi, h, ya, yb, tc1 = (torch.cat(c) for c in cols[:7])
        K = torch.cat(cols[7], dim=1)
        # Rows appear in step order, which is time order per sample: a stable sort by sample
        # lists every sample's steps consecutively and chronologically.
        order = torch.sort(sid, stable=True).indices
        sid, tlo, thi, h, ya, yb, tc1 = (x[order] for x in (sid, tlo, thi, h, ya, yb, tc1))
        K = K[:, order]
        counts = torch.bincount(sid, minlength=B)
        offsets = torch.cumsum(counts, 0) - counts
        rank = torch.arange(sid.shape[0], device=dev) - offsets[sid]
        keys = torch.full((B, int(counts.max())), float("inf"), dtype=torch.float64, device=dev)
        keys[sid, rank] = self._sdir[sid] * thi
        self._table = ((sid, tlo, thi, h, ya, yb, K, tc1), counts, offsets, keys)
        return self._table

    @property
    def step_times(self) -> list[list[float]]:
        """Per sample, its accepted step boundaries ``[t0_b, t_1, ..., t_final_b]``."""
        steps, counts, offsets, _ = self._build()
        out = []
        for b in range(self._t0.shape[0]):
            n, o = int(counts[b]), int(offsets[b]) if offsets is not None else 0
            ends = steps[2][o : o + n].tolist() if n else []
            out.append([float(self._t0[b])] + ends)
        return out

    def evaluate_flat(self, times: list[float], samples: torch.Tensor | None = None):
        """Values at ``times``: ``(m, B, M)`` for every sample, or ``(m, M)`` for ``samples``.

        Raises
        ------
        ValueError
            If a time lies outside the queried sample's solved interval ``[t0_b, t_final_b]``.
        """
        B, m = self._t0.shape[0], len(times)
        tq, s = query_rows(times, samples, self._t0, self._t_final)
        steps, counts, offsets, keys = self._build()
        if steps is None:  # no sample moved
            out = self._y0[s]
        else:
            sid, tlo, thi, h, ya, yb, K, tc1 = steps
            n = counts[s]
            pos = torch.searchsorted(keys[s], (self._sdir[s] * tq).unsqueeze(1)).squeeze(1)
            e = torch.where(n > 0, offsets[s] + torch.minimum(pos, n - 1), 0)
            st, ue, inv = self._stepper, e, None
            if st.Sd > st.S:  # dense stages once per step queried
                ue, inv = torch.unique(e, return_inverse=True)
            b = sid[ue]
            Kd = dense_rows(st, self._f, K[:, ue], tlo[ue], h[ue], ya[ue], tc1[ue], self._lo[b],
                            self._hi[b])  # fmt: skip
            Kd = Kd if inv is None else Kd[:, inv]
            out = st.interpolate(Kd, ya[e], h[e], (tq - tlo[e]) / h[e])
            # The initial state where a sample never moved (a zero-length interval).
            out = exact_at_step_end(out, tq, thi[e], yb[e])
            out = torch.where((n > 0).unsqueeze(1), out, self._y0[s])
        return out.view(m, B, -1) if samples is None else out


def query_rows(times, samples, t0, t_final, note=None, name_sample=True):
    """Each query's time and row, checked against its row's solved interval.

    ``times``: m floats; ``samples``: None (every time for every row: ``m * R`` queries, time
    major) or the (m,) row of each time; ``t0``, ``t_final``: (R,) float64. Returns ``(tq, s)``
    (float64 times and long rows). Raises ValueError naming the first query outside its row's
    ``[t0, t_final]`` (no extrapolation), with ``note(t, row)`` (a str, may be empty) appended, and
    the sample unless ``name_sample`` is False (one row shared by the whole state)."""
    dev = t0.device
    tq = torch.tensor(times, dtype=torch.float64, device=dev)
    R = t0.shape[0]
    if samples is None:
        s = torch.arange(R, device=dev).repeat(len(times))
        tq = tq.repeat_interleave(R)
    else:
        s = samples.to(dev)
    lo, hi = torch.minimum(t0[s], t_final[s]), torch.maximum(t0[s], t_final[s])
    bad = ((tq < lo) | (tq > hi)).nonzero().squeeze(1)
    if bad.numel():
        k = int(bad[0])
        who = f" of sample {int(s[k])}" if name_sample else ""
        extra = note(float(tq[k]), int(s[k])) if note is not None else ""
        raise ValueError(
            f"cannot evaluate the dense output{who} at t={float(tq[k])!r}: outside "
            f"{'its' if name_sample else 'the'} solved interval [{float(lo[k])!r}, "
            f"{float(hi[k])!r}] (no extrapolation{'; ' + extra if extra else ''})"
        )
    return tq, s
