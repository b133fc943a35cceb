"""What the gradient methods share: the per-solve run description and parameter discovery."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .._compiled import forward_or_none
from .._loop import LoopResult, Problem, VectorField, integrate, make_stepper

__all__ = [
    "Run",
    "capable",
    "find_params",
    "warn_missing_params",
    "ParamCheck",
    "check_params",
    "check_params_rows",
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
    """Whether a gradient method declares a capability (class attributes, False if absent):

    - ``exact_autograd``: the solve runs under autograd, differentiated through its own
      operations (dense output keeps the graph; compiled stepping can run in its place);
    - ``per_sample``: it has ``run_rows(run, y0flat)`` for ``batch_control="per_sample"``;
    - ``compiled_forward``: its forward solve (``forward_without_graph``) may run in
      compiled chunks (``compile=True``, shared control).
    """
    return bool(getattr(type(gradient), capability, False))


def output_in_state_shape(ctx, run: Run, ys: torch.Tensor) -> torch.Tensor:
    """The flat outputs ``ys`` of a custom-gradient Function, returned in the state's shape for
    a tensor state (``ctx.flat_shape`` keeps the flat shape for the backward pass).

    The caller's result is then the Function's own output, with no view node after it: a view
    is a C++ autograd node that the garbage collector cannot traverse, so an output kept on the
    module that made it (``self.out = solve(self, ...)``) would close a reference cycle (output
    -> node -> ctx -> run -> func -> output) that is never freed. Not a view either (the caller
    may modify the output in place): a fresh contiguous tensor takes the new shape itself."""
    spec = run.prob.spec
    ctx.flat_shape = ys.shape
    if spec.kind == "tensor" and run.samples_all is None:
        shape = (ys.shape[0], *spec.shapes[0])
        if ys._base is not None or not ys.is_contiguous():
            ys = ys.clone(memory_format=torch.contiguous_format)
        ys.set_(ys.untyped_storage(), ys.storage_offset(), shape)
    return ys
