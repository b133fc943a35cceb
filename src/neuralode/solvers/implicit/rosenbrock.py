"""Rosenbrock (linearly implicit) methods: ``rodas4``.

A Rosenbrock step replaces the Newton iteration of an implicit method by ``s`` linear solves with
one matrix ``W = I / (h gamma) - J`` built from the exact Jacobian at the step start. In the
transformed variables of Hairer & Wanner (II, sec. IV.7, eq. (7.25))::

    W U_i = f(t_n + alpha_i h, y_n + sum_{j<i} a_ij U_j) + sum_{j<i} (c_ij / h) U_j + h gamma_i f_t
    y_{n+1} = y_n + sum_i m_i U_i,        err = sum_i e_i U_i

with ``J = df/dy`` and ``f_t = df/dt`` at ``(t_n, y_n)``, both from autograd. No iteration, so no
convergence failures; the price is a fresh Jacobian and factorisation at every step (W depends on
the exact Jacobian: reusing an old one would lower the order).

Gradients: the step is an explicit formula in ``y_n`` through ``J(y_n)``; ``Direct`` and
``Checkpointed`` differentiate it exactly, including the dependence of the Jacobian on the state
and parameters (second derivatives of func by double backward).

References
----------
Hairer, Wanner. Solving Ordinary Differential Equations II, 2nd ed., 1996, sec. IV.7
(Rosenbrock methods, the transformed formulation, RODAS: the coefficients of RODAS4, method 1
of the code ``rodas.f``: 6 stages, order 4 with an embedded method of order 3, L-stable and
stiffly accurate). G. Steinebach, Order-reduction of ROW-methods for DAEs and method of lines
applications, 1995 (the construction RODAS4 follows).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..tableau import interpolant_sum
from .base import HermiteStepper, MethodFace
from .linalg import LUSolve, jacobian

__all__ = ["RosenbrockTableau", "Rosenbrock", "RODAS4"]

_TOL = 1e-12


@dataclass(frozen=True, eq=False)
class RosenbrockTableau:
    """Coefficients of a Rosenbrock method in Hairer & Wanner's transformed formulation.

    Parameters
    ----------
    name : str
    gamma : float
        Diagonal coefficient (``W = I / (h gamma) - J``).
    a, C : sequence of sequences
        Strictly lower triangular ``s x s`` stage coefficients (``a_ij`` couple the stage
        arguments, ``c_ij / h`` the right-hand sides).
    alpha : sequence
        Stage nodes; validated against ``a Gamma`` with ``Gamma = (diag(1/gamma) - C)^-1``.
    gamma_t : sequence
        Coefficients of ``h f_t`` (row sums of ``Gamma``; validated).
    m, e : sequence
        Weights of the new state and of the error estimate.
    order, embedded_order : int
    dense : sequence of two sequences, optional
        Weights ``d_2j, d_3j`` of the stages in the continuous extension
        ``y(t_n + theta h) = (1 - theta) y_n + theta (y_{n+1} + (1 - theta) (D_2 + theta D_3))``
        with ``D_k = sum_j d_kj U_j`` (Hairer & Wanner's RODAS; order 3). Without them the
        cubic Hermite interpolant is used.
    source : str

    Raises
    ------
    ValueError
        If the arrays are not ``s x s`` strictly lower triangular, the nodes or time
        coefficients disagree with ``a`` and ``C``, or the weights of the method or of the
        embedded method do not sum to one in the original variables.
    """

    name: str
    gamma: float
    a: Sequence[Sequence[float]]
    C: Sequence[Sequence[float]]
    alpha: Sequence[float]
    gamma_t: Sequence[float]
    m: Sequence[float]
    e: Sequence[float]
    order: int
    embedded_order: int
    dense: Sequence[Sequence[float]] = ()
    source: str = ""
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        a, C = np.array(self.a, dtype=float), np.array(self.C, dtype=float)
        s = len(self.m)
        if a.shape != (s, s) or C.shape != (s, s) or len(self.alpha) != s or len(self.e) != s:
            raise ValueError(
                f"tableau {self.name!r}: a and C must be {s} x {s}, alpha/e length {s}"
            )
        if np.any(np.triu(a) != 0) or np.any(np.triu(C) != 0):
            raise ValueError(f"tableau {self.name!r}: a and C must be strictly lower triangular")
        G = np.linalg.inv(np.diag(np.full(s, 1.0 / self.gamma)) - C)
        alpha = (a @ G).sum(1)
        if np.max(np.abs(alpha - np.array(self.alpha))) > _TOL:
            raise ValueError(
                f"tableau {self.name!r}: the nodes alpha disagree with a Gamma: {alpha}"
            )
        if np.max(np.abs(G.sum(1) - np.array(self.gamma_t))) > _TOL:
            raise ValueError(f"tableau {self.name!r}: gamma_t must be the row sums of Gamma")
        if self.dense and np.array(self.dense).shape != (2, s):
            raise ValueError(f"tableau {self.name!r}: dense must have 2 rows of {s} weights")
        for label, w in (("m", np.array(self.m)), ("m - e", np.array(self.m) - np.array(self.e))):
            if abs((w @ G).sum() - 1.0) > _TOL:
                raise ValueError(
                    f"tableau {self.name!r}: the weights {label} give sum(b) = {(w @ G).sum()!r} "
                    "in the original variables; must be 1"
                )

    @property
    def n_stages(self) -> int:
        return len(self.m)


_A5 = [1.221224509226641, 6.019134481288629, 12.53708332932087, -0.6878860361058950]
RODAS4_TABLEAU = RosenbrockTableau(
    name="rodas4",
    gamma=0.25,
    a=[
        [0, 0, 0, 0, 0, 0],
        [1.544, 0, 0, 0, 0, 0],
        [0.9466785280815826, 0.2557011698983284, 0, 0, 0, 0],
        [3.314825187068521, 2.896124015972201, 0.9986419139977817, 0, 0, 0],
        [*_A5, 0, 0],
        [*_A5, 1.0, 0],
    ],
    C=[
        [0, 0, 0, 0, 0, 0],
        [-5.6688, 0, 0, 0, 0, 0],
        [-2.430093356833875, -0.2063599157091915, 0, 0, 0, 0],
        [-0.1073529058151375, -9.594562251023355, -20.47028614809616, 0, 0, 0],
        [7.496443313967647, -10.24680431464352, -33.99990352819905, 11.70890893206160, 0, 0],
        [
            8.083246795921522,
            -7.981132988064893,
            -31.52159432874371,
            16.31930543123136,
            -6.058818238834054,
            0,
        ],
    ],
    alpha=[0.0, 0.386, 0.21, 0.63, 1.0, 1.0],
    gamma_t=[0.25, -0.1043, 0.1035, -0.0362, 0.0, 0.0],
    m=[*_A5, 1.0, 1.0],
    e=[0, 0, 0, 0, 0, 1.0],
    order=4,
    embedded_order=3,
    dense=[
        [
            10.12623508344586,
            -7.487995877610167,
            -34.80091861555747,
            -7.992771707568823,
            1.025137723295662,
            0.0,
        ],
        [
            -0.6762803392801253,
            6.087714651680015,
            16.43084320892478,
            24.76722511418386,
            -6.594389125716872,
            0.0,
        ],
    ],
    source="Hairer & Wanner II (1996), sec. IV.7: RODAS4 (rodas.f, METH=1, with its dense "
    "output coefficients D21..D35)",
)


@dataclass(frozen=True)
class Rosenbrock(MethodFace):
    """A Rosenbrock method (``solver="rodas4"``): adaptive, L-stable, dense linear algebra.

    Parameters
    ----------
    tableau : RosenbrockTableau
    """

    tableau: RosenbrockTableau
    fsal = False

    @property
    def interpolant_order(self) -> int:
        return 3

    @property
    def n_dense_stages(self) -> int:
        return 0 if self.tableau.dense else 1

    @property
    def dense_stage_is_next_first(self) -> bool:
        return not self.tableau.dense

    @property
    def name(self) -> str:
        return self.tableau.name

    @property
    def order(self) -> int:
        return self.tableau.order

    @property
    def embedded_order(self) -> int:
        return self.tableau.embedded_order

    def with_options(self, **options):
        """A copy with another tableau (the only setting of a Rosenbrock method).

        Raises
        ------
        ValueError
            For any other option (Rosenbrock methods have no Newton iteration and always use
            dense factorisations of exact Jacobians).
        """
        unknown = sorted(set(options) - {"tableau"})
        if unknown:
            raise ValueError(
                f"{self.name} has no option(s) {unknown}: Rosenbrock methods have no Newton "
                "iteration and factorise exact Jacobians; for a matrix-free stiff solver use "
                "get_tableau('kvaerno5').with_options(linear_solver='krylov')"
            )
        return dataclasses.replace(self, **options)

    def make_stepper(self, dtype: torch.dtype, device: torch.device):
        return RosenbrockStepper(self, dtype, device)

    def __repr__(self) -> str:
        return f"Rosenbrock({self.name!r}, order {self.order}({self.embedded_order}))"


RODAS4 = Rosenbrock(RODAS4_TABLEAU)


class RosenbrockStepper(HermiteStepper):
    """Per-solve state: the Jacobian at the current step start and the statistics."""

    fsal = False

    def __init__(self, method: Rosenbrock, dtype, device):
        self.method = self.tab = method
        T = method.tableau
        self.s = T.n_stages
        self.a = [[float(v) for v in row] for row in T.a]
        self.C = [[float(v) for v in row] for row in T.C]
        self.alpha = [float(v) for v in T.alpha]
        self.gamma_t = [float(v) for v in T.gamma_t]
        self.m = [float(v) for v in T.m]
        self.e = [float(v) for v in T.e]
        self.gamma = float(T.gamma)
        self.dense = [[float(v) for v in row] for row in T.dense]
        self._jac_key = None
        self._jac = None
        self._rows = None  # per-sample control: the rows' Jacobian blocks (see .rows)
        self.counts = dict(n_jac=0, n_lu=0)

    @property
    def stats(self) -> dict:
        return dict(self.counts)

    def _jacobian(self, f, t, yv, track_grad):
        key = (t, yv.data_ptr(), track_grad)
        if self._jac_key != key:
            if track_grad:
                J, ft = jacobian(f, t, yv, with_t=True)
            else:
                with torch.no_grad():
                    J, ft = jacobian(f, t, yv.detach(), with_t=True)
            self._jac, self._jac_key = (J, ft), key
            self.counts["n_jac"] += 1
        return self._jac

    def bind_rows(self, rtol, atol) -> None:
        """A per-sample solve starts: forget the Jacobian blocks of earlier rows."""
        self._rows = None

    def take_rows(self, keep) -> None:
        """The per-sample working set was compacted to rows ``keep``."""
        if self._rows is not None:
            self._rows.take(keep)

    def step(self, f, t, h, y, k1, t_last, track_grad: bool):
        """One step from ``(t, y)``. ``t``, ``h`` and ``t_last`` are floats (one step for the
        whole state: one ``N x N`` Jacobian) or ``(A,)`` float64 tensors (per-sample control:
        each row its own step, a block-diagonal Jacobian of ``A`` blocks ``M x M``, see
        :mod:`.rows`). Returns ``(y_new, err, K)``."""
        if isinstance(h, torch.Tensor):
            from .rows import rosenbrock_rows_step

            return rosenbrock_rows_step(self, f, t, h, y, k1, t_last, track_grad)
        shape = y.shape
        # A graph is needed only if the state or func's parameters require grad (k1 tells).
        track_grad = track_grad and (y.requires_grad or k1.requires_grad)
        yv = y.reshape(-1) if track_grad else y.reshape(-1).detach()
        k1v = k1.reshape(-1) if track_grad else k1.reshape(-1).detach()
        J, ft = self._jacobian(f, t, yv, track_grad)
        W = J * -1.0
        W.diagonal().add_(1.0 / (h * self.gamma))
        LU, piv = torch.linalg.lu_factor(W.detach())
        self.counts["n_lu"] += 1

        def solve(rhs):
            if track_grad:
                return LUSolve.apply(W, rhs, LU, piv)
            return torch.linalg.lu_solve(LU, piv, rhs.unsqueeze(-1)).squeeze(-1)

        return self.stages(f, t, h, h, yv, k1v, t_last, ft, solve, track_grad, shape)

    def stages(self, f, t, h, hv, yv, k1v, t_last, ft, solve, track_grad, shape):
        """The stages of one step and its results, written once for both drivers.

        ``yv``, ``k1v``, ``ft`` are flat ``(N,)``; ``h`` the step size (float, or ``(A,)`` per
        row) and ``hv`` the same laid out per component (the float, or ``(N,)``); ``solve`` maps
        a right-hand side ``(N,)`` to ``W^-1 rhs`` (one matrix, or one block per row)."""
        nonautonomous = bool(ft.abs().max() > 0) if not track_grad else True
        U = []
        for i in range(self.s):
            if i == 0:
                Fi = k1v
            else:
                Yi = yv
                for j in range(i):
                    if self.a[i][j]:
                        Yi = Yi + self.a[i][j] * U[j]
                ti = t_last if self.alpha[i] == 1.0 else t + self.alpha[i] * h
                Fi = f.flat(ti, Yi)
            rhs = Fi
            for j in range(i):
                if self.C[i][j]:
                    rhs = rhs + (self.C[i][j] / hv) * U[j]
            if nonautonomous and self.gamma_t[i]:
                rhs = rhs + (hv * self.gamma_t[i]) * ft
            U.append(solve(rhs))
        y_new = yv
        for mi, Ui in zip(self.m, U):
            if mi:
                y_new = y_new + mi * Ui
        err = None
        with torch.no_grad():
            err = sum(ei * Ui.detach() for ei, Ui in zip(self.e, U) if ei)
        if not torch.is_tensor(err):  # pragma: no cover - every table has an estimate
            err = torch.zeros_like(yv)
        K = self.pack(k1v, (y_new - yv) / hv)
        if self.dense:
            # Rows [f_n, slope, D_2 / h, D_3 / h]: the method's own continuous extension.
            D = []
            for row in self.dense:
                acc = None
                for dj, Uj in zip(row, U):
                    if dj:
                        acc = dj * Uj if acc is None else acc + dj * Uj
                D.append(acc / hv)
            K = torch.cat([K, torch.stack(D)])
        return y_new.view(shape), err.reshape(shape), K

    # ---------------------------------------------------------------- native dense output
    @property
    def S(self) -> int:
        return 4 if self.dense else 2

    @property
    def Sd(self) -> int:
        return 4 if self.dense else 3

    def dense_stages(self, f, t: float, h: float, y, K, k_next, t_last=None):
        if self.dense:
            return K
        return super().dense_stages(f, t, h, y, K, k_next, t_last)

    def interpolate(self, Kd, y, h, theta: torch.Tensor, samples=None):
        """RODAS's extension ``y_n + h [theta slope + (theta - theta^2) D_2/h
        + (theta^2 - theta^3) D_3/h]`` (rows 1..3 of ``Kd``), else cubic Hermite.
        Shapes as :meth:`HermiteStepper.interpolate` (``h`` a float, or ``(n,)`` per row)."""
        if not self.dense:
            return super().interpolate(Kd, y, h, theta, samples)
        t2 = theta * theta
        zero = torch.zeros_like(theta)
        W = torch.stack([zero, theta, theta - t2, t2 - t2 * theta], dim=-1)
        return interpolant_sum(y, h, W, Kd, samples)
