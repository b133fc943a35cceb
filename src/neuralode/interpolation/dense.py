"""Dense output: the continuous extension over all accepted steps of a solve."""

from __future__ import annotations

import bisect

import torch

from ..solvers.tableau import exact_at_step_end

__all__ = ["DenseOutput"]


class DenseOutput:
    """Piecewise continuous extension built from the accepted steps of a solve.

    Each step contributes its method's own interpolant (dopri5: Shampine's 4th order; tsit5:
    Tsitouras' 4th order; dopri8: the 7th-order DOP853 extension; others: cubic Hermite).
    Dense stages that a step did not need during the solve are evaluated on first use.

    Not for direct construction: obtained as ``Solution.dense``/through ``Solution.evaluate``.
    """

    def __init__(
        self, steps, stepper, f, spec, direction: float, t0: float, t_reached: float, y_final
    ):
        self._steps = steps
        self._stepper = stepper
        self._f = f
        self.spec = spec
        self.direction = direction
        self.t0 = t0
        self.t_reached = t_reached
        self._y_final = y_final
        # Step ends in increasing order of "direction * t" for bisection.
        self._keys = [direction * s.t_new for s in steps]

    @property
    def n_steps(self) -> int:
        return len(self._steps)

    @property
    def step_times(self) -> list[float]:
        """Accepted step boundaries ``[t0, t_1, ..., t_reached]``."""
        return [self.t0] + [s.t_new for s in self._steps]

    def _dense_stages(self, i: int):
        rec, st = self._steps[i], self._stepper
        if rec.K.shape[0] < st.Sd:
            k_next = rec.k_next
            rec.K = st.dense_stages(
                self._f, rec.t, rec.t_new - rec.t, rec.y, rec.K, k_next, rec.t_last
            )  # (the left limit at a jump_t)
        return rec.K

    def evaluate_flat(
        self, times: list[float], samples: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Values at ``times`` (floats) as flat rows.

        Shared state: returns ``(m, B, M)``. With ``samples`` (m,) long: ``(m, M)``, row ``j``
        taken from sample ``samples[j]``.

        Raises
        ------
        ValueError
            If a time lies outside the solved interval ``[t0, t_reached]``.
        """
        lo, hi = sorted((self.t0, self.t_reached))
        bad = [x for x in times if not (lo <= x <= hi)]
        if bad:
            raise ValueError(
                f"cannot evaluate the dense output at t={bad[0]!r}: outside the solved interval "
                f"[{lo!r}, {hi!r}] (no extrapolation)"
            )
        st = self._stepper
        dtype = torch.float64  # weights in double precision, cast when combined with stages
        device = self._y_final.device
        groups: dict[int, list[int]] = {}
        for j, x in enumerate(times):
            i = bisect.bisect_left(self._keys, self.direction * x)
            groups.setdefault(min(i, len(self._steps) - 1), []).append(j)
        pieces, order = [], []
        for i, js in sorted(groups.items()):
            if not self._steps:  # zero-length solve
                y = self._y_final
                vals = (
                    y.unsqueeze(0).expand(len(js), *y.shape) if samples is None else y[samples[js]]
                )
            else:
                rec = self._steps[i]
                h = rec.t_new - rec.t
                tau = torch.tensor([times[j] for j in js], dtype=dtype, device=device)
                Kd = self._dense_stages(i)
                sj = None if samples is None else samples[torch.tensor(js, device=samples.device)]
                vals = st.interpolate(Kd, rec.y, h, (tau - rec.t) / h, sj)
                y_end = self._steps[i + 1].y if i + 1 < len(self._steps) else self._y_final
                vals = exact_at_step_end(vals, tau, rec.t_new, y_end if sj is None else y_end[sj])
            pieces.append(vals)
            order.extend(js)
        out = torch.cat(pieces)
        inv = torch.empty(len(order), dtype=torch.long, device=out.device)
        inv[torch.tensor(order, device=out.device)] = torch.arange(len(order), device=out.device)
        return out[inv]
