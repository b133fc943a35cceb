"""Implicit Runge--Kutta tableaux as validated data.

An implicit method is given by Butcher's arrays like an explicit one, except that ``a`` may have
entries on and above the diagonal. :class:`ImplicitTableau` validates the arrays and derives
everything the stepper needs from them, never from flags set by hand:

- *structure*: diagonally implicit (``a`` lower triangular: the stages are solved one after the
  other, each an ``n``-dimensional nonlinear system) or fully implicit (all stages solved
  together; ``a`` must then be invertible and diagonalisable, so that the ``s n``-dimensional
  Newton system splits into ``s`` systems of size ``n``, Hairer & Wanner II, sec. IV.8);
- an *explicit first stage* (``c[0] == 0`` and row 0 of ``a`` zero: ESDIRK), which is simply
  ``f(t_n, y_n)``;
- *stiff accuracy* (the last row of ``a`` equals ``b``; then ``y_{n+1}`` is the last stage and
  ``f(t_{n+1}, y_{n+1})`` is known from the stage equations: the method is FSAL);
- whether the method is adaptive (it carries embedded weights ``b_hat``).

Dense output is the cubic Hermite interpolant through ``(y_n, f_n, y_{n+1}, f_{n+1})`` (third
order; Hairer, Norsett & Wanner I, sec. II.6), raised to a quartic of order 4 from the step's own
stage derivatives where the tableau carries weights ``b_dense`` (``kvaerno5``, ``radauIIA5``)::

    y(t_n + theta h) = Hermite(theta) + theta^2 (1 - theta)^2 h d,
    d = b_dense[0] f(t_n, y_n) + sum_i b_dense[i + 1] k_i.

The bubble ``theta^2 (1 - theta)^2`` keeps the end values and end derivatives of the Hermite
interpolant, so the extension stays C^1 across steps; ``b_dense`` is chosen so that the quartic
satisfies the order conditions of a continuous extension up to order 4 (Hairer, Norsett & Wanner
I, sec. II.6: ``sum_i b_i(theta) Phi_t(i) = theta^|t| / gamma(t)``): with the Hermite part these reduce to
``sum b_dense Phi_t = 0`` for the trees of order <= 3 and ``= 1 / gamma(t)`` for the four trees
of order 4, ``Phi_t`` the elementary weights of the tableau with ``f(t_n, y_n)`` as an extra
stage of node 0 (Kvaerno5's free weights also keep its one stage of stage order 2 out of ``d`` in
the stiff limit: see its table). It costs no evaluation of func (one combination of the stages per step) and
needs a stiffly accurate tableau (``f(t_{n+1}, y_{n+1})`` is its last stage). No fifth-order
extension exists from the stages of these methods (stage order 2 for Kvaerno5, 3 for Radau IIA:
the nine order-5 conditions outnumber the free weights), so order 4 = order - 1 is what they give
without extra evaluations of func -- the relation of ``dopri5``'s interpolant to its method.
The other tableaux keep the cubic Hermite: it is of order >= their order - 1 (``trbdf2`` and the
one- and two-stage methods, order <= 2; ``radauIIA3``, order 3; ``gl4``, order 4) -- except
``gl6`` (order 6, not stiffly accurate), whose outputs inside steps are third order (its
stages with ``f_n`` and ``f_{n+1}`` give at most order 4; a controller's ``step_t`` makes steps
end on the output times instead).

The tables (all orders verified by the order-condition and convergence tests):

| name                | stages | order (embedded) | structure          | stability     | source | dense output (order) |
|---------------------|--------|------------------|--------------------|---------------|--------|----|
| ``implicit_euler``  | 1      | 1                | DIRK, stiffly acc. | L-stable      | Radau IIA, s = 1 | Hermite (3) |
| ``implicit_midpoint`` | 1    | 2                | DIRK               | A-stable      | Gauss, s = 1 | Hermite (3) |
| ``trapezoid``       | 2      | 2                | ESDIRK, stiffly acc. | A-stable    | Lobatto IIIA, s = 2 | Hermite (3) |
| ``sdirk2``          | 2      | 2                | SDIRK, stiffly acc. | L-stable     | Alexander 1977 | Hermite (3) |
| ``trbdf2``          | 3      | 2 (3)            | ESDIRK, stiffly acc. | L-stable    | Bank et al. 1985; Hosea & Shampine 1996 | Hermite (3) |
| ``radauIIA3``       | 2      | 3                | fully implicit     | L-stable      | Hairer & Wanner II, Table IV.5.5 | Hermite (3) |
| ``radauIIA5``       | 3      | 5                | fully implicit     | L-stable      | Hairer & Wanner II, Table IV.5.6 | quartic (4) |
| ``gl4``             | 2      | 4                | fully implicit     | A-stable      | Hairer & Wanner II, Table IV.5.2 | Hermite (3) |
| ``gl6``             | 3      | 6                | fully implicit     | A-stable      | Hairer & Wanner II, Table IV.5.2 | Hermite (3) |
| ``kvaerno5``        | 7      | 5 (4)            | ESDIRK, stiffly acc. | L-stable    | Kværnø 2004 | quartic (4) |

References
----------
Hairer, Wanner. Solving Ordinary Differential Equations II: Stiff and Differential-Algebraic
Problems, 2nd ed., Springer 1996 (sec. IV.5: Gauss and Radau IIA collocation methods; sec.
IV.6: SDIRK methods; sec. IV.8: implementation). R. Alexander, Diagonally implicit Runge--Kutta
methods for stiff ODEs, SIAM J. Numer. Anal. 14 (1977) (the two-stage L-stable SDIRK). R. E.
Bank, W. M. Coughran, W. Fichtner, E. H. Grosse, D. J. Rose, R. K. Smith, Transient simulation of
silicon devices and circuits, IEEE Trans. CAD 4 (1985) (TR-BDF2); M. E. Hosea, L. F. Shampine,
Analysis and implementation of TR-BDF2, Appl. Numer. Math. 20 (1996) (its one-step ESDIRK form
and the third-order embedded weights). A. Kværnø, Singly diagonally implicit Runge--Kutta methods
with an explicit first stage, BIT 44 (2004) (the 7-stage 5(4) pair; coefficients as printed
there to 17 digits). E. Hairer, S. P. Norsett, G. Wanner, Solving Ordinary Differential
Equations I, 2nd ed., Springer 1993, sec. II.6 (continuous extensions, their order conditions
and Hermite interpolation; the quartic weights ``b_dense`` are derived here from those conditions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..tableau import HERMITE_BASIS as _HERMITE

__all__ = ["ImplicitTableau", "TABLEAUX"]

# Published irrational coefficients are written in closed form here (computed in double
# precision); the 17-digit decimals of Kvaerno's table satisfy the conditions to ~1e-16.
_TOL = 1e-12


@dataclass(frozen=True, eq=False)
class ImplicitTableau:
    """Coefficients of an implicit (possibly embedded) Runge--Kutta method.

    Parameters
    ----------
    name : str
        Method name as users pass it.
    a : sequence of sequences
        Full ``s x s`` coupling matrix (entries on and above the diagonal allowed).
    b, c : sequence
        Weights and nodes (``c[i] == sum(a[i])``).
    order : int
        Classical order of the propagated solution.
    b_hat : sequence, optional
        Embedded weights (error estimate ``h sum (b - b_hat) k``); ``None`` for fixed-step-only
        methods.
    embedded_order : int, optional
        Order of the embedded solution; required with ``b_hat``.
    source : str
        Where the coefficients come from.
    b_dense : sequence, optional
        Weights ``(s + 1,)`` of the quartic dense output's correction ``d`` on ``f(t_n, y_n)``
        and the stage derivatives ``k_1 .. k_s`` (module docstring). ``None`` (default): the
        cubic Hermite interpolant. Needs a stiffly accurate tableau.

    Raises
    ------
    ValueError
        For inconsistent lengths, row sums of ``a`` that differ from ``c``, weights that do not
        sum to one, a diagonally implicit stage with a zero diagonal entry after the first
        stage, a fully implicit ``a`` that is singular or not diagonalisable, or ``b_dense`` of
        the wrong length, on a tableau that is not stiffly accurate, or not satisfying the order
        conditions of a fourth-order continuous extension.
    """

    name: str
    a: Sequence[Sequence[float]]
    b: Sequence[float]
    c: Sequence[float]
    order: int
    b_hat: Sequence[float] | None = None
    embedded_order: int | None = None
    source: str = ""
    b_dense: Sequence[float] | None = None
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        a = tuple(tuple(float(v) for v in row) for row in self.a)
        b = tuple(float(v) for v in self.b)
        c = tuple(float(v) for v in self.c)
        s = len(b)
        if len(c) != s or len(a) != s or any(len(row) != s for row in a):
            raise ValueError(
                f"tableau {self.name!r}: a must be {s} x {s} and c have {s} entries (the number "
                f"of weights b); got a with rows of lengths {[len(r) for r in a]} and {len(c)} nodes"
            )
        for i, row in enumerate(a):
            if abs(math.fsum(row) - c[i]) > _TOL:
                raise ValueError(
                    f"tableau {self.name!r}: row {i} of a sums to {math.fsum(row)!r} but "
                    f"c[{i}] = {c[i]!r}; the row sums of a must equal the nodes c"
                )
        if abs(math.fsum(b) - 1.0) > _TOL:
            raise ValueError(f"tableau {self.name!r}: sum(b) = {math.fsum(b)!r}, must be 1")
        b_hat = None
        if self.b_hat is not None:
            b_hat = tuple(float(v) for v in self.b_hat)
            if len(b_hat) != s:
                raise ValueError(f"tableau {self.name!r}: b_hat has {len(b_hat)} entries, not {s}")
            if abs(math.fsum(b_hat) - 1.0) > _TOL:
                raise ValueError(f"tableau {self.name!r}: sum(b_hat) = {math.fsum(b_hat)!r}")
            if self.embedded_order is None:
                raise ValueError(f"tableau {self.name!r}: b_hat given without embedded_order")
        set_(self, "a", a)
        set_(self, "b", b)
        set_(self, "c", c)
        set_(self, "b_hat", b_hat)
        if self.diagonally_implicit:
            for i in range(s):
                if a[i][i] == 0.0 and not (i == 0 and self.explicit_first_stage):
                    raise ValueError(
                        f"tableau {self.name!r}: stage {i} has a zero diagonal entry; only the "
                        "first stage of a diagonally implicit method may be explicit"
                    )
        else:
            A = np.array(a)
            if abs(np.linalg.det(A)) < 1e-12:
                raise ValueError(
                    f"tableau {self.name!r}: a fully implicit tableau needs an invertible a"
                )
            lam, T = np.linalg.eig(A)
            if np.linalg.cond(T) > 1e8:
                raise ValueError(f"tableau {self.name!r}: a is not diagonalisable")
        if self.b_dense is not None:
            set_(self, "b_dense", tuple(float(v) for v in self.b_dense))
            self._check_dense()

    def _check_dense(self) -> None:
        """Validate ``b_dense``: the quartic extension ``b_i(theta)`` (weights on ``f_n`` and the
        stages) satisfies ``sum_i b_i(theta) Phi_t(i) = theta^|t| / gamma(t)`` for the eight
        trees of order <= 4, checked at several ``theta`` (Hairer, Norsett & Wanner I, II.6)."""
        s, q = self.n_stages, self.b_dense
        if len(q) != s + 1:
            raise ValueError(
                f"tableau {self.name!r}: b_dense has {len(q)} entries; it needs {s + 1} (the "
                "weight of f(t_n, y_n), then one per stage)"
            )
        if not self.stiffly_accurate:
            raise ValueError(
                f"tableau {self.name!r}: b_dense needs a stiffly accurate tableau (the quartic "
                "dense output takes f(t_n+1, y_n+1) from the last stage)"
            )
        A = np.zeros((s + 1, s + 1))
        A[1:, 1:] = self.a
        c = np.r_[0.0, self.c]  # f(t_n, y_n) as stage 0: node 0, zero row
        ac = A @ c
        trees = [(np.ones(s + 1), 1, 1), (c, 2, 2), (c**2, 3, 3), (ac, 3, 6), (c**3, 4, 4),
                 (c * ac, 4, 8), (A @ c**2, 4, 12), (A @ ac, 4, 24)]  # fmt: skip
        last = np.eye(s + 1)[s]
        b = np.r_[0.0, self.b]
        for th in (0.25, 0.5, 0.8):
            h10, h01, h11 = (sum(k * th ** (p + 1) for p, k in enumerate(r)) for r in _HERMITE)
            w = np.eye(s + 1)[0] * h10 + b * h01 + last * h11 + np.array(q) * (th * (1 - th)) ** 2
            for phi, order, gamma in trees:
                if abs(w @ phi - th**order / gamma) > 1e-10:
                    raise ValueError(
                        f"tableau {self.name!r}: b_dense does not give a fourth-order continuous "
                        f"extension (the order-{order} condition with gamma = {gamma} fails at "
                        f"theta = {th}: {w @ phi!r} != {th**order / gamma!r})"
                    )

    @property
    def interpolant_order(self) -> int:
        """Order of the dense output: 4 with ``b_dense`` (validated), else 3 (cubic Hermite)."""
        return 3 if self.b_dense is None else 4

    # ------------------------------------------------------------------ derived structure
    @property
    def n_stages(self) -> int:
        return len(self.b)

    @property
    def diagonally_implicit(self) -> bool:
        """Whether ``a`` is lower triangular (stages solved one after the other)."""
        s = self.n_stages
        return all(self.a[i][j] == 0.0 for i in range(s) for j in range(i + 1, s))

    @property
    def explicit_first_stage(self) -> bool:
        """Whether stage 0 is ``f(t_n, y_n)`` (node 0, zero row): an ESDIRK method."""
        return self.c[0] == 0.0 and all(v == 0.0 for v in self.a[0])

    @property
    def stiffly_accurate(self) -> bool:
        """Whether the last stage is the new state (last row of ``a`` equals ``b``, node 1)."""
        return self.c[-1] == 1.0 and all(abs(x - y) <= _TOL for x, y in zip(self.a[-1], self.b))

    @property
    def adaptive(self) -> bool:
        return self.b_hat is not None

    def error_order(self) -> int:
        """Exponent base of step-size control: min(order, embedded_order) + 1."""
        if self.embedded_order is None:
            raise ValueError(f"method {self.name!r} has no embedded error estimate")
        return min(self.order, self.embedded_order) + 1

    def eigen(self):
        """``(lam, T, T_inv)`` with ``a = T diag(lam) T_inv`` (complex, cached).

        Eigenvalues are ordered real ones first, then each complex pair with the positive
        imaginary part first, so that real problems solve one system per pair.
        """
        if "eig" not in self._cache:
            lam, T = np.linalg.eig(np.array(self.a))
            order = sorted(range(len(lam)), key=lambda i: (abs(lam[i].imag) > 1e-14, -lam[i].imag))
            lam, T = lam[order], T[:, order]
            self._cache["eig"] = (lam, T, np.linalg.inv(T))
        return self._cache["eig"]

    def simplifying_conditions(self) -> tuple[int, int]:
        """Largest ``(p, q)`` with B(p) and C(q) satisfied (for the order-condition tests).

        B(p): ``sum_i b_i c_i^(k-1) = 1/k`` for ``k <= p``; C(q): ``sum_j a_ij c_j^(k-1) = c_i^k / k``
        for ``k <= q``.
        """
        b, c, a = np.array(self.b), np.array(self.c), np.array(self.a)
        p = 0
        while p < 20 and abs(b @ c**p - 1.0 / (p + 1)) < 1e-12:
            p += 1
        q = 0
        while q < 20 and np.all(np.abs(a @ c**q - c ** (q + 1) / (q + 1)) < 1e-12):
            q += 1
        return p, q

    def __repr__(self) -> str:
        kind = f"{self.order}({self.embedded_order})" if self.adaptive else f"{self.order}"
        return f"ImplicitTableau({self.name!r}, order {kind}, {self.n_stages} stages)"


# ---------------------------------------------------------------------------- the tables
_S2, _S3, _S6, _S15 = math.sqrt(2.0), math.sqrt(3.0), math.sqrt(6.0), math.sqrt(15.0)

IMPLICIT_EULER = ImplicitTableau(
    name="implicit_euler",
    a=[[1.0]],
    b=[1.0],
    c=[1.0],
    order=1,
    source="backward Euler = Radau IIA with one stage (Hairer & Wanner II, sec. IV.5)",
)

IMPLICIT_MIDPOINT = ImplicitTableau(
    name="implicit_midpoint",
    a=[[0.5]],
    b=[1.0],
    c=[0.5],
    order=2,
    source="implicit midpoint rule = Gauss with one stage (Hairer & Wanner II, sec. IV.5)",
)

TRAPEZOID = ImplicitTableau(
    name="trapezoid",
    a=[[0.0, 0.0], [0.5, 0.5]],
    b=[0.5, 0.5],
    c=[0.0, 1.0],
    order=2,
    source="trapezoidal rule = Lobatto IIIA with two stages (Hairer & Wanner II, sec. IV.5)",
)

_G = 1.0 - _S2 / 2.0  # gamma of SDIRK2 and TR-BDF2, the root of 1 - 4 g + 2 g^2 in (0, 1)
SDIRK2 = ImplicitTableau(
    name="sdirk2",
    a=[[_G, 0.0], [1.0 - _G, _G]],
    b=[1.0 - _G, _G],
    c=[_G, 1.0],
    order=2,
    source="Alexander 1977, the two-stage L-stable SDIRK method (gamma = 1 - sqrt(2)/2)",
)

_W = _S2 / 4.0  # TR-BDF2 weights on the first two stages
TRBDF2 = ImplicitTableau(
    name="trbdf2",
    a=[[0.0, 0.0, 0.0], [_G, _G, 0.0], [_W, _W, _G]],
    b=[_W, _W, _G],
    c=[0.0, 2.0 * _G, 1.0],
    order=2,
    b_hat=[(1.0 - _W) / 3.0, (3.0 * _W + 1.0) / 3.0, _G / 3.0],
    embedded_order=3,
    source="Bank et al. 1985 (TR-BDF2); ESDIRK form and 3rd-order embedded weights from Hosea & "
    "Shampine 1996",
)

RADAU_IIA3 = ImplicitTableau(
    name="radauIIA3",
    a=[[5.0 / 12.0, -1.0 / 12.0], [3.0 / 4.0, 1.0 / 4.0]],
    b=[3.0 / 4.0, 1.0 / 4.0],
    c=[1.0 / 3.0, 1.0],
    order=3,
    source="Radau IIA, s = 2 (Hairer & Wanner II, Table IV.5.5)",
)

RADAU_IIA5 = ImplicitTableau(
    name="radauIIA5",
    a=[
        [(88 - 7 * _S6) / 360, (296 - 169 * _S6) / 1800, (-2 + 3 * _S6) / 225],
        [(296 + 169 * _S6) / 1800, (88 + 7 * _S6) / 360, (-2 - 3 * _S6) / 225],
        [(16 - _S6) / 36, (16 + _S6) / 36, 1 / 9],
    ],
    b=[(16 - _S6) / 36, (16 + _S6) / 36, 1 / 9],
    c=[(4 - _S6) / 10, (4 + _S6) / 10, 1.0],
    order=5,
    source="Radau IIA, s = 3 (Hairer & Wanner II, Table IV.5.6)",
    # The one quartic of order 4 (stage order 3: only the conditions sum q c^k = [k == 3] / 4).
    b_dense=[-2.5, 5 / 6 + 5 * _S6 / 4, 5 / 6 - 5 * _S6 / 4, 5 / 6],
)

GL4 = ImplicitTableau(
    name="gl4",
    a=[[1 / 4, 1 / 4 - _S3 / 6], [1 / 4 + _S3 / 6, 1 / 4]],
    b=[1 / 2, 1 / 2],
    c=[1 / 2 - _S3 / 6, 1 / 2 + _S3 / 6],
    order=4,
    source="Gauss--Legendre, s = 2 (Hairer & Wanner II, Table IV.5.2)",
)

GL6 = ImplicitTableau(
    name="gl6",
    a=[
        [5 / 36, 2 / 9 - _S15 / 15, 5 / 36 - _S15 / 30],
        [5 / 36 + _S15 / 24, 2 / 9, 5 / 36 - _S15 / 24],
        [5 / 36 + _S15 / 30, 2 / 9 + _S15 / 15, 5 / 36],
    ],
    b=[5 / 18, 4 / 9, 5 / 18],
    c=[1 / 2 - _S15 / 10, 1 / 2, 1 / 2 + _S15 / 10],
    order=6,
    source="Gauss--Legendre, s = 3 (Hairer & Wanner II, Table IV.5.2)",
)

# Kvaerno 2004, the 5(4) ESDIRK pair with 7 stages: gamma = 0.26, stiffly accurate in both the
# method (row 7) and its embedded companion (row 6), so the error estimate is Y_7 - Y_6.
_KG = 0.26
_KV = [
    [0.0],
    [_KG],
    [0.13, 0.84033320996790809],
    [0.22371961478320505, 0.47675532319799699, -0.06470895363112615],
    [0.16648564323248321, 0.10450018841591720, 0.03631482272098715, -0.13090704451073998],
    [0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141, 0.61943039072480676],
    [
        0.13659751177640291,
        0.0,
        -0.05496908796538376,
        -0.04118626728321046,
        0.62993304899016403,
        0.06962479448202728,
    ],
]
_KA = [row + ([_KG] if i else []) + [0.0] * (6 - i) for i, row in enumerate(_KV)]
_KA[0] = [0.0] * 7
KVAERNO5 = ImplicitTableau(
    name="kvaerno5",
    a=_KA,
    b=_KA[6],
    c=[0.0, 0.52, 1.230333209967908, 0.8957659843500759, 0.43639360985864756, 1.0, 1.0],
    order=5,
    b_hat=_KA[5][:6] + [0.0],
    embedded_order=4,
    source="Kværnø, BIT 44 (2004), the 7-stage ESDIRK 5(4) pair",
    # The minimum-norm solution of the five independent order-4 conditions (stage order 2) and
    # one stiff-limit condition, on the stages (f(t_n, y_n) is stage 1). Only stage 2 misses
    # C(3): on y' = lam (y - phi(t)) + phi'(t) with h lam -> -inf its defect
    # (3 a c^2 - c^3)_2 h^3 phi^(3) / 6 enters h k_i as (A~^-1 defect)_i (A~: a without the
    # explicit stage); q . A~^-1 e_2 = 0 keeps it out of d (measured on the k = 1e3 / 1e6
    # relaxation: interior errors 2.5e-5 / 2.5e-2 against 4.5e-5 / 6.6e-2 for the plain
    # minimum-norm weights, the same non-stiff accuracy). Computed in double precision.
    b_dense=[
        0.0,
        -0.5158454663395913,
        0.0,
        0.790301235424887,
        -1.6830620447688796,
        1.549504082151759,
        0.18042199899418934,
        -0.3213198054623631,
    ],
)

TABLEAUX = {
    t.name: t
    for t in (
        IMPLICIT_EULER,
        IMPLICIT_MIDPOINT,
        TRAPEZOID,
        SDIRK2,
        TRBDF2,
        RADAU_IIA3,
        RADAU_IIA5,
        GL4,
        GL6,
        KVAERNO5,
    )
}
