"""The generic explicit Runge--Kutta engine: one step of any Butcher tableau.

Every stage state, new state and error estimate is one :func:`stage_sum` (the one Runge--Kutta
stage combination of every driver, compiled stepping included): eagerly one fused ``addmv`` of
the stage matrix against a tableau row on the 1-D flat state. The same code serves the forward
solve, the replays of checkpointed and backsolve gradients, and dense output.
"""

from __future__ import annotations

import torch

from .stepper import Stepper
from .tableau import ButcherTableau, interpolant_sum

__all__ = ["RKStepper", "make_stepper", "stage_sum"]


class RKStepper(Stepper):
    """The generic explicit Runge--Kutta step for a tableau, in a given dtype/device."""

    def __init__(self, tableau: ButcherTableau, dtype: torch.dtype, device: torch.device):
        self.tab = tableau
        self.T = tableau.tensors(dtype, device)
        self.S = tableau.n_stages
        self.Sd = tableau.n_stages + tableau.n_dense_stages
        self.fsal = tableau.fsal
        self.c = tableau.c
        # Row i of a, restricted to the stages it combines (a[i, :i]), sliced once.
        rows = self.T.get("_rows")
        if rows is None:  # cached with the tensors (per dtype and device)
            rows = self.T["_rows"] = [self.T["a"][i, :i] for i in range(self.S)]
        self.rows = rows
        self.b_err = self.T["b_err"][0] if "b_err" in self.T else None
        # The rows of a, then b, and b - b_hat as Python floats (stage_sum's coefficients), and
        # whether a row past the first has several nonzero weights (stages() then wants the
        # state flattened once per step); cached with the tensors.
        floats = self.T.get("_floats")
        if floats is None:
            b_err = None
            if tableau.b_hat is not None:
                b_err = tuple(x - y for x, y in zip(tableau.b, tableau.b_hat))
            rows_f = (*tableau.a, tuple(tableau.b))
            multi = any(_single(row) is None for row in rows_f[1:])
            floats = self.T["_floats"] = (rows_f, b_err, multi)
        self.tab_rows, self.tab_b_err, self.multi = floats
        # Without a graph and when no step keeps its stages (no dense output), one stage buffer
        # serves every step: a fresh large allocation per step costs page faults that dominate
        # small vector fields. Row 0 holds the first stage across attempts (see carry_fsal).
        self.reuse_buffer = False
        self._buf: torch.Tensor | None = None
        self._err: torch.Tensor | None = None
        self._krows: list = []
        self._krows_shaped: list = []
        self._krows_shape = None
        self._prefix: list[torch.Tensor] = []
        self._bufT: torch.Tensor | None = None
        self._plan = None  # (see _make_plan)
        self._flat = (None, None)  # (a new state as returned, and flat: see step)

    def step(self, f, t, h, y, k1, t_last, track_grad: bool):
        """Take one step of size ``h`` from ``(t, y)`` with first stage ``k1``.

        ``t``, ``h`` and ``t_last`` are floats (one step for the whole state ``(B, M)``) or
        ``(B,)`` float64 tensors (one step per row: per-sample control). Returns ``(y_new, err,
        K)``: the new state ``(B, M)``, the error estimate (or None for methods without one) and
        the stages ``(S, B*M)``. Each stage state is one :func:`stage_sum` (the state stays 1-D
        inside); without a graph the stages are written into a reused buffer.
        """
        shape = y.shape
        # (The common eager case first: float step, no graph, the reused buffer, a vector
        # field that writes into it. The same operations as below, with the per-stage choices
        # made once per buffer.)
        if not track_grad and self.reuse_buffer and type(h) is float:
            plan = self._plan
            # (A stepper serves one dtype and device: the plan is for one f and one shape.)
            if plan is None or plan[0] is not f or plan[1] != shape:
                plan = self._make_plan(f, y)
            if plan[2] is not None:
                # (The last accepted state's flat form, kept: no reshape per step.)
                yv = self._flat[1] if self._flat[0] is y else y.reshape(-1)
                return self._step_planned(plan, f, t, h, yv, k1, t_last, shape)
        return self._step_general(f, t, h, y, k1, t_last, track_grad)

    def _make_plan(self, f, y):
        """The per-stage operations of :meth:`_step_planned` for ``f`` and ``y``'s layout:
        ``(f, shape, stages, K, KT, err_out, row0, err_shaped)`` with ``stages`` one ``(single, K_prefix, row,
        c, dst, dst_shaped)`` per stage past the first (``single``: the row's one nonzero weight
        ``(j, w)``, else None; ``c`` 1.0 for the stage at ``t_last``); ``stages`` None where the
        vector field has no ``into`` on a single-tensor state (then the general path). ``row0`` is
        the first stage's row viewed in ``y``'s shape (:meth:`carry_fsal`'s result), and
        ``err_shaped`` the error buffer so viewed (the error estimate returned)."""
        shape_f = getattr(f, "_shape", None)
        if shape_f is None or getattr(f, "into", None) is None:  # (remembered: no plan for f)
            self._plan = (f, y.shape, None)
            return self._plan
        K = self._buffer(y.reshape(-1))
        krows, prefix, rows = self._krows, self._prefix, self.rows
        kshaped = self._shaped_rows(shape_f)
        meta = self.T.get("_stage_meta")  # ((single, c) per stage past the first), cached
        if meta is None:
            S, fsal = self.S, self.fsal
            meta = self.T["_stage_meta"] = [
                (_single(self.tab_rows[i]), 1.0 if fsal and i == S - 1 else self.c[i])
                for i in range(1, S)
            ]  # (FSAL: the last stage is at t_last)
        stages = []
        for i, (single, c) in enumerate(meta, 1):
            stages.append((single, prefix[i], rows[i], c, krows[i], kshaped[i]))
        row0 = kshaped[0] if shape_f == y.shape else krows[0].view(*y.shape)
        err_shaped = self._err.view(*y.shape)
        self._plan = (f, y.shape, tuple(stages), K, self._bufT, self._err, row0, err_shaped)
        return self._plan

    def _step_planned(self, plan, f, t, h, yv, k1, t_last, shape):
        """:meth:`step` without a graph into the reused stage buffer (float ``h``); bitwise the
        operations of :func:`stage_sum` that the general path makes."""
        _, _, stages, K, KT, out, _, err_shaped = plan
        krows = self._krows
        if k1.data_ptr() != krows[0].data_ptr():  # else already there (carry_fsal)
            krows[0].copy_(k1.reshape(-1))
        into, add, addmv = f.into, torch.add, torch.addmv
        yi = None
        for single, Kp, wt, ci, dst, dst_shaped in stages:
            if single is not None:
                yi = add(yv, krows[single[0]], alpha=h * single[1])
            else:
                yi = addmv(yv, Kp, wt, alpha=h)
            into(t_last if ci == 1.0 else t + ci * h, yi, dst_shaped, dst)
        if self.fsal:  # (the last stage is at t_last: c = 1)
            y_new = yi
        else:
            y_new = stage_sum(yv, h, self.tab_rows[self.S], krows, K=KT, wt=self.T["b"], flat=yv)
        err = None
        if self.b_err is not None:  # (into the error buffer, returned in the state's shape)
            addmv(out, KT, self.b_err, beta=0, alpha=h, out=out)
            err = err_shaped
        y_shaped = y_new.view(*shape)
        self._flat = (y_shaped, y_new)
        return y_shaped, err, K

    def _step_general(self, f, t, h, y, k1, t_last, track_grad: bool):
        S, shape = self.S, y.shape
        yv = y.reshape(-1)
        # The step size as stage_sum takes it: a float, or per row expanded to the flat state.
        per_row = isinstance(h, torch.Tensor)
        hc = h.to(yv.dtype).unsqueeze(1).expand(shape).reshape(-1) if per_row else h
        out = None
        if track_grad:
            # (One stack of the stages per step, used by the error estimate detached and by the
            # outputs with its graph: a list, stacked only for outputs, measured no faster.)
            y_new, ks = self.stages(f.flat, t, h, yv, k1.reshape(-1), t_last, yv, hc)
            K = torch.stack(ks)
            KT = K.detach().T
        else:
            # (The buffer's prefixes serve a float step: see _buffer.)
            K = self._buffer(yv) if self.reuse_buffer and not per_row else None
            if K is None:
                K = torch.empty((S, yv.numel()), dtype=yv.dtype, device=yv.device)
            if K is self._buf:
                prefix, krows, KT, out = self._prefix, self._krows, self._bufT, self._err
                shape_f = getattr(f, "_shape", None)
                kshaped = [None] * S if shape_f is None else self._shaped_rows(shape_f)
            else:
                KT = K.T
                prefix, krows = [KT[:, :i] for i in range(S)], list(K)
                kshaped = [None] * S
            if k1.data_ptr() != krows[0].data_ptr():  # else already there (carry_fsal)
                krows[0].copy_(k1.reshape(-1))
            into = getattr(f, "into", None)
            rows_f, rows, y_new = self.tab_rows, self.rows, None
            for i in range(1, S):
                yi = stage_sum(yv, hc, rows_f[i], krows, K=prefix[i], wt=rows[i], flat=yv)
                ci = self.c[i]
                ti = t_last if ci == 1.0 else t + ci * h
                if self.fsal and i == S - 1:
                    y_new, ti = yi, t_last
                if into is not None:
                    into(ti, yi, kshaped[i], krows[i])
                else:
                    krows[i].copy_(f.flat(ti, yi))
            if y_new is None:
                y_new = stage_sum(yv, hc, rows_f[S], krows, K=KT, wt=self.T["b"], flat=yv)
        err = None
        if self.b_err is not None:
            # err = h * K^T (b - b_hat) (N,), one fused op, no graph; into a reused buffer when
            # the stages are (the loop consumes it before the next step).
            err = stage_sum(None, hc, self.tab_b_err, K=KT, wt=self.b_err, out=out).view(*shape)
        return y_new.view(*shape), err, K

    def stages(self, fcall, t, h, y, k1, t_last, yv=None, hc=None):
        """The stages of one step as a list (each shaped like ``y``) and the new state.

        ``fcall(t, y) -> f`` in ``y``'s shape; ``yv`` is ``y`` flattened (made here when a row
        needs it); ``hc`` the step size as :func:`stage_sum` takes it (per-row ``h``: expanded
        to the flat state; default ``h``). The path with a graph (and the fixed-step driver's,
        which keeps the state in the user's shape): no buffer, no copies; FSAL methods take the
        new state from the last stage's combination.
        """
        S, rows_f, rows = self.S, self.tab_rows, self.rows
        hc = h if hc is None else hc
        ks = [k1]
        y_new = None
        if yv is None and self.multi:  # (only rows with several weights use the flat state)
            yv = y.reshape(-1)
        for i in range(1, S):
            yi = stage_sum(y, hc, rows_f[i], ks, wt=rows[i], flat=yv)
            ci = self.c[i]
            if self.fsal and i == S - 1:
                y_new = yi
                ks.append(fcall(t_last, yi))
            else:
                ks.append(fcall(t_last if ci == 1.0 else t + ci * h, yi))
        if y_new is None:
            y_new = stage_sum(y, hc, rows_f[S], ks, wt=self.T["b"], flat=yv)
        return y_new, ks

    def _buffer(self, yv: torch.Tensor) -> torch.Tensor:
        buf = self._buf
        if (
            buf is None
            or buf.shape != (self.S, yv.numel())
            or buf.dtype != yv.dtype
            or buf.device != yv.device
        ):
            buf = self._buf = torch.empty((self.S, yv.numel()), dtype=yv.dtype, device=yv.device)
            self._err = torch.empty_like(yv)
            # The transposed stage prefixes K[:i]^T and the rows, made once per buffer (one
            # slice per prefix: K[:i]^T = (K^T)[:, :i]); a row with one nonzero weight is one
            # add of that stage with a float step (stage_sum), and needs none.
            bufT = self._bufT = buf.T
            single = self.T["_stage_single"] = self.T.get("_stage_single") or [
                i == 0 or _single(self.tab_rows[i]) is not None for i in range(self.S)
            ]
            self._prefix = [None if one else bufT[:, :i] for i, one in enumerate(single)]
            self._krows = buf.unbind(0)
            self._krows_shape = None
        return buf

    def _shaped_rows(self, shape_f):
        """The buffer's stage rows viewed in the vector field's shape ``shape_f`` (f's output is
        copied in directly), made once per buffer and shape."""
        if self._krows_shape != shape_f:
            self._krows_shaped = self._buf.view(self.S, *shape_f).unbind(0)
            self._krows_shape = shape_f
        return self._krows_shaped

    def stage_matrix(self, K):
        """The stages as one ``(S, B*M)`` tensor (the fixed-step driver's list is stacked)."""
        if not isinstance(K, list):
            return K
        K = torch.stack(K)
        return K if K.dim() == 2 else K.view(len(K), -1)

    def carry_fsal(self, K):
        """The next step's first stage from an accepted FSAL step's last stage. With the reused
        buffer it is copied into row 0, where it survives rejected attempts of the next step."""
        if K is self._buf:
            rows = self._krows
            rows[0].copy_(rows[-1])
            plan = self._plan  # (row 0 viewed in the state's shape, made once with the plan)
            return plan[6] if plan is not None and plan[2] is not None and plan[3] is K else rows[0]
        return K[self.S - 1]

    def dense_stages(self, f, t, h, y, K, k_next, t_last=None):
        """Stages plus dense stages ``(Sd, B*M)`` for interpolation inside the step.

        ``k_next`` is f at the step end (reused as dense stage 0 when the tableau's dense stage
        0 is the next step's first stage); pass None to have it evaluated. ``t_last`` is the
        time used for stages at the step end (just before it when the step ends on a jump).
        """
        tab = self.tab
        K = self.stage_matrix(K)
        if tab.n_dense_stages == 0:
            return K
        yv = y.reshape(-1)
        comb = _combiner(yv, h, y.shape)
        K = K.reshape(self.S, -1)
        rows = [K[i] for i in range(self.S)]
        Ad = self.T["a_dense"]
        for j in range(tab.n_dense_stages):
            if j == 0 and tab.dense_stage_is_next_first and k_next is not None:
                rows.append(k_next.reshape(-1))
                continue
            i = self.S + j
            yj = comb(torch.stack(rows, 1), Ad[j][:i])
            cj = tab.c_dense[j]
            tj = (t + h if t_last is None else t_last) if cj == 1.0 else t + cj * h
            rows.append(f(tj, yj.view(*y.shape)).reshape(-1))
        return torch.stack(rows)

    def interpolate(self, Kd, y, h, theta: torch.Tensor, samples=None):
        """Values of the continuous extension at ``theta`` (m,) inside a step.

        Shared grid: returns ``(m, B, M)``. Per-sample (``samples`` (m,) long): ``(m, M)``, row
        ``j`` for sample ``samples[j]``. Per row (``h`` a (B,) tensor: row ``j`` of ``y`` is
        its own step, at its own fraction ``theta[j]``; ``Kd`` (Sd, B, M)): ``(B, M)``.
        """
        # (Weights formed in float64 where theta is, then cast: high-order P cancel heavily.)
        return interpolant_sum(y, h, self.tab.interpolant_weights(theta, y.dtype), Kd, samples)


def _single(row) -> tuple[int, float] | None:
    nonzero = [(j, float(w)) for j, w in enumerate(row) if w != 0.0]
    return nonzero[0] if len(nonzero) == 1 else None


_SINGLE: dict = {}  # tableau row (floats) -> its one nonzero weight (j, w), or None
# From this many state elements a stage sum of a list of stages with a float step is a chain of
# torch.add(acc, k_j, alpha=h w_j): no stacked copy of the stages (and, with a graph, no
# stack/addmv backward, whose gradient of the stage matrix is another (N, i) temporary). At
# 2,048 elements the chain and the addmv take about the same time; at 65,536 (a Direct training
# step of dopri5 with tanh stages, 1 thread) the chain takes 0.55x the time.
_CHAIN_MIN = 2048


def stage_sum(y, h, w, ks=None, *, K=None, wt=None, flat=None, out=None):
    """``y + h * sum_j w[j] * ks[j]``: the one Runge--Kutta stage combination.

    Every driver forms its stage states, new states and error estimates here: the eager
    steppers (:class:`RKStepper`, and through :func:`_combiner` the implicit ones) and the
    compiled masked step (:mod:`neuralode._compiled_step`).

    Parameters
    ----------
    y : Tensor or None
        The base state; None for a zero base (the error estimate ``h K (b - b_hat)``).
    h : float or Tensor
        One step size, or per-row step sizes as a tensor that broadcasts against the base
        (eagerly against the flat base: ``(N,)``).
    w : tuple of float or None
        The tableau row (``a[i, :i]``, ``b`` or ``b - b_hat``) as Python floats (zero
        coefficients are skipped by the chains below; in an ``addmv`` they multiply, exactly
        0 for finite stages). May be None where ``K`` and ``wt`` are given.
    ks : list of Tensor, optional
        The stages, each shaped like ``y`` (only the first ``len(w)`` are read).
    K, wt : Tensor, optional
        Eagerly: the stage matrix ``(N, n)`` where it exists already (the stage buffer's
        transposed prefix) and the row as a tensor ``(n,)`` of the state's dtype.
    flat, out : Tensor, optional
        Eagerly: ``y`` flattened, if the caller has it (spares a view), and an output buffer
        (zero base only).

    Returns
    -------
    Tensor
        Shaped like ``y`` (a zero base: like ``flat``/``K``'s rows, ``(N,)``, eagerly).

    Notes
    -----
    One formula, lowered for who runs it. A row with one nonzero weight and a float step
    (explicit Euler, the midpoint rule, the first stages of most methods): one
    ``torch.add(y, k_j, alpha=h w_j)``. Traced by ``torch.compile`` (stages given as a list): a
    chain ``k_j * w_j`` over the nonzero weights, times ``h``, plus ``y``, which Inductor fuses
    into one loop. Eagerly, where every operation costs a dispatch (and, with a graph, an
    autograd node): one ``addmv`` of the stage matrix against the row (per-row ``h``:
    ``addcmul`` of ``y``, ``h`` and the ``mv``), the stages stacked as the matrix's columns
    (from 1,024 elements as rows, transposed: the copy is then contiguous); or, for a list of
    stages of at least 2,048 elements and a float step, a chain of
    ``torch.add(acc, k_j, alpha=h w_j)`` (no stacked copy).
    """
    per_row = type(h) is not float and isinstance(h, torch.Tensor)
    if w is not None and y is not None and not per_row:
        one = _SINGLE.get(w, False)
        if one is False:
            one = _SINGLE[w] = _single(w)
        if one is not None:
            return torch.add(y, ks[one[0]], alpha=h * one[1])
    if K is None:
        if torch.compiler.is_compiling():
            acc = None
            for c, k in zip(w, ks):
                if c != 0.0:
                    acc = k * c if acc is None else acc + k * c
            if y is None:
                return torch.zeros_like(ks[0]) if acc is None else h * acc
            return y if acc is None else y + h * acc
        n, numel = len(w), ks[0].numel()
        if numel >= _CHAIN_MIN and y is not None and not per_row:
            acc = y  # (large states: one add per weight, no stacked copy)
            for c, k in zip(w, ks):
                if c != 0.0:
                    acc = torch.add(acc, k, alpha=h * c)
            return acc
        if numel >= 1024:
            K = torch.stack(ks[:n]).view(n, -1).T
        else:
            K = torch.stack(ks[:n], -1)
            K = K if K.dim() == 2 else K.view(-1, n)
    if wt is None:
        wt = torch.tensor(w, dtype=K.dtype, device=K.device)
    if y is None:
        if per_row:
            return torch.mv(K, wt, out=out).mul_(h)
        # beta=0 ignores the input (it lends the shape only).
        return torch.addmv(K[:, 0] if out is None else out, K, wt, beta=0, alpha=h, out=out)
    if per_row:  # (h broadcasts against y as it is given: (N,) flat, or y's shape)
        m = torch.mv(K, wt)
        return torch.addcmul(y, h, m if y.dim() == 1 else m.view(y.shape))
    yv = flat if flat is not None else (y if y.dim() == 1 else y.reshape(-1))
    res = torch.addmv(yv, K, wt, alpha=h)
    return res if y.dim() == 1 else res.view(y.shape)


def _combiner(yv: torch.Tensor, h, shape):
    """``(K, w) -> yv + h K w`` (:func:`stage_sum` with a given stage matrix ``K`` and row
    ``w``) for a float step size or one step size per row of the state ``shape`` (B, M); the
    per-row step sizes, expanded to the flat state, are its ``hv``."""
    if not isinstance(h, torch.Tensor):
        return lambda K, w: stage_sum(yv, h, None, K=K, wt=w)
    hv = h.to(yv.dtype).unsqueeze(1).expand(shape).reshape(-1)

    def comb(K, w):
        return stage_sum(yv, hv, None, K=K, wt=w)

    comb.hv = hv
    return comb


def make_stepper(method, dtype: torch.dtype, device: torch.device):
    """The per-solve stepper of a method: :class:`RKStepper` for an explicit Butcher tableau;
    any other method object provides ``make_stepper(dtype, device)`` returning a
    :class:`~neuralode.solvers.stepper.Stepper`."""
    if isinstance(method, ButcherTableau):
        return RKStepper(method, dtype, device)
    return method.make_stepper(dtype, device)
