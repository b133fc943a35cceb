"""The per-sample backsolve adjoint's backward solve in compiled chunks.

With ``compile=True``, ``batch_control="per_sample"`` and ``gradient=Backsolve(...)`` the
forward solve runs in compiled chunks (:mod:`neuralode._compiled_rows`); here the backward
solve of :mod:`neuralode.gradients.rows` does too, when every sample's adjoint stops at its
outputs (``Solution.stats["backsolve_outputs"] == "stop"``: no forward step is replayed). It
integrates ``(y, a)`` per sample (``dy/dt = f``, ``da/dt = -a^T df/dy``) with the compiled
per-row step, the augmented field traced by ``torch.compile`` (its vector-Jacobian product is
``torch.func.vjp`` of func with respect to the state only, so func need not be a module). Each
sample's stops are its output slots, all landed on (a window of one output per step), where
its adjoint jumps by the gradients of its outputs there, y is put back to the forward's output
(y solved backward leaves the trajectory of contracting dynamics exponentially) and f is
evaluated afresh at that state (inside the chunk: ``Consts.row_impulses``), without
restarting the step-size control, as the eager backward solve does. The parameter integral
``-int a^T df/dtheta dt`` is the eager one's: after each compiled call, one vector-Jacobian
product of func over the stages of every step the call accepted (the stages' states rebuilt
from the recorded first state and stages).

What it needs, else the backward solve runs eagerly (``stats["compiled_backward"]`` says which
ran): the forward compiled, an explicit Runge--Kutta method and an adaptive controller for
the backward solve, no replayed forward steps, and func's compiled code matching it (else a
warning, as for the forward). At a ``jump_t`` the stages are at the limits from each side, as
eagerly (the times of the parameter integral's stages follow the chunk's rule).
"""

from __future__ import annotations

import threading
import types
import weakref

import torch

from ._compiled import CompiledCodeMismatch, warn_mismatch
from ._compiled_rows import integrate_rows_compiled
from ._loop_batched import BatchedField, RowsRun
from .controllers.step_size import time_beside
from .solvers.explicit_rk import make_stepper
from .solvers.tableau import ButcherTableau

__all__ = ["RowsAdjointField", "backward_rows_compiled"]

_lock = threading.Lock()
_fields: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # func's owner -> {key: field}


class RowsAdjointField:
    """The augmented field ``(t (B,), (y, a)) -> (f(t, y), -a^T df/dy)`` on the flat state's
    rows ``y``, ``a`` (B, M), for func of tree layout ``layout`` (traceable by torch.compile).
    Holds func by a weak reference (the cache of compiled code must not keep a model alive)."""

    def __init__(self, owner, method, layout: tuple):
        self._owner = weakref.ref(owner)
        self._method = method  # func's function when func is a bound method, else None
        self.layout = layout  # (kind, keys, shapes, sizes) of func's state

    def _f(self, t, y):
        owner = self._owner()
        func = owner if self._method is None else types.MethodType(self._method, owner)
        kind, keys, shapes, sizes = self.layout
        if kind == "tensor":
            return func(t, y.view(shapes[0])).reshape(y.shape)
        offs = [sum(sizes[:i]) for i in range(len(sizes))]
        parts = [y[:, o : o + m].reshape(sh) for o, m, sh in zip(offs, sizes, shapes)]
        res = func(t, tuple(parts) if kind == "tuple" else dict(zip(keys, parts)))
        vals = list(res) if kind == "tuple" else [res[k] for k in keys]
        return torch.cat([v.reshape(y.shape[0], -1) for v in vals], 1)

    def __call__(self, t, ya):
        y, a = ya
        fy, pull = torch.func.vjp(lambda yy: self._f(t, yy), y)
        (vj,) = pull(-a)
        return fy, vj


def rows_adjoint_field(func, spec) -> RowsAdjointField | None:
    """The (cached) :class:`RowsAdjointField` of ``func`` on states of layout ``spec``, or None
    when func cannot be held weakly."""
    if isinstance(func, types.MethodType):
        owner, method = func.__self__, func.__func__
    else:
        owner, method = func, None
    layout = (spec.kind, tuple(spec.keys), tuple(tuple(s) for s in spec.shapes), tuple(spec.sizes))
    try:
        with _lock:
            per = _fields.setdefault(owner, {})
            key = (method, layout)
            if key not in per:
                per[key] = RowsAdjointField(owner, method, layout)
            return per[key]
    except TypeError:  # not weak-referenceable
        return None


def backward_rows_compiled(run, tab, ctrl, aug_spec, ya, stops, rt, at, floor, max_steps,
                           params, gp, inner: BatchedField):  # fmt: skip
    """The per-sample backward solve of ``(y, a)`` (``ya`` (B, 2M) at the stops' start, the
    jumps at the start applied) over ``stops`` (see ``gradients.rows._stops``) in compiled
    chunks; adds the parameter integral to ``gp`` (its evaluations of func counted by
    ``inner``). Returns the final ``(y, a)`` (B, 2M) and the evaluations of the augmented
    field (func with a vector-Jacobian product each), or None when it cannot run
    compiled here (see the module docstring; the caller runs it eagerly)."""
    if not (
        run.stats.get("compiled") and stops.mode == "stop" and isinstance(tab, ButcherTableau)
        and ctrl.adaptive
    ):  # fmt: skip
        return None
    if bool((stops.times[:, 0] == stops.times[:, -1]).all()):  # nothing to integrate
        return None
    field = rows_adjoint_field(run.func, run.spec)
    if field is None:
        return None
    B, M2 = ya.shape
    M = M2 // 2
    S = stops.times.shape[1]
    f = BatchedField(field, aug_spec, run.time_dtype)
    aug = RowsRun(aug_spec, field, run.time_dtype, f, make_stepper(tab, ya.dtype, ya.device),
                  stops.times, ctrl, rt, at, max_steps, True, False, floor)  # fmt: skip
    # On landing on stop s: the adjoint jumps, y is put back to the forward's there (the
    # jumps at the start are in ya, its y the forward's)
    jumps, put = stops.jump.view(B, S, M).clone(), stops.put.view(B, S, 1).clone()
    jumps[:, 0], put[:, 0] = 0.0, False
    imp = torch.cat([torch.where(put, stops.y.view(B, S, M), 0.0), jumps], 2)
    puts = torch.cat([put.expand(B, S, M), torch.zeros_like(put).expand(B, S, M)], 2)
    a_ = [[float(x) for x in row] for row in tab.a]
    b_, c_ = [float(x) for x in tab.b], [float(x) for x in tab.c]
    use = [i for i in range(len(b_)) if b_[i] != 0.0]
    t0, t1 = stops.times[:, 0].contiguous(), stops.times[:, -1].contiguous()
    lo, hi = torch.minimum(t0, t1), torch.maximum(t0, t1)
    sdir = torch.where(t1 >= t0, 1.0, -1.0).to(torch.float64)
    J = torch.tensor(ctrl.jump_t, dtype=torch.float64, device=t0.device) if ctrl.jump_t else None
    # Each row's time of its next first stage: past a jump_t f's limit from the far side.
    tf = [ctrl.first_time(t0, t1, run.time_dtype)]
    gl = [torch.zeros_like(g) for g in gp]  # (added to gp once the solve is done)

    def stage_times(rec, n):
        """Per step of the call (B,): the time of its first stage, and of its stages at c = 1
        (the left limit at a jump_t), as the chunk evaluated them."""
        firsts, lasts = [], []
        for i in range(n):
            t_n, acc = rec["t_new"][i], rec["acc"][i]
            t_last = t_next = t_n
            if J is not None:
                jumped = acc & torch.isin(t_n, J)
                t_last = torch.where(jumped, time_beside(t_n, rec["t"][i], run.time_dtype), t_n)
                t_next = torch.where(jumped, time_beside(t_n, t_n + sdir, run.time_dtype), t_n)
            firsts.append(tf[0])
            lasts.append(t_last)
            tf[0] = torch.where(acc, t_next, tf[0])
        return torch.stack(firsts), torch.stack(lasts)

    def on_steps(rec, n):
        """The parameter integral over the accepted steps of one call: sum_i b_i h
        (-a_i^T df/dtheta) at the stages, one evaluation of func over all of them."""
        t_first, t_last = stage_times(rec, n)
        if not params:
            return
        i, r = rec["acc"].nonzero().unbind(1)
        if i.numel() == 0:
            return
        t_o, t_f, t_l = rec["t"][i, r], t_first[i, r], t_last[i, r]
        h = rec["t_new"][i, r] - t_o
        y_o, K = rec["y"][i, r], rec["K"][i, :, r]  # (q, 2M), (q, stages, 2M)
        hs = h.to(y_o.dtype).unsqueeze(1)
        ts, ys, cot = [], [], []
        for s in use:
            y_s = y_o
            for j in range(s):
                if a_[s][j] != 0.0:
                    y_s = y_s + (a_[s][j] * hs) * K[:, j]
            ts.append(t_f if s == 0 else t_l if c_[s] == 1.0 else
                      torch.clamp(t_o + c_[s] * h, lo[r], hi[r]))  # fmt: skip
            ys.append(y_s[:, :M])
            cot.append(-(b_[s] * hs) * y_s[:, M:])
        with torch.enable_grad():
            fy = inner(torch.cat(ts), torch.cat(ys).detach())
            grads = torch.autograd.grad(fy, params, torch.cat(cot), allow_unused=True)
        for q, g in enumerate(grads):
            if g is not None:
                gl[q] = gl[q] + g

    try:
        with torch.no_grad():
            res = integrate_rows_compiled(aug, ya, impulses=(imp, puts), on_steps=on_steps)
    except CompiledCodeMismatch as why:
        warn_mismatch(why, stacklevel=8)
        return None
    for q, g in enumerate(gl):
        gp[q] = gp[q] + g
    return res[1], f.nfe
