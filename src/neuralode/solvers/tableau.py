"""Butcher tableaux as validated data.

A tableau describes an explicit Runge--Kutta method by Butcher's arrays ``a`` (stage coupling,
strictly lower triangular), ``b`` (weights of the propagated solution), ``c`` (stage nodes) and,
for embedded pairs, ``b_hat`` (weights of the lower- or higher-order companion used only for the
error estimate). Everything else -- stage count, FSAL, whether the method is adaptive -- is
derived from the arrays, never set by hand.

Dense output is part of the data too. A continuous extension writes the state inside a step
``[t_n, t_n + h]`` at ``theta in [0, 1]`` as::

    y(t_n + theta h) = y_n + h * sum_i b_i(theta) k_i,   b_i(theta) = sum_p P[i, p] theta^(p+1)

where the sum over ``i`` runs over the method's stages followed by optional *dense stages*:
extra stage rows (``a_dense``, ``c_dense``) evaluated only when dense output is needed inside a
step. A dense stage whose row equals ``b`` with node 1 is ``f(t_n + h, y_{n+1})``, the first
stage of the next step, so it costs nothing extra in a run of steps.

Methods without an interpolant of their own get the cubic Hermite interpolant through
``(y_n, f_n, y_{n+1}, f_{n+1})`` (third order), built by :func:`hermite_interpolant`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch

__all__ = [
    "ButcherTableau", "HERMITE_BASIS", "exact_at_step_end", "hermite_interpolant",
    "interpolant_sum", "weights_at",
]  # fmt: skip

Number = float | Fraction | int

# Published tables are given as decimals rounded to ~16-20 digits; consistency conditions are
# therefore checked to a tolerance a little above double-precision rounding, not exactly.
_CONSISTENCY_TOL = 1e-12


def _as_float_rows(rows: Sequence[Sequence[Number]]) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in row) for row in rows)


@dataclass(frozen=True, eq=False)
class ButcherTableau:
    """Coefficients of an explicit (embedded) Runge--Kutta method.

    Parameters
    ----------
    name : str
        Method name as users pass it (e.g. ``"dopri5"``).
    a : sequence of sequences
        Lower-triangular coupling coefficients; row ``i`` has ``i`` entries (row 0 is empty).
    b : sequence
        Weights of the propagated solution, length ``s`` (the number of stages).
    c : sequence
        Nodes, length ``s``; ``c[i]`` must equal ``sum(a[i])``.
    order : int
        Classical order of the propagated solution.
    b_hat : sequence, optional
        Weights of the embedded solution. ``None`` for methods without an error estimate
        (they can only be used with a fixed-step controller).
    embedded_order : int, optional
        Order of the embedded solution; required when ``b_hat`` is given.
    interpolant : sequence of sequences, optional
        Matrix ``P`` of shape ``(s + len(a_dense), degree)`` of the continuous extension, see the
        module docstring. ``None`` selects the cubic Hermite interpolant.
    interpolant_order : int, optional
        Order of the continuous extension (3 for Hermite).
    a_dense, c_dense : optional
        Rows and nodes of the extra dense stages (each row may refer to all earlier stages,
        including earlier dense stages).
    source : str
        Where the coefficients come from (paper, year, table).

    Raises
    ------
    ValueError
        If the arrays have inconsistent lengths, ``a`` is not strictly lower triangular, a row
        sum of ``a`` differs from its node, or the weights do not sum to one.
    """

    name: str
    a: Sequence[Sequence[Number]]
    b: Sequence[Number]
    c: Sequence[Number]
    order: int
    b_hat: Sequence[Number] | None = None
    embedded_order: int | None = None
    interpolant: Sequence[Sequence[Number]] | None = None
    interpolant_order: int | None = None
    a_dense: Sequence[Sequence[Number]] = ()
    c_dense: Sequence[Number] = ()
    source: str = ""
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        a = _as_float_rows(self.a)
        b = tuple(float(v) for v in self.b)
        c = tuple(float(v) for v in self.c)
        s = len(b)
        if len(c) != s or len(a) != s:
            raise ValueError(
                f"tableau {self.name!r}: a has {len(a)} rows, b has {s} entries and c has {len(c)}; "
                "all three must equal the number of stages"
            )
        for i, row in enumerate(a):
            if len(row) > i and any(v != 0.0 for v in row[i:]):
                raise ValueError(
                    f"tableau {self.name!r}: row {i} of a has entries on or above the diagonal; "
                    "only explicit methods are described by ButcherTableau"
                )
            if abs(math.fsum(row) - c[i]) > _CONSISTENCY_TOL:
                raise ValueError(
                    f"tableau {self.name!r}: row {i} of a sums to {math.fsum(row)!r} but c[{i}] = "
                    f"{c[i]!r}; the row sums of a must equal the nodes c"
                )
        a = tuple(row[:i] + (0.0,) * max(0, i - len(row)) for i, row in enumerate(a))
        if abs(math.fsum(b) - 1.0) > _CONSISTENCY_TOL:
            raise ValueError(f"tableau {self.name!r}: sum(b) = {math.fsum(b)!r}, must be 1")
        b_hat = None
        if self.b_hat is not None:
            b_hat = tuple(float(v) for v in self.b_hat)
            if len(b_hat) != s:
                raise ValueError(
                    f"tableau {self.name!r}: b_hat has {len(b_hat)} entries, expected {s}"
                )
            if abs(math.fsum(b_hat) - 1.0) > _CONSISTENCY_TOL:
                raise ValueError(
                    f"tableau {self.name!r}: sum(b_hat) = {math.fsum(b_hat)!r}, must be 1"
                )
            if self.embedded_order is None:
                raise ValueError(f"tableau {self.name!r}: b_hat given without embedded_order")
        a_dense = _as_float_rows(self.a_dense)
        c_dense = tuple(float(v) for v in self.c_dense)
        if len(a_dense) != len(c_dense):
            raise ValueError(f"tableau {self.name!r}: a_dense and c_dense differ in length")
        for j, row in enumerate(a_dense):
            if len(row) > s + j:
                raise ValueError(f"tableau {self.name!r}: dense stage {j} refers to a later stage")
            if abs(math.fsum(row) - c_dense[j]) > _CONSISTENCY_TOL:
                raise ValueError(
                    f"tableau {self.name!r}: dense row {j} sums to {math.fsum(row)!r}, node is {c_dense[j]!r}"
                )
        a_dense = tuple(row + (0.0,) * (s + j - len(row)) for j, row in enumerate(a_dense))
        set_(self, "a", a)
        set_(self, "b", b)
        set_(self, "c", c)
        set_(self, "b_hat", b_hat)
        set_(self, "a_dense", a_dense)
        set_(self, "c_dense", c_dense)
        if self.interpolant is None:
            interp, a_dense2, c_dense2 = hermite_interpolant(a, b, c)
            if a_dense:
                raise ValueError(
                    f"tableau {self.name!r}: dense stages given without an interpolant"
                )
            set_(self, "a_dense", a_dense2)
            set_(self, "c_dense", c_dense2)
            set_(self, "interpolant", interp)
            set_(self, "interpolant_order", 3)
        else:
            interp = _as_float_rows(self.interpolant)
            if len(interp) != s + len(a_dense):
                raise ValueError(
                    f"tableau {self.name!r}: interpolant has {len(interp)} rows, expected "
                    f"{s + len(a_dense)} (stages plus dense stages)"
                )
            # The interpolant must reproduce the step's end point: b_i(1) == b_i.
            for i, row in enumerate(interp):
                target = b[i] if i < s else 0.0
                if abs(math.fsum(row) - target) > 1e-10:
                    raise ValueError(
                        f"tableau {self.name!r}: interpolant row {i} gives b_{i}(1) = "
                        f"{math.fsum(row)!r}, expected {target!r}"
                    )
            set_(self, "interpolant", interp)
            if self.interpolant_order is None:
                raise ValueError(
                    f"tableau {self.name!r}: interpolant given without interpolant_order"
                )

    # ------------------------------------------------------------------ derived properties
    @property
    def n_stages(self) -> int:
        """Number of stages evaluated per step (FSAL counts the reused stage once)."""
        return len(self.b)

    @property
    def fsal(self) -> bool:
        """First Same As Last: the last stage is f at the new state (row equals b, node 1)."""
        return self.c[-1] == 1.0 and all(
            abs(x - y) <= _CONSISTENCY_TOL for x, y in zip(self.a[-1], self.b)
        )

    @property
    def adaptive(self) -> bool:
        """Whether the method carries an embedded error estimate."""
        return self.b_hat is not None

    @property
    def n_dense_stages(self) -> int:
        return len(self.a_dense)

    @property
    def dense_stage_is_next_first(self) -> bool:
        """Whether dense stage 0 is f(t_n + h, y_{n+1}), i.e. the next step's first stage."""
        if not self.a_dense:
            return False
        row = self.a_dense[0]
        return (
            self.c_dense[0] == 1.0
            and all(abs(x - y) <= _CONSISTENCY_TOL for x, y in zip(row, self.b))
            and all(v == 0.0 for v in row[len(self.b) :])
        )

    def error_order(self) -> int:
        """Exponent base of step-size control: min(order, embedded_order) + 1."""
        if self.embedded_order is None:
            raise ValueError(f"method {self.name!r} has no embedded error estimate")
        return min(self.order, self.embedded_order) + 1

    # ------------------------------------------------------------------ tensors for the engine
    def tensors(self, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """The coefficient arrays as tensors of ``dtype`` on ``device`` (cached)."""
        key = (dtype, device)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        s = self.n_stages

        def t(x):
            return torch.tensor(x, dtype=dtype, device=device)

        out = {
            # Row i holds a[i, :i] padded with zeros to s columns; used as rows[:i] @ K[:i].
            "a": t([list(row) + [0.0] * (s - len(row)) for row in self.a]),
            "b": t(self.b),
        }
        if self.b_hat is not None:
            # The two combinations of a step in one matrix: new state and error estimate.
            out["b_err"] = t([[x - y for x, y in zip(self.b, self.b_hat)]])
            out["b_both"] = t([list(self.b), [x - y for x, y in zip(self.b, self.b_hat)]])
        sd = s + len(self.a_dense)
        if self.a_dense:
            out["a_dense"] = t([list(row) + [0.0] * (sd - len(row)) for row in self.a_dense])
        out["P"] = t([list(row) for row in self.interpolant])
        self._cache[key] = out
        return out

    def _P_numpy(self) -> tuple:
        """``(P.T, exponents 1..D)`` in NumPy (float64), made once."""
        PT = self._cache.get("P_numpy")
        if PT is None:
            P = self.tensors(torch.float64, torch.device("cpu"))["P"].numpy()
            PT = self._cache["P_numpy"] = (P.T, np.arange(1, P.shape[1] + 1))
        return PT

    def interpolant_weights(self, theta: torch.Tensor, dtype: torch.dtype | None = None):
        """``b_i(theta)`` for all stages and dense stages.

        theta : (m,) tensor in [0, 1]. Returns (m, s + n_dense) in ``dtype`` (default theta's;
        formed in theta's precision, then cast).
        """
        if theta.device.type == "cpu" and not theta.requires_grad:  # NumPy beats dispatch here
            PT, powers = self._P_numpy()
            W = (theta.numpy()[:, None] ** powers) @ PT
            np_dtype = _NUMPY_REAL.get(dtype or theta.dtype)
            if np_dtype is not None:  # the cast in NumPy (no dispatch)
                return torch.from_numpy(W.astype(np_dtype, copy=False))
            return torch.from_numpy(W).to(dtype)
        W = weights_at(theta, self.tensors(theta.dtype, theta.device)["P"])
        return W if dtype is None else W.to(dtype)

    def __repr__(self) -> str:
        kind = f"{self.order}({self.embedded_order})" if self.adaptive else f"{self.order}"
        return (
            f"ButcherTableau({self.name!r}, order {kind}, {self.n_stages} stages, fsal={self.fsal})"
        )


_NUMPY_REAL = {torch.float64: np.float64, torch.float32: np.float32}


def weights_at(theta: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """Interpolant weights ``b_i(theta) = sum_d P[i, d] theta^(d+1)`` at ``theta`` (m,) for the
    polynomial coefficients ``P`` (S, D): (m, S). (Compiled stepping calls it in its graph.)"""
    powers = theta.unsqueeze(-1) ** torch.arange(
        1, P.shape[1] + 1, dtype=theta.dtype, device=theta.device
    )
    return powers @ P.T


def exact_at_step_end(vals: torch.Tensor, tau: torch.Tensor, t_end, y_end) -> torch.Tensor:
    """A step's continuous extension ``vals`` at the times ``tau``, with the step's end state
    ``y_end`` exactly where ``tau`` equals the step end ``t_end`` (at ``theta = 1`` high-order
    weights cancel heavily, so the interpolant is the end state only to rounding).

    ``tau``: float64 ``(n,)`` (or ``(R, W)`` in compiled stepping), ``t_end`` a float or a
    tensor broadcastable to it; ``vals`` and ``y_end`` have ``tau``'s leading dimensions (or
    broadcast against them). The one rule of every dense output and driver that interpolates
    (the host-float driver, which interpolates only the outputs before the step end, takes the
    end state for the others without interpolating).
    """
    at_end = tau == t_end
    return torch.where(at_end.view(*at_end.shape, *[1] * (vals.dim() - at_end.dim())), y_end, vals)


def interpolant_sum(y, h, W: torch.Tensor, Kd: torch.Tensor, samples=None) -> torch.Tensor:
    """``y + h * sum_s W[..., s] Kd[s]``: a step's continuous extension at the weights ``W``.

    The one interpolant sum of every driver: the eager steppers' ``interpolate`` (explicit
    Runge--Kutta with ``W = b(theta)`` from :func:`weights_at`, and the cubic Hermite and
    Rosenbrock extensions of ``solvers/implicit``, whose weights are their own) and the
    outputs inside the steps of compiled stepping (:mod:`neuralode._compiled_step`).

    Parameters
    ----------
    y : Tensor
        The state at the step's start, ``(B, M)``; per row, any shape ``(n, ...)`` whose
        leading dimensions broadcast against ``W``'s.
    h : float or Tensor
        The step size: one (a float, the shared grid) or one per row of ``y`` (``(n,)``, any
        dtype: cast to ``y``'s).
    W : Tensor
        The weights: ``(m, Sd)`` for a float ``h``; per row ``(n, Sd)``, or ``(n, m, Sd)``
        (``m`` values per row, compiled stepping's window of output times).
    Kd : Tensor
        Stages and dense stages ``(Sd, B*M)`` (or any shape viewable as ``(Sd, *y.shape)``).
    samples : Tensor, optional
        ``(m,)`` long, float ``h`` only: value ``j`` is of sample ``samples[j]`` alone.

    Returns
    -------
    Tensor
        Float ``h``: ``(m, B, M)``, or ``(m, M)`` with ``samples``. Per row: ``y + h W Kd``
        broadcast, ``(n, M)`` for ``(n, Sd)`` weights.

    Notes
    -----
    Per row the sum is the elementwise form ``sum_s W[..., s, None] * Kd[s]``, which Inductor
    fuses into one loop (a batched matmul of ``(1, Sd)`` by ``(Sd, M)`` matrices would call a
    kernel per value); eagerly its final ``y + h * inc`` is one ``addcmul``. With a float
    ``h``, one ``addmm`` of the weights against the stage matrix.
    """
    if isinstance(h, torch.Tensor):
        W = W.to(y.dtype)
        Ws = W.movedim(-1, 0)  # (Sd, n, ...): the stage index first, as in Kd
        K = Kd.view(Kd.shape[0], *y.shape)
        inc = (Ws.reshape(*Ws.shape, *[1] * (K.dim() - Ws.dim())) * K).sum(0)
        hv = h.to(y.dtype).view(-1, *[1] * (y.dim() - 1))
        return y + hv * inc if torch.compiler.is_compiling() else torch.addcmul(y, hv, inc)
    if W.dtype != Kd.dtype:
        W = W.to(Kd.dtype)
    if samples is None:
        out = torch.addmm(y.reshape(1, -1), W, Kd, alpha=h)
        return out.view(W.shape[0], *y.shape)
    B, M = y.shape
    Kg = Kd.view(Kd.shape[0], B, M)[:, samples]  # (Sd, m, M)
    return y[samples] + h * torch.einsum("ms,smk->mk", W, Kg)


#: The cubic Hermite basis through ``y_n, f_n, y_{n+1}, f_{n+1}`` as coefficients of ``theta,
#: theta^2, theta^3``: the weights of ``f_n`` (``h10 = t - 2t^2 + t^3``), of the secant slope
#: ``(y_{n+1} - y_n) / h`` (``h01 = 3t^2 - 2t^3``) and of ``f_{n+1}`` (``h11 = t^3 - t^2``).
#: :func:`hermite_interpolant` and the implicit methods' Hermite extension are built from it.
HERMITE_BASIS = ((1.0, -2.0, 1.0), (0.0, 3.0, -2.0), (0.0, -1.0, 1.0))


def hermite_interpolant(a, b, c):
    """Cubic Hermite continuous extension through ``y_n, f_n, y_{n+1}, f_{n+1}``.

    Written in the ``b_i(theta)`` form: ``b_i(theta) = h01(theta) b_i + h10(theta) [i == 0]
    + h11(theta) [i == last]``, with the Hermite basis :data:`HERMITE_BASIS`. ``f_{n+1}`` is the last stage for FSAL
    methods and one dense stage (row ``b``, node 1) otherwise. Third order for any method of
    order >= 3 (Hairer, Norsett, Wanner I, sec. II.6).

    Returns ``(P, a_dense, c_dense)``.
    """
    s = len(b)
    fsal = c[-1] == 1.0 and all(abs(x - y) <= _CONSISTENCY_TOL for x, y in zip(a[-1], b))
    n = s if fsal else s + 1
    h10, h01, h11 = HERMITE_BASIS
    P = [[b[i] * x for x in h01] if i < s else [0.0, 0.0, 0.0] for i in range(n)]
    last = s - 1 if fsal else s
    P[0] = [p + x for p, x in zip(P[0], h10)]
    P[last] = [p + x for p, x in zip(P[last], h11)]
    if fsal:
        return tuple(tuple(r) for r in P), (), ()
    return tuple(tuple(r) for r in P), (tuple(b),), (1.0,)
