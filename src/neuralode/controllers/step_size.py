"""Step-size controllers (settings only; per-solve state lives in the loop).

A controller owns its formulas: the first step size (:meth:`PIController.initial_step`), the
next step size after an accepted or rejected step (:meth:`PIController.adapt`) and the rule
for a step that is too small (:meth:`Controller.underflows`). Each is written once in
arithmetic that works on Python floats (the host-float driver: one step size for the whole
batch) and on ``(B,)`` float64 tensors (the masked per-row driver: one step size per sample):
the helpers below dispatch ``where``/``minimum``/``maximum`` on the argument type and propagate
NaN either way, so the drivers cannot drift apart.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Controller", "ConstantStep", "StepToGrid", "PIController", "time_beside"]


def time_beside(x, toward, time_dtype: torch.dtype):
    """The time closest to ``x`` on the side of ``toward`` that f sees as different from ``x``.

    At a discontinuity (``jump_t``) f is evaluated there, just inside the interval being
    stepped. In double precision that is ``math.nextafter``; f receives its time in
    ``time_dtype``, and with float32 the next double rounds back onto ``x``, so the step is taken
    to the next float32 instead (or to float32's rounding of ``x`` when that already lies on the
    ``toward`` side). Floats, or float64 tensors (compiled stepping calls it in its graph).
    """
    if isinstance(x, torch.Tensor):
        if time_dtype != torch.float32:
            return torch.nextafter(x, toward)
        up = toward > x
        x32 = x.to(torch.float32)
        past = torch.where(up, x32.double() > x, x32.double() < x)
        far = torch.where(up, torch.inf, -torch.inf).to(torch.float32)
        return torch.where(past, x32, torch.nextafter(x32, far)).double()
    if time_dtype != torch.float32:
        return math.nextafter(x, toward)
    up = toward > x
    x32 = torch.tensor(x, dtype=torch.float32)
    if (float(x32) > x) if up else (float(x32) < x):
        return float(x32)
    far = torch.tensor(math.inf if up else -math.inf, dtype=torch.float32)
    return float(torch.nextafter(x32, far))


_EPS64 = 2.220446049250313e-16
# Relative distance below which a step end is merged with the landing just beyond it: the
# resolution of t in :func:`underflows`.
_SLIVER = 4 * _EPS64


def underflows(h, t, dt_min: float):
    """Whether a step of size ``|h|`` from ``t`` cannot be taken: below ``dt_min`` (a step of
    exactly ``dt_min`` is allowed) or below the resolution of ``t`` (a few ulps, or ``t + h``
    rounds to ``t``). Floats or tensors; NaN never underflows (it is non-finite)."""
    return (h < dt_min) | (h <= 4 * _EPS64 * abs(t)) | (t + h == t)


def grid_point(t, t0, t_end, direction, dt: float):
    """The next point ``t0 + k dt`` after ``t``, computed by multiplication (no drift from
    repeated addition, so no sliver step at the end); within 8 ulps of ``t_end`` it is
    ``t_end``. Floats or tensors (compiled stepping calls it inside the compiled graph)."""
    fl = torch.floor if isinstance(t, torch.Tensor) else math.floor
    k = fl(direction * (t - t0) / dt) + 1
    t_new = t0 + direction * k * dt
    t_new = where(direction * (t_new - t) <= 0, t0 + direction * (k + 1) * dt, t_new)
    near = abs(t_end - t_new) <= 8 * _EPS64 * maximum(abs(t_end), dt)
    return where(near, t_end, t_new)


def pi_update(safety, ifactor, dfactor, pcoeff, icoeff, h, h_prop, e, prev, k, accept, clipped):
    """The I/PI step-size update (Gustafsson 1991; Soderlind 2003) of :meth:`PIController.adapt`,
    on floats or tensors (compiled stepping calls it inside the compiled graph)."""
    ep = maximum(e, 1e-100)  # e = 0 would divide by zero: ifactor (set below) either way
    up = safety * ep ** (-(icoeff + pcoeff) / k)
    if pcoeff:
        up = up * prev ** (pcoeff / k)
    up = where(e == 0, ifactor, minimum(ifactor, maximum(dfactor, up)))
    h_acc = h * up
    h_acc = where(clipped, maximum(h_prop, h_acc), h_acc)
    down = minimum(1.0, maximum(dfactor, safety * ep ** (-1.0 / k)))
    h_rej = h * where(isfinite(e), down, dfactor)
    return where(accept, h_acc, h_rej), where(accept, maximum(e, 1e-4), prev)


# -------------------------------------------- arithmetic on floats or (B,) tensors alike
def where(cond, a, b):
    """``a`` where ``cond`` else ``b``: ``torch.where`` for tensors, a conditional for bools."""
    if isinstance(cond, torch.Tensor):
        return torch.where(cond, a, b)
    return a if cond else b


def minimum(a, b):
    """Elementwise minimum that propagates NaN (as ``torch.minimum``) for floats too."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not isinstance(b, torch.Tensor):
            return torch.clamp(a, max=b)
        if not isinstance(a, torch.Tensor):
            return torch.clamp(b, max=a)
        return torch.minimum(a, b)
    return a if (a != a or a <= b) else b


def maximum(a, b):
    """Elementwise maximum that propagates NaN (as ``torch.maximum``) for floats too."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not isinstance(b, torch.Tensor):
            return torch.clamp(a, min=b)
        if not isinstance(a, torch.Tensor):
            return torch.clamp(b, min=a)
        return torch.maximum(a, b)
    return a if (a != a or a >= b) else b


def isfinite(x):
    return torch.isfinite(x) if isinstance(x, torch.Tensor) else math.isfinite(x)


def per_row(h, x: torch.Tensor):
    """``h * x`` for a step size ``h`` that is a float or a (B,) tensor (one per row of x)."""
    if isinstance(h, torch.Tensor):
        return h.to(x.dtype).unsqueeze(1) * x
    return h * x


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


class Controller:
    """The step-size controller protocol: subclass it to write a new controller (one class).

    A controller is a frozen dataclass of settings (no per-solve state: every driver threads
    the state through its loop). The drivers -- the host-float driver (shared control: one step
    size for the whole batch, Python floats), the masked per-row driver (per-sample control:
    ``(B,)`` float64 tensors, one entry per sample) and compiled stepping (the per-row formulas
    inside ``torch.compile``) -- call the methods below and never branch on the controller's
    type. Every method that receives step sizes or times must work on both floats and ``(B,)``
    float64 tensors, with no host read and no data-dependent Python branch on tensors (use the
    module helpers ``where``, ``minimum``, ``maximum``, ``isfinite``, which dispatch on the
    argument type and propagate NaN either way). Step sizes ``h`` are magnitudes ``|h| > 0``;
    ``direction`` is ``+1.0``/``-1.0`` (a float, or a ``(B,)`` tensor per sample).

    Attributes
    ----------
    adaptive : bool, default False
        Whether steps are chosen from the method's embedded error estimate (the solver must have
        one). An adaptive controller also has ``rtol`` and ``atol`` (floats or tensors
        broadcastable to the state), which the engine lays out over the state for the scaled
        error norm; a step is accepted when that norm is ``<= 1`` (or :meth:`accepts`).
    step_t, jump_t : tuple of float, default ()
        Times to land on (at ``jump_t`` f is evaluated afresh on the far side). Keep them as
        fields so that :meth:`with_landings` and :meth:`step_rule` can replace them.
    dt_min, dt_max : float, default 0, inf
        Bounds on ``|h|`` used by the default :meth:`underflows` and :meth:`bounded`.
    norm : callable or None, default None
        A custom error norm (None: the engine's scaled RMS norm).

    Methods a subclass overrides (the defaults suit fixed steps):

    - :meth:`initial_step` ``(norm, f, t0, y0, k1, direction, span, order) -> h0``: the first
      ``|h|`` (default ``inf``: the first step ends on the next landing time or the end).
    - :meth:`propose` ``(t, h, t0, t_end, direction) -> t_try``: the end of the next step before
      landings (default ``t + direction h``). A fixed grid computes it from ``t0`` and ``t``.
    - :meth:`adapt` ``(h, h_prop, e, prev, k, accept, clipped) -> (h_next, prev_next)``: the next
      ``|h|`` and error memory after a step (default unchanged; adaptive controllers only).
    - :meth:`bounded` ``(h_abs, nonfinite=False) -> h_abs``: the step size to try (default
      capped at ``dt_max``).
    - :meth:`underflows` ``(h, t) -> bool``: the step cannot be taken (default below ``dt_min``
      or the resolution of ``t``).
    - :meth:`accepts` ``(err, h_abs) -> bool``: accept a step whose scaled error exceeds 1 (host
      floats; default no).
    - :meth:`step_rule` ``() -> Controller``: the per-step formulas as a hashable value (compiled
      stepping keys its cache on it); override to drop per-solve data (tolerances, landing times).
    - :meth:`step_count` ``(t0, t_end) -> int or None``: the number of steps when known before
      the solve (fixed steps; compiled stepping unrolls exactly that many).
    - :meth:`adjoint_rule` ``() -> Controller``: the controller of an adjoint's backward solve.
    - :meth:`check_span` ``(lo, hi)``: raise ValueError if the controller cannot cover
      ``[lo, hi]``.

    Landings (:meth:`land`, :meth:`first_time`, :meth:`landing_times`) are the engine's and apply
    to every controller. Pass an instance as ``solve(..., controller=...)``.

    See the README's "Writing a controller" and ``tests/test_controller_protocol.py`` (a
    geometric fixed-step grid and an adaptive I controller, each through every driver).
    """

    adaptive: bool = False
    step_t: tuple[float, ...] = ()
    jump_t: tuple[float, ...] = ()
    dt_min: float = 0.0
    dt_max: float = math.inf
    norm = None  # a custom error norm (PIController(norm=...)); None: the engine's scaled RMS

    def check_span(self, lo: float, hi: float) -> None:
        """Raise ValueError if this controller cannot step over ``[lo, hi]`` (every sample's
        interval lies inside it)."""

    def underflows(self, h, t):
        """Whether a step of size ``|h|`` from ``t`` cannot be taken (see :func:`underflows`)."""
        return underflows(h, t, self.dt_min)

    def initial_step(self, norm, f, t0, y0, k1, direction, span, order: int):
        """The first step size ``|h|`` (fixed-step controllers: their step; no evaluation).

        ``norm(*xs)`` gives the scaled norms of ``xs`` (floats, or (B,) tensors per row);
        ``f(t, y)`` the vector field on the flat state; ``y0``/``k1`` the state and
        ``f(t0, y0)`` (flat, detached); ``t0``, ``direction``, ``span`` (the interval's length)
        floats or (B,) float64 tensors; ``order`` the adaptation exponent (error order + 1).
        ``norm`` and ``order`` are None, and ``k1`` may be None, for a fixed-step controller.
        """
        return math.inf

    def propose(self, t, h, t0, t_end, direction):
        """The end of the next step before landings: ``t + direction h`` (floats or (B,)
        tensors)."""
        return t + direction * h

    def adapt(self, h, h_prop, e, prev, k: int, accept, clipped):
        """Next step size and error memory (fixed steps: unchanged)."""
        return h_prop, prev

    def bounded(self, h_abs, nonfinite: bool = False):
        """The step size to try: ``|h|`` capped at ``dt_max`` (floats or (B,) tensors; NaN
        stays NaN). Every driver caps its steps here."""
        return minimum(h_abs, self.dt_max)

    def accepts(self, err: float, h_abs: float) -> bool:
        """Whether a step of size ``h_abs`` with scaled error ``err`` is accepted (the host
        drivers ask it when ``err > 1``; default: only ``err <= 1``)."""
        return err <= 1.0

    def step_rule(self) -> Controller:
        """This controller's per-step formulas (:meth:`propose`, :meth:`bounded`,
        :meth:`underflows`, :meth:`adapt` and ``adaptive``) as a hashable controller that
        compares by value, without the per-solve data the step receives as tensors or uses
        elsewhere (tolerances, landing times, first step, custom norm): compiled stepping bakes
        it into its code and keys its cache on it, so that solves that differ only in that data
        share one compilation. Default: the controller itself."""
        return self

    def adjoint_rule(self) -> Controller:
        """The controller of an adjoint's backward solve over the forward's interval: the same
        step formulas and landings, without what belongs to the forward solve (a first step
        size, a custom norm, ``dt_min``: a forward step clipped to an output time may be
        shorter); the backward problem carries its own tolerances. Default: the controller."""
        return self

    def step_count(self, t0: float, t_end: float) -> int | None:
        """The number of steps from ``t0`` to ``t_end`` when it is known before the solve
        (fixed steps: compiled stepping then unrolls exactly the steps left), else None.
        Default: adaptive, None; fixed, one step from landing to landing."""
        return None if self.adaptive else len(self.landing_times(t0, t_end)) + 1

    def with_landings(self, times) -> Controller:
        """A copy of this controller that also lands on ``times`` (as ``step_t``)."""
        return dataclasses.replace(self, step_t=tuple(sorted({*self.step_t, *times})))

    def first_time(self, t0, t_end, time_dtype: torch.dtype):
        """The time of the first stage from ``t0`` toward ``t_end``: ``t0``, or f's limit from
        inside the interval where ``t0`` is a ``jump_t`` (floats, or (B,) float64 tensors)."""
        if not isinstance(t0, torch.Tensor):
            return time_beside(t0, t_end, time_dtype) if t0 in self.jump_t and t_end != t0 else t0
        if not self.jump_t:
            return t0
        J = torch.tensor(self.jump_t, dtype=torch.float64, device=t0.device)
        on_jump = torch.isin(t0, J) & (t_end != t0)
        return torch.where(on_jump, time_beside(t0, t_end, time_dtype), t0)

    def landing_times(self, t0: float, t_end: float) -> tuple[float, ...]:
        """``step_t`` and ``jump_t`` strictly inside the solve interval, increasing."""
        lo, hi = min(t0, t_end), max(t0, t_end)
        return tuple(sorted({x for x in (*self.step_t, *self.jump_t) if lo < x < hi}))

    def land(self, t, t_try, t_end, direction, landings):
        """``(t_new, clipped, is_jump)``: the proposed step end ``t_try`` clipped to the next
        landing time after ``t`` (``landings``, increasing) and to ``t_end``; ``is_jump`` where it
        ends on a ``jump_t``. Floats (``landings`` a tuple), or (B,) tensors (``landings`` a
        float64 tensor; ``direction`` and ``t_end`` per row)."""
        if isinstance(t, torch.Tensor):
            return self._land_rows(t, t_try, t_end, direction, landings)
        land = None
        if landings:
            if direction > 0:
                i = bisect.bisect_right(landings, t)
                land = landings[i] if i < len(landings) else None
            else:
                i = bisect.bisect_left(landings, t) - 1
                land = landings[i] if i >= 0 else None
        # A step ending within a few ulps short of a landing ends on it: the sliver step left
        # over would be below the resolution of t (an adjoint solve replaying it underflows).
        if land is not None and direction * (t_try - land) >= -_SLIVER * abs(land):
            return land, True, land in self.jump_t  # landings lie strictly inside
        # (A jump at the end: its left limit, perturb.)
        if direction * (t_try - t_end) >= -_SLIVER * abs(t_end):
            return t_end, True, t_end in self.jump_t
        return t_try, False, False

    def _land_rows(self, t, t_try, t_end, sdir, L):
        """:meth:`land` per row (``L`` sorted float64, ``sdir`` each row's direction)."""
        J = None
        if self.jump_t:
            J = torch.tensor(self.jump_t, dtype=t_try.dtype, device=t_try.device)
        return land_rows(t, t_try, t_end, sdir, L, J)


def land_rows(t, t_try, t_end, sdir, L, J=None):
    """:meth:`Controller.land` on (B,) float64 tensors: ``L`` the sorted landing times, ``J``
    the jump times (a tensor, or None). Compiled stepping calls it inside its graph."""
    n = L.shape[0]
    if n:
        up = torch.searchsorted(L, t.contiguous(), right=True)
        dn = torch.searchsorted(L, t.contiguous(), right=False) - 1
        i = torch.where(sdir > 0, up, dn)
        ok = (i >= 0) & (i < n)
        land = torch.where(ok, L[i.clamp(0, n - 1)], t_end)
        # A landing beyond the end is no landing: the end comes first.
        ok = ok & (sdir * (t_end - land) > 0)
        to_land = ok & (sdir * (t_try - land) >= -_SLIVER * land.abs())
        t_new = torch.where(to_land, land, t_try)
    else:
        to_land = torch.zeros_like(t, dtype=torch.bool)
        t_new = t_try
    at_end = sdir * (t_new - t_end) >= -_SLIVER * t_end.abs()
    t_new = torch.where(at_end, t_end, t_new)
    if J is not None:  # on a jump_t landing, or at an end that is one (its left limit)
        jump = (to_land | at_end) & torch.isin(t_new, J)
    else:
        jump = torch.zeros_like(at_end)
    return t_new, to_land | at_end, jump


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
        """The grid ``t0 + k dt`` (the last point within rounding of ``t_end`` is ``t_end``)
        and one step more per landing time inside."""
        n = max(1, math.ceil(abs(t_end - t0) / self.dt - 1e-9))
        return n + len(self.landing_times(t0, t_end))


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
        Bounds on ``|h|``. A step that would need ``|h| < dt_min`` raises StepSizeUnderflowError
        (unless ``force_dt_min``).
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
        For non-positive tolerances or factors outside their ranges.
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
            return minimum(self.dt0 + 0.0 * span, self.dt_max)
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
            return minimum(minimum(minimum(100 * h0, h1), span), self.dt_max)

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
