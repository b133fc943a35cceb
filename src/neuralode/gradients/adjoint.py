"""The backsolve adjoint method: constant memory in the number of steps."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch

from .._compiled_adjoint import compiled_backward
from .._loop import (
    FlatVectorField,
    Problem,
    VectorField,
    integrate,
    make_stepper,
    replay_step,
    sorted_outputs_grad,
)
from .._tree import flatten_state
from ..controllers import ConstantStep, PIController, StepToGrid
from ..controllers.step_size import time_beside, underflows
from ..errors import MaxStepsError
from ..solvers import get_tableau
from ._common import (
    ParamCheck,
    Run,
    check_params_rows,
    find_params,
    forward_without_graph,
    held_run,
    hold_run,
)
from .checkpoint import add_initial_outputs, n_initial_outputs

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
    than carrying y on.

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
    ``nn.Module`` (or its bound ``forward``) and ``params`` among its parameters; otherwise,
    and for a custom ``norm`` or an implicit backward ``solver``, the backward solve runs
    eagerly. ``Solution.stats["compiled_backward"]`` records which ran. The compiled backward
    solve with ``outputs="stop"`` chooses its own steps between the outputs (it does not stop
    at every forward step boundary), so its gradient agrees with the eager one to the
    tolerance, not to rounding.

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
    compiled_forward = True  # the forward may run in compiled chunks (compile=True, shared)

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
        ctx.t_start, y_start = _backward_start(run, res)
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
                y_start = _state_at(run, ctx.y0, ctx.t_start)
            grads = _backward(run, cfg, params, y_start, ctx.t_start, g_ys, ctx.ys)
        return (None, None, *grads)


def _backward_start(run: Run, res) -> tuple[float, torch.Tensor | None]:
    """``(t_start, y_start)``: where the backward solve starts, and the state there. After a
    solve that stopped early (``throw=False``) the adjoint is zero past the last output
    reached, so it starts at that output (not where the forward failed), from its value; with
    per-sample output grids (an output is one sample's row) None: see :func:`_state_at`."""
    prob, steps = run.prob, res.steps
    if res.status in ("success", "event"):
        return (steps[-1].t_new if steps else prob.t0), res.y_final
    n_reached = steps[-1].out_hi if steps else 0
    if n_reached <= n_initial_outputs(prob):  # no output past t0: nothing to integrate
        return prob.t0, res.y_final
    if prob.out_sample is not None:
        return prob.out_t[n_reached - 1], None
    y_out = res.ys[n_reached - 1].reshape(res.y_final.shape)  # (1-D t: sorted = result order)
    return prob.out_t[n_reached - 1], y_out


def _state_at(run: Run, y0flat: torch.Tensor, t_end: float) -> torch.Tensor:
    """The state at ``t_end`` (reached by the forward), solved for again without a graph."""
    prob = dataclasses.replace(
        run.prob,
        t_end=t_end,
        out_t=[],
        out_sample=None,
        out_order=None,
        n_out_rows=0,
        _out_t_dev=None,
    )
    with torch.no_grad():
        return integrate(prob, run.vector_field(), y0flat, track_grad=False).y_final


def _backward(run: Run, cfg: Backsolve, params, y_final, t_start: float, g_ys, ys):
    prob = run.prob
    spec = prob.spec
    B, M = y_final.shape
    dtype, device = y_final.dtype, y_final.device
    steps = run.result.steps
    direction = prob.direction
    samples = run.samples_all
    g_sorted = sorted_outputs_grad(prob, g_ys)
    out_t = prob.out_t
    # Where the adjoint jumps, the reconstructed y is put back to the forward's own value (its
    # outputs; the start of a replayed step): y solved backward drifts off the forward's
    # trajectory, exponentially fast on contracting dynamics (torchdiffeq restarts from the
    # forward's outputs likewise). Under a 2-D t an output sets its own sample's row only.
    ys_sorted = sorted_outputs_grad(prob, ys)

    def put_back(y, idx):
        if samples is None:
            return ys_sorted[idx[0]].reshape(-1)
        return y.view(B, M).index_copy(0, samples[idx], ys_sorted[idx].view(-1, M)).reshape(-1)

    # The backward solve stops where the adjoint jumps: at outputs exactly on a forward step
    # boundary, and at the start of each forward step holding outputs (added through that step's
    # own continuous extension). When it runs at the forward's tolerances it visits every forward
    # boundary and proposes each forward step as its backward step over the same interval (the
    # adjoint shares the forward's time scales), so the stops cost no extra steps; the error of
    # every backward step is still controlled. With looser adjoint tolerances it stops only where
    # the adjoint jumps and carries its step size across the stops.
    mode = cfg.outputs
    if mode == "auto":
        # Stopping at outputs inside steps costs about one backward step each; take it when
        # they are no more than the forward steps (the cost at most doubles, and the gradient
        # follows the continuous problem more closely), else replay (cost flat in outputs).
        n_inner = sum(
            sum(tau != rec.t_new for tau in out_t[rec.out_lo : rec.out_hi]) for rec in steps
        )
        # Compiled stepping (compile=True) stops at every output: its jumps are then made
        # inside the compiled chunks, while replays would run eagerly.
        # A multistep forward method cannot replay one step out of its history: stop.
        replayable = getattr(prob.tableau, "single_step_replay", True)
        few = n_inner <= len(steps)
        mode = "stop" if few or run.stats.get("compiled") or not replayable else "replay"
    run.stats["backsolve_outputs"] = mode
    actions: dict[float, list[tuple[str, int]]] = {}
    for k, rec in enumerate(steps):
        taus = out_t[rec.out_lo : rec.out_hi]
        if mode == "stop":  # a stop at every output time: the adjoint jumps there
            for j, tau in enumerate(taus):
                actions.setdefault(tau, []).append(("at", rec.out_lo + j))
            continue
        if any(tau == rec.t_new for tau in taus):
            actions.setdefault(rec.t_new, []).append(("end", k))
        if any(tau != rec.t_new for tau in taus):
            actions.setdefault(rec.t, []).append(("inner", k))
    follow_forward = cfg.rtol is None and cfg.atol is None and cfg.dt is None
    boundaries = {*(r.t for r in steps), *(r.t_new for r in steps)} if follow_forward else actions
    points = sorted(
        # (past t_start only when the forward stopped early: no output there, a zero adjoint)
        {x for x in (t_start, prob.t0, *boundaries, *actions) if direction * (t_start - x) >= 0},
        key=lambda x: -direction * x,
    )

    # The augmented state (y, a, g_1..g_P), flat, integrated by the same engine.
    p_sizes = [p.numel() for p in params]
    y = y_final.reshape(-1)
    a = torch.zeros_like(y)
    gs = [torch.zeros(n, dtype=dtype, device=device) for n in p_sizes]
    aug_spec, _ = flatten_state((y, a, *gs), batched=False, name="augmented state")

    check = run.extra.get("param_check")
    inner_f = VectorField(run.func, spec, run.time_dtype)  # inside the augmented dynamics
    fwd_f = VectorField(run.func, spec, run.time_dtype)  # replays of forward steps

    # The last evaluation of the augmented dynamics, with its graph kept: a segment ends with
    # an FSAL stage at its end point, so a replay starting there can reuse f(t_n, y_n).
    last: dict = {}

    def aug_parts(tf: float, yy, aa) -> list:
        """(f, -a^T df/dy, -a^T df/dtheta_1, ...) at time ``tf``, each flat."""
        with torch.enable_grad():
            yv = yy.detach().requires_grad_()
            fy = inner_f(tf, yv)
            if check is not None:
                check(fy, yv)
            if fy.requires_grad:
                vj = torch.autograd.grad(
                    fy, [yv, *params], -aa, allow_unused=True, retain_graph=True
                )
                last.update(t=tf, y=yv, f=fy)
            else:
                vj = [None] * (1 + len(params))
        out = [fy.detach().reshape(-1)]
        out.append(vj[0].reshape(-1) if vj[0] is not None else torch.zeros_like(aa).reshape(-1))
        for v, n in zip(vj[1:], p_sizes):
            out.append(
                v.reshape(-1).to(dtype)
                if v is not None
                else torch.zeros(n, dtype=dtype, device=device)
            )
        return out

    def aug_func(t, aug):  # on the structured augmented state (the implicit solvers' Jacobians)
        return tuple(aug_parts(_t_float(t), aug[0].view(B, M), aug[1].view(B, M)))

    def aug_flat(tf: float, v):  # on the flat (1, W) augmented state: no unflatten/validation
        v = v.view(-1)
        return torch.cat(aug_parts(tf, v[: B * M].view(B, M), v[B * M : 2 * B * M].view(B, M)))

    aug_f = FlatVectorField(aug_flat, aug_func, aug_spec, run.time_dtype)
    tab = get_tableau(cfg.solver) if cfg.solver is not None else prob.tableau
    ctrl = prob.controller
    rtol = cfg.rtol if cfg.rtol is not None else prob.rtol
    atol = cfg.atol if cfg.atol is not None else prob.atol
    if tab.adaptive and ctrl.adaptive:
        # The controller's own tolerances are placeholders: the augmented problem carries the
        # tolerances laid out over (y, a, params) (aug_rtol/aug_atol below).
        # No dt_min: the forward's last step may be shorter than it (clipped to the end).
        actrl = ctrl.adjoint_rule()
    elif tab.adaptive and cfg.solver is not None:  # fixed-step forward, adaptive backward
        actrl = PIController(
            rtol=1e-6 if cfg.rtol is None else cfg.rtol, atol=1e-8 if cfg.atol is None else cfg.atol
        )
        rtol, atol = actrl.rtol, actrl.atol
    elif cfg.dt is not None:  # a fixed step of its own
        actrl = ConstantStep(cfg.dt, jump_t=ctrl.jump_t)
        if tab.adaptive:
            raise ValueError("Backsolve(dt=...) needs a fixed-step solver (e.g. solver='rk4')")
    else:  # a fixed-step method: the forward's steps, backward
        grid = sorted({prob.t0, *(r.t_new for r in steps)})
        actrl = StepToGrid(grid if len(grid) >= 2 else [prob.t0, prob.t_end], jump_t=ctrl.jump_t)
        if tab.adaptive:
            tab = get_tableau("rk4")
    aug_rtol = _aug_tol(rtol, B, M, p_sizes, dtype, device)
    aug_atol = _aug_tol(atol, B, M, p_sizes, dtype, device)

    # A norm object with resolve() decides only now (the torchdiffeq face's adjoint_options).
    norm = cfg.norm.resolve() if hasattr(cfg.norm, "resolve") else cfg.norm
    # compile=True: the backward solve in compiled chunks where the augmented field can be
    # traced (else None: the eager driver).
    compiled = compiled_backward(run, params, (B, M), tab, norm, aug_f, follow_forward)

    def aug_problem(t0, t_end, controller, max_steps):
        return Problem(
            spec=aug_spec, tableau=tab, controller=controller, t0=t0, t_end=t_end, out_t=[],
            out_sample=None, out_order=None, n_out_rows=0, max_steps=max_steps, rtol=aug_rtol,
            atol=aug_atol, norm=norm, norm_components=2 if cfg.seminorm else None,
        )  # fmt: skip

    replay_gp = [torch.zeros_like(p) for p in params]
    aug_stepper = None
    jumps = set(ctrl.jump_t)
    if (
        compiled is not None
        and len(points) > 1
        and mode == "stop"
        and not jumps
        and not isinstance(actrl, ConstantStep)
    ):
        # The whole solve at once, the adjoint's jumps at the outputs inside the chunks.
        h0 = _step_containing(steps, points[0], points[1], direction) if follow_forward else None
        with torch.no_grad(), _max_steps_error(cfg, 0, prob.t0):
            got = compiled.whole(
                lambda t0, t_end, c: aug_problem(t0, t_end, c, cfg.max_steps), actrl, points,
                actions, g_sorted, samples, torch.cat([y, a, *gs]).unsqueeze(0), h0, ys_sorted,
            )  # fmt: skip
        if got is not None:
            parts = aug_spec.components(got[0])
            y, a = parts[0].reshape(-1), parts[1].reshape(-1)
            gs = [c.reshape(-1) for c in parts[2:]]
            points = []  # (nothing left for the segments below)
    k1_next = None  # the first stage for the next segment, when it is already known
    h_carry = None
    used = 0  # step attempts of the backward solve so far (all segments)
    for i, point in enumerate(points):
        acted = False
        for kind, k in actions.get(point, ()):
            acted = True
            if kind == "at":
                y = put_back(y, [k])
                g = g_sorted[k]
                if samples is None:
                    a = a + g.reshape(-1)
                else:
                    a = a.view(B, M).index_add(0, samples[k : k + 1], g.unsqueeze(0)).reshape(-1)
                continue
            rec = steps[k]
            taus = out_t[rec.out_lo : rec.out_hi]
            if kind == "end":
                idx = [rec.out_lo + j for j, tau in enumerate(taus) if tau == rec.t_new]
                y = put_back(y, idx)
                g = g_sorted[idx]
                if samples is None:
                    a = a + g.sum(0).reshape(-1)
                else:
                    a = a.view(B, M).index_add(0, samples[idx], g).reshape(-1)
                continue
            k1 = None
            if rec.y is not None:  # (kept by the forward for the steps with outputs inside)
                y = rec.y.reshape(-1)
            if _last_at(last, rec.t_first, y.view(B, M)):
                yk, k1 = last["y"], last["f"]  # reuse the segment's final FSAL stage
            else:
                yk = y.view(B, M).detach().requires_grad_()
                last.clear()
            with torch.enable_grad():
                _, vals, k1r = replay_step(prob, run.stepper, fwd_f, rec, yk, samples, k1=k1)
                gout = g_sorted[rec.out_lo : rec.out_hi].clone()
                at_end = [j for j, tau in enumerate(taus) if tau == rec.t_new]
                if at_end:
                    gout[at_end] = 0
                keep = rec.t_first == point and k1r.requires_grad
                vj = torch.autograd.grad(
                    vals, [yk, *params], gout, allow_unused=True, retain_graph=keep
                )
            if keep:
                last.update(t=point, y=yk, f=k1r)
            if vj[0] is not None:
                a = a + vj[0].reshape(-1)
            for q, v in enumerate(vj[1:]):
                if v is not None:
                    replay_gp[q] = replay_gp[q] + v
        if i + 1 == len(points):
            break
        nxt = points[i + 1]
        # max_steps bounds the whole backward solve, over all its segments.
        aug_prob = aug_problem(
            point, nxt, actrl, None if cfg.max_steps is None else max(cfg.max_steps - used, 0)
        )
        if aug_stepper is None:
            aug_stepper = make_stepper(tab, dtype, device)
        flat = torch.cat([y, a, *gs]).unsqueeze(0)
        if point in jumps:
            k1_aug = None
        elif acted:
            # The adjoint jumped here. If f(t_n, y_n) with its graph is at hand at the same y
            # (the replay's first stage; the previous segment's last one only where y was not
            # put back), the augmented first stage costs one vector-Jacobian product with the
            # new adjoint, and no evaluation of f; else f is evaluated at the y put back.
            k1_aug = None
            if _last_at(last, point, y.view(B, M)):
                k1_aug = _aug_stage(last, params, a.view(B, M), p_sizes, dtype, device)
        else:
            k1_aug = k1_next  # FSAL across the boundary: nothing changed here
        # Starting at a discontinuity, the first stage sees the limit from the side integrated.
        t_first = time_beside(point, nxt, run.time_dtype) if point in jumps else None
        h0 = _step_containing(steps, point, nxt, direction) if follow_forward else h_carry
        if h0 is None and underflows(abs(nxt - point), point, 0.0):
            # A first segment a rounding long (the ends of two samples' grids): the forward
            # step as the proposal, clipped to the segment (a step selected for it underflows).
            h0 = _step_containing(steps, point, nxt, direction)
        with torch.no_grad(), _max_steps_error(cfg, used, prob.t0):
            res = (
                None if compiled is None else compiled.segment(aug_prob, flat, h0, k1_aug, t_first)
            )
            if res is None:
                res = integrate(
                    aug_prob, aug_f, flat, track_grad=False, stepper=aug_stepper, h0=h0,
                    k1=k1_aug, t_first=t_first,
                )  # fmt: skip
        used += res.n_accepted + res.n_rejected
        k1_next = res.k1_next
        h_carry = res.h_next
        if last.get("t") != nxt:  # only a stage at the segment's end point can be reused
            last.clear()
        parts = aug_spec.components(res.y_final)
        y, a = parts[0].reshape(-1), parts[1].reshape(-1)
        gs = [c.reshape(-1) for c in parts[2:]]

    a = add_initial_outputs(a.view(B, M), g_sorted, n_initial_outputs(prob), samples)
    # Each augmented evaluation calls func once (plus one vector-Jacobian product); replays of
    # forward steps holding outputs call it once per stage.
    run.stats["nfe_backward"] = aug_f.nfe + fwd_f.nfe
    run.stats["nfe_backward_replay"] = fwd_f.nfe
    grads_p = []
    for p, g, extra in zip(params, gs, replay_gp):
        g = g.view(p.shape)
        if g.is_complex() and not p.is_complex():
            g = g.real
        grads_p.append(g.to(p.dtype) + extra)
    return [a, *grads_p]


@contextlib.contextmanager
def _max_steps_error(cfg: Backsolve, used: int, t0: float):
    """A MaxStepsError of the backward solve says which limit it reached (``used``: the step
    attempts of the earlier segments)."""
    try:
        yield
    except MaxStepsError as e:
        raise MaxStepsError(
            f"the backward (adjoint) solve reached Backsolve(max_steps={cfg.max_steps}) "
            f"step attempts at t={e.t:.17g}, before it got back to t0={t0:.17g}; raise "
            "Backsolve(max_steps=...) or loosen its rtol/atol",
            t=e.t,
            step=used + e.step,
            h=e.h,
        ) from e


def _step_containing(steps, point: float, nxt: float, direction: float) -> float:
    """The length of the forward step that holds the backward segment from ``point`` to ``nxt``
    (proposed as the backward step: the segment ends it when it is a piece of the step, e.g.
    between two output times a few ulps apart, without a step size below the resolution)."""
    lo, hi = 0, len(steps)
    mid_t = 0.5 * (point + nxt)
    while lo < hi:  # the first step whose end lies beyond the segment's midpoint
        m = (lo + hi) // 2
        if direction * (steps[m].t_new - mid_t) < 0:
            lo = m + 1
        else:
            hi = m
    if lo < len(steps):
        return abs(steps[lo].t_new - steps[lo].t)
    return abs(nxt - point)


def _last_at(last: dict, t: float, y) -> bool:
    """Whether the kept evaluation of f was made at exactly (t, y)."""
    return last.get("t") == t and torch.equal(last["y"], y)


def _aug_stage(last: dict, params, a, p_sizes, dtype, device):
    """The augmented vector field at the kept evaluation, for adjoint ``a``: (f, -a^T df/dy,
    -a^T df/dtheta), flat (1, W)."""
    fy, yk = last["f"], last["y"]
    with torch.enable_grad():
        vj = torch.autograd.grad(fy, [yk, *params], -a, allow_unused=True, retain_graph=True)
    parts = [fy.detach().reshape(-1)]
    for v, n in zip(vj, [a.numel(), *p_sizes]):
        z = torch.zeros(n, dtype=dtype, device=device)
        parts.append(v.reshape(-1).to(dtype) if v is not None else z)
    return torch.cat(parts).unsqueeze(0)


def _t_float(t) -> float:
    return float(t) if not isinstance(t, torch.Tensor) else t.item()


def _aug_tol(tol, B, M, p_sizes, dtype, device):
    """Tolerances for (y, a, params...): the state's for y and a, the smallest for params."""
    if not isinstance(tol, torch.Tensor):
        return tol
    real = dtype.to_real() if dtype.is_complex else dtype
    t = tol.to(real).expand(B, M).reshape(-1)
    rest = [torch.full((n,), float(t.min()), dtype=real, device=device) for n in p_sizes]
    return torch.cat([t, t, *rest]).unsqueeze(0)
