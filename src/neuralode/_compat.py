"""The torchdiffeq-compatible face: ``odeint`` and ``odeint_adjoint``.

A thin translation of torchdiffeq's method strings and option dicts onto :func:`solve`, so that
code written for torchdiffeq 0.2.x runs unchanged with ``from neuralode import odeint``.
Differences, all deliberate and documented:

- ``max_num_steps`` counts step attempts over the whole solve (torchdiffeq counts per output
  interval, so 50 output times let ~2,000 steps through a limit of 200).
- Output times never shorten steps and func is never evaluated outside ``[t0, t1]``.
- Fixed-step methods interpolate between steps with cubic Hermite (torchdiffeq: linear).
- Non-FSAL adaptive methods (adaptive_heun, fehlberg2) evaluate f at every new step's start.
- A fixed-step method given no ``step_size`` (and no ``grid_constructor``) steps between the
  output times only, as torchdiffeq does, but with a warning (this is rarely what is meant)
  unless the output grid is itself fine: no interval longer than a fifth of the span.
- ``dopri8`` is Hairer's DOP853 (with its 7th-order dense output); torchdiffeq's ``dopri8`` is
  Prince & Dormand's RK8(7)13M. Both are 8th order; results agree to the tolerance, not bitwise.
- ``options=dict(interp="linear")`` warns and uses cubic Hermite (``"cubic"`` is the default).
- Implicit methods solve their stages by Newton's method with autograd Jacobians and converge at
  their stated orders (torchdiffeq's ``gl4`` has a wrong node and converges at order 1); the
  adaptive stiff solvers ``kvaerno5`` and ``rodas4`` are available too.
- Adams methods use variable-step coefficients (exact on uneven grids; output times are added
  to the grid) and default to order 4: torchdiffeq's default ``max_order=12`` makes
  ``explicit_adams`` unstable (``y' = -y`` with ``step_size=0.01`` blows up).
- A state stays in its dtype and func gets times in its precision (float32 states: float32).
  A derivative of another dtype is cast to the state's, as in torchdiffeq, but with a warning
  (once per pair of dtypes; ``neuralode.solve`` raises TypeError): the solve is retried with
  the cast when the engine refuses the dtype, so func runs uncast (at no cost) otherwise.
- Step callbacks get the state in y0's structure; a callable ``adjoint_options['norm']`` gets a
  0-d zero for the adjoint of t (not integrated); ``odeint_dense`` takes any method.

Like torchdiffeq: unknown options warn; solve failures raise ``AssertionError`` (also
neuralode's SolveError subclasses, see ``_compat_hooks``); ``perturb``, ``jump_t``, ``min_step``
and the step callbacks behave as in torchdiffeq; tuple states mixing dtypes are promoted.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ._compat_args import TORCHDIFFEQ_METHODS, translate
from ._compat_hooks import (
    FORWARD,
    DeferredAdjointNorm,
    adjoint_norm,
    callbacks_of,
    hook_adjoint_callbacks,
    hook_callbacks,
    promoted,
    solve_casting,
    torchdiffeq_errors,
)
from ._compat_scipy import scipy_odeint, scipy_odeint_adjoint
from ._solve import solve
from .controllers import PIController, StepToGrid
from .gradients import Backsolve, Direct
from .gradients._common import collect_runs, hold_outputs
from .solvers import get_tableau

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "odeint_dense", "TORCHDIFFEQ_METHODS"]

# With an event function the second time only gives the direction (as in torchdiffeq): the solve
# runs until the event. This horizon stands in for "forever".
_EVENT_HORIZON = 1e15
# torchdiffeq's method names that mean another tableau in neuralode.
_ADJ_NAMES = {"rk4": "rk38", "rk4_classic": "rk4"}
_EVENT_MAX_STEPS = 100_000


def _event_solve(func, y0, t, kwargs, event_fn, gradient):
    """torchdiffeq's event mode: returns (event_t, stack([y0, y_event]))."""
    from ._events_segments import no_event
    from .events import Event

    t = torch.as_tensor(t)
    if t.numel() != 2:
        raise ValueError(
            f"with event_fn, t must hold 2 times (the start and, by its sign, the direction), "
            f"as in torchdiffeq; got {t.numel()}"
        )
    t0 = float(t[0].detach())
    sign = 1.0 if float(t[-1].detach()) >= t0 else -1.0
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if kwargs.get("max_steps") is None:
        # The solve runs until the event: bound it so that an event that never fires ends with
        # MaxStepsError (or SolveError at the horizon) (options['max_num_steps'] overrides).
        kwargs = dict(kwargs, max_steps=_EVENT_MAX_STEPS)
    ctrl = kwargs.get("controller")
    if isinstance(ctrl, StepToGrid):  # fixed step: keep the step size, drop the grid's end
        g = ctrl.grid
        dt = abs(g[1] - g[0]) if len(g) > 1 else 1.0
        from .controllers import ConstantStep

        kwargs = dict(kwargs, controller=ConstantStep(dt, jump_t=ctrl.jump_t))
    # The start time stays in the graph (t0 may require grad, e.g. a previous event time).
    tt = torch.cat(
        [t[:1].to(torch.float64), t[:1].detach().to(torch.float64) + sign * _EVENT_HORIZON]
    )
    # The custom-gradient solves' runs are held by the results' own nodes (the stack would hide
    # the solve's; see gradients._common.structured_outputs and events.solve_with_event).
    with collect_runs() as runs:
        sol = solve(
            func,
            y0,
            tt,
            gradient=gradient,
            dense_output=False,
            event=Event(event_fn, constant_ok=True),
            **kwargs,
        )
    if bool(torch.isnan(sol.event_t).any()):  # the horizon reached: no silent NaN event time
        no_event(sol, t0 + sign * _EVENT_HORIZON)
    if isinstance(y0, (tuple, list)):
        traj = tuple(torch.stack([a, b]) for a, b in zip(y0, sol.event_y))
    else:
        traj = torch.stack([y0, sol.event_y])
    event_t = sol.event_t.to(t.dtype if t.is_floating_point() else torch.float64)
    if event_t.shape == (1,):
        # torchdiffeq returns a 0-d event time when event_fn gives a one-element tensor (its
        # bouncing-ball example does); (B,) with B > 1 keeps neuralode's one-event-per-sample.
        event_t = event_t.reshape(())
    return hold_outputs((event_t, traj), runs)


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None):
    """Solve an ODE with torchdiffeq's interface; gradients by autograd through the solver.

    Parameters
    ----------
    func : callable
        ``func(t, y) -> dy/dt``; ``y`` a tensor or tuple of tensors like ``y0``.
    y0 : Tensor or tuple of Tensors
        Initial state at ``t[0]``.
    t : Tensor (T,)
        Output times, strictly increasing or strictly decreasing.
    rtol, atol : float or tuple, default 1e-7, 1e-9
        Tolerances of adaptive methods (tuples give one per component of a tuple state).
    method : str, default "dopri5"
        One of ``dopri8, dopri5, tsit5, bosh3, fehlberg2, adaptive_heun, euler, midpoint,
        heun2, heun3, rk4`` (Kutta's 3/8 rule, as in torchdiffeq), ``rk38``, ``rk4_classic``;
        the fixed-grid implicit methods ``implicit_euler, implicit_midpoint, trapezoid,
        radauIIA3, radauIIA5, gl4, gl6, sdirk2, trbdf2``; the Adams methods ``explicit_adams,
        implicit_adams, fixed_adams``; the adaptive stiff solvers ``kvaerno5, rodas4`` (not in
        torchdiffeq); ``scipy_solver``.
    options : dict, optional
        Adaptive: ``first_step, safety, ifactor, dfactor, max_num_steps, step_t, jump_t, norm,
        dtype, min_step, max_step``. Fixed: ``step_size, grid_constructor, perturb, interp,
        max_num_steps, dtype``; implicit fixed-grid methods also ``max_iters`` (Newton
        iterations per stage solve, default 10); Adams also ``max_order`` (the corrector's
        order as in torchdiffeq, default 4) and ``max_iters`` (corrector iterations, default 4).
        scipy_solver: ``solver`` (a solve_ivp method), ``min_step``, ``max_step``,
        ``first_step``.
    event_fn : callable, optional
        ``event_fn(t, y) -> Tensor``: solve until it crosses zero (torchdiffeq semantics: ``t[1]``
        only gives the direction). A 0-d output stops the whole solve; an output of shape ``(B,)``
        (y0's batch) gives each sample its own event time. Event times are differentiable.

    Returns
    -------
    Tensor ``(T, *y0.shape)``, or a tuple of them for a tuple ``y0``. With ``event_fn``:
    ``(event_t, solution)`` where ``solution`` stacks ``y0`` and the state at the event.

    Raises
    ------
    ValueError
        For unknown methods or options, misplaced options, and invalid inputs.
    SolveError
        When the solve fails (step-size underflow, ``max_num_steps``, non-finite state).
    """
    kwargs, opts = translate(func, y0, t, rtol, atol, method, options)
    if kwargs is None:
        if event_fn is not None:
            raise ValueError("method='scipy_solver' does not support event_fn")
        if callbacks_of(func, FORWARD) is not None:
            warnings.warn(
                "method='scipy_solver' does not call func's step callbacks (scipy takes the steps)",
                UserWarning,
                stacklevel=2,
            )
        return scipy_odeint(func, y0, t, rtol, atol, opts)
    _hook_forward(func, kwargs)
    func, y0 = promoted(func, y0)

    def run(func):
        if event_fn is not None:
            return _event_solve(func, y0, t, kwargs, event_fn, Direct())
        return solve(func, y0, t, gradient=Direct(), dense_output=False, **kwargs).ys

    return solve_casting(run, func, y0)


def _hook_forward(func, kwargs) -> None:
    """func's torchdiffeq step callbacks (callback_step, ...) on the forward solve."""
    kwargs["solver"] = hook_callbacks(
        func,
        kwargs["solver"],
        adaptive=isinstance(kwargs.get("controller"), PIController),
        stacklevel=4,
    )


def odeint_adjoint(
    func,
    y0,
    t,
    *,
    rtol=1e-7,
    atol=1e-9,
    method=None,
    options=None,
    event_fn=None,
    adjoint_rtol=None,
    adjoint_atol=None,
    adjoint_method=None,
    adjoint_options=None,
    adjoint_params=None,
):
    """Like :func:`odeint`, differentiated by the backsolve adjoint method.

    The forward solve keeps no graph; gradients come from integrating the adjoint system backward
    (see :class:`neuralode.Backsolve`), with a cost that does not grow with the number of output
    times. Tuple states with tuple ``rtol``/``atol`` and complex states with real parameters work.

    Parameters
    ----------
    adjoint_rtol, adjoint_atol : float, optional
        Tolerances of the backward solve (default: ``rtol``, ``atol``).
    adjoint_method : str, optional
        Method of the backward solve (default: ``method``).
    adjoint_options : dict, optional
        ``norm="seminorm"`` leaves the parameter adjoint out of the error norm (Kidger et al.
        2021); ``max_num_steps`` limits the backward solve.
    adjoint_params : sequence of Tensor, optional
        Tensors to differentiate; default ``tuple(func.parameters())``, which needs func to be
        an ``nn.Module``.

    Raises
    ------
    ValueError
        If func is not an ``nn.Module`` and no ``adjoint_params`` are given, and for unknown or
        misplaced options.
    """
    if adjoint_params is None and not isinstance(func, nn.Module):
        raise ValueError(
            "func must be an nn.Module to find the adjoint parameters; otherwise pass them "
            "explicitly with adjoint_params=(...) (adjoint_params=() if there are none)"
        )
    kwargs, opts = translate(func, y0, t, rtol, atol, method, options)
    if kwargs is None:  # scipy_solver: scipy on the backward solve too
        if event_fn is not None:
            raise ValueError("method='scipy_solver' does not support event_fn")
        params = tuple(adjoint_params) if adjoint_params is not None else tuple(func.parameters())
        return scipy_odeint_adjoint(func, y0, t, rtol, atol, opts, params)
    aopts = dict(adjoint_options or {})
    seminorm, anorm = False, None
    if "norm" in aopts:
        norm = aopts.pop("norm")
        if norm == "seminorm":
            seminorm = True
        elif callable(norm):
            anorm = norm
        elif norm not in (None, "default"):
            raise ValueError(
                f"adjoint_options['norm'] must be 'seminorm', 'default' or a callable "
                f"norm(tensor_tuple) -> Tensor, got {norm!r}"
            )
    amax = aopts.pop("max_num_steps", None)
    astep = aopts.pop("step_size", None)
    if aopts:  # torchdiffeq passes them to the backward solver; here they have no effect
        warnings.warn(
            f"adjoint_options {sorted(aopts)} are ignored; supported: norm ('seminorm', "
            "'default' or a callable), max_num_steps, step_size",
            UserWarning,
            stacklevel=2,
        )
    if astep is not None and not (float(astep) > 0):
        raise ValueError(f"adjoint_options['step_size'] must be positive, got {astep!r}")
    if adjoint_method is not None:
        get_tableau(_ADJ_NAMES.get(adjoint_method, adjoint_method))
    params = tuple(adjoint_params) if adjoint_params is not None else tuple(func.parameters())
    art = (
        adjoint_rtol
        if adjoint_rtol is not None
        else (rtol if isinstance(rtol, (int, float)) else None)
    )
    aat = (
        adjoint_atol
        if adjoint_atol is not None
        else (atol if isinstance(atol, (int, float)) else None)
    )
    asolver = None if adjoint_method is None else _ADJ_NAMES.get(adjoint_method, adjoint_method)
    # func's step callbacks: the backward solve runs the forward's method unless adjoint_method
    # names another (which then carries the *_adjoint callbacks itself).
    adaptive = isinstance(kwargs.get("controller"), PIController)
    if asolver is None and not adaptive and get_tableau(kwargs["solver"]).adaptive:
        asolver = "rk4"  # what Backsolve runs on a fixed grid for a method with an estimate
    if asolver is None:
        kwargs["solver"] = hook_callbacks(
            func, kwargs["solver"], adaptive=adaptive, adjoint_adaptive=adaptive
        )
    else:
        _hook_forward(func, kwargs)
        asolver = hook_adjoint_callbacks(
            func, asolver, adaptive=get_tableau(asolver).adaptive or adaptive
        )
    grad = Backsolve(
        rtol=art,
        atol=aat,
        solver=asolver,
        seminorm=seminorm,
        norm=DeferredAdjointNorm(y0, params, seminorm)
        if anorm is None
        else adjoint_norm(anorm, y0, params),
        params=params,
        max_steps=None if amax is None else int(amax),
        dt=None if astep is None else float(astep),
        errors=torchdiffeq_errors,  # the backward solve fails as torchdiffeq's does
    )
    func, y0 = promoted(func, y0)

    def run(func):
        if event_fn is not None:
            return _event_solve(func, y0, t, kwargs, event_fn, grad)
        return _two_nodes_deep(solve(func, y0, t, gradient=grad, dense_output=False, **kwargs).ys)

    return solve_casting(run, func, y0)


def _two_nodes_deep(ys):
    """A tuple state's outputs one node further from the backward solve's node, as torchdiffeq
    builds them (leaf <- view <- slice <- adjoint): code written for it finds
    ``adjoint_options`` at ``ys[i].grad_fn.next_functions[0][0].next_functions[0][0]`` (its own
    tests do). The run moves to each leaf's new node, where the garbage collector sees it (a
    node behind another hides it), so a module keeping these outputs stays collectable."""
    if not isinstance(ys, tuple):
        return ys
    nodes = [y.grad_fn for y in ys]
    if not all(hasattr(n, "adjoint_options") and hasattr(n, "keep") for n in nodes):
        return ys
    held = []
    for y, n in zip(ys, nodes, strict=True):
        keep, n.keep = n.keep, None  # only the outer node holds the run (the gc sees it there)
        held.append(hold_outputs(y, [keep]))
    return tuple(held)


def odeint_dense(func, y0, t0, t1, *, rtol=1e-7, atol=1e-9, method=None, options=None):
    """Solve over ``[t0, t1]`` and return the dense output; torchdiffeq 0.2.5's ``odeint_dense``.

    Parameters
    ----------
    func, y0, rtol, atol, method, options :
        As for :func:`odeint` (torchdiffeq allows ``method="dopri5"`` only; any method works
        here, with its own dense output).
    t0, t1 : Tensor or float
        Start and end of the interval (``t1 < t0`` integrates backward).

    Returns
    -------
    callable
        ``dense_output_fn(t_eval)``: the solution at ``t_eval`` (0-d or ``(K,)`` tensor of times
        in ``[t0, t1]``), of shape ``(*t_eval.shape, *y0.shape)``; differentiable w.r.t. ``y0``
        and the parameters of ``func`` by autograd through the solver.

    Raises
    ------
    ValueError
        For a tuple ``y0`` (as in torchdiffeq), invalid options, or query times outside
        ``[t0, t1]`` (when ``dense_output_fn`` is called).
    """
    if not isinstance(y0, torch.Tensor):
        raise ValueError("odeint_dense needs a tensor y0 (torchdiffeq supports no tuple states)")
    dt = torch.as_tensor(t0).dtype if isinstance(t0, torch.Tensor) else torch.float64
    t = torch.stack([torch.as_tensor(t0, dtype=dt).reshape(()), torch.as_tensor(t1).to(dt)])
    kwargs, opts = translate(func, y0, t, rtol, atol, method, options)
    if kwargs is None:
        raise ValueError("method='scipy_solver' has no dense output in odeint_dense")
    _hook_forward(func, kwargs)
    func, y0 = promoted(func, y0)
    dense = lambda fn: solve(fn, y0, t, gradient=Direct(), dense_output=True, **kwargs)  # noqa: E731
    sol = solve_casting(dense, func, y0)

    def dense_output_fn(t_eval):
        return sol.evaluate(t_eval)

    return dense_output_fn


def odeint_event(func, y0, t0, *, event_fn, reverse_time=False, odeint_interface=None, **kwargs):
    """Solve until ``event_fn(t, y)`` crosses zero; torchdiffeq's ``odeint_event``.

    Parameters
    ----------
    func, y0 :
        As for :func:`odeint`.
    t0 : Tensor or float
        Initial time.
    event_fn : callable
        ``event_fn(t, y) -> Tensor`` (0-d, or ``(B,)`` for one event per sample; a one-element
        ``(1,)`` output gives a 0-d ``event_t``, as in torchdiffeq).
    reverse_time : bool, default False
        Integrate backward in time from ``t0``.
    odeint_interface : callable, default :func:`odeint`
        :func:`odeint` or :func:`odeint_adjoint` (gradients by the adjoint method).
    **kwargs :
        Passed on (``rtol``, ``atol``, ``method``, ``options``, adjoint arguments).

    Returns
    -------
    (event_t, solution) :
        The event time (differentiable w.r.t. ``t0``, y0, the parameters of func and those of
        event_fn, by the implicit function theorem) and ``stack([y0, y(event_t)])``.

    Raises
    ------
    neuralode.SolveError
        When event_fn never changes sign (the solve runs to a stand-in horizon of 1e15).
    """
    odeint_interface = odeint if odeint_interface is None else odeint_interface
    t0 = torch.as_tensor(t0).reshape(-1)[:1]
    t = torch.cat([t0, t0.detach() + (-1.0 if reverse_time else 1.0)])
    return odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)
