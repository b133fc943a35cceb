"""Argument handling of the torchdiffeq-compatible face (:mod:`neuralode._compat`): its method
names and option dicts translated into :func:`neuralode.solve`'s keyword arguments (solver,
controller, step limit, time dtype), with torchdiffeq's option checks (unknown options warn,
options without effect for the method are named)."""

from __future__ import annotations

import math
import warnings

import torch

from ._compat_grid import fixed_grid, merge_tolerance, merged_grid, time_list
from ._compat_hooks import Perturbed
from .controllers import PIController, StepToGrid
from .solvers import get_tableau

__all__ = ["TORCHDIFFEQ_METHODS", "translate", "fixed_solver", "with_time_dtype"]

_ADAPTIVE = {"dopri8", "dopri5", "tsit5", "bosh3", "fehlberg2", "adaptive_heun"}
# torchdiffeq's "rk4" is Kutta's 3/8 rule (rk4_alt_step_func); "rk4_classic" is offered in
# neuralode as "rk4" natively.
_FIXED = {
    "euler": "euler",
    "midpoint": "midpoint",
    "heun2": "heun2",
    "heun3": "heun3",
    "rk4": "rk38",
    "rk38": "rk38",
    "rk4_classic": "rk4",
}
# torchdiffeq's fixed-grid implicit methods (option max_iters: Newton iterations per step) and
# Adams methods (options max_order, max_iters). neuralode's solve their stages by Newton with
# autograd Jacobians (torchdiffeq: Broyden), its gl4 has the right nodes (torchdiffeq's repeats
# the first and converges at order 1), and its Adams coefficients follow the actual grid.
_IMPLICIT_FIXED = {
    "implicit_euler",
    "implicit_midpoint",
    "trapezoid",
    "radauIIA3",
    "radauIIA5",
    "gl4",
    "gl6",
    "sdirk2",
    "trbdf2",
}
_ADAMS = {"explicit_adams", "implicit_adams", "fixed_adams"}
# Adaptive stiff solvers offered through odeint as well (not in torchdiffeq).
_STIFF_ADAPTIVE = {"kvaerno5", "rodas4"}
TORCHDIFFEQ_METHODS = tuple(
    sorted(_ADAPTIVE | set(_FIXED) | _IMPLICIT_FIXED | _ADAMS | {"scipy_solver"})
)

_ADAPTIVE_OPTS = {
    "first_step",
    "safety",
    "ifactor",
    "dfactor",
    "max_num_steps",
    "step_t",
    "jump_t",
    "norm",
    "dtype",
    "min_step",
    "max_step",
}
_FIXED_OPTS = {
    "step_size",
    "grid_constructor",
    "perturb",
    "interp",
    "max_num_steps",
    "dtype",
    "jump_t",
    "step_t",
}
_SCIPY_OPTS = {"solver", "max_step", "min_step", "first_step"}
_IMPLICIT_OPTS = _FIXED_OPTS | {"max_iters"}
_ADAMS_OPTS = _FIXED_OPTS | {"max_iters", "max_order"}


def _check_options(method: str, options: dict | None, allowed: set, where: str = "options") -> dict:
    options = dict(options or {})
    if where == "options" and options.get("norm") == "seminorm":
        raise ValueError(
            "norm='seminorm' belongs in adjoint_options (it applies to the backward solve of "
            "odeint_adjoint): use odeint_adjoint(..., adjoint_options=dict(norm='seminorm'))"
        )
    all_known = _ADAPTIVE_OPTS | _ADAMS_OPTS | _SCIPY_OPTS
    unknown = sorted(set(options) - all_known)
    if unknown:
        # torchdiffeq warns and runs (code in the wild passes misspelled keys and relies on
        # it); the native face raises (STYLE.md: strict inputs).
        warnings.warn(
            f"unknown {where} {unknown} for method {method!r} are ignored; valid ones are "
            f"{sorted(allowed)}",
            UserWarning,
            stacklevel=4,
        )
    unused = sorted(set(options) - allowed - set(unknown))
    if unused:  # torchdiffeq warns here too ("Unexpected arguments"): stay drop-in
        warnings.warn(
            f"{where} {unused} have no effect with method {method!r}", UserWarning, stacklevel=4
        )
    for k in (*unknown, *unused):
        options.pop(k)
    return options


def translate(func, y0, t, rtol, atol, method, options, *, where="options"):
    """Map torchdiffeq's (method, options) onto solve() keyword arguments."""
    method = "dopri5" if method is None else method
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=torch.float64)
    if t.dim() != 1:
        raise ValueError(
            f"t must be 1-D for odeint, got shape {tuple(t.shape)}; use neuralode.solve for per-sample grids"
        )
    kwargs: dict = {}
    if method in _ADAPTIVE or method in _STIFF_ADAPTIVE:
        opts = _check_options(method, options, _ADAPTIVE_OPTS, where)
        min_step = float(opts.get("min_step", 0.0))
        max_step = float(opts.get("max_step", math.inf))
        ctrl = PIController(
            rtol=rtol,
            atol=atol,
            safety=float(opts.get("safety", 0.9)),
            ifactor=float(opts.get("ifactor", 10.0)),
            dfactor=float(opts.get("dfactor", 0.2)),
            dt0=None if opts.get("first_step") is None else abs(float(opts["first_step"])),
            dt_min=min_step,
            dt_max=max_step,
            # torchdiffeq accepts a step at min_step whatever its error
            force_dt_min=min_step > 0,
            step_t=opts.get("step_t"),
            jump_t=opts.get("jump_t"),
            norm=opts.get("norm"),
        )
        kwargs.update(solver=method, controller=ctrl)
    elif method in _FIXED or method in _IMPLICIT_FIXED or method in _ADAMS:
        allowed = (
            _FIXED_OPTS if method in _FIXED else _ADAMS_OPTS if method in _ADAMS else _IMPLICIT_OPTS
        )
        opts = _check_options(method, options, allowed, where)
        solver = fixed_solver(method, opts)
        if opts.get("interp", "cubic") != "cubic":
            warnings.warn(
                f"options['interp']={opts['interp']!r} is not available: outputs between fixed "
                "steps use cubic Hermite interpolation (third order; torchdiffeq's 'cubic')",
                UserWarning,
                stacklevel=3,
            )
        if t.numel() == 1:  # nothing to integrate: the output is y0 (torchdiffeq: y0[None])
            kwargs.update(solver=solver, dt=1.0)
            return with_time_dtype(kwargs, opts, y0), opts
        grid = fixed_grid(t, opts, func, y0)
        user_jumps = time_list(opts.get("jump_t"))
        # Times the steps must end on: the ends, step_t, jump_t and, for Adams, the outputs (a
        # multistep step cannot be replayed on its own, which odeint_adjoint would need for
        # outputs inside steps; the variable-step coefficients make the uneven steps exact).
        times = t.detach().tolist()
        must = [times[0], times[-1], *time_list(opts.get("step_t")), *user_jumps]
        if method in _ADAMS:
            must += times
        time_dtype = with_time_dtype({}, opts, y0).get("time_dtype", torch.float64)
        grid = merged_grid(grid, must, merge_tolerance(t, grid, time_dtype))
        # With perturb, f is evaluated just inside each step (next float after its start,
        # previous before its end), as torchdiffeq's perturb does, so discontinuities at grid
        # points are honoured; the ends too: f is never evaluated exactly at t[0] or t[-1].
        jumps = sorted(set(grid) | set(user_jumps)) if opts.get("perturb") else user_jumps
        if opts.get("perturb"):
            solver = Perturbed(get_tableau(solver))
        kwargs.update(solver=solver, controller=StepToGrid(grid, jump_t=jumps))
    elif method == "scipy_solver":
        return None, _check_options(method, options, _SCIPY_OPTS, where)
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {list(TORCHDIFFEQ_METHODS)}")
    if opts.get("max_num_steps") is not None:
        kwargs["max_steps"] = int(opts["max_num_steps"])
    return with_time_dtype(kwargs, opts, y0), opts


def fixed_solver(method: str, opts: dict):
    """The solver of a fixed-grid method, with torchdiffeq's method options applied."""
    if method in _FIXED:
        return _FIXED[method]
    extra = {}
    if opts.get("max_iters") is not None:
        extra["max_iters"] = int(opts["max_iters"])
    if method in _ADAMS and opts.get("max_order") is not None:
        # torchdiffeq's max_order is the corrector's order; its explicit_adams then uses
        # Adams--Bashforth of order max_order - 1. Unlike torchdiffeq (12) the default is 4.
        order = int(opts["max_order"])
        extra["max_order"] = order - 1 if method == "explicit_adams" else order
    tab = get_tableau(method)
    return tab.with_options(**extra) if extra else tab


def with_time_dtype(kwargs: dict, opts: dict, y0) -> dict:
    """torchdiffeq hands func a time in the state's (real) dtype unless options['dtype'] says
    otherwise; step control itself always runs in double precision."""
    if opts.get("dtype") is not None:
        kwargs["time_dtype"] = opts["dtype"]
    else:
        parts = [y0] if isinstance(y0, torch.Tensor) else list(y0)
        if parts and all(isinstance(x, torch.Tensor) for x in parts):
            dtype = parts[0].dtype
            for x in parts[1:]:  # a tuple mixing dtypes is solved in the promoted one
                dtype = torch.promote_types(dtype, x.dtype)
            if dtype in (torch.float32, torch.complex64):
                kwargs["time_dtype"] = torch.float32
    return kwargs
