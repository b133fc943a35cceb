"""The backsolve adjoint method: constant memory in the number of steps.

Its settings (:class:`Backsolve`) and the autograd Function around the forward solve; the
backward solve itself is :mod:`neuralode.gradients._adjoint_backward`."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..solvers import get_tableau
from ._adjoint_backward import backward_solve, backward_start, state_at
from ._common import (
    ParamCheck,
    Run,
    check_params_rows,
    find_params,
    forward_without_graph,
    held_run,
    hold_run,
)

__all__ = ["Backsolve"]


@dataclass(frozen=True)
class Backsolve:
    """Adjoint sensitivity method with the state recomputed backward in time.

    The forward solve keeps no graph; it stores its step times (floats), a copy of its outputs
    and the states at the starts of the steps with outputs inside them. The backward pass
    integrates the augmented system ``(y, a, g)`` from the final time to the initial one::

        dy/dt = f(t, y),   da/dt = -a^T df/dy,   dg/dt = -a^T df/dtheta

    where ``a(t) = dL/dy(t)`` is the adjoint state and ``g`` accumulates ``dL/dtheta``. Outputs
    at intermediate times make ``a`` jump; the backward solve never restarts step-size control
    (no new initial step selection at an output). When outputs inside forward steps are many
    (more than the forward steps; ``outputs="replay"``) it stops only at the boundaries of
    forward steps that hold outputs and adds their contribution through the forward step's own
    continuous extension (replaying that one step with autograd), so its cost does not grow
    with the number of output times. When they are few (``outputs="stop"``) it stops at each
    output time and the adjoint jumps there, which follows the continuous problem more closely.

    Wherever the adjoint jumps (an output time; the start of a forward step replayed) the
    backward solve puts y back to the forward solve's own value there (the outputs, a private
    copy kept for the backward pass; for a replayed step the state at its start, which the
    forward solve keeps for the steps holding outputs inside: memory bounded by the outputs),
    as each backward solve of Chen et al. (2018, Algorithm 1) starts from the forward's state
    and as torchdiffeq's ``odeint_adjoint`` restarts from its outputs. Solving y backward is
    unstable on contracting dynamics (an error grows like ``exp(lam * span)`` for a decay rate
    ``lam``): a y carried back over the whole span leaves the trajectory by orders of
    magnitude, and the gradient with it (Prothero-Robinson ``lam = 50``, outputs at 0.5, 1
    and 2, loss ``y(0.5)``: ``dL/dlam`` was -1.8e+23 against -6.9e-12). The first augmented
    stage after a put-back evaluates f at the forward's y: one evaluation of f more per stop
    than carrying y on. Between the stops y still drifts: ``Solution.stats["backsolve_drift"]``
    records the largest distance put back, in units of the forward tolerance
    (``|y - y_fwd| / (atol + rtol |y_fwd|)``; eager backward solves after an adaptive
    forward). Without a running cost that drift is harmless (the adjoint decays where it
    grows); a running cost (``integral=``) is evaluated
    on the drifted state, so above 1e4 a ``RuntimeWarning`` says so (contracting rate 50,
    outputs 0.8 apart: drift 6e22, gradient 1e15 relative off; outputs 0.1 apart: drift 99,
    gradient 1e-6): add output times there, or use :class:`Checkpointed`.

    The gradient approximates the gradient of the *continuous* problem to the adjoint
    tolerances; it is not the exact gradient of the discrete forward solve (use
    :class:`Direct` or :class:`Checkpointed` for that). Example: fixed-step Euler, ``y' = a y``,
    ``a = -0.8``, one step ``h = 1``: Direct gives ``dy(1)/da = 1.0`` (the discrete map
    ``(1 + a) y0``); Backsolve integrates the adjoint with the same single Euler step backward
    and gives an approximation of the continuous value ``exp(-0.8) = 0.449``.

    Parameters
    ----------
    rtol, atol : float, optional
        Tolerances of the backward solve (default: the forward ones).
    solver : str or ButcherTableau, optional
        Method of the backward solve (default: the forward one).
    seminorm : bool, default False
        Leave the parameter integral out of the error norm (Kidger, Chen & Lyons 2021): it is
        never fed back into the dynamics, so its error need not shorten steps. Typically saves
        40% or more of the backward evaluations.
    params : sequence of Tensor, optional
        Tensors to differentiate besides y0. Default: the parameters of ``func`` when it is an
        ``nn.Module`` (or a bound method of one); none for a plain function or lambda. A
        UserWarning is given, during the forward solve and under either ``batch_control``,
        when func uses a tensor requiring grad that is not among them (a closure's captured
        tensor, a module attribute that is not a parameter): its gradient is not computed
        (``None``/unchanged). Found from func's graph on its first evaluations (no extra
        evaluation in the shared solve; one or two under ``"per_sample"``); a tensor that
        func creates afresh on every call is not reported.
    max_steps : int, optional
        Step limit of the backward solve.
    norm : callable, optional
        ``norm(scaled_error) -> 0-d tensor`` for the backward solve's error control, given the
        scaled error of the augmented state as a tuple ``(y, adj_y, adj_param_1, ...)`` of flat
        tensors (the parameters' adjoints in the order of ``params``). Replaces the default
        (the maximum over components of each component's RMS) and ``seminorm``. Not available
        under ``batch_control="per_sample"`` (ValueError).
    dt : float, optional
        Fixed step size of the backward solve (with a fixed-step ``solver``); default: the
        forward's steps. Under ``batch_control="per_sample"``: steps of ``dt`` for each sample
        backward from its final time, landing on its stops (output times, or the starts of
        forward steps replayed).
    outputs : {"auto", "replay", "stop"}, default "auto"
        How outputs strictly inside forward steps enter the adjoint. ``"replay"``: the backward
        solve stops only at forward step boundaries and adds them by differentiating the
        forward step's continuous extension (cost independent of the number of outputs; the
        gradient of those outputs is that of the discrete extension, as accurate as the forward
        step). ``"stop"``: the backward solve stops at every output time and the adjoint jumps
        there (one more backward step per output; the gradient follows the continuous problem,
        2-4x more accurate at moderate tolerances in ``benchmarks/gradients.py``). ``"auto"``:
        ``"stop"`` when such outputs are no more than the forward steps, else ``"replay"``;
        always ``"stop"`` with ``compile=True`` (the adjoint's jumps are then made inside the
        compiled backward solve, while replays run eagerly).
        ``Solution.stats["backsolve_outputs"]`` records the choice (after the backward pass).
        Under ``batch_control="per_sample"`` the choice is made for each sample, on its own
        forward steps and outputs (``"auto"``: ``"replay"`` when its inner outputs outnumber
        2.5 times the forward steps holding them), in one continuous backward solve per sample
        that lands on its stops without restarting step-size control (``"mixed"`` in the
        stats when samples differ); failed samples (``throw=False``) stop at their outputs,
        and ``"replay"`` needs an explicit Runge-Kutta forward method (ValueError otherwise;
        ``"auto"`` then stops at every output). Damped oscillator, batch 2, dopri5 at rtol
        1e-6, ``t`` in [0, 10]: per-sample backward NFE 483 / 493 / 801 / 976 at ``len(t)`` =
        2 / 10 / 100 / 400, shared 475 / 759 / 982 / 1,084 (``benchmarks/backsolve_outputs.py``;
        per sample, restarted at every output before: 481 / 556 / 1,598 / 6,391; shared, before
        y was put back at the stops: 475 / 751 / 931 / 1,033).
    errors : callable, optional
        A context-manager factory (``errors() -> context manager``) the backward solve runs
        inside, e.g. to re-raise its failures as other exception types; the torchdiffeq face
        passes one that raises torchdiffeq's ``AssertionError``, as in the forward solve.
        Default: failures raise neuralode's :class:`~neuralode.SolveError` subclasses.

    Notes
    -----
    With ``solve(..., compile=True)`` (shared control) the forward solve and the backward solve
    run in compiled chunks (``neuralode._compiled_adjoint``): the augmented field's
    vector-Jacobian products are traced by ``torch.func.vjp``, which needs func to be an
    ``nn.Module`` (or its bound ``forward``) and ``params`` among its parameters (a custom
    ``norm`` is traced into the compiled step: it must be traceable); otherwise, and for an
    implicit backward ``solver``, the backward solve runs eagerly. ``Solution.stats["compiled_backward"]`` records which ran. The compiled backward
    solve with ``outputs="stop"`` chooses its own steps between the outputs (it does not stop
    at every forward step boundary), so its gradient agrees with the eager one to the
    tolerance, not to rounding. Per sample the backward solve is compiled for any traceable
    func when it stops at every output (``"stop"``, ``"auto"``; adaptive backward control:
    ``neuralode._compiled_rows_adjoint``); ``"replay"`` replays eagerly.

    Gradients of gradients (``create_graph=True``) are not supported and raise a RuntimeError;
    use :class:`Checkpointed` or :class:`Direct` for those.

    A solve that stopped early (``throw=False``: a blow-up, the step limit) is differentiated
    through the outputs it reached: the backward solve starts at the last of them (the
    outputs after it are NaN constants without a gradient, as under :class:`Direct`), never in
    the region where the forward solve failed. With a multistep forward method (Adams),
    ``outputs="auto"`` stops at every output (a step cannot be replayed out of its history)
    and ``outputs="replay"`` is refused by the solve.

    With a fixed-step (non-adaptive) controller and no ``dt``, the backward solve under
    ``batch_control="shared"`` retraces the forward's step times exactly (a step-to-grid
    controller over them). Under ``batch_control="per_sample"`` it runs the forward's
    controller itself backward from each sample's final time, so ``propose(t, h, t0, ...)``
    receives that final time as ``t0``: a grid anchored at ``t0`` (e.g. a geometric grid
    ``t0 + h0 (q^k - 1) / (q - 1)``) is then laid from the end, and the backward steps differ
    from the forward's (a different discretisation of the adjoint: its gradient error is that
    of the backward grid). :class:`~neuralode.controllers.ConstantStep` gives the same times
    either way.

    func must be deterministic: the backward pass evaluates it again (backwards in time, along the adjoint equations), so a
    random func (``nn.Dropout`` in training mode, noise drawn inside func) gives the gradient
    of different draws than the forward pass used, silently. Draw the randomness outside func
    (a fixed mask or noise tensor per solve), or use :class:`~neuralode.Direct`.

    References
    ----------
    Chen, Rubanova, Bettencourt, Duvenaud, "Neural Ordinary Differential Equations", NeurIPS 2018
    (adjoint method, augmented backward system; each backward solve starts from the forward's
    state). Pontryagin et al. 1962. Kidger, Chen, Lyons,
    "'Hey, that's not an ODE': Faster ODE Adjoints via Seminorms", ICML 2021.
    """

    rtol: float | None = None
    atol: float | None = None
    solver: object = None
    seminorm: bool = False
    params: tuple | None = None
    max_steps: int | None = None
    dt: float | None = None
    outputs: str = "auto"
    norm: object = field(default=None, compare=False)
    errors: object = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.outputs not in ("auto", "replay", "stop"):
            raise ValueError(
                f"Backsolve(outputs=...) must be 'auto', 'replay' or 'stop', got {self.outputs!r}"
            )
        if self.dt is not None and not (isinstance(self.dt, (int, float)) and self.dt > 0):
            raise ValueError(f"Backsolve(dt=...) must be a positive step size, got {self.dt!r}")
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"Backsolve({name}=...) must be a non-negative number, got {v!r}")
        if self.solver is not None:
            get_tableau(self.solver)
        if self.errors is not None and not callable(self.errors):
            raise TypeError(
                f"Backsolve(errors=...) must be a context-manager factory, got {self.errors!r}"
            )
        if self.norm is not None and not callable(self.norm):
            raise TypeError(f"Backsolve(norm=...) must be callable, got {self.norm!r}")
        if not isinstance(self.seminorm, bool):
            raise TypeError(f"Backsolve(seminorm=...) must be a bool, got {self.seminorm!r}")

    exact_autograd = False  # capabilities: a custom backward pass, with a per-sample version
    per_sample = True
    compiled_forward = True  # the forward may run in compiled chunks (compile=True)

    @property
    def replays_steps(self) -> bool:
        """Whether the backward pass must recompute single forward steps: with
        ``outputs="replay"`` only (``"auto"`` stops at every output instead when the forward
        method cannot replay a step on its own, e.g. Adams)."""
        return self.outputs == "replay"

    def run_rows(self, run, y0flat: torch.Tensor):
        """The per-sample solve (``batch_control="per_sample"``): the backward solve of
        ``(y, a)`` runs per sample on the per-sample driver; the parameter integral is left
        out of its error norm (as ``seminorm=True``); it lands on each sample's output
        times, or replays the forward steps holding them (``outputs=``), without restarting."""
        from .rows import backsolve_rows

        params = find_params(run.func, self.params, "Backsolve(params=...)")
        if torch.is_grad_enabled():
            check_params_rows(run, y0flat, params, "backsolve adjoint")
        return backsolve_rows(self, run, y0flat, params)

    def run(self, run: Run, y0flat: torch.Tensor):
        params = find_params(run.func, self.params, "Backsolve(params=...)")
        if torch.is_grad_enabled():
            # Seen on func's first evaluation in the forward solve and confirmed on the first
            # of the backward solve (see ParamCheck): no evaluation of f of its own.
            run.extra["param_check"] = ParamCheck(
                params,
                "backsolve adjoint",
                output_needs_grad=y0flat.requires_grad or bool(params),
            )
        return _BacksolveFn.apply(run, self, y0flat, *params)


class _BacksolveFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: Run, cfg: Backsolve, y0flat, *params):
        res = forward_without_graph(run, y0flat, "times", check=run.extra.get("param_check"))
        hold_run(ctx, run)  # weakly: the outputs' nodes hold it (see structured_outputs)
        ctx.cfg, ctx.params = cfg, params
        if hasattr(cfg.norm, "options"):  # torchdiffeq's grad_fn.adjoint_options
            ctx.adjoint_options = cfg.norm.options
        # Where the backward solve starts, and the state there (a private copy: the caller may
        # modify the returned outputs in place).
        ctx.t_start, y_start = backward_start(run, res)
        ctx.y_final = None if y_start is None else y_start.detach().clone()
        ctx.y0 = y0flat.detach().clone() if y_start is None else None
        ys, res.ys = res.ys, None  # (the run need not keep the outputs)
        ctx.ys = ys.detach().clone()  # the backward solve's y is put back to them (a copy, too)
        return ys

    @staticmethod
    def backward(ctx, g_ys):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "gradients of gradients (create_graph=True) are not supported by the backsolve "
                "adjoint; use gradient='checkpoint' (exact, bounded memory) or 'direct'"
            )
        run, cfg, params = held_run(ctx), ctx.cfg, list(ctx.params)
        with cfg.errors() if cfg.errors is not None else contextlib.nullcontext():
            y_start = ctx.y_final
            if y_start is None:  # (a partial solve with per-sample output grids)
                y_start = state_at(run, ctx.y0, ctx.t_start)
            grads = backward_solve(run, cfg, params, y_start, ctx.t_start, g_ys, ctx.ys)
        return (None, None, *grads)
