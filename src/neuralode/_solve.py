"""The native face: validate and normalise inputs, hand over to the gradient method."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch

from ._loop import Problem, VectorField, integrate
from ._norms import tolerances
from ._tree import flatten_state, real_dtype
from .controllers.resolve import resolve_controller
from .gradients import capable, get_gradient
from .gradients._common import Run, structured_outputs
from .interpolation import DenseOutput
from .solution import Solution
from .solvers import get_tableau

__all__ = ["solve"]


def solve(
    func,
    y0,
    t,
    *,
    solver="dopri5",
    controller=None,
    rtol: float | None = None,
    atol: float | None = None,
    dt: float | None = None,
    gradient="direct",
    max_steps: int | None = None,
    dense_output: bool | None = None,
    throw: bool = True,
    time_dtype: torch.dtype | None = None,
    event=None,
    batch_control: str = "shared",
    compile: bool = False,
    integral=None,
    integral_in_error_norm: bool = True,
    _monitor=None,
    _stats: dict | None = None,
) -> Solution:
    """Solve ``dy/dt = func(t, y)`` from ``y(t[0]) = y0`` and return the state at the times ``t``.

    Parameters
    ----------
    func : callable
        The vector field ``func(t, y) -> dy/dt``, typically an ``nn.Module``. ``t`` is a 0-d
        tensor of ``time_dtype`` on y0's device; ``y`` has the structure, shapes and dtype of
        ``y0``, and the return value must match them exactly (no broadcasting).
    y0 : Tensor or tuple/dict of Tensors
        Initial state, floating point or complex, any shape. With a 2-D ``t`` every component's
        first dimension is the batch ``B``.
    t : Tensor (T,) or (B, T), or a sequence of floats
        Output times, in the units of the vector field. 1-D: shared by the whole state, strictly
        increasing or strictly decreasing, ``t[0]`` is the initial time. 2-D: one grid per sample
        (row ``b`` for sample ``b`` of the batch), each row monotone in the same direction
        (repeated values, e.g. padding, are allowed); with the default ``batch_control="shared"``
        all rows start at the same initial time, with ``"per_sample"`` each at its own. Output times never shorten steps: values come from the method's dense output.
    solver : str or ButcherTableau, default "dopri5"
        Method name (see :mod:`neuralode.solvers`) or a custom tableau.
    controller : Controller, optional
        :class:`PIController` (default for adaptive solvers), :class:`ConstantStep` or
        :class:`StepToGrid`.
    rtol, atol : float, optional
        Shortcut for ``controller=PIController(rtol=rtol, atol=atol)`` (defaults 1e-6, 1e-8).
    dt : float, optional
        Shortcut for ``controller=ConstantStep(dt)``.
    gradient : str or gradient method, default "direct"
        ``"direct"``, ``"backsolve"`` (alias ``"adjoint"``), ``"checkpoint"``, ``"reversible"`` or
        an instance of :class:`Direct`, :class:`Backsolve`, :class:`Checkpointed`,
        :class:`Reversible` (which solves with the reversible version of the method).
    max_steps : int, optional
        Limit on step attempts (accepted + rejected) over the whole solve. Default: none.
    dense_output : bool, optional
        Keep the continuous extension for :meth:`Solution.evaluate`. Default: True with
        ``gradient="direct"``, False otherwise (it costs memory proportional to the steps).
    throw : bool, default True
        On failure raise a :class:`~neuralode.SolveError`; with False return the partial solution
        (outputs past the failure are NaN) with ``status`` and ``t_final`` set.
    time_dtype : torch.dtype, optional
        Dtype of the time tensor passed to func (torch.float32 or torch.float64). Default:
        float64 under ``batch_control="shared"`` (a 0-d tensor, which does not change the dtype
        of ``t * y``); under ``"per_sample"`` (``t`` of shape ``(A,)``) the state's precision,
        float64 for a float64 (or complex128) state and float32 otherwise, so that
        ``t[:, None] * y`` keeps y's dtype and the same func runs under both. Step control
        always runs in double precision.
    event : Event, optional
        An event function to locate (terminal, per-sample, non-terminal, with resets); see
        :class:`neuralode.Event`. The Solution then has ``event_t`` and ``event_y``.
    batch_control : {"shared", "per_sample"}, default "shared"
        ``"shared"``: one step size and accept/reject decision for the whole state (the error
        norm is taken over the whole batch). ``"per_sample"``: every sample of the batch (the
        leading dimension ``B`` that all components of ``y0`` share) has its own time, step size,
        error norm (RMS over that sample's components), PI control, initial step and
        accept/reject, so its result does not depend on the rest of the batch; samples that
        have finished stop costing evaluations. Then ``func`` is called as ``func(t, y)`` with
        ``t`` of shape ``(A,)`` (each row's own time, ``time_dtype``) and ``y`` holding only the
        ``A`` rows still being integrated (a time-independent func is unaffected; a
        time-dependent one must broadcast ``t`` against the batch, e.g. ``t[:, None]``). ``t``
        may be 1-D (shared output times) or 2-D ``(B, T)`` with rows starting at different times
        and running in either direction; ``max_steps`` counts each sample's attempts. Works with
        every explicit Runge--Kutta tableau and controller (``step_t``/``jump_t`` per sample;
        ``ConstantStep`` on each sample's own grid ``t0_b + k dt``; ``PIController(norm=...)``
        measures each sample's scaled error, batch dimension 1, as the shared driver would for
        that sample alone, vectorised by ``torch.func.vmap``) and every gradient method
        (``"checkpoint"`` replays the per-sample iterations: equal to Direct to rounding,
        ``max_checkpoints`` bounding the iterations whose states are kept;
        ``"backsolve"`` solves the adjoint per sample backward, its parameter integral left out
        of the error norm; ``Backsolve(dt=...)`` steps it by ``dt``), gradients with respect to
        a 1-D or 2-D ``t``, and events (each sample locates its own; the event function is
        called like ``func`` and returns ``(A,)``; see :class:`neuralode.Event`). Stiff
        methods run per sample too: ``"rodas4"`` and the adaptive diagonally implicit
        ``"kvaerno5"``/``"trbdf2"`` (``"direct"``; ``"checkpoint"`` for ``"rodas4"``; a
        backsolve whose backward solver is explicit, ``Backsolve(solver="dopri5")``), with one
        ``M x M`` Jacobian block, factorisation and Newton iteration per sample
        (``neuralode.solvers.implicit.rows``: the same steps as each sample solved alone).
        With ``compile=True``: explicit Runge--Kutta methods, Direct gradients (also w.r.t.
        ``t``), Checkpointed and Backsolve (the forward compiled, see ``compile``). Raises ValueError for fully implicit, matrix-free, fixed-step Newton and Adams
        methods, and ``Backsolve(norm=...)``.
        ``Solution.t_final`` and ``stats["n_accepted"]``/``["n_rejected"]`` are then ``(B,)``
        tensors, and ``stats`` adds ``sample_evals`` (rows passed to func),
        ``wasted_sample_evals`` (rows of samples that had already finished, kept below 1/16 of
        every evaluation by compacting the batch) and ``wasted_share``.
    compile : bool, default False
        Run the solve in compiled chunks of steps (:mod:`neuralode._compiled`): one masked
        per-row step -- the stages with ``func`` inlined, the error norm, accept/reject, the
        step-size controller with its landings and the outputs at the output times -- unrolled
        over 8 steps and compiled by ``torch.compile`` (Inductor, C++ wrapper) into one call; the
        host reads the state of the solve back once per 8 steps. This removes PyTorch's
        per-operation dispatch cost, which dominates small states and cheap vector fields
        (Lorenz: about 5 us per evaluation of f against about 40 us eagerly and 7 us for scipy's
        ``solve_ivp``). The same compiled step serves shared control (one row: the whole batch)
        and ``batch_control="per_sample"`` (one row per sample: each its own time, step size,
        error norm, accept/reject and output times; every row is evaluated in every call, a
        finished one with a step of length zero, so there is no compaction), a 1-D or 2-D
        ``t``, ``step_t``/``jump_t``, fixed steps (``ConstantStep``, ``StepToGrid``), tensor,
        tuple and dict states, and dense output: with ``dense_output=True`` (default False under
        ``compile=True``: it costs memory per step) every accepted step's times, state and
        stages are recorded inside the chunks and :meth:`Solution.evaluate` works as eagerly.
        The first solve with a given func, dtype and shape compiles for 20-40 s on 2 CPU cores
        (``torch.compile``'s on-disk cache shortens later processes to seconds); with fixed steps
        the second solve compiles its first call once more (it then evaluates f at the start
        inside the call, not eagerly). ``func`` must be traceable by ``torch.compile``
        without graph breaks. Under autograd
        (``gradient="direct"``) gradients flow through the compiled chunks (torch.compile
        compiles their backward too; a solve under grad mode compiles once more than one under
        ``torch.no_grad()``), and gradients with respect to a 1-D ``t`` work as eagerly. With
        ``gradient="checkpoint"`` (shared control without ``max_checkpoints``; per-sample
        control with or without) the forward runs in compiled chunks that record a checkpoint
        per step, and the backward pass replays the steps eagerly from them (per sample: the
        eager per-sample replay); with ``gradient="backsolve"`` the forward and the adjoint
        solve backward run in compiled chunks (the augmented field's vector-Jacobian products
        traced with ``torch.func.vjp``; the adjoint's jumps at the output times made inside
        the chunks, ``outputs="stop"``, which ``"auto"`` then chooses), when the backward
        method is explicit Runge--Kutta without a custom norm and, with shared control, func
        is an ``nn.Module`` whose parameters are the gradient's ``params``, per sample, the
        backward controller adaptive (else the backward solve runs eagerly;
        ``stats["compiled_backward"]`` says which ran). A custom ``PIController(norm=...)``
        is traced into the compiled step (the same norm as eagerly: shared control the whole
        batch's scaled error, per sample each sample's alone through ``torch.func.vmap``; it
        must be traceable). Reversible, events and implicit/Adams methods raise ValueError.
        Results agree with the eager engine to the tolerance: the error estimate is summed in
        another order (its last bits, and so the step sizes, differ relatively by about 1e-10;
        the accepted/rejected counts are normally the same), a step never passes more than 8
        output times (32 per sample with per-sample control, 4096 with a 2-D ``t``: it lands
        on the last of them), and with dopri8, whose continuous extension needs
        three more stages, steps land on every output time instead of interpolating. Methods
        without FSAL (dopri8, fehlberg2, adaptive_heun) also evaluate f at the end of rejected
        attempts, so their NFE is a little higher than the eager engine's; with ``jump_t`` every
        attempt evaluates f once more (f at the right limit past a jump, computed in every
        step and used where one was crossed). A compiled version serves one func object (pass
        the same one at every solve: a new function or module object compiles again), dtype, state shape, number of output times and landing times (another
        number compiles again). ``stats`` holds what the eager driver's holds plus
        ``compiled``, which is False when the solve ran on the eager engine instead: when there
        was nothing to integrate (one output time), or when func no longer matches the code
        compiled for it (a Python number it reads changed, e.g. ``self.k = 1.7``; a
        RuntimeWarning says so; keep such values in tensors). A func that torch.compile cannot
        trace raises RuntimeError.
    integral : callable, optional
        A running cost ``g(t, y) -> Tensor`` (any shape, y0's dtype; called like ``func``).
        ``int_{t0}^{t_j} g(t, y(t)) dt`` is computed alongside the state and returned as
        ``Solution.integral`` with shape ``(T, *g's output shape)``. It is integrated as one more
        component of the state (:mod:`neuralode._integral`), so it works with every gradient
        method, per-sample grids and control (g must then return one row per sample, ``(B,
        ...)``), whole-state events (``Solution.event_integral``) and dense output
        (:meth:`Solution.evaluate_integral`), and ``compile=True`` (the augmented state is a
        tuple state; g must then be traceable too). g is evaluated once more at ``(t0, y0)`` to
        learn its shape.
    integral_in_error_norm : bool, default True
        Whether the integral's local error enters step-size control (as another component of
        the mixed norm, with the state's tolerances). False leaves it out (steps are those of
        the solve without the integral; its error is then not controlled).

    Returns
    -------
    Solution
        ``ys`` with shape ``(T, *y0.shape)`` per component (for a 2-D ``t``: ``(T, B, ...)``),
        dense output, statistics (``nfe``, ``n_accepted``, ``n_rejected``) and status.

    Raises
    ------
    TypeError, ValueError
        For invalid inputs (each message names the argument and the fix).
    StepSizeUnderflowError, MaxStepsError, NonFiniteError
        When the solve fails and ``throw=True``; the message gives t, the step count, the step
        size and what to try.

    Notes
    -----
    Gradients w.r.t. a 1-D ``t`` use ``dL/dt_j = <dL/dy(t_j), f(t_j, y(t_j))>`` for output times
    after the first and ``dL/dt_0 = -<dL/dy0, f(t_0, y0)>`` (the continuous derivatives; one
    extra evaluation of f per output time when ``t.requires_grad``).

    Examples
    --------
    >>> import torch, neuralode
    >>> sol = neuralode.solve(lambda t, y: -y, torch.tensor([1.0]), torch.linspace(0, 1, 5))
    >>> round(float(sol.ys[-1]), 6)
    0.367879
    """
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}")
    _check_arguments(y0, max_steps, dense_output, throw, integral_in_error_norm)
    if time_dtype is None:  # see the docstring: func's t never changes the dtype of its result
        wide = {real_dtype(c.dtype) for c in leaves(y0) if isinstance(c, torch.Tensor)}
        narrow = batch_control == "per_sample" and torch.float64 not in wide
        time_dtype = torch.float32 if narrow else torch.float64
    if integral is not None:  # integral= is one more state component: see _integral.py
        from ._integral import solve_with_integral

        kw = dict(solver=solver, controller=controller, rtol=rtol, atol=atol, dt=dt)
        kw.update(gradient=gradient, max_steps=max_steps, dense_output=dense_output, throw=throw)
        kw.update(time_dtype=time_dtype, event=event, batch_control=batch_control)
        kw.update(compile=compile, _monitor=_monitor)
        return solve_with_integral(solve, func, y0, t, integral, integral_in_error_norm, kw)
    tab = get_tableau(solver)
    grad_method = get_gradient(gradient)
    _check_replay(tab, grad_method)
    if time_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"time_dtype must be torch.float32 or torch.float64, got {time_dtype}")

    t_tensor = t if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=torch.float64)
    if batch_control not in ("shared", "per_sample"):
        raise ValueError(f"batch_control must be 'shared' or 'per_sample', got {batch_control!r}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {compile!r}")
    if compile:
        if event is not None:
            raise ValueError(
                "compile=True does not support event=...; use compile=False (the eager engine "
                "supports it)"
            )
        from ._compiled import check_compilable

        # Direct: autograd through the compiled chunks; Checkpointed and Backsolve: the forward
        # compiled, keeping its step records; the replay eager, the adjoint solve compiled with
        # shared control (per sample: eager, gradients/rows.py).
        ok = capable(grad_method, "exact_autograd") or capable(grad_method, "compiled_forward")
        check_compilable(
            tab=tab,
            ctrl=resolve_controller(tab, controller, rtol, atol, dt),
            gradient=None if ok else type(grad_method).__name__,
        )
        if getattr(grad_method, "max_checkpoints", None) is not None and batch_control == "shared":
            raise ValueError(
                "compile=True with batch_control='shared' keeps a checkpoint at every step: "
                "Checkpointed(max_checkpoints=...) is not supported with it; use Checkpointed(), "
                "compile=False or batch_control='per_sample'"
            )
    if getattr(controller, "force_dt_min", False) and (compile or batch_control == "per_sample"):
        raise ValueError(
            "PIController(force_dt_min=True) is supported by the default driver only; use "
            "compile=False and batch_control='shared', or force_dt_min=False"
        )
    if batch_control == "per_sample":  # its own loop, in _loop_batched (opt-in)
        from ._loop_batched import solve_per_sample

        return solve_per_sample(
            func,
            y0,
            t_tensor,
            tab=tab,
            controller=controller,
            rtol=rtol,
            atol=atol,
            dt=dt,
            gradient=grad_method,
            max_steps=max_steps,
            dense_output=dense_output,
            throw=throw,
            time_dtype=time_dtype,
            event=event,
            compile=compile,
        )
    if event is not None:
        from .events import Event, solve_with_event

        if not isinstance(event, Event):
            raise TypeError(f"event must be a neuralode.Event, got {type(event).__name__}")
        kwargs = dict(
            solver=solver,
            controller=controller,
            rtol=rtol,
            atol=atol,
            dt=dt,
            gradient=gradient,
            max_steps=max_steps,
            dense_output=dense_output,
            throw=throw,
            time_dtype=time_dtype,
        )
        return solve_with_event(solve, func, y0, t_tensor, event, kwargs)
    per_sample, t0, t_end, out_t, out_sample, out_order = _check_times(t_tensor, y0)
    spec, y0flat = flatten_state(y0, batched=per_sample)
    ctrl = resolve_controller(tab, controller, rtol, atol, dt)
    ctrl.check_span(min(t0, t_end), max(t0, t_end))
    rtol_, atol_, floor = tolerances(spec, ctrl, 0.0)
    prob = Problem(
        spec=spec,
        tableau=tab,
        controller=ctrl,
        t0=t0,
        t_end=t_end,
        out_t=out_t,
        out_sample=out_sample,
        out_order=None if out_order is None else torch.as_tensor(out_order, device=spec.device),
        n_out_rows=len(out_t),
        max_steps=max_steps,
        rtol=rtol_,
        atol=atol_,
        norm=ctrl.norm,
        atol_zero=floor,
    )
    dense = default_dense(dense_output, grad_method, compile)
    samples_all = prob.samples_on(spec.device)
    # (_stats: the dict to fill; non-terminal events gather its backward counters)
    stats = {} if _stats is None else _stats
    run = Run(prob, func, time_dtype, throw, dense, samples_all, stats=stats)
    if _monitor is not None:
        run.extra["monitor"] = _monitor

    t_grad = wants_t_grad(t)
    if t_grad and per_sample:
        raise ValueError(
            "gradients with respect to a 2-D (per-sample) t are not supported with "
            "batch_control='shared'; use batch_control='per_sample' (which supports them), pass "
            "t.detach(), or solve with a shared 1-D t"
        )
    y_start = y0flat
    f0 = None
    if t_grad:
        f0 = VectorField(func, spec, time_dtype)(t0, y0flat)
        y_start = y0flat - (t[0] - t[0].detach()).to(real_dtype(spec.dtype)) * f0
    if compile and capable(grad_method, "exact_autograd"):
        ys = _run_compiled(run, y_start, t_grad)
    else:
        run.extra["compile"] = compile  # (Checkpointed: its forward in compiled chunks)
        ys = grad_method.run(run, y_start)
    res = run.result
    if t_grad:
        fv = VectorField(func, spec, time_dtype)
        # Output 0 is y0 itself, which does not move with t0: undo the shift applied to y0.
        corr = [(t[0] - t[0].detach()).to(real_dtype(spec.dtype)) * f0]
        for j in range(1, len(out_t)):
            y_j = ys[j].reshape(y0flat.shape)
            corr.append((t[j] - t[j].detach()).to(real_dtype(spec.dtype)) * fv(out_t[j], y_j))
        ys = ys + torch.stack(corr).reshape(ys.shape)
        run.stats["nfe_t_gradient"] = fv.nfe + 1
    dense_obj = None
    if dense:
        dense_obj = DenseOutput(
            res.steps, run.stepper, run.f, spec, prob.direction, t0, res.t_reached, res.y_final
        )
    direct = capable(grad_method, "exact_autograd")
    return solution(
        t_tensor, spec, ys, run, direct, run.stats, run.stepper, res.n_accepted, res.n_rejected,
        res.status, res.t_reached, res.message, dense_obj, per_sample,
    )  # fmt: skip


def _check_arguments(y0, max_steps, dense_output, throw, integral_in_error_norm) -> None:
    """The checks of solve's arguments that do not depend on the driver, made before either
    driver sees them (so both raise the same exception): the state's components are tensors,
    flags are bools (``"no"`` is not False), ``max_steps`` a positive int (not a bool)."""
    if isinstance(y0, (tuple, list, Mapping)):
        items = y0.items() if isinstance(y0, Mapping) else enumerate(y0)
        for k, x in items:
            if not isinstance(x, torch.Tensor):
                raise TypeError(
                    f"y0[{k!r}] is {type(x).__name__}, expected a tensor: y0 is a tensor or a "
                    "tuple/list/dict of tensors (one per state component); for numbers pass "
                    "torch.tensor(y0, dtype=torch.float64)"
                )
    elif not isinstance(y0, torch.Tensor):
        raise TypeError(
            f"y0 must be a tensor or a tuple/dict of tensors, got {type(y0).__name__}; wrap "
            "numbers with torch.tensor(y0, dtype=torch.float64)"
        )
    for name, v, optional in (
        ("dense_output", dense_output, True),
        ("throw", throw, False),
        ("integral_in_error_norm", integral_in_error_norm, False),
    ):
        if not (isinstance(v, bool) or (optional and v is None)):
            none = " or None" if optional else ""
            raise TypeError(f"{name} must be a bool{none}, got {v!r}")
    if max_steps is not None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral):
            raise TypeError(
                f"max_steps must be a positive integer or None, got {max_steps!r} "
                f"({type(max_steps).__name__})"
            )
        if max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer or None, got {max_steps!r}")


def _check_replay(tab, gradient) -> None:
    """A gradient method whose backward pass recomputes single steps needs a method that can
    take one out of context (a multistep method's step depends on its history)."""
    if capable(gradient, "replays_steps") and not getattr(tab, "single_step_replay", True):
        name = getattr(tab, "name", type(tab).__name__)
        raise ValueError(
            f"gradient={type(gradient).__name__}(...) recomputes single steps in its backward pass, which solver "
            f"{name!r} cannot (a multistep method's step depends on the history of earlier "
            "steps); use gradient='direct', or 'backsolve' (Backsolve(outputs='auto' or "
            "'stop'): it stops at every output instead)"
        )


def wants_t_grad(t) -> bool:
    """Whether gradients with respect to the output times are asked for."""
    return isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled()


def default_dense(dense_output: bool | None, gradient, compile: bool) -> bool:
    """Whether to keep the dense output: as asked, else with Direct gradients on the eager
    engine (compiled stepping records steps only when asked: it is the fast path)."""
    if dense_output is not None:
        return bool(dense_output)
    return capable(gradient, "exact_autograd") and not compile


def solution(
    t, spec, ys, run, direct: bool, stats: dict, stepper, n_acc, n_rej, status: str, t_final,
    message: str, dense, per_sample: bool,
) -> Solution:  # fmt: skip
    """Both drivers' wrap-up: the step counters (and the stepper's, e.g. Jacobians and Newton
    iterations of implicit methods) into ``stats``, the outputs flat ``(T*rows, M)`` back in the
    state's structure, and the :class:`Solution`."""
    stats.update(n_accepted=n_acc, n_rejected=n_rej, n_steps=n_acc)
    if stepper is not None and stepper.stats:
        stats.update(stepper.stats)
    # (custom gradients: each leaf its own node holding the run; see structured_outputs)
    ys_struct = structured_outputs(spec, ys, (t.shape[-1],), None if direct else run)
    return Solution(
        t=t, ys=ys_struct, stats=stats, status=status, t_final=t_final, message=message,
        _dense=dense, _per_sample=per_sample, _detached=not direct,
    )  # fmt: skip


def _run_compiled(run: Run, y0flat, t_grad: bool):
    """``solve(..., compile=True)`` in place of ``grad_method.run`` (Direct gradients): the
    forward solve in compiled chunks of steps (or eagerly, with a warning, when func's compiled
    code no longer matches it). Fills ``run.result``, ``run.f``, ``run.stepper`` and ``stats``
    like the gradient methods."""
    from ._compiled import CompiledCodeMismatch, integrate_compiled, warn_mismatch
    from .gradients._common import find_params

    prob, func = run.prob, run.func
    needs_grad = torch.is_grad_enabled() and (
        t_grad
        or y0flat.requires_grad
        or any(p.requires_grad for p in find_params(func, None, "params"))
        # A tensor requiring grad that func closes over shows in its output.
        or run.vector_field()(prob.t0, y0flat).requires_grad
    )
    if run.dense:
        run.stepper = run.new_stepper(y0flat)
    f = run.vector_field()
    res = None
    rec = "dense" if run.dense else None
    if prob.t_end != prob.t0:  # (a single output time: nothing to integrate, nor to compile)
        try:
            res = integrate_compiled(
                prob, f, y0flat, throw=run.throw, track_grad=needs_grad, record=rec
            )
        except CompiledCodeMismatch as why:
            warn_mismatch(why, stacklevel=4)
            res, f = None, run.vector_field()
    run.stats["compiled"] = res is not None
    if res is None:
        res = integrate(
            prob, f, y0flat, track_grad=needs_grad, throw=run.throw, record=rec,
            stepper=run.stepper,
        )  # fmt: skip
    run.result, run.f = res, f
    run.stats["nfe"] = f.nfe
    return res.ys


def host_times(t: torch.Tensor) -> list[float] | torch.Tensor:
    """Validate ``t`` (a real dtype, 1-D ``(T,)`` or 2-D ``(B, T)`` with ``T >= 1``, finite, a
    1-D ``t`` strictly monotone) and return it on the host: a list of floats (1-D) or a float64
    CPU tensor (2-D). Both drivers' one check of ``t``."""
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"t must be a real tensor of times, got dtype {t.dtype}")
    if t.dim() not in (1, 2) or t.numel() == 0:
        empty = "t is empty; pass at least the initial time: " if t.numel() == 0 else ""
        raise ValueError(
            f"{empty}t must be 1-D (T,) or 2-D (batch, T) with T >= 1, got shape {tuple(t.shape)}"
        )
    if t.dim() == 1 and t.numel() <= 1024:
        # The common case in plain Python: one copy to the host, no small tensor operations.
        out_t = t.detach().to("cpu", torch.float64).tolist()
        finite = all(map(math.isfinite, out_t))
        pairs = list(zip(out_t, out_t[1:]))
        monotone = all(a < b for a, b in pairs) or all(a > b for a, b in pairs)
    else:
        tl = t.detach().to("cpu", torch.float64)
        finite = bool(torch.isfinite(tl).all())
        out_t = tl.tolist() if t.dim() == 1 else tl
        d = tl[1:] - tl[:-1]
        monotone = t.dim() == 2 or bool((d > 0).all()) or bool((d < 0).all())
    if not finite:
        raise ValueError(f"t contains NaN or infinite values: {_shown(t)}")
    if not monotone:
        raise ValueError(
            f"a 1-D t must be strictly increasing or strictly decreasing; got {_shown(t)}"
        )
    return out_t


def _shown(t: torch.Tensor) -> str:
    v = t.detach().reshape(-1)[:11].tolist()
    return str(v) if len(v) <= 10 else str(v[:10]) + "..."


def check_batch(t: torch.Tensor, B: int | None) -> None:
    """A 2-D ``t`` has one row per sample of the batch ``B`` (None: no batch dimension)."""
    if B is not None and t.shape[0] != B:
        raise ValueError(
            f"t has shape {tuple(t.shape)} (batch, T) but y0's batch dimension is {B}; a 2-D t "
            "needs one row of output times per sample of y0"
        )


def _check_times(t: torch.Tensor, y0):
    """Validate ``t`` and lay out the output plan (sorted times, samples, result order)."""
    tl = host_times(t)
    if isinstance(tl, list):
        return False, tl[0], tl[-1], tl, None, None
    B, T = tl.shape
    check_batch(tl, leading_batch(y0))
    if not bool((tl[:, 0] == tl[0, 0]).all()):
        raise ValueError(
            "every row of a 2-D t must start at the same initial time (the batch is integrated "
            f"together from t[:, 0]); got starts {tl[:, 0].tolist()[:8]}. For an autonomous "
            "vector field shift each row to start at 0; otherwise pass batch_control='per_sample' "
            "(each sample integrated from its own t[b, 0]) or solve the groups separately"
        )
    d = tl[:, 1:] - tl[:, :-1]
    inc, dec = bool((d >= 0).all()), bool((d <= 0).all())
    if not (inc or dec):
        raise ValueError("each row of a 2-D t must be monotone, all in the same direction")
    direction = 1.0 if inc else -1.0
    if inc and dec:  # every row constant
        direction = 1.0
    flat = tl.T.reshape(-1)  # time-major: position j * B + b
    samples = torch.arange(B).repeat(T)
    order = torch.sort(direction * flat, stable=True).indices
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel())
    out_t = flat[order].tolist()
    t_end = out_t[-1]
    return True, float(tl[0, 0]), t_end, out_t, samples[order].tolist(), inv


def leaves(y0) -> list:
    """The components of a tensor, tuple/list or dict state (anything else: itself)."""
    if isinstance(y0, Mapping):
        return list(y0.values())
    return list(y0) if isinstance(y0, (tuple, list)) else [y0]


def leading_batch(y0) -> int | None:
    """The leading (batch) dimension of the state's first component, or None."""
    c = (leaves(y0) or [None])[0]
    return c.shape[0] if isinstance(c, torch.Tensor) and c.dim() else None
