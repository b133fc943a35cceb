"""The backward solve of the backsolve adjoint in compiled chunks (shared control).

With ``compile=True`` and ``gradient=Backsolve(...)`` the forward solve runs in compiled chunks
(:func:`neuralode._compiled.forward_or_none`); here the backward solve does too. It integrates
the augmented system ``(y, a, g)`` of :mod:`neuralode.gradients.adjoint` (``dy/dt = f``,
``da/dt = -a^T df/dy``, ``dg/dt = -a^T df/dtheta``) with the same masked step
(:mod:`neuralode._compiled_step`), the augmented vector field written so that ``torch.compile``
can trace it: the vector-Jacobian product is ``torch.func.vjp`` of
``torch.func.functional_call`` of func's module with the parameters as explicit inputs, so the
products are part of the compiled graph (``torch.autograd.grad`` would break it). The segments
between the adjoint's stops (output times, forward step boundaries), the jumps of ``a`` there
and the replays of forward steps holding outputs stay in
:mod:`neuralode.gradients._adjoint_backward`; each segment is one or a few compiled calls.

What it needs, else the backward solve runs on the eager driver as before
(``Solution.stats["compiled_backward"]`` says which ran): func an ``nn.Module`` (or its bound
``forward``) whose parameters are the parameters of the gradient (the default; tensors that are
not parameters of the module, passed in ``Backsolve(params=...)``, cannot be made inputs of
func), no submodule or parameter held under two names (``integral=`` adds such an alias: its
wrapper holds func twice) and an explicit Runge--Kutta method for the backward solve (a custom
``Backsolve(norm=...)`` is traced into the step, :mod:`neuralode._compiled_norm`).
"""

from __future__ import annotations

import threading
import types
import weakref

import torch
from torch import nn

from ._compiled import CompiledCodeMismatch, integrate_compiled, warn_mismatch
from ._loop import FlatVectorField
from .solvers.tableau import ButcherTableau

__all__ = ["AugmentedField", "CompiledBackward", "augmented_field", "compiled_backward"]

#: Steps per compiled call in a backward segment that follows one forward step (its first step
#: is proposed as the forward step's length and normally accepted): one, so no masked step is
#: paid for; a rejection costs another call.
_STEPS_FOLLOWING = 1

_lock = threading.Lock()
_fields: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> {key: field}


class AugmentedField:
    """The augmented vector field ``(t, (y, a, g_1, ...)) -> (f, -a^T df/dy, -a^T df/dp_1, ...)``
    (every part flat 1-D; ``y``, ``a`` of ``B * M`` values for the flat ``(B, M)`` state of
    layout ``layout``) for func = ``module`` and the parameters named ``names``, traceable by
    ``torch.compile``. Holds the module by a weak reference (the cache of compiled code must
    not keep a model alive)."""

    def __init__(self, module: nn.Module, names: tuple, layout: tuple, flat_shape: tuple,
                 dtype: torch.dtype):  # fmt: skip
        self._module = weakref.ref(module)
        self.names = names
        self.layout = layout  # (kind, keys, shapes, sizes) of func's state
        self.flat_shape = flat_shape  # (B, M)
        self.dtype = dtype

    def _call(self, module, params, t, y):
        """func on the flat ``(B, M)`` state with the parameters ``params``; flat result."""
        kind, keys, shapes, sizes = self.layout
        state = dict(zip(self.names, params))
        if kind == "tensor":
            return torch.func.functional_call(module, state, (t, y.view(shapes[0]))).reshape(
                y.shape
            )
        offs = [sum(sizes[:i]) for i in range(len(sizes))]
        parts = [y[:, o : o + m].reshape(sh) for o, m, sh in zip(offs, sizes, shapes)]
        arg = tuple(parts) if kind == "tuple" else dict(zip(keys, parts))
        res = torch.func.functional_call(module, state, (t, arg))
        vals = list(res) if kind == "tuple" else [res[k] for k in keys]
        return torch.cat([v.reshape(y.shape[0], -1) for v in vals], 1)

    def __call__(self, t, aug):
        module = self._module()
        y, a = aug[0], aug[1]
        y2 = y.view(self.flat_shape)
        params = tuple(module.get_parameter(n) for n in self.names)
        fy, pull = torch.func.vjp(lambda yy, *ps: self._call(module, ps, t, yy), y2, *params)
        vj = pull(-a.view(y2.shape))
        return (fy.reshape(-1), *(v.reshape(-1).to(self.dtype) for v in vj))


def _owner(func) -> nn.Module | None:
    """func's module when func is one, or its bound ``forward`` (what functional_call calls)."""
    if isinstance(func, nn.Module):
        return func
    if isinstance(func, types.MethodType) and isinstance(func.__self__, nn.Module):
        if func.__func__ is type(func.__self__).forward:
            return func.__self__
    return None


def _aliased(module: nn.Module) -> bool:
    """Whether ``module`` holds a submodule or parameter under two names (``integral=``'s
    wrapper does: func is its ``.func`` and one of its ``.owners``). torch.compile fails to
    trace ``functional_call`` of such a module (torch 2.13), so its backward solve runs eagerly."""
    mods = [id(m) for _, m in module.named_modules(remove_duplicate=False)]
    pars = [id(p) for _, p in module.named_parameters(remove_duplicate=False)]
    return len(set(mods)) < len(mods) or len(set(pars)) < len(pars)


def augmented_field(func, params, spec, flat_shape) -> AugmentedField | None:
    """The (cached) traceable augmented field for ``func`` and the gradient's ``params``
    (a list of tensors) on the flat state of shape ``flat_shape`` ``(B, M)`` with tree layout
    ``spec``, or None when it cannot be written (see the module docstring)."""
    module = _owner(func)
    if module is None:
        return None
    if _aliased(module):
        return None
    by_id = {id(p): n for n, p in module.named_parameters()}
    if any(id(p) not in by_id for p in params):
        return None
    names = tuple(by_id[id(p)] for p in params)
    layout = (spec.kind, tuple(spec.keys), tuple(tuple(s) for s in spec.shapes), tuple(spec.sizes))
    key = (names, layout, tuple(flat_shape), spec.dtype)
    with _lock:
        per = _fields.setdefault(module, {})
        if key not in per:
            per[key] = AugmentedField(module, names, layout, tuple(flat_shape), spec.dtype)
        return per[key]


def compiled_backward(run, params, flat_shape, tab, norm, aug_f: FlatVectorField,
                      follow_forward: bool):  # fmt: skip
    """A :class:`CompiledBackward` for this backward solve, or None when it cannot be compiled
    here (see the module docstring). Records ``run.stats["compiled_backward"]``."""
    field = None
    if run.stats.get("compiled") and isinstance(tab, ButcherTableau):  # (a norm: traced too)
        field = augmented_field(run.func, params, run.prob.spec, flat_shape)
    run.stats["compiled_backward"] = field is not None
    if field is None:
        return None
    return CompiledBackward(run, field, aug_f, follow_forward)


class CompiledBackward:
    """The backward solve's integrations in compiled chunks: a segment between two stops
    (:meth:`segment`), or the whole solve with the adjoint's jumps inside the chunks
    (:meth:`whole`). Each returns None once func's compiled code no longer matches it (after a
    warning; ``stats["compiled_backward"]`` becomes False): the caller runs it eagerly."""

    def __init__(self, run, field: AugmentedField, aug_f: FlatVectorField, follow_forward: bool):
        self.run, self.aug_f, self.follow_forward = run, aug_f, follow_forward
        self.cf = FlatVectorField(aug_f.flat_fn, field, aug_f.spec, aug_f.time_dtype)
        self.ok = True

    def _integrate(self, prob, flat, steps_per_call, **kw):
        if not self.ok:
            return None
        try:
            return integrate_compiled(prob, self.cf, flat, throw=True,
                                      steps_per_call=steps_per_call, **kw)  # fmt: skip
        except CompiledCodeMismatch as why:
            warn_mismatch(why, stacklevel=9)
            self.ok = False
            self.run.stats["compiled_backward"] = False
            return None
        finally:
            self.aug_f.nfe += self.cf.nfe
            self.cf.nfe = 0

    def segment(self, prob, flat, h0, k1, t_first):
        """One segment (the eager loop's ``integrate`` call, same arguments)."""
        steps = _STEPS_FOLLOWING if self.follow_forward else None
        return self._integrate(prob, flat, steps, h0=h0, k1=k1, t_first=t_first)

    def whole(self, problem, ctrl, points, actions, g_sorted, samples, flat, h0, ys_sorted):
        """The whole backward solve in the ``"stop"`` mode, from ``points[0]`` to
        ``points[-1]``, as one compiled solve: the adjoint's jumps at the output times
        (``actions``: ``{time: [("at", k)]}``, ``g_sorted[k]`` the jump of output ``k``, of
        sample ``samples[k]`` with a 2-D t) are impulses of the chunk at landing times, which
        also put back the forward's state there (``ys_sorted[k]``, that sample's row).
        ``problem(t0, t_end, controller)`` builds the augmented problem. Returns the final
        flat augmented state ``(1, W)`` and the step attempts, or None (see the class)."""
        B, M = self.cf.func.flat_shape
        t_start, t_stop = points[0], points[-1]
        inner = [p for p in points[1:-1] if p in actions]
        jumps = torch.zeros(len(inner) + 2, B, M, dtype=flat.dtype, device=flat.device)
        ys, put = torch.zeros_like(jumps), torch.zeros_like(jumps)
        for j, point in enumerate([t_start, *inner, t_stop]):
            for _, k in actions.get(point, ()):
                if samples is None:
                    jumps[j] += g_sorted[k].view(B, M)
                    ys[j], put[j] = ys_sorted[k].view(B, M), 1
                else:
                    row = samples[k : k + 1]
                    jumps[j].index_add_(0, row, g_sorted[k].view(1, M))
                    ys[j].index_copy_(0, row, ys_sorted[k].view(1, M))
                    put[j].index_fill_(0, row, 1)
        jumps = jumps.view(len(inner) + 2, B * M)
        flat = flat.clone()
        flat[0, B * M : 2 * B * M] += jumps[0]  # outputs at the start: the initial adjoint
        if t_start == t_stop:
            res_y, attempts = flat, 0
        else:
            ctrl = ctrl.with_landings(inner)
            imp = torch.zeros(len(inner), flat.shape[1], dtype=flat.dtype, device=flat.device)
            imp[:, B * M : 2 * B * M] = jumps[1:-1]
            imp[:, : B * M] = ys[1:-1].view(len(inner), B * M)
            mask = torch.zeros_like(imp)  # the state's entries put back (not added)
            mask[:, : B * M] = put[1:-1].view(len(inner), B * M)
            res = self._integrate(problem(t_start, t_stop, ctrl), flat, None, h0=h0,
                                  impulses=_on_landings(ctrl, inner, imp, mask))  # fmt: skip
            if res is None:
                return None
            res_y, attempts = res.y_final.clone(), res.n_accepted + res.n_rejected
        res_y[0, B * M : 2 * B * M] += jumps[-1]
        return res_y, attempts


def _on_landings(ctrl, times, imp, put):
    """The impulses ``imp`` (n, W) at ``times`` moved onto the landings the steps really end on:
    the controller merges landing times a rounding apart (``merge_landings``; e.g. the output
    times of two samples of a 2-D ``t`` one ulp apart), and an impulse at a time no step lands
    on exactly would never be applied. Impulses that share a landing are summed (exact up to
    rounding: their times differ by a few ulps), except the entries they put (``put`` (n, W)
    nonzero: the forward's state), which are averaged over the impulses putting them. Returns
    ``(times, impulses, put)``."""
    if not times:
        return times, imp, put
    L = torch.tensor(ctrl.merged_landings(), dtype=torch.float64)
    pts = torch.tensor(times, dtype=torch.float64)
    rep = L[(pts.unsqueeze(1) - L.unsqueeze(0)).abs().argmin(1)]
    at, which = torch.unique(rep, return_inverse=True)
    which = which.to(imp.device)
    summed = imp.new_zeros(at.shape[0], imp.shape[1]).index_add_(0, which, imp)
    n_put = put.new_zeros(summed.shape).index_add_(0, which, put)
    summed = summed / torch.where(n_put != 0, n_put, 1)
    return tuple(at.tolist()), summed, n_put
