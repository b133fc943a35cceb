"""The inputs of the compiled chunk (:func:`neuralode._compiled_step.chunk`): its state ``s``
and constant tensors ``k``, and, for :func:`neuralode._compiled.integrate_compiled`, a cache of
the constants per solve setup, so that a repeated solve (a sampling or training loop) does not
rebuild them."""

from __future__ import annotations

import math
import threading

import torch

from ._compiled_norm import compiled_norm
from ._loop import Problem

_MAX_SETUPS = 16
_lock = threading.Lock()


def _tolerance(tol, dtype, dev):
    """rtol/atol as a tensor of the state's (real) dtype."""
    if not isinstance(tol, torch.Tensor):
        tol = torch.tensor(tol, dtype=dtype, device=dev)
    return tol.real if tol.is_complex() else tol


def _chunk_state(y0, k1, t0, h0, out, p) -> dict:
    """The chunk's state ``s`` (see :func:`~neuralode._compiled_step.chunk`) at the start: rows
    at ``t0`` ((R,) float64) with first step sizes ``h0``, state ``y0`` and first stage ``k1``.
    Every tensor is its own (torch.compile guards on which inputs alias)."""
    R, dev = t0.shape[0], y0.device
    f64, i64 = dict(dtype=torch.float64, device=dev), dict(dtype=torch.int64, device=dev)
    return dict(
        y=y0, k1=k1, t=t0.clone(), h=torch.zeros(R, **f64) + h0, prev=torch.ones(R, **f64),
        out=out, p=p, att=torch.zeros(R, **i64), nacc=torch.zeros(R, **i64),
        st=torch.zeros(R, **i64), nf=torch.zeros(R, dtype=torch.bool, device=dev),
    )  # fmt: skip


def _shared_state(y0, k1, t0, h0: float, p: int, n_slots: int, init: dict) -> dict:
    """:func:`_chunk_state` of shared control (one row) at the start of a solve: the outputs
    ``(1, n_slots, B, M)`` hold ``y0`` in their first ``p`` slots, NaN after. The tensors that
    are the same at every solve of a setup (the row's time, counters, status, PI memory, the
    NaN slots) are made once, in ``init`` (the setup's; the chunk never writes to its inputs),
    and the outputs in one ``cat``: 8 small tensors fewer per solve."""
    if not init:
        R, dev = 1, y0.device
        f64, i64 = dict(dtype=torch.float64, device=dev), dict(dtype=torch.int64, device=dev)
        init.update(
            t=t0.clone(), prev=torch.ones(R, **f64), p=torch.tensor([p], **i64),
            att=torch.zeros(R, **i64), nacc=torch.zeros(R, **i64), st=torch.zeros(R, **i64),
            nf=torch.zeros(R, dtype=torch.bool, device=dev),
            nan=torch.full((n_slots - p, *y0.shape), math.nan, dtype=y0.dtype, device=dev),
        )  # fmt: skip
    # (a new tensor, never the cached one itself: the outputs reach the caller)
    out = torch.cat([y0.unsqueeze(0).expand(p, *y0.shape), init["nan"]]).unsqueeze(0)
    h = torch.full((1,), h0, dtype=torch.float64, device=y0.device)
    return dict(
        y=y0, k1=k1, t=init["t"], h=h, prev=init["prev"], out=out, p=init["p"],
        att=init["att"], nacc=init["nacc"], st=init["st"], nf=init["nf"],
    )  # fmt: skip


def _chunk_consts(C, ctrl, dtype, t0, t_end, sdir, out_t, max_steps, rtol, atol, landings,
                  pick=None) -> dict:  # fmt: skip
    """The chunk's constants ``k`` (see :func:`~neuralode._compiled_step.chunk`) for rows from
    ``t0`` to ``t_end`` in directions ``sdir`` ((R,) float64), a state of dtype ``dtype``. The
    chunk never writes to them (they may be reused by later solves)."""
    dev = t0.device
    f64, i64 = dict(dtype=torch.float64, device=dev), dict(dtype=torch.int64, device=dev)
    k = dict(
        t_end=t_end, t0=t0, sdir=sdir, lo=torch.minimum(t0, t_end), hi=torch.maximum(t0, t_end),
        out_t=out_t.contiguous(), rtol=_tolerance(rtol, dtype, dev),
        max_att=torch.tensor(max_steps if max_steps is not None else 2**62, **i64),
        atol=_tolerance(atol, dtype, dev), L=torch.tensor(landings, **f64),
    )  # fmt: skip
    if C.jumps:
        k["J"] = torch.tensor(ctrl.jump_t, **f64)
    if pick is not None:
        k["pick"] = pick
    return k


def _chunk_inputs(C, ctrl, y0, k1, t0, t_end, sdir, h0, out, p, out_t, max_steps, rtol, atol,
                  landings, pick=None):  # fmt: skip
    """The chunk's state ``s`` and constants ``k`` (:func:`_chunk_state`,
    :func:`_chunk_consts`)."""
    k = _chunk_consts(C, ctrl, y0.dtype, t0, t_end, sdir, out_t, max_steps, rtol, atol,
                      landings, pick)  # fmt: skip
    return _chunk_state(y0, k1, t0, h0, out, p), k


#: integrate_compiled's constants per solve setup (a repeated solve -- a sampling or training
#: loop -- skips rebuilding the tableau's and controller's constants and ~10 small tensors).
_setups: dict = {}


def _setup(prob: Problem, time_dtype, n_steps: int, record: bool, impulses: bool, dtype, dev):
    """The chunk's constants ``C`` and constant tensors ``k`` (a new dict, its tensors shared
    between solves of the same setup) for :func:`integrate_compiled`, the setup's record of
    the funcs solved with it and its initial state tensors (:func:`_shared_state`) (two dicts,
    empty when the setup is not cached)."""
    tab, ctrl, spec = prob.tableau, prob.controller, prob.spec
    key = None
    # Cached only when every part compares by value or identity (float tolerances: a tensor
    # tolerance does not compare to a bool).
    if isinstance(prob.rtol, float) and isinstance(prob.atol, float) and not impulses:
        key = (
            tab, ctrl, time_dtype, n_steps, record, dtype, dev, spec.kind, tuple(spec.keys),
            tuple(tuple(x) for x in spec.shapes), prob.atol_zero, prob.norm_components,
            prob.t0, prob.t_end, tuple(prob.out_t), prob.out_sample is None or
            tuple(prob.out_sample), prob.rtol, prob.atol, prob.max_steps, id(prob.norm),
        )  # fmt: skip
        try:
            hit = _setups.get(key)
        except (TypeError, RuntimeError):  # (unhashable, or compares to no bool)
            hit = key = None
        if hit is not None:
            return hit[0], dict(hit[1]), hit[2], hit[3]
    from ._compiled import _consts  # (late: _compiled imports this module)

    d, t0, t_end = prob.direction, prob.t0, prob.t_end
    pick = prob.out_sample is not None
    n_out = len(prob.out_t)
    # Without outputs strictly inside the interval (t = [t0, t1], a sampling loop) a window of
    # one slot serves: the last step lands on t1, and no step interpolates.
    inner = sum(1 for x in prob.out_t if d * (x - t0) > 0 and d * (t_end - x) > 0)
    C = _consts(tab, ctrl, time_dtype, n_steps, spec, prob.atol_zero, rows=False,
                pick=pick, record=record, n_out=n_out if pick or inner else 1,
                norm_parts=prob.norm_components, impulses=impulses)  # fmt: skip
    # (PIController(norm=...); by identity in the key: C holds it, so its id stays its own)
    C = compiled_norm(C, prob.norm, spec, rows=False)
    W = C.window
    f64 = dict(dtype=torch.float64, device=dev)
    i64 = dict(dtype=torch.int64, device=dev)
    out_t = torch.tensor([list(prob.out_t) + [d * math.inf] * W], **f64)
    tt = [torch.tensor([x], **f64) for x in (t0, t_end, d)]
    pick_t = torch.tensor([list(prob.out_sample) + [0] * W], **i64) if pick else None
    k = _chunk_consts(C, ctrl, dtype, *tt, out_t, prob.max_steps, prob.rtol, prob.atol,
                      ctrl.landing_times(t0, t_end), pick_t)  # fmt: skip
    seen: dict = {}  # ids of the funcs solved with this setup -> weak references to them
    init: dict = {}  # the initial state's tensors that are the same at every solve
    if key is not None:
        with _lock:
            _setups[key] = (C, k, seen, init)
            while len(_setups) > _MAX_SETUPS:
                _setups.pop(next(iter(_setups)))
    return C, dict(k), seen, init
