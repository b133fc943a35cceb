"""torchdiffeq's step callbacks, as a method object wrapping a solver.

torchdiffeq calls ``func.callback_step(t0, y0, dt)`` before every step attempt, and, with
adaptive methods, ``func.callback_accept_step(t0, y0, dt)`` or ``func.callback_reject_step(t0,
y0, dt)`` after it; the ``*_adjoint`` variants during the backward solve of ``odeint_adjoint``.
The engine drives any method object that provides ``make_stepper`` (see
:func:`neuralode.solvers.explicit_rk.make_stepper`), so the callbacks are a wrapper around the
method's stepper: no branch in the stepping loop.

- ``step`` is called once per attempt: it calls ``callback_step`` first. An attempt that is not
  followed by ``accept`` was rejected: the rejection is reported just before the next attempt
  (so callbacks come in torchdiffeq's order: step, reject, step, ..., step, accept).
- Replays of accepted steps (the backsolve adjoint recomputes steps that hold outputs; the
  checkpointed method recomputes every step) are recognised by their ``(t, dt)`` and do not
  call the callbacks again.
- ``t0`` and ``dt`` are 0-d tensors of the state's real dtype (as torchdiffeq gives them); ``y0``
  is the state in y0's structure (the forward solve) or the augmented state ``(y, adj_y,
  adj_params...)`` with flat components (the backward solve).
"""

from __future__ import annotations

import warnings

import torch

from ._tree import StateDtypeError
from .controllers.step_size import time_beside
from .errors import MaxStepsError, NonFiniteError, StepSizeUnderflowError
from .solvers import get_tableau
from .solvers.explicit_rk import make_stepper

FORWARD = ("callback_step", "callback_accept_step", "callback_reject_step")
ADJOINT = tuple(name + "_adjoint" for name in FORWARD)


def callbacks_of(func, names) -> tuple | None:
    """The callbacks of ``func`` among ``names`` (None for each missing), or None if none."""
    found = tuple(getattr(func, n, None) for n in names)
    found = tuple(c if callable(c) else None for c in found)
    return found if any(c is not None for c in found) else None


class WithCallbacks:
    """A solver (tableau or method object) whose steps call torchdiffeq-style callbacks.

    ``forward`` and ``backward`` are (step, accept, reject) triples, None where absent. The
    backsolve adjoint integrates its augmented state with the forward's method unless told
    otherwise: solves of the forward state's structure (the first one bound) call ``forward``,
    any other (the augmented state) ``backward``. ``backward_only`` marks a method used by the
    backward solve alone (an explicit ``adjoint_method``).
    """

    def __init__(self, method, forward=None, backward=None, backward_only=False):
        self._method = method
        self._forward, self._backward = forward, backward
        self._backward_only = backward_only
        self._forward_spec = None

    def __getattr__(self, name):  # the method's own properties (adaptive, order, ...)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._method, name)

    def make_stepper(self, dtype, device):
        return _CallbackStepper(make_stepper(self._method, dtype, device), self)

    def callbacks_for(self, spec) -> tuple:
        if self._backward_only:
            return self._backward or _NONE
        if self._forward_spec is None:
            self._forward_spec = spec
        same = spec == self._forward_spec
        return (self._forward if same else self._backward) or _NONE


_NONE = (None, None, None)


class _CallbackStepper:
    _own = ("_inner", "_owner", "_cb", "_spec", "_pending", "_accepted")

    def __init__(self, inner, owner: WithCallbacks):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_cb", _NONE)
        object.__setattr__(self, "_spec", None)
        object.__setattr__(self, "_pending", None)
        object.__setattr__(self, "_accepted", set())

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value):  # e.g. the loop's reuse_buffer
        if name in self._own:
            object.__setattr__(self, name, value)
        else:
            setattr(self._inner, name, value)

    def _args(self, t: float, y: torch.Tensor, h: float):
        real = y.real.dtype if y.is_complex() else y.dtype
        tt = torch.tensor(t, dtype=real, device=y.device)
        dt = torch.tensor(h, dtype=real, device=y.device)
        state = self._spec.unflatten(y) if self._spec is not None else y
        return tt, state, dt

    def bind(self, prob):
        self._spec = prob.spec
        self._cb = self._owner.callbacks_for(prob.spec)
        self._pending = None
        inner = getattr(self._inner, "bind", None)
        if inner is not None:
            inner(prob)

    def step(self, f, t, h, y, k1, t_last, track_grad):
        on_step, _, on_reject = self._cb
        if (t, h) not in self._accepted:  # not a replay of an accepted step
            if self._pending is not None and on_reject is not None:
                on_reject(*self._args(*self._pending))
            if on_step is not None:
                on_step(*self._args(t, y, h))
            self._pending = (t, y, h)
        return self._inner.step(f, t, h, y, k1, t_last, track_grad)

    def accept(self, t, t_new, y, y_new, K):
        on_accept = self._cb[1]
        h = t_new - t
        self._accepted.add((t, h))
        self._pending = None
        if on_accept is not None:
            on_accept(*self._args(t, y, h))
        inner = getattr(self._inner, "accept", None)
        if inner is not None:
            inner(t, t_new, y, y_new, K)


def hook_callbacks(func, solver, *, adaptive: bool, adjoint_adaptive=None, stacklevel=3):
    """``solver`` wrapped so that its steps call func's torchdiffeq callbacks (the forward set;
    with ``adjoint_adaptive`` not None, the solver also serves the backward solve of the
    backsolve adjoint, which calls the ``*_adjoint`` set); ``solver`` itself when func has none.
    Fixed-step methods have no accept/reject decision: those callbacks are ignored with a
    warning, as in torchdiffeq."""
    fwd = _usable(func, FORWARD, adaptive, "forward solve", stacklevel + 1)
    back = None
    if adjoint_adaptive is not None:
        back = _usable(func, ADJOINT, adjoint_adaptive, "backward solve", stacklevel + 1)
    if fwd is None and back is None:
        return solver
    return WithCallbacks(get_tableau(solver), fwd, back)


def hook_adjoint_callbacks(func, solver, *, adaptive: bool, stacklevel=3):
    """An explicit ``adjoint_method`` wrapped to call func's ``*_adjoint`` callbacks."""
    back = _usable(func, ADJOINT, adaptive, "backward solve", stacklevel + 1)
    if back is None:
        return solver
    return WithCallbacks(get_tableau(solver), None, back, backward_only=True)


def _usable(func, names, adaptive: bool, where: str, stacklevel: int):
    cbs = callbacks_of(func, names)
    if cbs is None:
        return None
    if not adaptive and (cbs[1] is not None or cbs[2] is not None):
        warnings.warn(
            f"{names[1]}/{names[2]} are not called by fixed-step methods ({where}): every "
            "step is accepted",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
        cbs = (cbs[0], None, None)
    # accept/reject alone are enough (torchdiffeq calls each callback that func defines)
    return cbs if any(c is not None for c in cbs) else None


class Perturbed:
    """A fixed-step solver for torchdiffeq's ``options=dict(perturb=True)``: f is never
    evaluated exactly at a step's ends, but just inside them (the next representable time in the
    time dtype, as torchdiffeq's ``Perturb.NEXT``/``PREV``). The grid points are also jump times
    of the controller (the loop then evaluates the first stage of every step just inside it);
    this wrapper catches what the loop does not see: evaluations inside a method's step at its
    ends, such as the Jacobian of an implicit method at the step start.
    """

    def __init__(self, method):
        self._method = method

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._method, name)

    def make_stepper(self, dtype, device):
        return _PerturbedStepper(make_stepper(self._method, dtype, device))


class _PerturbedStepper:
    def __init__(self, inner):
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)

    def step(self, f, t, h, y, k1, t_last, track_grad):
        return self._inner.step(_Inside(f, t, t + h), t, h, y, k1, t_last, track_grad)


class _Inside:
    """A vector field whose evaluations at ``a`` or ``b`` move just inside ``[a, b]``."""

    def __init__(self, f, a: float, b: float):
        self._f, self._a, self._b = f, a, b

    def _move(self, t: float) -> float:
        if t == self._a:
            return time_beside(t, self._b, self._f.time_dtype)
        if t == self._b:
            return time_beside(t, self._a, self._f.time_dtype)
        return t

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __call__(self, t, y):
        return self._f(self._move(t), y)

    def flat(self, t, y):
        return self._f.flat(self._move(t), y)

    def into(self, t, y, *args):
        return self._f.into(self._move(t), y, *args)

    def _time(self, t):
        return self._f._time(self._move(t))


def adjoint_norm(user_norm, y0, params):
    """torchdiffeq's layout for a user's ``adjoint_options['norm']``: the backward solve's
    scaled error as ``(t, y, adj_y, adj_param_1, ...)`` for a tensor state and ``(t, y_1, ...,
    y_n, adj_y_1, ..., adj_y_n, adj_param_1, ...)`` for a tuple state, each in its own shape.
    neuralode does not integrate the adjoint of t: its entry is a 0-d zero."""
    shapes = [y0.shape] if isinstance(y0, torch.Tensor) else [c.shape for c in y0]
    sizes = [int(torch.Size(sh).numel()) for sh in shapes]
    p_shapes = [p.shape for p in params if p.requires_grad]

    def norm(parts):
        y, adj, *gs = parts

        def split(v):
            return [c.view(sh) for c, sh in zip(torch.split(v.reshape(-1), sizes), shapes)]

        real = y.real.dtype if y.is_complex() else y.dtype
        t = torch.zeros((), dtype=real, device=y.device)
        ps = [g.view(sh) for g, sh in zip(gs, p_shapes)]
        return user_norm((t, *split(y), *split(adj), *ps))

    return norm


# ----------------------------------------------------------------------------- errors
class MaxNumStepsExceeded(MaxStepsError, AssertionError):
    """``max_num_steps`` exceeded on the compatible face: a :class:`~neuralode.MaxStepsError`
    that is also the ``AssertionError`` torchdiffeq raises (training scripts catch that)."""


class DtUnderflow(StepSizeUnderflowError, AssertionError):
    """Step-size underflow on the compatible face (torchdiffeq: ``AssertionError('underflow in
    dt ...')``)."""


class NonFiniteUnderflow(NonFiniteError, AssertionError):
    """A non-finite state or derivative on the compatible face (torchdiffeq ends such solves
    with ``AssertionError('underflow in dt nan')``)."""


_AS_TORCHDIFFEQ = (
    (MaxStepsError, MaxNumStepsExceeded, "max_num_steps exceeded ({step}>={step})"),
    (StepSizeUnderflowError, DtUnderflow, "underflow in dt {h}"),
    (NonFiniteError, NonFiniteUnderflow, "underflow in dt {h}"),
)


class torchdiffeq_errors:
    """Re-raise neuralode's solve errors as torchdiffeq's: the same classes (subclassed) and
    also ``AssertionError``, with torchdiffeq's message first and neuralode's after it."""

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is None or isinstance(exc, AssertionError):
            return False
        for base, cls, prefix in _AS_TORCHDIFFEQ:
            if isinstance(exc, base):
                head = prefix.format(step=exc.step, h=exc.h)
                raise cls(f"{head}: {exc}", t=exc.t, step=exc.step, h=exc.h) from exc
        return False


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.abs().pow(2).mean().sqrt()


class DeferredAdjointNorm:
    """The adjoint norm of an ``odeint_adjoint`` call without a norm callable, decided when the
    backward pass starts. torchdiffeq exposes its adjoint options on the output's ``grad_fn``
    (``adjoint_options["norm"]``) and code may replace the norm there before ``backward()``;
    ``options`` is that dict. Untouched, neuralode's own norm runs (``resolve()`` gives None);
    replaced, the replacement is called with torchdiffeq's layout for it: ``(t, y, adj_y,
    adj_params...)`` with ``y``, ``adj_y`` in y0's shape (tensor states) or flat (tuple states),
    and a 0-d zero for ``t``. ``options["norm"]`` starts as :meth:`default`, torchdiffeq's
    formula (max of ``|t|``, the RMS of ``y`` and ``adj_y`` -- the max over components' RMS for
    tuple states -- and, unless ``seminorm``, each parameter adjoint's RMS)."""

    def __init__(self, y0, params, seminorm: bool):
        self.tensor = isinstance(y0, torch.Tensor)
        self.shape = y0.shape if self.tensor else None
        comps = [y0] if self.tensor else list(y0)
        self.sizes = [int(c.numel()) for c in comps]
        self.p_shapes = [p.shape for p in params if p.requires_grad]
        self.seminorm = seminorm
        sizes = self.sizes

        def state_norm(v: torch.Tensor) -> torch.Tensor:
            return max(_rms(c) for c in torch.split(v.reshape(-1), sizes))

        def default(parts):  # a closure, not a bound method: no reference cycle through self
            t, y, adj, *ps = parts
            out = [t.abs(), state_norm(y), state_norm(adj)]
            if not seminorm:
                out += [_rms(p) for p in ps]
            return max(out)

        self.default = default
        self.options = {"norm": default}

    def resolve(self):
        fn = self.options.get("norm")
        if fn is self.default or fn is None:
            return None

        def norm(parts):
            y, adj, *gs = parts
            real = y.real.dtype if y.is_complex() else y.dtype
            t = torch.zeros((), dtype=real, device=y.device)
            if self.tensor:
                y, adj = y.view(self.shape), adj.view(self.shape)
            ps = [g.view(sh) for g, sh in zip(gs, self.p_shapes)]
            return fn((t, y, adj, *ps))

        return norm

    def __call__(self, parts):  # (Backsolve validates that norm is callable)
        return self.resolve()(parts)


def promoted(func, y0):
    """``(func, y0)`` as torchdiffeq solves them when the state's dtypes differ.

    A tuple state mixing dtypes (e.g. float32 and float64 components) is solved in the promoted
    dtype (torchdiffeq concatenates the components, so its outputs and func's inputs all have
    that dtype) and func's derivatives are cast to it silently. Any other state comes back
    unchanged, func unwrapped: a derivative of another dtype is handled by
    :func:`solve_casting`, at no cost per evaluation where the dtypes agree.
    """
    tensors = [y0] if isinstance(y0, torch.Tensor) else list(y0)
    if not tensors or not all(isinstance(x, torch.Tensor) for x in tensors):
        return func, y0  # (solve raises naming what is wrong)
    common = tensors[0].dtype
    for x in tensors[1:]:
        common = torch.promote_types(common, x.dtype)
    if all(x.dtype == common for x in tensors):
        return func, y0
    return _casting(func, common, silent=True), tuple(x.to(common) for x in tensors)


def solve_casting(run, func, y0):
    """``run(func)`` with neuralode's solve errors raised as torchdiffeq's
    (:class:`torchdiffeq_errors`), once more with func's derivatives cast to the state's dtype where the
    engine refused one of another dtype (a float32 state times a float64 tensor made from a
    numpy array), as torchdiffeq casts them, with a warning the first time per pair of dtypes
    (:func:`neuralode.solve` raises TypeError there instead).

    func runs unwrapped first, so the common case costs nothing per evaluation. The price of
    the other case: the first try stops at the first derivative of another dtype (usually
    func's first evaluation) and the solve starts over, so func runs once more than the solve
    needs -- more where the dtype changes only later in the solve, whose evaluations (and step
    callbacks) up to there run twice. Nothing else of the first try is kept or returned.
    """
    try:
        with torchdiffeq_errors():
            return run(func)
    except StateDtypeError as exc:
        if exc.what != FUNC_DERIVATIVE or (exc.got.is_complex and not exc.want.is_complex):
            raise  # (a complex derivative for a real state: not cast, solve's error stands)
        tensors = [y0] if isinstance(y0, torch.Tensor) else list(y0)
        with torchdiffeq_errors():
            return run(_casting(func, tensors[0].dtype, silent=False))


def _casting(func, common: torch.dtype, silent: bool):
    """func with its derivatives (a tensor, or a tuple's components) cast to ``common``."""

    # (No closure refers to itself: a reference cycle would leave garbage for the collector.)
    def cast_func(t, y):
        out = func(t, y)
        if type(out) is torch.Tensor:  # (the common case: one comparison)
            return out if out.dtype is common else _cast(out, common, silent)
        if isinstance(out, (tuple, list)):
            return tuple(_cast(o, common, silent) for o in out)
        return out  # (solve raises naming what is wrong)

    return cast_func


#: The ``what`` of the engine's check of func's derivatives (:meth:`TreeSpec.flatten`).
FUNC_DERIVATIVE = "the derivative returned by func"


def _cast(out, common: torch.dtype, silent: bool):
    """``out`` in dtype ``common`` (a warning the first time unless ``silent``); anything else
    than a real/complex tensor, or a complex one for a real state, unchanged (solve raises)."""
    if not isinstance(out, torch.Tensor) or out.dtype == common:
        return out
    if out.is_complex() and not common.is_complex:
        return out  # the imaginary part would be lost
    if not silent:
        _warn_cast(out.dtype, common)
    return out.to(common)


_WARNED_CASTS: set = set()


def _warn_cast(got: torch.dtype, want: torch.dtype) -> None:
    if (got, want) in _WARNED_CASTS:
        return
    _WARNED_CASTS.add((got, want))
    warnings.warn(
        f"func returned a derivative of dtype {got} for a state of dtype {want}: it is cast to "
        f"{want}, as torchdiffeq does (neuralode.solve raises TypeError here). Make func return "
        f"the state's dtype, e.g. build constants with torch.as_tensor(..., dtype=y.dtype) or "
        f"cast a module with module.to({want}). (Warned once per pair of dtypes.)",
        UserWarning,
        stacklevel=4,
    )
