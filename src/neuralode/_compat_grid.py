"""The step grid of the torchdiffeq face's fixed-step methods (``step_size``,
``grid_constructor``, or the output times), with the times the steps must end on merged in."""

from __future__ import annotations

import bisect
import math
import warnings

import torch

from .controllers.step_size import MERGE_ULPS, landing_tolerance

__all__ = ["fixed_grid", "merged_grid", "merge_tolerance", "time_list"]


def fixed_grid(t: torch.Tensor, options: dict, func, y0) -> list[float]:
    """The step boundaries from t[0] to t[-1] (floats): ``t0 + i * step_size`` with the last
    replaced by t[-1] (torchdiffeq's construction), ``grid_constructor(func, y0, t)``, or the
    output times themselves (with a warning unless they are a fine grid)."""
    start, end = float(t[0].detach()), float(t[-1].detach())
    if "step_size" in options and "grid_constructor" in options:
        raise ValueError("pass step_size or grid_constructor in options, not both")
    if "step_size" in options:
        step = float(options["step_size"])
        if not (step > 0 and math.isfinite(step)):
            raise ValueError(
                f"options['step_size'] must be a positive number, got {options['step_size']!r}"
            )
        n = math.ceil(abs(end - start) / step + 1)
        sign = 1.0 if end >= start else -1.0
        grid = [start + sign * i * step for i in range(n)]
        grid[-1] = end
        # Same construction as torchdiffeq: the last point is replaced by the end time.
        return grid
    if "grid_constructor" in options:
        g = options["grid_constructor"](func, y0, t)
        g = [float(x) for x in torch.as_tensor(g).reshape(-1)]
        if g[0] != start or g[-1] != end:
            raise ValueError("grid_constructor must return a grid whose ends equal t[0] and t[-1]")
        return g
    grid = [float(x) for x in t.detach().tolist()]
    if not _fine_output_grid(grid, t.dtype):
        warnings.warn(
            "a fixed-step method was given no options['step_size'] (or grid_constructor): it "
            "takes one step between consecutive output times, as torchdiffeq does, which is "
            "usually far too coarse (rk4 on y' = -y over [0, 5] with t = [0, 5] returns 13.7 for "
            "0.0067). Pass options=dict(step_size=...) (no warning either when no output "
            f"interval exceeds 1/{_FINE_INTERVALS} of the span)",
            UserWarning,
            stacklevel=3,
        )
    return grid


# A fixed-step method without step_size steps on the output times. That is deliberate when the
# caller made the output grid fine (latent_ode's ODE-RNN encoder integrates with euler on
# linspace(t_prev, t_i, n), n chosen so that the spacing is at most 1/50 of the series), and an
# oversight when t holds a few observation times (t = [0, 5]). With no time scale of f at
# hand, "fine" means: no output interval longer than this fraction of the span (so 6 or more
# evenly spaced output times).
_FINE_INTERVALS = 5


def _fine_output_grid(times: list[float], dtype: torch.dtype) -> bool:
    """Whether no interval of ``times`` exceeds ``1/_FINE_INTERVALS`` of their span (rounding
    of t's dtype allowed for, so that ``torch.linspace(a, b, 6)`` in float32 qualifies)."""
    span = abs(times[-1] - times[0])
    gap = max(abs(b - a) for a, b in zip(times, times[1:]))
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    slack = MERGE_ULPS * eps * max(abs(times[0]), abs(times[-1]))
    return gap <= span / _FINE_INTERVALS + slack


def time_list(value) -> list[float]:
    """Times given as None, a sequence or a tensor (torchdiffeq takes tensors), as floats."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [float(x) for x in value.detach().reshape(-1).tolist()]
    return [float(x) for x in value]


def merge_tolerance(t: torch.Tensor, grid: list[float], time_dtype: torch.dtype) -> float:
    """How far apart a grid point and a must-land time may be and still be one point: the
    native controllers' :func:`~neuralode.controllers.step_size.landing_tolerance` (a few ulps
    relative to the largest |time|, never more than a quarter of the smallest step of the grid),
    in the coarser of the time dtype and t's dtype (float32 output times are float32 roundings
    of the step grid's points, which a float32 func cannot tell apart)."""
    eps = torch.finfo(time_dtype).eps
    if t.is_floating_point():
        eps = max(eps, torch.finfo(t.dtype).eps)
    scale = max(abs(grid[0]), abs(grid[-1]))
    smallest = min(abs(b - a) for a, b in zip(grid, grid[1:])) if len(grid) > 1 else math.inf
    return landing_tolerance(scale, smallest, eps)


def merged_grid(grid, must, tol: float) -> list[float]:
    """The step boundaries ``grid`` with the times ``must`` added, sorted: a point of ``grid``
    within ``tol`` of a time of ``must`` is dropped (the step ends on that time instead).

    Without the merge, output times given in float32 (``torch.linspace(0, 5, 51)``) next to
    the double grid ``0 + i * 0.1`` leave steps of 1e-9 (float32; 4e-16 in float64), which
    cost a step each and wreck the variable-step Adams formulas (errors 1e4 times too large).
    """
    keep = sorted(set(must))
    out = list(keep)
    for g in grid:
        i = bisect.bisect_left(keep, g)
        if i < len(keep) and keep[i] - g <= tol:
            continue
        if i > 0 and g - keep[i - 1] <= tol:
            continue
        out.append(g)
    return sorted(set(out))
