"""The generic explicit Runge--Kutta engine: one step of any Butcher tableau.

Stages are combined with one fused ``addmv`` per stage (the stage matrix against a tableau row)
on the 1-D flat state; the error estimate is one more. The same code serves the forward solve,
the replays of checkpointed and backsolve gradients, and dense output.
"""

from __future__ import annotations

import torch

from .stepper import Stepper
from .tableau import ButcherTableau

__all__ = ["RKStepper", "make_stepper"]


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
        # Row i of a (row S: b) as (j, w) where it has one nonzero weight w (at stage j), else
        # None: such a combination is one torch.add (see combine).
        single = self.T.get("_single")
        if single is None:
            single = self.T["_single"] = [_single(row) for row in (*tableau.a, tableau.b)]
        self.single = single
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

    def step(self, f, t, h, y, k1, t_last, track_grad: bool):
        """Take one step of size ``h`` from ``(t, y)`` with first stage ``k1``.

        ``t``, ``h`` and ``t_last`` are floats (one step for the whole state ``(B, M)``) or
        ``(B,)`` float64 tensors (one step per row: per-sample control). Returns ``(y_new, err,
        K)``: the new state ``(B, M)``, the error estimate (or None for methods without one) and
        the stages ``(S, B*M)``. Each stage state is one combination :meth:`combine` (the state
        stays 1-D inside); without a graph the stages are written into a reused buffer.
        """
        S, shape = self.S, y.shape
        yv = y.reshape(-1)
        comb = _combiner(yv, h, shape)
        y_new = None
        if track_grad:
            y_new, ks = self.stages(f.flat, t, h, yv, k1.reshape(-1), t_last, comb)
            K = torch.stack(ks)
        else:
            K = self._buffer(yv) if self.reuse_buffer else None
            if K is None:
                K = torch.empty((S, yv.numel()), dtype=yv.dtype, device=yv.device)
            if K is self._buf:
                prefix, krows = self._prefix, self._krows
                # The rows also viewed in the state's shape: f's output is copied in directly.
                shape_f = getattr(f, "_shape", None)
                if shape_f is not None and self._krows_shape != shape_f:
                    self._krows_shaped = [
                        r.view(*shape_f) if shape_f else r.view(()) for r in krows
                    ]
                    self._krows_shape = shape_f
                kshaped = self._krows_shaped if shape_f is not None else [None] * S
            else:
                prefix, krows = [K[:i].T for i in range(S)], list(K)
                kshaped = [None] * S
            if k1.data_ptr() != krows[0].data_ptr():  # else already there (carry_fsal)
                krows[0].copy_(k1.reshape(-1))
            into = getattr(f, "into", None)
            for i in range(1, S):
                yi = self.combine(yv, h, krows, i, comb, prefix[i])
                ci = self.c[i]
                ti = t_last if ci == 1.0 else t + ci * h
                if self.fsal and i == S - 1:
                    y_new, ti = yi, t_last
                if into is not None:
                    into(ti, yi, kshaped[i], krows[i])
                else:
                    krows[i].copy_(f.flat(ti, yi))
            if y_new is None:
                y_new = self.combine(yv, h, krows, S, comb, self._bufT if K is self._buf else K.T)
        err = None
        if self.b_err is not None:
            # beta=0 ignores the input: err = h * K^T (b - b_hat), one fused op, no graph; into a
            # reused buffer when the stages are (the loop consumes it before the next step).
            out, KT = (self._err, self._bufT) if K is self._buf else (None, None)
            if KT is None:
                KT = (K.detach() if K.requires_grad else K).T
            if isinstance(h, torch.Tensor):
                err = torch.mv(KT, self.b_err, out=out).mul_(comb.hv)
            else:
                yd = yv.detach() if yv.requires_grad else yv  # (beta=0: shape and dtype only)
                err = torch.addmv(yd, KT, self.b_err, beta=0, alpha=h, out=out)
            err = err.view(*shape)
        return y_new.view(*shape), err, K

    def stages(self, fcall, t, h, y, k1, t_last, comb=None):
        """The stages of one step as a list (each shaped like ``y``) and the new state.

        ``fcall(t, y) -> f`` in ``y``'s shape. The path with a graph (and the fixed-step
        driver's, which keeps the state in the user's shape): no buffer, no copies; FSAL methods
        take the new state from the last stage's combination. ``comb`` is the step's
        :func:`_combiner` (made here when a row needs it).
        """
        S = self.S
        ks = [k1]
        y_new = None
        for i in range(1, S):
            yi = self.combine(y, h, ks, i, comb)
            ci = self.c[i]
            if self.fsal and i == S - 1:
                y_new = yi
                ks.append(fcall(t_last, yi))
            else:
                ks.append(fcall(t_last if ci == 1.0 else t + ci * h, yi))
        if y_new is None:
            y_new = self.combine(y, h, ks, S, comb)
        return y_new, ks

    def combine(self, y, h, ks, i, comb=None, K=None):
        """``y + h sum_j w_j k_j``: the state of stage ``i`` (row ``i`` of ``a``; ``i == S``: the
        new state, with ``b``) from the stages ``ks`` (a list, or the rows of the stage buffer).

        The one Runge--Kutta stage combination. A row with one nonzero weight (explicit Euler,
        the midpoint rule, the first stages of most methods) is one ``torch.add`` with
        ``alpha = h w``; other rows are one fused ``addmv`` of the stage matrix (``K``, the
        buffer's transposed prefix, or the stacked list) against the row (per-row step sizes:
        ``mv`` and ``addcmul``, see :func:`_combiner`).
        """
        one = self.single[i]
        if one is not None and not isinstance(h, torch.Tensor):
            return torch.add(y, ks[one[0]], alpha=h * one[1])
        if comb is None:
            comb = _combiner(y.reshape(-1), h, y.shape)
        if K is None:
            # Stacked as rows and transposed, the copy is contiguous (faster for large states);
            # stacked as columns, the backward split is cheaper (faster for small ones).
            # (1-D stages stack into the matrix directly: no view, no autograd node for one.)
            flat = y.dim() == 1
            if y.numel() >= 4096:
                K = torch.stack(ks[:i]) if flat else torch.stack(ks[:i]).view(i, -1)
                K = K.T
            else:
                K = torch.stack(ks[:i], -1) if flat else torch.stack(ks[:i], -1).view(-1, i)
        out = comb(K, self.rows[i] if i < self.S else self.T["b"])
        return out if y.dim() == 1 else out.view_as(y)

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
            # The transposed stage prefixes K[:i]^T and the rows, made once per buffer.
            bufT = self._bufT = buf.T  # (one slice per prefix: K[:i]^T = (K^T)[:, :i])
            self._prefix = [bufT[:, :i] for i in range(self.S)]
            self._krows = list(buf)
            self._krows_shape = None
        return buf

    def carry_fsal(self, K):
        """The next step's first stage from an accepted FSAL step's last stage. With the reused
        buffer it is copied into row 0, where it survives rejected attempts of the next step."""
        if K is self._buf:
            rows = self._krows
            rows[0].copy_(rows[-1])
            return rows[0]
        return K[self.S - 1]

    def dense_stages(self, f, t, h, y, K, k_next, t_last=None):
        """Stages plus dense stages ``(Sd, B*M)`` for interpolation inside the step.

        ``k_next`` is f at the step end (reused as dense stage 0 when the tableau's dense stage
        0 is the next step's first stage); pass None to have it evaluated. ``t_last`` is the
        time used for stages at the step end (just before it when the step ends on a jump).
        """
        tab = self.tab
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
        if isinstance(h, torch.Tensor):  # float64 weights, then cast
            W = self.tab.interpolant_weights(theta, y.dtype)  # (m, Sd)
            inc = (W.T.unsqueeze(2) * Kd.view(-1, *y.shape)).sum(0)
            return torch.addcmul(y, h.to(y.dtype).unsqueeze(1), inc)
        W = self.tab.interpolant_weights(theta, Kd.dtype)
        if samples is None:
            out = torch.addmm(y.reshape(1, -1), W, Kd, alpha=h)
            return out.view(theta.shape[0], *y.shape)
        B, M = y.shape
        Kg = Kd.view(Kd.shape[0], B, M)[:, samples]  # (Sd, m, M)
        return y[samples] + h * torch.einsum("ms,smk->mk", W, Kg)


def _single(row) -> tuple[int, float] | None:
    nonzero = [(j, float(w)) for j, w in enumerate(row) if w != 0.0]
    return nonzero[0] if len(nonzero) == 1 else None


def _combiner(yv: torch.Tensor, h, shape):
    """``(K, w) -> yv + h K w``: the one Runge--Kutta stage combination, for a float step
    size (one fused ``addmv``) or one step size per row of the state ``shape`` (B, M)."""
    if not isinstance(h, torch.Tensor):
        return lambda K, w: torch.addmv(yv, K, w, alpha=h)
    hv = h.to(yv.dtype).unsqueeze(1).expand(shape).reshape(-1)

    def comb(K, w):
        return torch.addcmul(yv, hv, torch.mv(K, w))

    comb.hv = hv
    return comb


def make_stepper(method, dtype: torch.dtype, device: torch.device):
    """The per-solve stepper of a method: :class:`RKStepper` for an explicit Butcher tableau;
    any other method object provides ``make_stepper(dtype, device)`` returning a
    :class:`~neuralode.solvers.stepper.Stepper`."""
    if isinstance(method, ButcherTableau):
        return RKStepper(method, dtype, device)
    return method.make_stepper(dtype, device)
