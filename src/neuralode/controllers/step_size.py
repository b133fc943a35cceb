"""Step-size controllers (settings only; per-solve state lives in the loop)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Controller", "ConstantStep", "StepToGrid", "PIController", "time_beside"]


def time_beside(x: float, toward: float, time_dtype: torch.dtype) -> float:
    """The time closest to ``x`` on the side of ``toward`` that f sees as different from ``x``.

    At a discontinuity (``jump_t``) f is evaluated there, just inside the interval being
    stepped. In double precision that is ``math.nextafter``; f receives its time in
    ``time_dtype``, and with float32 the next double rounds back onto ``x``, so the step is taken
    to the next float32 instead (or to float32's rounding of ``x`` when that already lies on the
    ``toward`` side).
    """
    if time_dtype != torch.float32:
        return math.nextafter(x, toward)
    up = toward > x
    x32 = torch.tensor(x, dtype=torch.float32)
    if (float(x32) > x) if up else (float(x32) < x):
        return float(x32)
    far = torch.tensor(math.inf if up else -math.inf, dtype=torch.float32)
    return float(torch.nextafter(x32, far))


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
    """Base class. ``adaptive`` controllers need a solver with an embedded error estimate."""

    adaptive: bool = False
    step_t: tuple[float, ...] = ()
    jump_t: tuple[float, ...] = ()
    dt_min: float = 0.0
    dt_max: float = math.inf


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
        Bounds on |h|. A step that would need |h| < dt_min raises StepSizeUnderflowError
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

    def bounded(self, h_abs: float, nonfinite: bool) -> float:
        """The step size to try: ``|h|`` within ``[dt_min, dt_max]`` when ``force_dt_min``
        (unless the last error was non-finite: then the loop reports the failure), else
        ``|h|`` capped at ``dt_max`` (below ``dt_min`` the loop raises)."""
        h_abs = min(h_abs, self.dt_max)
        if self.force_dt_min and not nonfinite:
            h_abs = max(h_abs, self.dt_min)
        return h_abs

    def accepts(self, err: float, h_abs: float) -> bool:
        """Whether a step of size ``h_abs`` with scaled error ``err`` is accepted."""
        if err <= 1.0:
            return True
        return self.force_dt_min and h_abs <= self.dt_min and math.isfinite(err)

    def factor(self, err: float, prev_err: float, k: int) -> float:
        """Step-size multiplier after an accepted step with scaled error ``err``."""
        if err == 0.0:
            return self.ifactor
        f = self.safety * err ** (-(self.icoeff + self.pcoeff) / k)
        if self.pcoeff:
            f *= prev_err ** (self.pcoeff / k)
        return min(self.ifactor, max(self.dfactor, f))

    def reject_factor(self, err: float, k: int) -> float:
        """Step-size multiplier after a rejected step (never an increase)."""
        if not math.isfinite(err):
            return self.dfactor
        return min(1.0, max(self.dfactor, self.safety * err ** (-1.0 / k)))
