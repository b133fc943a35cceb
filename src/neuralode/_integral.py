"""Running-cost integrals: ``solve(..., integral=g)`` as one more component of the state.

``Q(t) = int_{t0}^{t} g(s, y(s)) ds`` satisfies ``dQ/dt = g(t, y)``, ``Q(t0) = 0``. The solve
integrates the tuple state ``(y..., Q)`` with the vector field ``(f, g)`` through the ordinary
engine, so every gradient method (the adjoint carries Q's adjoint, which is constant), per-sample
control and grids, events and dense output work with integrals without knowing about them. This
module builds the augmented problem, translates tolerances and the error norm, and splits the
result back into the state and the integral.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["solve_with_integral"]


class _Augmented(nn.Module):
    """The vector field ``(f, g)`` on the state ``(y_1, ..., y_n, Q)``.

    An ``nn.Module`` that owns the modules behind ``func`` and ``g`` (or the modules of bound
    methods), so that gradient methods which look for parameters (Backsolve, Checkpointed) find
    those of both.
    """

    running_cost = True  # (Backsolve warns when y solved backward drifts under a running cost)

    def __init__(self, func, g, kind: str, keys: tuple, q_tail: torch.Size, per_sample: bool):
        super().__init__()
        self.func, self.g = func, g
        self.kind, self.keys, self.q_tail, self.per_sample = kind, keys, q_tail, per_sample
        owners = []
        for c in (func, g):
            o = c if isinstance(c, nn.Module) else getattr(c, "__self__", None)
            if isinstance(o, nn.Module) and all(o is not x for x in owners):
                owners.append(o)
        self.owners = nn.ModuleList(owners)

    def split(self, state):
        """``(y, Q)`` from the augmented tuple (``y`` in y0's structure)."""
        *ys, q = state
        if self.kind == "tensor":
            return ys[0], q
        if self.kind == "tuple":
            return tuple(ys), q
        return dict(zip(self.keys, ys)), q

    def forward(self, t, state):
        y, _ = self.split(state)
        dy = self.func(t, y)
        if self.kind == "tensor":
            parts = (dy,)
        elif self.kind == "tuple":
            parts = tuple(dy) if isinstance(dy, (tuple, list)) else (dy,)
        else:
            if not isinstance(dy, Mapping):
                raise TypeError(
                    f"the derivative returned by func must be a dict with keys {list(self.keys)} "
                    f"like y0, got {type(dy).__name__}"
                )
            parts = tuple(dy[k] for k in self.keys)
        return (*parts, _check_g(self.g(t, y), self.q_tail, self.per_sample, y, t))


def _first(y):
    if isinstance(y, torch.Tensor):
        return y
    return next(iter(y.values())) if isinstance(y, Mapping) else y[0]


def _check_g(out, q_tail: torch.Size, per_sample: bool, y, t):
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"integral g(t, y) must return a tensor, got {type(out).__name__}")
    want = q_tail
    if per_sample:  # only the rows still being integrated are passed
        want = torch.Size((_first(y).shape[0], *q_tail[1:]))
    if out.shape != want:
        raise ValueError(
            f"integral g(t, y) returned shape {tuple(out.shape)} at t={_t_repr(t)} but "
            f"{tuple(want)} was expected (its shape at t0); g must return the same shape at "
            "every time"
        )
    return out


def _t_repr(t) -> str:
    if isinstance(t, torch.Tensor) and t.numel() == 1:
        return f"{float(t):.17g}"
    return "(per-sample times)"


def _components(y0):
    """(kind, keys, tensors) of a state in y0's structure."""
    if isinstance(y0, torch.Tensor):
        return "tensor", (0,), [y0]
    if isinstance(y0, (tuple, list)):
        return "tuple", tuple(range(len(y0))), list(y0)
    if isinstance(y0, Mapping):
        keys = tuple(y0.keys())
        return "dict", keys, [y0[k] for k in keys]
    raise TypeError(
        f"y0 must be a tensor or a tuple/dict of tensors, got {type(y0).__name__}; wrap numbers "
        "with torch.tensor(...)"
    )


def _tol_parts(tol, kind: str, keys: tuple, name: str):
    """A tolerance given for y0's structure as one entry per component (numbers stay numbers)."""
    if isinstance(tol, (int, float)) or (isinstance(tol, torch.Tensor) and tol.numel() == 1):
        return [tol] * len(keys), True
    if kind == "tensor":
        return [tol], False
    if kind == "tuple":
        if not isinstance(tol, (tuple, list)) or len(tol) != len(keys):
            raise ValueError(
                f"{name} for a tuple state must be a number or a tuple of {len(keys)} "
                f"numbers/tensors (one per component), got {tol!r}"
            )
        return list(tol), False
    if not isinstance(tol, Mapping) or set(tol) != set(keys):
        raise ValueError(
            f"{name} for a dict state must be a number or a dict with keys {list(keys)}"
        )
    return [tol[k] for k in keys], False


def _min_of(parts) -> float:
    return min(float(torch.as_tensor(p).min()) for p in parts)


def _aug_tols(rtol, atol, kind, keys, in_norm: bool, dtype):
    """Tolerances of the augmented state ``(y..., Q)``.

    Included in the norm, Q takes the state's tolerances (the smallest entry of per-component
    ones). Left out, Q's scaled error is made zero by ``rtol = 0`` and an absolute tolerance at
    the largest finite number of the dtype: per-component tolerances are honoured by every
    driver (shared, per-sample, the adjoint's backward solve, the initial step), so no driver
    needs to know about integrals, and with the mixed norm (maximum over components) a zero
    component leaves the norm of the others unchanged.
    """
    r_parts, r_scalar = _tol_parts(rtol, kind, keys, "rtol")
    a_parts, a_scalar = _tol_parts(atol, kind, keys, "atol")
    if in_norm:
        if r_scalar and a_scalar:
            return rtol, atol
        return (*r_parts, _min_of(r_parts)), (*a_parts, _min_of(a_parts))
    big = torch.finfo(dtype.to_real() if dtype.is_complex else dtype).max
    return (*r_parts, 0.0), (*a_parts, big)


class _StateDense:
    """The dense output of the augmented solve seen as that of ``y`` (or of ``Q``) only."""

    def __init__(self, dense, lo: int, n: int, kind: str, keys: tuple):
        spec = dense.spec
        cols = spec.offsets[lo], spec.offsets[lo] + sum(spec.sizes[lo : lo + n])
        self._dense, self._cols = dense, cols
        self.spec = dataclasses.replace(
            spec,
            kind=kind,
            keys=keys,
            shapes=spec.shapes[lo : lo + n],
            sizes=spec.sizes[lo : lo + n],
        )

    @property
    def step_times(self):
        return self._dense.step_times

    def evaluate_flat(self, *args):
        return self._dense.evaluate_flat(*args)[..., self._cols[0] : self._cols[1]]


def solve_with_integral(solve_fn, func, y0, t, g, in_error_norm: bool, kwargs: dict):
    """``solve(func, y0, t, integral=g, **kwargs)``: see :func:`neuralode.solve`."""
    if not callable(g):
        raise TypeError(f"integral must be callable as g(t, y) -> Tensor, got {type(g).__name__}")
    if not isinstance(in_error_norm, bool):
        raise TypeError(f"integral_in_error_norm must be a bool, got {in_error_norm!r}")
    kind, keys, comps = _components(y0)
    if not comps or not all(isinstance(c, torch.Tensor) for c in comps):
        raise TypeError("y0 must hold tensors (a tensor, or a tuple/dict of tensors)")
    ref = comps[0]
    t_tensor = (
        t.detach() if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=torch.float64)
    )
    per_sample = kwargs.get("batch_control") == "per_sample"
    time_dtype = kwargs.get("time_dtype", torch.float64)
    # One evaluation of g at the initial state gives the integral's shape and dtype.
    if t_tensor.dim() == 2 and per_sample:
        t_probe = t_tensor[:, 0].detach().to(device=ref.device, dtype=time_dtype)
    else:
        t_probe = torch.as_tensor(
            float(t_tensor.reshape(-1)[0] if t_tensor.dim() == 1 else t_tensor[0, 0]),
            dtype=time_dtype,
            device=ref.device,
        )
    y_probe = y0.detach() if kind == "tensor" else _detach(y0, kind, keys, comps)
    with torch.no_grad():
        q_val = g(t_probe, y_probe)
    if not isinstance(q_val, torch.Tensor):
        raise TypeError(f"integral g(t, y) must return a tensor, got {type(q_val).__name__}")
    if q_val.dtype != ref.dtype:
        raise TypeError(
            f"integral g(t, y) returned dtype {q_val.dtype} but the state has dtype {ref.dtype}; "
            "make g return the state's dtype (it is integrated together with the state)"
        )
    if (t_tensor.dim() == 2 or per_sample) and (q_val.dim() == 0 or q_val.shape[0] != ref.shape[0]):
        raise ValueError(
            "with per-sample output grids or batch_control='per_sample' the integral is taken "
            f"per sample: g(t, y) must return shape (B, ...) with B = {ref.shape[0]} (y0's "
            f"batch), got {tuple(q_val.shape)}"
        )
    q0 = torch.zeros(q_val.shape, dtype=ref.dtype, device=ref.device)
    if kwargs.get("compile"):
        aug = _compiled_augmented(func, g, kind, keys, q0.shape, per_sample)
    else:
        aug = _Augmented(func, g, kind, keys, q0.shape, per_sample)
    kw = dict(kwargs)
    if kw.get("dt") is None:
        ctrl = kw.get("controller")
        if ctrl is None:
            r = 1e-6 if kw.get("rtol") is None else kw["rtol"]
            a = 1e-8 if kw.get("atol") is None else kw["atol"]
            kw["rtol"], kw["atol"] = _aug_tols(r, a, kind, keys, in_error_norm, ref.dtype)
        elif getattr(ctrl, "adaptive", False):
            r, a = _aug_tols(ctrl.rtol, ctrl.atol, kind, keys, in_error_norm, ref.dtype)
            norm = ctrl.norm
            if norm is not None:
                norm = _aug_norm(norm, aug, in_error_norm)
            kw["controller"] = dataclasses.replace(ctrl, rtol=r, atol=a, norm=norm)
    event = kw.get("event")
    if event is not None:
        kw["event"] = _aug_event(event, aug)
    sol = solve_fn(aug, (*comps, q0), t, **kw)
    n = len(comps)
    ys, q = aug.split(sol.ys)
    event_y, event_q = sol.event_y, None
    if event_y is not None:
        event_y, event_q = aug.split(event_y)
    dense, dense_q = sol._dense, None
    if dense is not None:
        dense, dense_q = (
            _StateDense(sol._dense, 0, n, kind, keys),
            _StateDense(sol._dense, n, 1, "tensor", (0,)),
        )
    return dataclasses.replace(
        sol,
        ys=ys,
        integral=q,
        event_y=event_y,
        event_integral=event_q,
        _dense=dense,
        _dense_integral=dense_q,
    )


#: compile=True: the augmented fields of recent (func, g) pairs, most recent last. Compiled code
#: is cached per vector-field object, so a new wrapper at every solve would compile again each
#: time; reusing the wrapper keeps func and g alive while they are among the last few pairs.
_COMPILED_AUGMENTED: list = []
_COMPILED_AUGMENTED_MAX = 8


def _identity(c) -> tuple:
    """What identifies a callable: a bound method by its object and function (``m.forward`` is
    a new object at every attribute access); a plain function by its code, globals, captured
    objects and defaults (a lambda written in a training loop is a new object at every
    iteration, with the same behaviour); anything else by itself."""
    if isinstance(c, types.MethodType):
        return ("method", c.__self__, c.__func__)
    if isinstance(c, types.FunctionType) and not c.__kwdefaults__:
        try:
            captured = tuple(cell.cell_contents for cell in c.__closure__ or ())
        except ValueError:  # an empty cell
            return ("object", c)
        return ("function", c.__code__, c.__globals__, *captured, "defaults",
                *(c.__defaults__ or ()))  # fmt: skip
    return ("object", c)


def _compiled_augmented(func, g, kind, keys, q_tail, per_sample) -> _Augmented:
    parts = (*_identity(func), "g", *_identity(g))
    layout = (kind, keys, tuple(q_tail), per_sample)
    for i, (p, lay, aug) in enumerate(_COMPILED_AUGMENTED):
        if lay == layout and len(p) == len(parts) and all(a is b for a, b in zip(p, parts)):
            _COMPILED_AUGMENTED.append(_COMPILED_AUGMENTED.pop(i))
            return aug
    aug = _Augmented(func, g, kind, keys, q_tail, per_sample)
    _COMPILED_AUGMENTED.append((parts, layout, aug))
    del _COMPILED_AUGMENTED[:-_COMPILED_AUGMENTED_MAX]
    return aug


def _detach(y0, kind, keys, comps):
    parts = [c.detach() for c in comps]
    return tuple(parts) if kind == "tuple" else dict(zip(keys, parts))


def _aug_norm(norm, aug: _Augmented, in_norm: bool):
    """A user norm on y's structure, applied to the augmented state's scaled error."""

    def on_aug(scaled):
        y, q = aug.split(scaled)
        ny = torch.as_tensor(norm(y))
        if not in_norm:
            return ny
        nq = q.abs().square().mean().sqrt().to(ny.dtype)
        return torch.maximum(ny, nq)

    return on_aug


def _aug_event(event, aug: _Augmented):
    """The event with ``fn`` (and ``reset``) acting on y only; a reset leaves Q unchanged."""
    fn, reset = event.fn, event.reset

    def fn_aug(t, state):
        return fn(t, aug.split(state)[0])

    changes = dict(fn=fn_aug)
    if reset is not None:

        def reset_aug(t, state):
            y, q = aug.split(state)
            new = reset(t, y)
            return (*_components(new)[2], q)

        changes["reset"] = reset_aug
    return dataclasses.replace(event, **changes)
