"""Compiled stepping: several adaptive steps per call of one ``torch.compile``'d function.

The eager drivers pay PyTorch's dispatch cost (a few microseconds) for every operation of a
step, and the host-float driver reads the error norm back to the host once per step. On small
states and cheap vector fields that cost dominates: a Lorenz step is ~60 tiny operations. Here
the masked per-row step of :mod:`neuralode._compiled_step` -- the stages (the vector field
inlined), the error norm, the accept/reject decision, the step-size controller with its
landings, and the outputs at the output times the step passes -- is unrolled ``steps_per_call``
times and compiled into one kernel sequence by ``torch.compile`` (Inductor, with its C++
wrapper: no Python between the kernels). Nothing leaves the device inside a call; the host
reads back the rows' times, step sizes, counters and status once per call. A solve repeated
with the same func and shapes (a training loop) unrolls only as many steps per call as the
previous one took (:mod:`neuralode._compiled_lengths`): finished rows' masked steps cost as much
as real ones, in the forward and in the backward pass.

The same chunk serves both kinds of control: shared (one row: one step size and error norm for
the whole batch, a 1-D or a 2-D ``t``; :func:`integrate_compiled` in place of the host-float
driver) and per-sample (one row per sample; ``_compiled_rows.integrate_rows_compiled`` in place of the
eager per-row driver), and records every step's times, state and stages for dense output when
asked. The arithmetic is the eager drivers' (see :mod:`neuralode._compiled_step`), but sums
run in another order: the error estimate, which cancels heavily, then differs in its last bits
and the step sizes relatively by about 1e-10 (the accepted/rejected counts are normally the
same). A step passes at most a window of output times (``_OUT_WINDOW``), landing on the last.

Failures are those of the eager drivers (the same rule, :func:`neuralode._failures.cannot_step`,
in the step), found at the end of the call in which they happen. Each (func, constants, dtype,
device, shapes) compiles once; afterwards a call whose guards fail (func's Python state changed,
e.g. a float attribute) is not recompiled: the faces raise :class:`CompiledCodeMismatch` and
the solve runs on the eager engine.

Scope: explicit Runge--Kutta methods (Butcher tableaux) under any controller (``step_t``/
``jump_t``, a custom ``norm``: :mod:`neuralode._compiled_norm`), any state, a 1-D or 2-D ``t``;
Direct gradients (autograd through the chunks), Checkpointed and Backsolve (the forward
compiled, keeping the step records their backward passes use: :func:`forward_or_none` with
shared control, ``_compiled_rows`` per sample); no events.
"""

from __future__ import annotations

import logging
import math
import threading
import types
import warnings
import weakref

import torch

from . import _compiled_lengths as _lengths
from ._compiled_setup import _chunk_state, _setup, _shared_state
from ._compiled_stance import DEFAULT_STANCE, FAIL_ON_RECOMPILE
from ._compiled_start import Start, chunk_from_start
from ._compiled_step import Consts, chunk, raise_if_stuck
from ._failures import CAUSES, report_failure
from ._loop import LoopResult, Problem, StepRecord, VectorField, _start_outputs
from ._norms import ErrorNorm, initial_norm
from .controllers.step_size import time_beside
from .solvers.tableau import ButcherTableau

__all__ = ["STEPS_PER_CALL", "CompiledCodeMismatch", "check_compilable", "integrate_compiled"]

#: Steps unrolled into one compiled call at most (shorter calls, of powers of two, when a
#: repeated solve needs fewer). More steps amortise the call (~40 us) further but lengthen the
#: first compilation (about 4 s per step for dopri5 on 2 CPU cores, once per vector field,
#: dtype and shape; later runs reuse torch.compile's on-disk cache).
STEPS_PER_CALL = 8
#: With fixed steps (one to four evaluations each, all accepted, their number known) calls
#: unroll exactly the steps left, up to this many times ``STEPS_PER_CALL``: a 50-step Euler
#: sampling loop is two calls (32 + 18 steps) instead of seven (each call costs 50-100 us
#: besides its steps: guards, the host read, Python).
_FIXED_FACTOR = 4
#: Output times one step may pass (a step that would pass more lands on the last of them).
#: Each costs an interpolation per step: of the whole batch with shared control and a 1-D t
#: (``B * M`` values), of one sample per row with per-sample control (``B * M`` over the
#: rows), of one sample with shared control and a 2-D t (``M``: the window can be wide, and
#: must be, since the samples' output times interleave: 256 samples put 256 in every span).
_OUT_WINDOW = 8
_OUT_WINDOW_ROWS = 32
_OUT_WINDOW_PICK = 4096

_MAX_CACHED = 16
_lock = threading.Lock()
_compiled: dict = {}  # (ids of func's parts, key) -> _Entry


def check_compilable(*, tab, ctrl, gradient=None) -> None:
    """Raise ValueError naming what ``compile=True`` does not support in this call (events are
    refused by ``solve`` before it gets here). ``gradient`` is the name of a gradient method
    other than Direct, or None."""
    problems = []
    if not isinstance(tab, ButcherTableau):
        name = getattr(tab, "name", type(tab).__name__)
        problems.append(
            f"solver {name!r} (compiled stepping needs an explicit Runge-Kutta method: e.g. "
            "dopri5, tsit5, bosh3, dopri8, rk4, euler)"
        )
    if gradient is not None:
        problems.append(
            f"gradient={gradient} (compiled stepping differentiates by autograd through the "
            "compiled steps, replays their checkpoints or solves the adjoint backward: use "
            "gradient='direct', the default, 'checkpoint' or 'backsolve')"
        )
    if problems:
        raise ValueError(
            "compile=True does not support " + "; ".join(problems) + ". Use compile=False (the "
            "eager engine supports " + ("all of these)" if len(problems) > 1 else "it)")
        )


def _consts(tab, ctrl, time_dtype, steps, spec, floor, *, rows, pick, record, n_out,
            norm_parts=None, impulses=False, row_impulses=False) -> Consts:  # fmt: skip
    """The chunk's constants for this tableau, controller and state layout (``n_out`` output
    times per row; ``norm_parts``: only the first components in the error norm)."""
    P = tab.tensors(torch.float64, torch.device("cpu"))["P"]
    b_hat = tab.b_hat if tab.adaptive else tab.b
    # Outputs inside a step come from the continuous extension when it needs no extra
    # evaluations (no dense stages, or only f at the step end); otherwise (DOP853's 7th-order
    # extension has three more stages) steps land on every output time instead.
    cheap = tab.n_dense_stages == 0 or (tab.n_dense_stages == 1 and tab.dense_stage_is_next_first)
    wide = _OUT_WINDOW_PICK if pick else _OUT_WINDOW_ROWS if rows else _OUT_WINDOW
    return Consts(
        a=tuple(tuple(float(x) for x in row) for row in tab.a),
        b=tuple(float(x) for x in tab.b),
        b_err=tuple(float(x) - float(y) for x, y in zip(tab.b, b_hat)),
        c=tuple(float(x) for x in tab.c),
        P=tuple(tuple(float(x) for x in row) for row in P.tolist()),
        fsal=bool(tab.fsal),
        ctrl=ctrl.step_rule(),
        order=int(tab.error_order()) if tab.adaptive else 1,
        time_dtype=time_dtype,
        steps=int(steps),
        layout=(
            spec.kind,
            tuple(spec.keys),
            tuple(tuple(x) for x in spec.shapes),
            tuple(spec.sizes),
        ),  # fmt: skip
        # (at least one slot: a solve without outputs, the adjoint's, pads one)
        window=max(1, min(wide, n_out)) if cheap else 1,
        n_dense=int(tab.n_dense_stages),
        floor=bool(floor) and ctrl.adaptive,
        rows=rows,
        pick=pick,
        record=record,
        jumps=bool(ctrl.jump_t),
        norm_parts=int(norm_parts or 0),
        impulses=bool(impulses),
        row_impulses=bool(row_impulses),
    )


def _evals_per_attempt(tab, C: Consts) -> int:
    """Evaluations of func per step attempt in the chunk (non-FSAL methods evaluate f at the
    end of every attempt; jump_t adds the evaluation past the jump)."""
    extra = int(C.jumps) + int(C.impulses) + int(C.row_impulses)
    return (tab.n_stages - 1 if tab.fsal else tab.n_stages) + extra


def _func_parts(func) -> tuple:
    """The objects that identify func for the cache (a bound method by its object and function:
    ``model.forward`` is a new object at every attribute access)."""
    if isinstance(func, types.MethodType):
        return (func.__self__, func.__func__)
    return (func,)


def _refs(objs) -> tuple:
    out = []
    for o in objs:
        try:
            out.append(weakref.ref(o))
        except TypeError:  # not weak-referenceable: keep it (the cache is bounded)
            out.append(lambda o=o: o)
    return tuple(out)


def _without_constant_guards(entries) -> list[bool]:
    """torch.compile's guard filter: no guards on the chunk's constants ``C`` (hundreds of
    float comparisons, ~0.1 us each, per call: the tableau, the interpolant) nor on the start's
    ``S`` (:mod:`neuralode._compiled_start`), since an entry is only ever called with the
    constants it is cached under (:func:`_entry`; the controller in ``C`` compares by type and
    value, so its class's guards go too). The guards on func (its Python state) and on the
    tensors' shapes and dtypes stay."""
    consts = ("C", "S")
    prefixes = tuple(p for c in consts for p in (f"L['{c}']", f"{c}."))
    inner = tuple(f"({c}." for c in consts)
    return [not (e.name in consts or e.name.startswith(prefixes) or any(i in e.name for i in inner))
            for e in entries]  # fmt: skip


class _Entry:
    """One compiled ``chunk`` (or ``code``: a function calling it) for one (func, constants,
    dtype, device, shape)."""

    def __init__(self, parts, code=chunk):
        self.refs = _refs(parts)
        clone = types.FunctionType(code.__code__.replace(), code.__globals__, code.__name__)
        self.code = clone.__code__
        # The C++ wrapper calls the kernels without Python in between: on tiny states this
        # halves the cost of a call.
        options = {"cpp_wrapper": True, "guard_filter_fn": _without_constant_guards}
        self.fn = torch.compile(clone, fullgraph=True, dynamic=False, options=options)
        self.compiled = False

    def matches(self, parts) -> bool:
        return len(parts) == len(self.refs) and all(r() is o for r, o in zip(self.refs, parts))


def _entry(func, key, code=chunk) -> _Entry:
    """The cache entry for ``func`` and ``key`` (the rest of what the compiled code depends on).

    Each entry compiles its own copy of ``chunk``'s code object: torch.compile keeps its cache
    (and its recompilation limit) per code object, so many vector fields in one process do not
    push each other out. The most recently used entries are kept. ``code`` is the function
    compiled (``chunk``, or one calling it: part of ``key``).
    """
    parts = _func_parts(func)
    full_key = (tuple(id(o) for o in parts), key)
    with _lock:
        entry = _compiled.pop(full_key, None)
        if entry is None or not entry.matches(parts):  # new, or an id reused after collection
            entry = _Entry(parts, code)
        _compiled[full_key] = entry  # most recently used last
        while len(_compiled) > _MAX_CACHED:
            _compiled.pop(next(iter(_compiled)))
    return entry


class CompiledCodeMismatch(Exception):
    """func's compiled code no longer matches it (torch.compile would recompile); raised before
    any result is returned, so the caller can run the solve on the eager engine instead."""


def _compile_call(entry: _Entry, args):
    """The entry's first call, which compiles (Inductor's warnings about operators it runs
    through its fallback executor, e.g. for complex dtypes, are silenced meanwhile)."""
    quiet = [logging.getLogger(name) for name in ("torch._inductor", "torch._inductor.ir")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        out = entry.fn(*args)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise RuntimeError(
            f"compile=True: torch.compile could not compile the solve with this func "
            f"({type(e).__name__}: {first}). func, and a custom error norm if given, must be "
            "traceable by torch.compile without graph breaks (no data-dependent Python control "
            "flow, no .item()/.tolist(), no printing); use compile=False for this func"
        ) from e
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    entry.compiled = True
    return out


def _recompile_reason(e: Exception) -> str | None:
    """Why torch.compile refused to recompile (under the "fail_on_recompile" stance), or None
    if ``e`` is something else."""
    import torch._dynamo.exc as dynamo_exc

    text = str(e)
    recompile = (dynamo_exc.RecompileError, dynamo_exc.FailOnRecompileLimitHit)
    if not isinstance(e, recompile) and "recompile" not in text.lower():
        return None
    # The guard that failed, e.g. "f.k == 1.0", is the useful part of the message.
    why = [ln.strip(" -") for ln in text.splitlines() if "==" in ln or "guard" in ln]
    return (why[-1] if why else text.splitlines()[0] if text else type(e).__name__)[:200]


def _signature(func, C: Consts, s: dict, k: dict, track_grad: bool) -> tuple:
    """What a solve's step count is remembered under (:mod:`neuralode._compiled_lengths`): func,
    the constants, device, the inputs' shapes and dtypes (``k1``, if there, has ``y``'s)."""
    shapes = tuple((n, tuple(v.shape), v.dtype) for d in (s, k) for n, v in d.items() if n != "k1")
    ids = tuple(id(o) for o in _func_parts(func))
    return (ids, C._replace(steps=0, first=False), s["y"].device, shapes, bool(track_grad))


def _with_k1(grads: tuple) -> tuple:
    """The names of the chunk's inputs with a graph, ``grads``, with ``k1`` among them (after
    ``y``, as in the state)."""
    i = 1 if grads[:1] == ("y",) else 0
    return grads[:i] + ("k1",) + grads[i:]


def _run_chunks(func, C: Consts, s: dict, k: dict, track_grad: bool, on_report,
                adapt: bool = True, estimate=None, start=None) -> dict:  # fmt: skip
    """Call the compiled chunk until ``on_report(report, records, state, steps)`` returns True.

    Each call unrolls ``steps`` of :func:`neuralode._compiled_lengths.lengths` (``C.steps`` at
    most): with ``adapt``, the smallest that covers the attempts the last solve of the same
    signature took (:func:`neuralode._compiled_lengths.pick`; ``estimate()``, or None,
    before there is one), else ``C.steps``. With fixed steps the count is exact: each call unrolls the steps
    left. With ``start`` (a :class:`neuralode._compiled_start.Start`; ``s`` without ``k1``) the
    first call evaluates ``f(t0, y0)`` and the initial step size itself
    (:func:`neuralode._compiled_start.chunk_from_start`).

    Raises
    ------
    CompiledCodeMismatch
        When func's compiled code no longer matches func (torch.compile would have to
        recompile: a Python value func reads has changed); the caller runs the eager engine.
    RuntimeError
        When torch.compile cannot compile the solve with this func (graph breaks).
    """
    # (the calls after a start have k1, as y: the keys of the chunks solves without one use)
    full = s if start is None else {"y": s["y"], "k1": s["y"], **s}
    shapes = tuple((n, tuple(v.shape), v.dtype) for d in (full, k) for n, v in d.items())
    signature = _signature(func, C, s, k, track_grad)
    expected = _lengths.expected(signature, estimate) if adapt else None
    done = 0
    # Once compiled, a call that would recompile (func's Python state changed: guards fail)
    # raises instead of silently spending 10-40 s per call; the caller then runs eagerly.
    with torch.set_grad_enabled(track_grad), FAIL_ON_RECOMPILE:
        while True:
            n = _lengths.pick(expected, done, C.steps, exact=not C.ctrl.adaptive)
            Cn = C if n == C.steps else C._replace(steps=n)
            # Which inputs carry a graph is part of the signature (torch.compile guards on it):
            # under autograd a first call from a y0 without one is followed by calls from
            # states with one.
            grads = tuple(name for name, v in s.items() if v.requires_grad)
            key, args = (Cn, s["y"].device, shapes, bool(track_grad), grads), (func, Cn, s, k)
            if start is None:
                entry = _entry(func, key)
            else:
                entry, args = _entry(func, (*key, start), chunk_from_start), (*args, start)
            if not entry.compiled:  # (a new length: func must still match the older ones)
                # (a first call that evaluates f itself has no k1: the older lengths have)
                # (a start's siblings are plain chunks, whose k1 has a graph under autograd)
                stale = None
                for g in [grads] if start is None else [grads, _with_k1(grads)]:
                    probe = s if "k1" in s else dict(s, k1=torch.empty_like(s["y"]))
                    if "k1" in g and "k1" not in s:
                        probe["k1"].requires_grad_()
                    stale = stale or _lengths.stale_sibling((signature, g), entry, func, probe, k)
                if stale is not None:
                    raise CompiledCodeMismatch(f"guards of the code for {stale} steps failed")
                with DEFAULT_STANCE:
                    res = _compile_call(entry, args)
            else:
                try:
                    res = entry.fn(*args)
                except Exception as e:
                    why = _recompile_reason(e)
                    if why is None:
                        raise
                    raise CompiledCodeMismatch(why) from e
            if start is None:  # (the siblings stale_sibling checks are plain chunks)
                _lengths.note_run((signature, grads), entry, Cn)
            C, start = C._replace(first=False), None  # (f at the start: only in the first call)
            done += n
            s = dict(res)
            report, rec = s.pop("report").tolist(), s.pop("rec", None)
            raise_if_stuck(report, C, k)  # (a propose that does not advance: ValueError)
            if on_report(report, rec, s, n):
                R = s["t"].shape[0]
                _lengths.remember(signature, max(report[2 * R : 3 * R]))
                return s


def _split(report: list, R: int, steps: int):
    """The report's per-row fields (lists of length R) and the records' per-step times."""
    fields = [report[i * R : (i + 1) * R] for i in range(7)]
    rest = report[7 * R :]
    n = steps * R
    recs = [rest[i * n : (i + 1) * n] for i in range(3)] if rest else None
    return fields, recs


def integrate_compiled(
    prob: Problem, f: VectorField, y0: torch.Tensor, *, throw: bool, steps_per_call=None,
    track_grad: bool = False, record: str | None = None, h0: float | None = None,
    k1: torch.Tensor | None = None, t_first: float | None = None, impulses=None,
) -> LoopResult:  # fmt: skip
    """The forward solve of :func:`neuralode._loop.integrate` (shared control) in compiled
    chunks of steps.

    ``y0`` is the flat ``(B, M)`` state; ``prob.out_sample`` set (a 2-D ``t``) gives each
    output one sample. Returns a :class:`LoopResult` with the outputs in result order and,
    with ``record`` ``"times"``, ``"states"`` or ``"dense"``, a :class:`StepRecord` per
    accepted step (times and outputs; the state at its start; also its stages), as the eager
    loop keeps them (for the backsolve adjoint, checkpointed gradients and dense output).
    ``h0`` (the first step size, adaptive control), ``k1`` (f at the start, ``(B, M)``) and
    ``t_first`` (the time of the first evaluation) replace what the solve would choose, as in
    :func:`neuralode._loop.integrate` (the backsolve adjoint's segments). ``impulses``
    ``(times, jumps, put)``: the state (one row, ``B = 1``) jumps by ``jumps[j]`` ``(M,)`` when
    a step ends on ``times[j]``, or is set to it where ``put[j]`` is nonzero (landing times of
    the controller; f is evaluated afresh there).

    Raises
    ------
    CompiledCodeMismatch, RuntimeError
        See :func:`_run_chunks`.
    """
    tab, ctrl = prob.tableau, prob.controller
    dev, dtype = y0.device, y0.dtype
    M = y0.shape[1]
    d, t0, t_end = prob.direction, prob.t0, prob.t_end
    pick = prob.out_sample is not None
    n_steps = steps_per_call or STEPS_PER_CALL * (1 if ctrl.adaptive else _FIXED_FACTOR)
    n_out = len(prob.out_t)
    C, k, seen, init = _setup(prob, f.time_dtype, n_steps, record is not None,
                        bool(impulses and impulses[0]), dtype, dev)  # fmt: skip
    if pick:
        out = torch.full((1, n_out + C.window, 1, M), math.nan, dtype=dtype, device=dev)
        first, p = _start_outputs(prob, y0, prob.samples_on(dev))  # (the initial state)
        if p:
            out[0, :p] = first[0].unsqueeze(1)
    else:  # (the initial state in the first p slots: see _shared_state)
        p = _start_outputs(prob, y0, None)[1]
    if t_first is None:  # (past a jump_t at t0: f's limit from inside the interval)
        t_first = ctrl.first_time(t0, t_end, f.time_dtype)
    # Fixed steps from t0 evaluate the first stage inside the first call (an eager call costs
    # ~1.5 compiled evaluations) once an earlier solve of this setup has checked func's output
    # (the eager call's checks name what is wrong); the first call compiles once more.
    parts = _func_parts(f.func)
    ids = tuple(id(o) for o in parts)
    known = seen.get(ids)  # (weak references to func's parts, whether it took one call)
    checked = known is not None and all(r() is o for r, o in zip(known[0], parts))
    inside = k1 is None and not ctrl.adaptive and not track_grad and t_first == t0 and checked
    # Adaptive steps: f(t0, y0) and the initial step size in the first call too, when the last
    # solve of this setup with this func fitted in one call (a training step: the eager prologue
    # and its backward cost about two compiled steps; a longer solve keeps the plain chunks, so
    # that it compiles no more versions). A single tensor state with float tolerances.
    start = None
    if (
        k1 is None and h0 is None and ctrl.adaptive and t_first == t0 and checked and known[1]
        and steps_per_call is None and prob.spec.kind == "tensor" and prob.norm is None
        and isinstance(prob.rtol, float) and isinstance(prob.atol, float)
    ):  # fmt: skip
        start = Start(ctrl, prob.spec, tab.error_order(), prob.rtol, prob.atol)
        try:  # (part of the compiled entry's key: a controller that does not hash starts eagerly)
            hash(start)
            h0 = 0.0  # (chosen in the call)
        except TypeError:
            start = None
    if inside:
        C = C._replace(first=True)
    elif k1 is None and start is None:
        k1 = f(t_first, y0)  # (with its graph under autograd: the first stage of the first step)
    if (h0 is None or not ctrl.adaptive) and start is None:
        with torch.no_grad():  # step sizes are constants of the discrete solve
            nrm = order = None
            if ctrl.adaptive:
                norm, order = ErrorNorm(y0, prob.spec, prob.norm_components), tab.error_order()
                nrm = initial_norm(norm, y0, prob.rtol, prob.atol, prob.atol_zero, prob=prob)
            h0 = ctrl.initial_step(nrm, f, t0, y0.detach(), None if inside else k1.detach(), d,
                                   abs(t_end - t0), order)  # fmt: skip
    nfe0 = f.nfe
    if pick:
        s = _chunk_state(y0, k1, k["t0"], h0, out, torch.tensor([p], dtype=torch.int64, device=dev))
    else:
        s = _shared_state(y0, k1, k["t0"], h0, p, n_out + C.window, init)
    if inside or start is not None:
        del s["k1"]
    if C.impulses:
        k["I_t"] = torch.tensor(impulses[0], dtype=torch.float64, device=dev)
        k["I"], k["I_put"] = (x.to(dtype=dtype, device=dev) for x in impulses[1:3])
    steps: list[StepRecord] = []
    keep_next = not tab.fsal and tab.dense_stage_is_next_first
    done = dict(p=p, t_first=t_first, calls=0)

    def on_report(report, rec, state, n_call):
        fields, times = _split(report, 1, n_call)
        (t_now,), (h_now,), (att,), (acc,), (code,), (nf,), (busy,) = fields
        if rec is not None:
            t_o, t_n, ok = times
            for i in (i for i in range(n_call) if ok[i]):
                lo = hi = done["p"]  # the outputs in (t, t_new]
                while hi < n_out and d * (prob.out_t[hi] - t_n[i]) <= 0:
                    hi += 1
                # At a jump_t the last stage saw the left limit, the next first one the right.
                jump = t_n[i] in ctrl.jump_t
                t_last = time_beside(t_n[i], t_o[i], f.time_dtype) if jump else t_n[i]
                r = StepRecord(t_o[i], t_n[i], done["t_first"], t_last, lo, hi)
                if record != "times" or hi > lo and prob.out_t[lo] != t_n[i]:  # (a replay's)
                    r.y = rec["y"][i] if record != "times" else rec["y"][i].clone()
                if record == "dense":
                    r.K = rec["K"][i].reshape(tab.n_stages, -1)
                    r.k_next = rec["k_next"][i] if keep_next else None
                steps.append(r)
                done["p"] = hi
                done["t_first"] = time_beside(t_n[i], t_n[i] + d, f.time_dtype) if jump else t_n[i]
        done.update(t=t_now, h=abs(h_now), att=int(att), acc=int(acc), calls=done["calls"] + 1)
        if busy:  # (a row with a status code is not busy)
            return False
        done["cause"], done["nf"] = failure_cause(code, busy, d * (t_end - t_now) <= 0), bool(nf)
        return True

    s = _run_chunks(f.func, C, s, k, track_grad, on_report, adapt=steps_per_call is None,
                    estimate=lambda: ctrl.step_count(t0, t_end), start=start)  # fmt: skip
    if ids in seen or len(seen) < _MAX_CACHED:
        seen[ids] = (known[0] if checked else _refs(parts), done["calls"] == 1)
    t_now, h_now, att, n_acc = done["t"], done["h"], done["att"], done["acc"]
    # (a start in the call: f(t0, y0), and the initial step's evaluation unless dt0 is set)
    at_start = 0 if start is None else 1 + (getattr(ctrl, "dt0", None) is None)
    f.nfe = nfe0 + att * _evals_per_attempt(tab, C) + int(inside) + at_start
    state = {"status": "success", "message": ""}
    cause = done["cause"]
    if cause is None and not ctrl.adaptive and not bool(torch.isfinite(s["y"]).all()):
        cause = "nonfinite_fixed"  # fixed steps make no per-step decision: checked at the end
    if cause is not None:
        report_failure(
            cause, t=t_now, attempts=att, h=h_now, dt_min=ctrl.dt_min, nonfinite=done["nf"],
            max_steps=prob.max_steps, t_end=t_end, n_acc=n_acc, n_rej=att - n_acc,
            engine="compiled stepping", throw=throw, state=state,
        )  # fmt: skip
    status, message = state["status"], state["message"]
    ys = s["out"].select(0, 0).narrow(0, 0, n_out)
    if pick:
        ys = ys[:, 0]
    if prob.out_order is not None:
        ys = ys[prob.out_order]
    return LoopResult(
        ys=ys, y_final=s["y"], t_reached=t_now, status=status, message=message,
        n_accepted=n_acc, n_rejected=att - n_acc, steps=steps, h_next=h_now, k1_next=s["k1"],
    )  # fmt: skip


def failure_cause(code: int, busy, reached: bool) -> str | None:
    """Why a row of the compiled step stopped short (a cause of :data:`~neuralode._failures.CAUSES`
    from its status ``code``), or None: it is still stepping (``busy``) or ``reached`` its end.
    A row that stopped without a code used up its step attempts in a call's last step."""
    if code:
        return CAUSES[int(code)]
    return None if busy or reached else "max_steps"


def warn_mismatch(why, stacklevel: int) -> None:
    """The warning when a solve runs eagerly because func's compiled code no longer matches."""
    warnings.warn(
        "compile=True: func no longer matches the code compiled for it (torch.compile "
        f"would recompile: {why}); a Python number or object that func reads has "
        "probably changed since the first solve (e.g. an attribute self.k = 1.7). This "
        "solve runs on the eager engine. Keep such values in tensors (e.g. "
        "register_buffer) so that one compiled version serves every call",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def forward_or_none(run, f: VectorField, y0: torch.Tensor, record: str | None):
    """The forward solve of a custom-gradient method (no graph) in compiled chunks, keeping
    ``record`` per step, when the solve asked for compiled stepping; else None, and None (after
    a warning) when func's compiled code no longer matches it: the caller runs it eagerly."""
    if not run.extra.get("compile"):
        return None
    result = None
    if run.prob.t_end != run.prob.t0:  # (a single output time: nothing to integrate)
        try:
            result = integrate_compiled(run.prob, f, y0, throw=run.throw, record=record)
        except CompiledCodeMismatch as why:
            warn_mismatch(why, stacklevel=6)
    run.stats["compiled"] = result is not None
    return result
