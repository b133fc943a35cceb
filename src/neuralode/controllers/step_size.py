"""Step-size controllers (settings only; per-solve state lives in the loop).

The library's controllers on the protocol of :mod:`neuralode.controllers.base`: fixed steps
(:class:`ConstantStep`, :class:`StepToGrid`) and PI control (:class:`PIController`) with their
formulas (:func:`grid_point`, :func:`pi_update`), written once on floats or ``(B,)`` tensors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

# The protocol and its float-or-tensor arithmetic (also imported from here by the engine).
from .base import (  # noqa: F401  (re-exported)
    _EPS64,
    MERGE_ULPS,
    Controller,
    isfinite,
    land_rows,
    landing_eps,
    landing_tolerance,
    maximum,
    minimum,
    per_row,
    time_beside,
    underflows,
    where,
)

__all__ = ["Controller", "ConstantStep", "StepToGrid", "PIController", "time_beside"]


def grid_point(t, t0, t_end, direction, dt: float):
    """The next point ``t0 + k dt`` after ``t``, computed by multiplication (no drift from
    repeated addition, so no sliver step at the end). A grid point within
    :func:`landing_tolerance` past ``t`` (``t`` a landing just before it) is passed over for the
    next one, and one within it of ``t_end`` is ``t_end``: the grid continues as ``t0 + k dt``
    after a landing without a sliver step. Floats or tensors (compiled stepping calls it inside
    the compiled graph; ``t0``, ``t_end``, ``direction`` per row)."""
    fl = torch.floor if isinstance(t, torch.Tensor) else math.floor
    scale = maximum(abs(t0), abs(t_end))
    k = fl(direction * (t - t0) / dt) + 1
    t_new = t0 + direction * k * dt
    past = landing_tolerance(scale, dt, landing_eps(t))
    t_new = where(direction * (t_new - t) <= past, t0 + direction * (k + 1) * dt, t_new)
    near = abs(t_end - t_new) <= landing_tolerance(scale, dt, landing_eps(t_end))
    return where(near, t_end, t_new)


def pi_update(safety, ifactor, dfactor, pcoeff, icoeff, h, h_prop, e, prev, k, accept, clipped):
    """The I/PI step-size update (Gustafsson 1991; Soderlind 2003) of :meth:`PIController.adapt`,
    on floats or tensors (compiled stepping calls it inside the compiled graph)."""
    ep = maximum(e, 1e-100)  # e = 0 would divide by zero: ifactor (set below) either way
    host = type(accept) is bool  # (a host decision: only its branch is formed, once per step)
    h_acc = h_rej = None
    if not host or accept:
        up = safety * ep ** (-(icoeff + pcoeff) / k)
        if pcoeff:
            up = up * prev ** (pcoeff / k)
        up = where(e == 0, ifactor, minimum(ifactor, maximum(dfactor, up)))
        h_acc = h * up
        h_acc = where(clipped, maximum(h_prop, h_acc), h_acc)
    if not host or not accept:
        down = minimum(1.0, maximum(dfactor, safety * ep ** (-1.0 / k)))
        h_rej = h * where(isfinite(e), down, dfactor)
    return where(accept, h_acc, h_rej), where(accept, maximum(e, 1e-4), prev)


def _times(value, name: str) -> tuple[float, ...]:
    """Validate a collection of times (step_t, jump_t, grid) into a sorted tuple of floats."""
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        if value.dim() > 1:
            raise ValueError(f"{name} must be 1-D, got a tensor of shape {tuple(value.shape)}")
        value = value.detach().reshape(-1).tolist()
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of times, got {value!r}") from None
    if any(not math.isfinite(v) for v in out):
        raise ValueError(f"{name} contains a non-finite time: {out}")
    return tuple(sorted(set(out)))


def _all_zero(v) -> bool:
    vals = (
        list(v.values()) if isinstance(v, Mapping) else v if isinstance(v, (tuple, list)) else [v]
    )
    return all((bool((x == 0).all()) if isinstance(x, torch.Tensor) else x == 0) for x in vals)


@dataclass(frozen=True)
class ConstantStep(Controller):
    """Fixed steps of size ``dt`` from the start time; the last step is clipped to end exactly
    at the final time. Also lands on ``step_t`` and ``jump_t`` times (see :class:`PIController`).

    Parameters
    ----------
    dt : float
        Step size in the units of ``t`` (> 0; its sign follows the direction of integration).
    step_t, jump_t : sequence of float, optional
        Times to land on; at ``jump_t`` f is evaluated afresh on the far side (a discontinuity).

    Raises
    ------
    ValueError
        If ``dt`` is not a positive finite number.
    """

    dt: float
    step_t: tuple[float, ...] = ()
    jump_t: tuple[float, ...] = ()
    adaptive = False

    def __post_init__(self):
        dt = self.dt.item() if isinstance(self.dt, torch.Tensor) else self.dt
        if not isinstance(dt, (int, float)) or not math.isfinite(dt) or dt <= 0:
            raise ValueError(
                f"ConstantStep(dt=...) needs a positive finite step size, got {self.dt!r}"
            )
        object.__setattr__(self, "dt", float(abs(dt)))
        object.__setattr__(self, "step_t", _times(self.step_t, "step_t"))
        object.__setattr__(self, "jump_t", _times(self.jump_t, "jump_t"))

    def initial_step(self, norm, f, t0, y0, k1, direction, span, order: int):
        return self.dt

    def propose(self, t, h, t0, t_end, direction):
        """The next point ``t0 + k dt`` after ``t`` (the module function ``grid_point``)."""
        return grid_point(t, t0, t_end, direction, self.dt)

    def step_rule(self) -> ConstantStep:
        return dataclasses.replace(self, step_t=(), jump_t=())

    def step_count(self, t0: float, t_end: float) -> int:
        """The steps from ``t0`` to ``t_end``, exactly as the drivers take them: the grid
        ``t0 + k dt`` cut at each (merged) landing time, where a grid point a rounding away from
        a landing is that landing (:meth:`propose` and :meth:`~Controller.land` decide at the
        ends of each stretch between landings: a few calls per landing, not per step)."""
        if t_end == t0:
            return 0
        d, dt = (1.0 if t_end > t0 else -1.0), self.dt
        lands = self.landing_times(t0, t_end)
        n, t = 0, t0
        for b in (lands if d > 0 else lands[::-1]) + (t_end,):
            first = self.propose(t, dt, t0, t_end, d)  # the first grid point past t
            if self.land(t, first, t_end, d, lands)[1]:  # (one step: t to b)
                n, t = n + 1, b
                continue
            k1 = round(d * (first - t0) / dt)
            k = max(k1, math.floor(d * (b - t0) / dt) + 2)  # (a grid point past b)
            while k > k1:  # the last grid point k whose step (from k - 1) ends before b
                prev = first if k == k1 + 1 else t0 + d * (k - 1) * dt
                t_try = self.propose(prev, dt, t0, t_end, d)
                t_new, clipped, _ = self.land(prev, t_try, t_end, d, lands)
                if not clipped and d * (t_new - b) < 0:
                    break
                k -= 1
            n, t = n + (k - k1 + 1) + 1, b  # grid points k1..k, then the step onto b
        return n


@dataclass(frozen=True)
class StepToGrid(Controller):
    """Fixed steps between consecutive points of ``grid`` (which must cover the solve interval;
    points outside it are ignored).

    Parameters
    ----------
    grid : 1-D tensor or sequence of float
        Step boundaries, strictly monotone.
    jump_t : sequence of float, optional
        Discontinuities of f among the grid points (f is evaluated afresh after them).

    Raises
    ------
    ValueError
        If the grid has fewer than two points or is not strictly monotone.
    """

    grid: tuple[float, ...]
    jump_t: tuple[float, ...] = ()
    adaptive = False

    def __post_init__(self):
        g = self.grid
        if isinstance(g, torch.Tensor):
            g = g.detach().reshape(-1).tolist()
        g = [float(v) for v in g]
        if len(g) < 2:
            raise ValueError(f"StepToGrid(grid=...) needs at least two points, got {len(g)}")
        d = [b - a for a, b in zip(g, g[1:])]
        if not (all(x > 0 for x in d) or all(x < 0 for x in d)):
            raise ValueError(
                "StepToGrid(grid=...) must be strictly increasing or strictly decreasing"
            )
        object.__setattr__(self, "grid", tuple(sorted(g)))
        object.__setattr__(self, "jump_t", _times(self.jump_t, "jump_t"))

    @property
    def step_t(self) -> tuple[float, ...]:  # type: ignore[override]
        return self.grid

    def initial_step(self, norm, f, t0, y0, k1, direction, span, order: int):
        return math.inf  # every step ends on the next grid point (a landing)

    def step_rule(self) -> Controller:
        return _TO_LANDINGS  # (the grid reaches the step as landing times)

    def with_landings(self, times) -> StepToGrid:
        return dataclasses.replace(self, grid=tuple(sorted({*self.grid, *times})))

    def check_span(self, lo: float, hi: float) -> None:
        if not (self.grid[0] <= lo and self.grid[-1] >= hi):
            raise ValueError(
                f"StepToGrid(grid=...) spans [{self.grid[0]!r}, {self.grid[-1]!r}] but the solve "
                f"runs over [{lo!r}, {hi!r}]; the grid must cover the whole interval (add its end "
                "points)"
            )


@dataclass(frozen=True)
class _ToLandings(Controller):
    """:class:`StepToGrid`'s step formulas without its grid (see :meth:`Controller.step_rule`):
    every step ends on the next landing time (``h`` is infinite)."""


_TO_LANDINGS = _ToLandings()


@dataclass(frozen=True)
class PIController(Controller):
    """Adaptive step-size control from the embedded error estimate.

    The scaled error of a step is ``e = norm(err / (atol + rtol * max(|y_n|, |y_{n+1}|)))``
    (RMS norm by default; tuple/dict states take the maximum over components). A step is accepted
    when ``e <= 1``. The next step size is ``h * clip(safety * e_n^(-b1/k) * e_{n-1}^(b2/k),
    dfactor, ifactor)`` with ``k = min(order, embedded order) + 1``, ``b1 = icoeff + pcoeff`` and
    ``b2 = pcoeff`` (Gustafsson 1991; Söderlind 2003). ``pcoeff=0, icoeff=1`` (default) is the
    classical I controller; ``pcoeff=0.2, icoeff=0.65`` reproduces Hairer's PI controller of
    DOPRI5 (beta = 0.04).

    Parameters
    ----------
    rtol, atol : float or tensor, default 1e-6, 1e-8
        Relative and absolute tolerances; a tensor broadcastable to the state gives per-component
        tolerances (a tuple of them for tuple states).
    safety : float, default 0.9
    ifactor, dfactor : float, default 10.0, 0.2
        Largest increase and decrease of the step size per step.
    pcoeff, icoeff : float, default 0.0, 1.0
    dt0 : float, optional
        First step size; by default chosen by Hairer's algorithm (HNW I, sec. II.4), which costs
        one extra evaluation of f.
    dt_min, dt_max : float, default 0, inf
        Bounds on ``|h|`` (``dt_max > 0``). The initial step (``dt0`` or Hairer's guess) is
        clamped into them. A step that would need ``|h| < dt_min`` raises
        StepSizeUnderflowError (unless ``force_dt_min``).
    force_dt_min : bool, default False
        Take steps of at least ``dt_min`` and accept a step of ``dt_min`` or less even when it
        fails the error test (torchdiffeq's ``min_step``, diffrax's ``force_dtmin``): the error
        is no longer controlled there. A non-finite error still fails the solve.
        ``dt0 = dt_min = dt_max = h`` gives fixed steps ``h`` with an adaptive method.
    step_t : sequence of float, optional
        Times the solver lands on exactly (e.g. where f changes behaviour), without restarting.
    jump_t : sequence of float, optional
        Discontinuities of f: the solver lands on them and evaluates f afresh on the far side.
    norm : callable, optional
        ``norm(scaled_error) -> 0-d tensor`` taking the scaled error in the state's structure;
        replaces the default mixed RMS norm.

    Raises
    ------
    ValueError
        For non-positive tolerances or factors outside their ranges, ``dt_max <= 0``, or
        ``icoeff <= 0`` (no integral gain: the step would not follow the error).
    """

    rtol: float | torch.Tensor | Sequence = 1e-6
    atol: float | torch.Tensor | Sequence = 1e-8
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    pcoeff: float = 0.0
    icoeff: float = 1.0
    dt0: float | None = None
    dt_min: float = 0.0
    dt_max: float = math.inf
    step_t: tuple[float, ...] = ()
    jump_t: tuple[float, ...] = ()
    norm: Callable | None = field(default=None, compare=False)
    force_dt_min: bool = False
    adaptive = True

    def __post_init__(self):
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            vals = (
                list(v.values())
                if isinstance(v, Mapping)
                else v
                if isinstance(v, (tuple, list))
                else [v]
            )
            for x in vals:
                if isinstance(x, torch.Tensor):
                    bad = bool((x < 0).any()) or not bool(torch.isfinite(x).all())
                else:
                    bad = not (isinstance(x, (int, float)) and 0 <= x < math.inf)
                if bad:
                    raise ValueError(f"{name} must be finite and non-negative, got {v!r}")
        if _all_zero(self.rtol) and _all_zero(self.atol):
            raise ValueError(
                "rtol and atol are both zero: no error could ever be accepted; give a positive "
                "rtol or atol (e.g. rtol=1e-6, atol=1e-8)"
            )
        if not (0 < self.safety <= 1):
            raise ValueError(f"safety must lie in (0, 1], got {self.safety!r}")
        if not self.ifactor >= 1:
            raise ValueError(f"ifactor must be >= 1, got {self.ifactor!r}")
        if not (0 < self.dfactor <= 1):
            raise ValueError(f"dfactor must lie in (0, 1], got {self.dfactor!r}")
        if self.dt0 is not None and not (self.dt0 > 0 and math.isfinite(self.dt0)):
            raise ValueError(f"dt0 must be a positive finite step size, got {self.dt0!r}")
        if not (0 <= self.dt_min <= self.dt_max):
            raise ValueError(
                f"need 0 <= dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}"
            )
        if not (self.dt_max > 0 and math.isfinite(self.dt_min)):
            raise ValueError(
                f"dt_max must be > 0 and dt_min finite, got dt_min={self.dt_min}, "
                f"dt_max={self.dt_max}; dt_max=inf (the default) leaves steps unbounded"
            )
        # The exponent of the error in the update is (icoeff + pcoeff) / k: an I part is what
        # drives the error to the tolerance (icoeff = 0 leaves the step to shrink by `safety`
        # every step, or to follow the error ratio only).
        if not (self.icoeff > 0 and math.isfinite(self.icoeff) and math.isfinite(self.pcoeff)):
            raise ValueError(
                f"icoeff must be > 0 (the integral gain that drives the error to the tolerance) "
                f"and pcoeff finite, got icoeff={self.icoeff!r}, pcoeff={self.pcoeff!r}; use "
                "icoeff=1, pcoeff=0 (I control, the default) or icoeff=0.65, pcoeff=0.2 (PI)"
            )
        if not self.icoeff + self.pcoeff > 0:
            raise ValueError(
                f"icoeff + pcoeff must be > 0 (the exponent of the error in the step-size "
                f"update), got icoeff={self.icoeff!r}, pcoeff={self.pcoeff!r}"
            )
        if not isinstance(self.force_dt_min, bool):
            raise TypeError(f"force_dt_min must be a bool, got {self.force_dt_min!r}")
        object.__setattr__(self, "step_t", _times(self.step_t, "step_t"))
        object.__setattr__(self, "jump_t", _times(self.jump_t, "jump_t"))

    def initial_step(self, norm, f, t0, y0, k1, direction, span, order: int):
        """Hairer's starting step size (Hairer, Norsett & Wanner I, sec. II.4, algorithm p. 169).

        ``norm(*xs)`` gives the scaled norms of ``xs`` with the scale of ``y0`` (floats, or (B,)
        tensors per row); ``t0``, ``direction`` and ``span`` (the length of the interval) are
        floats or (B,) float64 tensors. Costs one evaluation ``f(t, y)``; never steps past the
        interval. With ``dt0`` set, that is the answer (no evaluation).
        """
        if self.dt0 is not None:
            return self._within_bounds(self.dt0 + 0.0 * span)
        with torch.no_grad():
            d0, d1 = norm(y0, k1)
            # 0.01 d0/d1, or 1e-6 when either norm is tiny (the floor only guards the division).
            h0 = where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / maximum(d1, 1e-5))
            h0 = minimum(minimum(h0, span), self.dt_max)
            f1 = f(t0 + direction * h0, y0 + per_row(direction * h0, k1))
            d2 = norm(f1 - k1) / h0
            dmax = maximum(d1, d2)
            h1 = where(
                dmax <= 1e-15,
                maximum(1e-6, h0 * 1e-3),
                (0.01 / maximum(dmax, 1e-15)) ** (1 / order),
            )
            h1 = where(isfinite(dmax), h1, h0 * 1e-3)
            return self._within_bounds(minimum(minimum(100 * h0, h1), span))

    def _within_bounds(self, h):
        """The initial step (a guess) clamped into ``[dt_min, dt_max]``: a guess below
        ``dt_min`` would fail the solve before its first attempt."""
        return maximum(minimum(h, self.dt_max), self.dt_min)

    def step_rule(self) -> PIController:
        # (The tolerances reach the step as tensors; placeholders here.)
        return dataclasses.replace(self, rtol=1.0, atol=1.0, dt0=None, step_t=(), jump_t=(),
                                   norm=None)  # fmt: skip

    def adapt(self, h, h_prop, e, prev, k: int, accept, clipped):
        """Next ``|step size|`` and error memory after a step of size ``|h|`` with scaled error
        ``e`` (accepted where ``accept``; ``clipped`` where it was shortened to land on a time,
        then at least the proposal ``h_prop`` is kept). ``prev`` is the previous accepted error
        (PI control). Floats or (B,) tensors alike; returns ``(h_next, prev_next)``.

        After an accepted step ``h * clip(safety e^(-b1/k) prev^(b2/k), dfactor, ifactor)`` (an
        error of 0 gives ``ifactor``); after a rejected one ``h * clip(safety e^(-1/k),
        dfactor, 1)`` (``dfactor`` for a non-finite error), never an increase.
        """
        return pi_update(
            self.safety, self.ifactor, self.dfactor, self.pcoeff, self.icoeff,
            h, h_prop, e, prev, k, accept, clipped,
        )  # fmt: skip

    def bounded(self, h_abs, nonfinite: bool = False):
        """The step size to try: ``|h|`` within ``[dt_min, dt_max]`` when ``force_dt_min``
        (unless the last error was non-finite: then the loop reports the failure), else
        ``|h|`` capped at ``dt_max`` (below ``dt_min`` the loop raises). A float or (B,)
        tensor."""
        h_abs = minimum(h_abs, self.dt_max)
        if self.force_dt_min and not nonfinite:
            h_abs = maximum(h_abs, self.dt_min)
        return h_abs

    def adjoint_rule(self) -> PIController:
        # (The backward problem lays its own tolerances over the augmented state: placeholders.)
        return dataclasses.replace(self, dt0=None, norm=None, rtol=1.0, atol=1.0, dt_min=0.0)

    def accepts(self, err: float, h_abs: float) -> bool:
        """Whether a step of size ``h_abs`` with scaled error ``err`` is accepted (with
        ``force_dt_min`` also a finite error at ``|h| <= dt_min``)."""
        if err <= 1.0:
            return True
        return self.force_dt_min and h_abs <= self.dt_min and math.isfinite(err)

    def factor(self, err: float, prev_err: float, k: int) -> float:
        """Step-size multiplier after an accepted step with scaled error ``err``."""
        return self.adapt(1.0, 0.0, err, prev_err, k, True, False)[0]

    def reject_factor(self, err: float, k: int) -> float:
        """Step-size multiplier after a rejected step (never an increase)."""
        return self.adapt(1.0, 0.0, err, 1.0, k, False, False)[0]
