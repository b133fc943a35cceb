"""The step-size controller protocol (:class:`Controller`) and the arithmetic its formulas use.

A controller owns its formulas (first step, proposal, bound, underflow rule, adaptation), each
written once in arithmetic that works on Python floats (the host-float driver: one step size
for the whole batch) and on ``(B,)`` float64 tensors (the masked per-row driver and compiled
stepping: one step size per sample). The helpers here dispatch ``where``/``minimum``/
``maximum``/``isfinite`` on the argument type and propagate NaN either way, so the drivers
cannot drift apart. The engine's landing rule (:meth:`Controller.land`, :func:`land_rows`) and
the resolution of ``t`` (:func:`underflows`, :func:`time_beside`) apply to every controller.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import struct

import torch

__all__ = [
    "Controller", "time_beside", "underflows", "land_rows", "where", "minimum", "maximum",
    "isfinite", "per_row", "landing_tolerance", "landing_eps", "landing_scale", "MERGE_ULPS",
    "stuck_error", "merge_landings", "checked_initial_step",
]  # fmt: skip


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


# ------------------------------------------------- merging step ends with landing times
# A step end within this many ulps (at the interval's magnitude, :func:`landing_scale`) of a
# time the steps must end on (step_t, jump_t, an output landing, the end) is that time.
# torch.linspace in float32 lands within ~0.5 ulp of the exact points and the grid
# ``t0 + k dt`` (double) within a few double ulps of them: 16 leaves a wide margin and moves a
# step end by under 2e-6 of max(|t|, |t_end|) in float32, never more than a quarter step (see
# landing_eps for a float64 landing that is float32-exact). Without the merge such a pair leaves
# a sliver step of 1e-9 (float32 landings) or 4e-16 (float64): an extra step each, and the
# variable-step Adams formulas break on them. The torchdiffeq face merges its fixed grids with
# the same tolerance (:mod:`neuralode._compat_grid`).
MERGE_ULPS = 16
_EPS32 = 1.1920928955078125e-07


def landing_tolerance(scale, step, eps):
    """How far apart a step end and a landing time may be and still be one point:
    ``MERGE_ULPS`` ulps (relative precision ``eps``) of the span's magnitude ``scale``, never
    more than a quarter of ``step`` (so a landing genuinely off the grid keeps its own step).
    Floats or (B,) float64 tensors; a NaN ``step`` gives NaN (nothing merges)."""
    return minimum(MERGE_ULPS * eps * scale, step / 4)


def landing_scale(t, t_end):
    """The magnitude at which a step end from ``t`` toward ``t_end`` is merged with a landing:
    ``max(|t|, |t_end|)``, the interval's own, never a landing's outside it (so per-sample
    control with several rows' landings merges as each row solved alone, and as shared control).
    Floats or (B,) float64 tensors."""
    if type(t) is not float and isinstance(t, torch.Tensor):
        return torch.maximum(t.abs(), t_end.abs())
    return max(abs(t), abs(t_end))


def stuck_error(ctrl, t, t_try) -> ValueError:
    """The error for a controller whose ``propose`` returned a time that does not advance."""
    return ValueError(
        f"{type(ctrl).__name__}.propose returned t_try={t_try!r} from t={t!r}: the step end must "
        "lie strictly beyond t in the direction of integration (t + direction * h with h > 0); "
        "fix the controller's propose"
    )


def checked_initial_step(ctrl, h, rows: bool = False):
    """``h``, the result of ``ctrl.initial_step``, once per solve: a positive number (``inf``:
    the first step ends on the next landing; NaN: a non-finite start, reported by the drivers'
    failure rule) -- a float under shared control, a float or (B,) tensor per sample. Raises
    TypeError/ValueError naming the controller otherwise."""
    name = type(ctrl).__name__
    if rows and isinstance(h, torch.Tensor):
        bad = bool((h <= 0).any())
    elif isinstance(h, (int, float)) and not isinstance(h, bool):
        bad = h <= 0
    else:
        raise TypeError(
            f"{name}.initial_step must return the first step size |h| as a float (or a (B,) "
            f"float64 tensor under per-sample control), got {type(h).__name__} {h!r}"
        )
    if bad:
        raise ValueError(
            f"{name}.initial_step returned {h!r}: the first step size is a magnitude |h| > 0 "
            "(the direction of integration is applied by the engine)"
        )
    return h


def landing_eps(x):
    """The relative precision of the times a landing ``x`` came in: float32's where ``x`` is a
    float32 value (``t`` or ``step_t`` given in float32: the landings are float32 roundings of
    the grid's points, ~1e-9 off them at t = 0.1), else float64's. Floats or float64 tensors
    (elementwise).

    The engine's times are double and the dtype ``t`` was given in is not passed down, so a
    float64 landing that happens to be a float32 value (0.5, 1e6 + 0.3125) is treated as a
    float32 one: its merge tolerance is ``MERGE_ULPS`` float32 ulps of the interval's
    magnitude, ``16 * 1.19e-7 * max(|t|, |t_end|)`` (:func:`landing_scale`), capped at a
    quarter of the step. It grows with ``|t|``, not with the span: at ``t`` near 1e6 it is
    about 1.9, so the quarter-step cap decides. Limitation: such a landing within that
    tolerance beyond a grid point merges into it -- the step ends exactly on the landing and
    the grid point is skipped (``ConstantStep(0.1, step_t=(1e6 + 0.3125,))`` from ``t0 = 1e6``
    steps 1e6 + 0.2 -> 1e6 + 0.3125, without 1e6 + 0.3). Give such landings off the float32
    grid, or with ``t0`` near 0, to keep every grid point."""
    if isinstance(x, torch.Tensor):
        exact = x.to(torch.float32).to(x.dtype) == x
        return _EPS64 + (_EPS32 - _EPS64) * exact.to(x.dtype)
    eps = _EPS_OF.get(x)  # (a landing's answer, kept: land asks it of t_end every step)
    if eps is None:
        try:
            exact = struct.unpack("f", struct.pack("f", x))[0] == x
        except OverflowError:  # beyond float32's range
            exact = False
        eps = _EPS32 if exact else _EPS64
        if len(_EPS_OF) < 4096:
            _EPS_OF[x] = eps
    return eps


_EPS_OF: dict = {}  # landing_eps of the float landings seen (a few per solve; bounded)


def merge_landings(step_t, jump_t) -> tuple[float, ...]:
    """The landing times ``step_t`` and ``jump_t``, increasing, with near-duplicates merged.

    Two landings a float32 rounding apart (``step_t=(0.1,)`` and ``jump_t`` a float32 0.1, or a
    float64 grid and a float32 jump) would leave a sliver step between them. Consecutive
    landings ``a < b`` are one point when ``b - a`` is within the landing rule's tolerance at
    their own magnitude, ``max(_SLIVER, MERGE_ULPS * eps) * max(|a|, |b|)``, where ``eps`` is
    float32's when exactly one of them is a float32 value (the other then may be the time it
    rounds) and float64's otherwise (two distinct float32 values are never merged). The kept
    time is the ``jump_t`` one if either is, else the one that is not a float32 value (the more
    precise). Independent of the solve interval, so every driver and sample merges alike.
    """
    jumps = set(jump_t)
    out: list[float] = []
    for x in sorted({*step_t, *jump_t}):
        if out:
            a = out[-1]
            ea, ex = landing_eps(a), landing_eps(x)
            eps = _EPS32 if ea != ex else _EPS64
            tol = max(_SLIVER, MERGE_ULPS * eps) * max(abs(a), abs(x))
            if x - a <= tol:
                if (x in jumps and a not in jumps) or ((x in jumps) == (a in jumps) and ex < ea):
                    out[-1] = x
                continue
        out.append(x)
    return tuple(out)


# -------------------------------------------- arithmetic on floats or (B,) tensors alike
# (Each helper tests for the host float first: the step-size control of the host-float driver
# calls them a few dozen times a step, and isinstance against torch.Tensor costs ~0.1 us.)
def where(cond, a, b):
    """``a`` where ``cond`` else ``b``: ``torch.where`` for tensors, a conditional for bools."""
    if type(cond) is not bool and isinstance(cond, torch.Tensor):
        return torch.where(cond, a, b)
    return a if cond else b


def minimum(a, b):
    """Elementwise minimum that propagates NaN (as ``torch.minimum``) for floats too."""
    if (type(a) is not float or type(b) is not float) and (
        isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)
    ):
        if not isinstance(b, torch.Tensor):
            return torch.clamp(a, max=b)
        if not isinstance(a, torch.Tensor):
            return torch.clamp(b, max=a)
        return torch.minimum(a, b)
    return a if (a != a or a <= b) else b


def maximum(a, b):
    """Elementwise maximum that propagates NaN (as ``torch.maximum``) for floats too."""
    if (type(a) is not float or type(b) is not float) and (
        isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)
    ):
        if not isinstance(b, torch.Tensor):
            return torch.clamp(a, min=b)
        if not isinstance(a, torch.Tensor):
            return torch.clamp(b, min=a)
        return torch.maximum(a, b)
    return a if (a != a or a >= b) else b


def isfinite(x):
    if type(x) is not float and isinstance(x, torch.Tensor):
        return torch.isfinite(x)
    return math.isfinite(x)


def per_row(h, x: torch.Tensor):
    """``h * x`` for a step size ``h`` that is a float or a (B,) tensor (one per row of x)."""
    if isinstance(h, torch.Tensor):
        return h.to(x.dtype).unsqueeze(1) * x
    return h * x


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
      ``|h|`` and error memory after a step (default unchanged; adaptive controllers only). Under
      shared control it receives floats; an ``h_next`` returned as a 0-d tensor is read as a
      float (one host read per step: return a float where you can).
    - :meth:`bounded` ``(h_abs, nonfinite=False) -> h_abs``: the step size to try (default
      capped at ``dt_max``).
    - :meth:`underflows` ``(h, t) -> bool``: the step cannot be taken (default below ``dt_min``
      or the resolution of ``t``).
    - :meth:`accepts` ``(err, h_abs) -> bool``: accept a step whose scaled error exceeds 1 (host
      floats; asked by the host-float and reversible drivers only; default no).
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

    def first_step(self, norm, f, t0, y0, k1, direction, span, order, rows: bool = False):
        """:meth:`initial_step`, checked (``checked_initial_step``): what the eager drivers
        call, once per solve (``rows``: per-sample control, a float or (B,) tensor allowed)."""
        h = self.initial_step(norm, f, t0, y0, k1, direction, span, order)
        return checked_initial_step(self, h, rows)

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
        share one compilation. Default: the controller with the fields it has among ``rtol``,
        ``atol`` (placeholders 1.0: the step receives the tolerances as tensors), ``step_t``,
        ``jump_t`` (empty: it receives the landing times as tensors) and ``norm`` (None)
        reset; override it when other fields hold per-solve data."""
        if not dataclasses.is_dataclass(self):
            return self
        reset = {
            f.name: _PER_SOLVE[f.name] for f in dataclasses.fields(self) if f.name in _PER_SOLVE
        }
        return dataclasses.replace(self, **reset) if reset else self

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

    def merged_landings(self) -> tuple[float, ...]:
        """``step_t`` and ``jump_t``, increasing, with near-duplicates merged once
        (``merge_landings``): every driver's landing list is built from it."""
        return merge_landings(self.step_t, self.jump_t)

    def landing_times(self, t0: float, t_end: float) -> tuple[float, ...]:
        """:meth:`merged_landings` strictly inside the solve interval, increasing."""
        lo, hi = min(t0, t_end), max(t0, t_end)
        return tuple(x for x in self.merged_landings() if lo < x < hi)

    def land(self, t, t_try, t_end, direction, landings):
        """``(t_new, clipped, is_jump)``: the proposed step end ``t_try`` clipped to the next
        landing time after ``t`` (``landings``, increasing) and to ``t_end``; ``is_jump`` where it
        ends on a ``jump_t``. Floats (``landings`` a tuple), or (B,) tensors (``landings`` a
        float64 tensor; ``direction`` and ``t_end`` per row)."""
        if type(t) is not float and isinstance(t, torch.Tensor):
            return self._land_rows(t, t_try, t_end, direction, landings)
        if direction * (t_try - t) <= 0:  # (one comparison: a propose that does not advance)
            raise stuck_error(self, t, t_try)
        land = None
        if landings:
            if direction > 0:
                i = bisect.bisect_right(landings, t)
                land = landings[i] if i < len(landings) else None
            else:
                i = bisect.bisect_left(landings, t) - 1
                land = landings[i] if i >= 0 else None
        # A step ending within landing_tolerance short of a landing ends on it (ConstantStep:
        # a grid point a rounding away from a float32 output time), and always within a few
        # ulps: the sliver step left over would be below the resolution of t (an adjoint solve
        # replaying it underflows).
        scale = landing_scale(t, t_end)
        step = abs(t_try - t)
        if land is not None:
            tol = maximum(_SLIVER * abs(land), landing_tolerance(scale, step, landing_eps(land)))
            if direction * (t_try - land) >= -tol:
                return land, True, land in self.jump_t  # landings lie strictly inside
        # (A jump at the end: its left limit, perturb.)
        tol = maximum(_SLIVER * abs(t_end), landing_tolerance(scale, step, landing_eps(t_end)))
        if direction * (t_try - t_end) >= -tol:
            return t_end, True, t_end in self.jump_t
        return t_try, False, False

    def _land_rows(self, t, t_try, t_end, sdir, L):
        """:meth:`land` per row (``L`` sorted float64, ``sdir`` each row's direction)."""
        J = None
        if self.jump_t:
            J = torch.tensor(self.jump_t, dtype=t_try.dtype, device=t_try.device)
        return land_rows(t, t_try, t_end, sdir, L, J)


#: The per-solve fields that :meth:`Controller.step_rule` resets by default, and their values.
_PER_SOLVE = {"rtol": 1.0, "atol": 1.0, "step_t": (), "jump_t": (), "norm": None}


def land_rows(t, t_try, t_end, sdir, L, J=None):
    """:meth:`Controller.land` on (B,) float64 tensors: ``L`` the sorted landing times, ``J``
    the jump times (a tensor, or None). Compiled stepping calls it inside its graph."""
    n = L.shape[0]
    # The merge of Controller.land: within landing_tolerance (at least a few ulps) short of a
    # landing or the end, the step ends on it.
    scale = landing_scale(t, t_end)
    step = (t_try - t).abs()
    if n:
        up = torch.searchsorted(L, t.contiguous(), right=True)
        dn = torch.searchsorted(L, t.contiguous(), right=False) - 1
        i = torch.where(sdir > 0, up, dn)
        ok = (i >= 0) & (i < n)
        land = torch.where(ok, L[i.clamp(0, n - 1)], t_end)
        # A landing beyond the end is no landing: the end comes first.
        ok = ok & (sdir * (t_end - land) > 0)
        tol = maximum(_SLIVER * land.abs(), landing_tolerance(scale, step, landing_eps(land)))
        to_land = ok & (sdir * (t_try - land) >= -tol)
        t_new = torch.where(to_land, land, t_try)
    else:
        to_land = torch.zeros_like(t, dtype=torch.bool)
        t_new = t_try
    tol = maximum(_SLIVER * t_end.abs(), landing_tolerance(scale, step, landing_eps(t_end)))
    at_end = sdir * (t_new - t_end) >= -tol
    t_new = torch.where(at_end, t_end, t_new)
    if J is not None:  # on a jump_t landing, or at an end that is one (its left limit)
        jump = (to_land | at_end) & torch.isin(t_new, J)
    else:
        jump = torch.zeros_like(at_end)
    return t_new, to_land | at_end, jump
