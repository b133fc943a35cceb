"""What the gradient methods share: the per-solve run description and parameter discovery."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

from .._compiled import forward_or_none
from .._loop import LoopResult, Problem, VectorField, integrate, make_stepper

__all__ = [
    "Run",
    "add_drift",
    "warn_drift",
    "capable",
    "find_params",
    "warn_missing_params",
    "ParamCheck",
    "check_params",
    "check_params_rows",
    "hold_run",
    "held_run",
    "structured_outputs",
    "collect_runs",
    "hold_outputs",
]


@dataclass
class Run:
    """One solve: the problem plus what the gradient method needs to run and differentiate it."""

    prob: Problem
    func: object
    time_dtype: torch.dtype
    throw: bool
    dense: bool
    samples_all: torch.Tensor | None
    stats: dict
    result: LoopResult | None = None
    f: VectorField | None = None
    stepper: object = None
    extra: dict = field(default_factory=dict)

    def vector_field(self) -> VectorField:
        return VectorField(self.func, self.prob.spec, self.time_dtype)

    def new_stepper(self, y0):
        return make_stepper(self.prob.tableau, y0.dtype, y0.device)


def find_params(func, explicit, name: str = "params") -> list[torch.Tensor]:
    """Tensors to differentiate with respect to, besides y0.

    ``explicit`` (a sequence of tensors) wins; else the parameters of ``func`` when it is an
    ``nn.Module`` or a bound method of one; else none.

    Raises
    ------
    TypeError
        If ``explicit`` holds something other than tensors.
    ValueError
        If ``explicit`` lists the same tensor twice (its gradient would be counted twice).
    """
    if explicit is not None:
        out = list(explicit)
        seen: dict[int, int] = {}
        for i, p in enumerate(out):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{name}[{i}] is {type(p).__name__}, expected a tensor")
            if id(p) in seen:
                raise ValueError(
                    f"{name}[{i}] is the same tensor as {name}[{seen[id(p)]}] (shape "
                    f"{tuple(p.shape)}); its gradient would be added twice: list each tensor once"
                )
            seen[id(p)] = i
        return [p for p in out if p.requires_grad]
    owner = func if isinstance(func, nn.Module) else getattr(func, "__self__", None)
    if isinstance(owner, nn.Module):
        return [p for p in owner.parameters() if p.requires_grad]
    return []


def missing_params(out: torch.Tensor, params: list[torch.Tensor], state=None) -> list:
    """The leaf tensors requiring grad that ``out`` (an evaluation of func) depends on other
    than through ``params``: their gradients would be missing. A parameter that is not a leaf
    (e.g. spline coefficients computed from leaves) passes its gradient on to the leaves it is
    made from, so the search stops there. Leaves sharing storage with ``state`` (a func that
    calls ``y.requires_grad_()``, as in FFJORD or Hamiltonian networks) are the state itself."""
    if not isinstance(out, torch.Tensor) or out.grad_fn is None:
        return []
    known = {id(p) for p in params}
    through = {p.grad_fn for p in params if p.grad_fn is not None}
    state_ptr = state.untyped_storage().data_ptr() if state is not None else None
    seen, stack, missing = set(), [out.grad_fn], []
    while stack and len(seen) < 10_000:
        node = stack.pop()
        if node is None or node in seen or node in through:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None and id(var) not in known:
            if state_ptr is None or var.untyped_storage().data_ptr() != state_ptr:
                missing.append(var)
        stack.extend(n for n, _ in node.next_functions)
    return missing


class ParamCheck:
    """Warns, from func's own evaluations during the backward solve (no extra evaluation),
    when a gradient is really lost: a leaf requiring grad that func uses but that is not among
    the parameters, and that is the same tensor in two evaluations (a leaf that func creates
    afresh on every call has no gradient anyone could read)."""

    def __init__(self, params: list[torch.Tensor], method: str, output_needs_grad: bool):
        self.params, self.method = params, method
        self.output_needs_grad = output_needs_grad
        self.first: dict | None = None
        self.done = False

    def __call__(self, out: torch.Tensor, state) -> None:
        if self.done:
            return
        found = missing_params(out, self.params, state=state)
        if self.first is None:
            self.first = {id(v): v for v in found}
            if found and not self.output_needs_grad:
                # No backward pass will come (nothing else requires grad): say it now.
                _warn_missing(found, self.method, stacklevel=7)
            if not found or not self.output_needs_grad:
                self.done = True
            return
        self.done = True
        lost = [v for v in found if self.first.get(id(v)) is v]
        self.first = None
        if lost:
            _warn_missing(lost, self.method, stacklevel=5)


def warn_missing_params(
    out: torch.Tensor, params: list[torch.Tensor], method: str, state=None
) -> None:
    """Warn when ``out`` (an evaluation of func) depends on a leaf tensor that requires grad but
    is not among ``params`` (see :func:`missing_params`)."""
    missing = missing_params(out, params, state=state)
    if missing:
        _warn_missing(missing, method, stacklevel=5)


def _warn_missing(missing: list, method: str, stacklevel: int) -> None:
    if missing:
        shapes = ", ".join(str(tuple(v.shape)) for v in missing[:5])
        warnings.warn(
            f"func uses {len(missing)} tensor(s) that require grad but are not among the "
            f"parameters of the {method} gradient (shapes {shapes}); their gradients will be "
            "missing (left unchanged). Make func an nn.Module that owns them, or pass them "
            "explicitly (Backsolve(params=...), Checkpointed(params=...) or "
            "Reversible(params=...), or adjoint_params=... "
            "for odeint_adjoint).",
            UserWarning,
            stacklevel=stacklevel,
        )


def _check_by_evaluation(call, y0flat: torch.Tensor, params: list, method: str) -> None:
    """Evaluate ``call(state) -> flat f`` at y0 with graph building on and warn (through
    :class:`ParamCheck`) about tensors func uses that are not among ``params``; a second
    evaluation, only when the first found some, confirms that they are the same tensors."""
    check = ParamCheck(params, method, output_needs_grad=True)
    while not check.done:
        state = y0flat.detach().clone()
        with torch.enable_grad():
            out = call(state)
        check(out, state)


def check_params(run: Run, y0flat: torch.Tensor, params: list[torch.Tensor], method: str) -> None:
    """Evaluate func at (t0, y0) with graph building on and warn about missing params."""
    spec = run.prob.spec
    tt = torch.tensor(run.prob.t0, dtype=run.time_dtype, device=spec.device)

    def call(state):
        out = run.func(tt, spec.unflatten(state))
        return spec.flatten(out, what="the derivative returned by func", t=run.prob.t0)

    _check_by_evaluation(call, y0flat, params, method)


def check_params_rows(run, y0flat: torch.Tensor, params: list[torch.Tensor], method: str) -> None:
    """:func:`check_params` for a per-sample solve (``run`` a ``RowsRun``): func on every row
    at its initial time (its own field, so the solve's counters are not touched)."""
    from .._loop_batched import BatchedField

    f = BatchedField(run.func, run.spec, run.time_dtype)
    _check_by_evaluation(lambda state: f(run.tau[:, 0], state), y0flat, params, method)


class _FirstChecked(VectorField):
    """A vector field whose first evaluation (f at the start, which the loop needs anyway) is
    made with graph building on and shown to ``check(out, state)``: the parameter check costs
    no evaluation of f of its own."""

    def __init__(self, func, spec, time_dtype, check):
        super().__init__(func, spec, time_dtype)
        self._check = check

    def __call__(self, t: float, y: torch.Tensor) -> torch.Tensor:
        check = self._check
        if check is None:
            return super().__call__(t, y)
        state = y.detach().clone()
        with torch.enable_grad():
            out = super().__call__(t, state)
        check(out, state)
        # A ParamCheck that found something confirms it on the next evaluation (in the forward
        # solve: a gradient that will not be asked for, w.r.t. the tensor it is lost for, is
        # then still reported); any other check sees the first evaluation only.
        if not (isinstance(check, ParamCheck) and not check.done):
            self._check = None
        return out.detach()


def forward_without_graph(run: Run, y0flat: torch.Tensor, record: str, max_states=None, check=None):
    """The forward solve of a custom-gradient method: no graph, ``record`` kept per step.
    ``check(out, state)``, if given, sees func's first evaluation with its graph."""
    f = (
        run.vector_field()
        if check is None
        else _FirstChecked(run.func, run.prob.spec, run.time_dtype, check)
    )
    stepper = run.new_stepper(y0flat)
    with torch.no_grad():
        # compile=True: the forward in compiled chunks (None: run it here instead)
        res = forward_or_none(
            run, f, y0flat.detach(), "dense" if run.dense else record
        ) or integrate(
            run.prob,
            f,
            y0flat.detach(),  # func must see a plain tensor, not a graph-less view of y0
            track_grad=False,
            record="dense" if run.dense else record,
            throw=run.throw,
            stepper=stepper,
            max_states=None if run.dense else max_states,
        )
    run.result, run.f, run.stepper = res, f, stepper
    run.stats["nfe"] = f.nfe
    return res


def capable(gradient, capability: str) -> bool:
    """Whether a gradient method declares a capability (attributes of the method object, False
    if absent; a property where it depends on the method's settings):

    - ``exact_autograd``: the solve runs under autograd, differentiated through its own
      operations (dense output keeps the graph; compiled stepping can run in its place);
    - ``per_sample``: it has ``run_rows(run, y0flat)`` for ``batch_control="per_sample"``;
    - ``compiled_forward``: its forward solve (``forward_without_graph``) may run in
      compiled chunks (``compile=True``; per-sample control: ``run_rows`` through
      ``RowsRun.integrate``, which the compiled per-row driver serves);
    - ``replays_steps``: its backward pass recomputes single accepted steps from their start
      states (refused with methods whose ``single_step_replay`` is False: multistep methods).
    """
    return bool(getattr(gradient, capability, False))


# ----------------------------------------------------------------------- output packaging
# An output kept on the module that made it (``self.out = solve(self, ...)``, as torchdiffeq-
# style code does) must not keep the module alive. The garbage collector follows a tensor to
# the Python object of its grad_fn only when that node is a custom Function's and the tensor is
# its sole owner; any other node (a view, a slice, an addition: C++ nodes) or a Function with
# several outputs hides what lies behind it. So the custom-gradient Functions hold their run
# (whose func is the module) by weak reference only (:func:`hold_run`), and every leaf of the
# caller's result is the single output of its own small Function (:class:`_OutputPart`) whose
# context holds the run strongly: the cycle output -> part node -> run -> func -> output is
# then visible, and collected. The run lives as long as any output's graph (a backward pass
# starts from one of them), as it did on the Function itself.


def hold_run(ctx, run) -> None:
    """Keep ``run`` on a custom-gradient Function's ``ctx`` by weak reference: the strong one is
    on the outputs' own nodes (:func:`structured_outputs`). Read it back with :func:`held_run`."""
    ctx.run_ref = weakref.ref(run)


def held_run(ctx):
    """The run kept by :func:`hold_run` (alive while any output's graph is)."""
    run = ctx.run_ref()
    if run is None:  # only if the flat outputs were differentiated without structured_outputs
        raise RuntimeError(
            "internal error: the solve's record was freed before its backward pass (the "
            "outputs of a custom-gradient Function must be packaged by structured_outputs)"
        )
    return run


class _OutputPart(torch.autograd.Function):
    """Component ``i`` of the flat outputs (``(*lead, B, M)`` in any shape of that size) in its
    own shape ``(*lead, *shape_i)``: an alias of the flat outputs' storage (no copy; not a view
    either, so the caller may modify it in place) whose node holds ``keep`` (the run)."""

    @staticmethod
    def forward(ctx, flat, keep, spec, lead, i, options):
        ctx.keep = keep
        layout = (*lead, spec.batch, spec.width)
        ctx.layout = (spec.kind, flat.shape, layout, spec.offsets[i], spec.sizes[i])
        if options is not None:  # torchdiffeq's grad_fn.adjoint_options (Backsolve)
            ctx.adjoint_options = options
        part = spec.components(flat.reshape(layout))[i].reshape(*lead, *spec.shapes[i])
        out = part.new_empty(0)
        return out.set_(part.untyped_storage(), part.storage_offset(), part.shape, part.stride())

    @staticmethod
    def backward(ctx, g):
        kind, shape, layout, offset, size = ctx.layout
        if kind == "tensor":
            return g.reshape(shape), None, None, None, None, None
        g_flat = g.new_zeros(layout)
        g_flat[..., offset : offset + size] = g.reshape(*layout[:-1], size)
        return g_flat.reshape(shape), None, None, None, None, None


# Code that computes its own outputs from the outputs of inner solves (events: slices, stacks,
# the implicit-function-theorem step) would hide the inner leaves' nodes again behind its own
# operations. It collects the inner solves' runs instead (:func:`collect_runs`: inside, the
# packaging functions hand their ``keep`` over rather than holding it) and packages its final
# outputs itself, each leaf the only output of a node that holds them all (:func:`hold_outputs`).
_COLLECTOR: ContextVar[list | None] = ContextVar("neuralode_run_collector", default=None)


@contextmanager
def collect_runs() -> Iterator[list]:
    """Inside: :func:`structured_outputs` and :func:`hold_outputs` give plain outputs (views,
    no holder) and append the runs they would have held to the yielded list, whose owner
    packages its own outputs with :func:`hold_outputs` after the block. Nested blocks compose:
    an inner owner's :func:`hold_outputs` hands its list on to the enclosing block."""
    runs: list = []
    token = _COLLECTOR.set(runs)
    try:
        yield runs
    finally:
        _COLLECTOR.reset(token)


def _handed_over(keep) -> bool:
    """Whether a collector takes ``keep`` (then the caller holds nothing itself)."""
    collector = _COLLECTOR.get()
    if collector is None:
        return False
    collector.append(keep)
    return True


class _Held(torch.autograd.Function):
    """``x`` unchanged, as the only output of a node holding ``keep``: an alias of its storage
    (not a view, so it may be modified in place); the gradient passes through."""

    @staticmethod
    def forward(ctx, x, keep):
        ctx.keep = keep
        out = x.new_empty(0)
        return out.set_(x.untyped_storage(), x.storage_offset(), x.shape, x.stride())

    @staticmethod
    def backward(ctx, g):
        return g, None


def hold_outputs(state, keep):
    """``state`` (a tensor, None, or tuples/lists/dicts of them, nested) with every tensor that has
    a graph made the only output of its own node holding ``keep`` (runs collected by
    :func:`collect_runs`; nothing is done when it is empty). The tensors must be results that
    no node of the graph saved (the caller's final operations: a concatenation, a stack), so
    that writing into the alias cannot change a saved tensor; one that is a view is copied
    first, since its base may be such a tensor. Inside another
    :func:`collect_runs` block, ``keep`` is handed on instead and ``state`` returned as is."""
    if not keep or _handed_over(keep):
        return state
    return _held(state, keep)


def _held(x, keep):
    # (a module-level function: a recursive closure would be a reference cycle of its own)
    if isinstance(x, dict):
        return {k: _held(v, keep) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_held(v, keep) for v in x)
    if not isinstance(x, torch.Tensor) or x.grad_fn is None:
        return x
    return _Held.apply(x.clone() if x._base is not None else x, keep)


def structured_outputs(spec, flat: torch.Tensor, lead: tuple[int, ...], keep=None):
    """The outputs ``flat`` (``(*lead, B, M)`` values in any shape of that size, e.g. ``(T * B,
    M)``) in the state's structure, each leaf ``(*lead, *shape_i)``.

    ``keep``: the run of a custom-gradient Function that holds it by :func:`hold_run`; each
    leaf is then the output of its own node holding ``keep`` (see the note above), and aliases
    the storage of ``flat`` unless ``flat`` is a view (of a larger buffer of compiled stepping,
    say: then a private copy, which neither keeps the buffer alive nor writes into whatever
    shares it). ``None`` (Direct: autograd's own graph, which references no run): the views of
    :meth:`TreeSpec.unflatten`. Inside :func:`collect_runs`, ``keep`` goes to the collector and
    the outputs are those views too.
    """
    if keep is not None and flat._base is not None:
        flat = flat.clone()
    if keep is not None and flat.grad_fn is not None and _handed_over(keep):
        keep = None
    if keep is None or flat.grad_fn is None:
        layout = (*lead, spec.batch, spec.width)
        return spec.unflatten(flat if flat.shape == layout else flat.reshape(layout), lead=lead)
    options = getattr(flat.grad_fn, "adjoint_options", None)
    parts = [
        _OutputPart.apply(flat, keep, spec, tuple(lead), i, options)
        for i in range(len(spec.shapes))
    ]
    return spec.rebuild(parts)


def add_drift(acc: list, y, ref, rtol, atol, rows=None) -> None:
    """Fold ``max |y - ref| / (atol + rtol |ref|)`` into ``acc[0]`` (a 0-d tensor, or None
    before the first): how far a state solved backward lies from the forward's own value, in
    units of the forward's tolerance, kept on the device (no host read per put-back).
    ``y``, ``ref`` (n, M); ``rtol``/``atol`` floats or (B, M) tensors (``rows``: the n rows)."""
    if y.numel() == 0:
        return
    tol = [t if not isinstance(t, torch.Tensor) or rows is None else t[rows] for t in (rtol, atol)]
    size = ref.abs()
    # (components at or near 0 under atol = 0: the row's mean size, not a 1e-300 scale)
    scale = tol[1] + tol[0] * torch.maximum(size, size.mean(-1, keepdim=True))
    d = (y.detach() - ref).abs() / scale.clamp_min(torch.finfo(scale.dtype).tiny)
    d = torch.nan_to_num(d, nan=0.0).max()
    acc[0] = d if acc[0] is None else torch.maximum(acc[0], d)


# Above this many tolerances between the y solved backward and the forward's value where it is
# put back, a running cost (``integral=``) evaluated on the y solved backward between those
# points is not to be trusted: warn (the distance is in stats either way). Without a running cost
# the adjoint decays where y solved backward grows (a contracting mode), and the gradients stay
# at the tolerance (Backsolve vs Direct, k = 50, drift 6e22: 1e-6).
DRIFT_WARN = 1e4


def warn_drift(stats: dict, acc: list, func, rtol, atol) -> None:
    """Record ``stats["backsolve_drift"]``; warn when it passes :data:`DRIFT_WARN` and func
    carries a running cost (``solve(..., integral=...)``, whose field is marked so). Nothing
    for a forward solve without tolerances (fixed steps): the distance has no unit there."""
    if not any(bool((t != 0).any()) if isinstance(t, torch.Tensor) else t for t in (rtol, atol)):
        return
    drift = 0.0 if acc[0] is None else float(acc[0])  # (the one host read)
    stats["backsolve_drift"] = drift
    if drift > DRIFT_WARN and getattr(func, "running_cost", False):
        warnings.warn(
            f"Backsolve: the state solved backward drifted from the forward trajectory by up to "
            f"{drift:.3g} times the forward tolerance between the points where it is put back "
            "(the output times), and the integral= running cost is evaluated on it there: its "
            "gradients may be inaccurate. Add output times where the solution contracts fast "
            "(y is put back at each), or use gradient='checkpoint' (exact gradients, memory "
            "bounded by the checkpoints)",
            RuntimeWarning,
            stacklevel=2,
        )
