"""Coefficient checks for the high-order tableaux ``dopri8`` (DOP853) and ``tsit5``.

Three independent kinds of evidence, none of which uses the torch solver:

* Butcher's order conditions over all rooted trees, for ``b`` and ``b_hat`` (and checks that
  they are sharp and that a perturbed coefficient breaks them);
* the continuous-extension conditions ``sum_i b_i(theta) Phi_i(t) = theta^rho(t) / gamma(t)``
  for every tree up to the interpolant's order, over the full stage set (dense stages included);
* a one-step convergence study with a small NumPy Runge--Kutta implementation on a nonlinear
  non-autonomous system with a known solution.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest

from neuralode.solvers import dopri8, tsit5

TABLEAUX = {"dopri8": dopri8.TABLEAU, "tsit5": tsit5.TABLEAU}

# Residual tolerance for conditions that must hold: the coefficients are stored as doubles, and
# the largest dopri8 elementary weights sum terms of size ~1e3, so rounding gives ~1e-13.
TOL = 1e-11


# --------------------------------------------------------------------------- rooted trees
# A rooted tree is the sorted tuple of its subtrees (the leaf is ``()``); sorting by
# ``(order, tree)`` makes each unlabelled tree have exactly one representation.
def _key(t: tuple) -> tuple:
    return (order(t), t)


@cache
def order(t: tuple) -> int:
    """rho(t): number of vertices."""
    return 1 + sum(order(s) for s in t)


@cache
def density(t: tuple) -> int:
    """gamma(t) = rho(t) * prod gamma(subtrees)."""
    return order(t) * math.prod(density(s) for s in t)


@cache
def _forests(m: int, bound: tuple | None) -> tuple[tuple, ...]:
    """Multisets of trees of total order ``m``, as tuples in non-increasing key order, each key
    at most ``bound``."""
    if m == 0:
        return ((),)
    out = []
    for k in range(1, m + 1):
        for t in trees_of_order(k):
            if bound is not None and _key(t) > bound:
                continue
            for rest in _forests(m - k, _key(t)):
                out.append((t, *rest))
    return tuple(out)


@cache
def trees_of_order(n: int) -> tuple[tuple, ...]:
    if n == 1:
        return ((),)
    return tuple(tuple(sorted(f, key=_key)) for f in _forests(n - 1, None))


def trees_up_to(n: int) -> list[tuple]:
    return [t for k in range(1, n + 1) for t in trees_of_order(k)]


def stage_weights(A: np.ndarray, t: tuple, memo: dict) -> np.ndarray:
    """Phi_i(t) for every stage i: 1 for the leaf, prod_subtrees (A Phi(subtree))_i otherwise."""
    if t not in memo:
        v = np.ones(A.shape[0])
        for s in t:
            v = v * (A @ stage_weights(A, s, memo))
        memo[t] = v
    return memo[t]


def order_residuals(A, b, max_order: int, min_order: int = 1) -> np.ndarray:
    """|b^T Phi(t) - 1/gamma(t)| for all trees with min_order <= rho(t) <= max_order."""
    A = np.asarray(A, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    memo: dict = {}
    trees = [t for t in trees_up_to(max_order) if order(t) >= min_order]
    return np.array([abs(b @ stage_weights(A, t, memo) - 1.0 / density(t)) for t in trees])


def satisfied_order(A, b, limit: int, tol: float = TOL) -> int:
    """Largest p <= limit such that all conditions of order <= p hold to ``tol``."""
    for p in range(1, limit + 1):
        if order_residuals(A, b, p, p).max() > tol:
            return p - 1
    return limit


# --------------------------------------------------------------------------- tableau helpers
def method_matrix(tab) -> np.ndarray:
    s = tab.n_stages
    A = np.zeros((s, s))
    for i, row in enumerate(tab.a):
        A[i, : len(row)] = row
    return A


def full_matrix(tab) -> np.ndarray:
    """Stage matrix of the method stages followed by the dense stages."""
    s, n = tab.n_stages, tab.n_stages + tab.n_dense_stages
    A = np.zeros((n, n))
    A[:s, :s] = method_matrix(tab)
    for j, row in enumerate(tab.a_dense):
        A[s + j, : len(row)] = row
    return A


def interp_weights(tab, theta: float) -> np.ndarray:
    """b_i(theta) for all stages and dense stages."""
    P = np.asarray(tab.interpolant, dtype=np.float64)
    powers = theta ** np.arange(1, P.shape[1] + 1)
    return P @ powers


# --------------------------------------------------------------------------- tree machinery
def test_tree_counts():
    # OEIS A000081: number of rooted trees with n vertices.
    assert [len(trees_of_order(n)) for n in range(1, 10)] == [1, 1, 2, 4, 9, 20, 48, 115, 286]
    assert len(set(trees_up_to(9))) == len(trees_up_to(9))
    # gamma of the bushy tree [tau^(n-1)] is n, of the tall tree n!.
    tall = ()
    for n in range(2, 8):
        tall = (tall,)
        assert density(tall) == math.factorial(n)
    assert density(((),) * 6) == 7


def test_order_conditions_detect_classic_rk4():
    # Sanity check of the checker on a method whose order is known: RK4 is order 4, not 5.
    A = [[0, 0, 0, 0], [0.5, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 1, 0]]
    b = [1 / 6, 1 / 3, 1 / 3, 1 / 6]
    assert satisfied_order(A, b, 6) == 4


# --------------------------------------------------------------------------- (a) order conditions
@pytest.mark.parametrize("name", sorted(TABLEAUX))
def test_method_order(name):
    tab = TABLEAUX[name]
    A = method_matrix(tab)
    p = tab.order
    assert order_residuals(A, tab.b, p).max() < TOL
    # Sharp: some condition of order p + 1 fails clearly.
    assert order_residuals(A, tab.b, p + 1, p + 1).max() > 1e-6
    assert satisfied_order(A, tab.b, p + 1) == p


@pytest.mark.parametrize("name", sorted(TABLEAUX))
def test_embedded_order(name):
    tab = TABLEAUX[name]
    A = method_matrix(tab)
    q = tab.embedded_order
    assert order_residuals(A, tab.b_hat, q).max() < TOL
    assert order_residuals(A, tab.b_hat, q + 1, q + 1).max() > 1e-6
    assert satisfied_order(A, tab.b_hat, q + 1) == q


def test_embedded_weights_sign():
    """b_hat and its mirror image 2 b - b_hat satisfy the same order conditions (the difference
    b - b_hat is orthogonal to every condition up to the embedded order), so pin the published
    orientation: DOP853's er_i = b_i - b_hat_i, and Tsitouras' b_hat_7 = +1/66."""
    d8 = dopri8.TABLEAU
    assert d8.b[0] - d8.b_hat[0] == pytest.approx(0.1312004499419488073e-1, rel=1e-15)
    assert d8.b[11] - d8.b_hat[11] == pytest.approx(-0.2235530786388629526e-1, rel=1e-15)
    t5 = tsit5.TABLEAU
    assert t5.b_hat[6] == pytest.approx(1 / 66, rel=1e-15)
    assert t5.b_hat[0] == pytest.approx(0.09468075576583945807, rel=1e-15)


def test_dopri8_third_order_weights():
    A = method_matrix(dopri8.TABLEAU)
    assert satisfied_order(A, dopri8.B_HAT_3, 5) == 3


@pytest.mark.parametrize("name", sorted(TABLEAUX))
def test_perturbed_coefficient_breaks_order(name):
    """The checks can fail: moving weight between two entries of one row of ``a`` keeps the row
    sum (so c and the order-1/2 conditions) but breaks higher-order conditions."""
    tab = TABLEAUX[name]
    A = method_matrix(tab)
    i = tab.n_stages - 2
    A[i, 0] += 1e-7
    A[i, i - 1] -= 1e-7
    assert order_residuals(A, tab.b, 2).max() < TOL
    assert order_residuals(A, tab.b, tab.order).max() > 1e-9
    assert satisfied_order(A, tab.b, tab.order) < tab.order
    # A perturbed weight (sum kept) breaks order 2 already.
    b = np.array(tab.b)
    b[1] += 1e-7
    b[-1] -= 1e-7
    assert order_residuals(method_matrix(tab), b, tab.order).max() > 1e-9


# --------------------------------------------------------------------------- (b) interpolant
@pytest.mark.parametrize("name", sorted(TABLEAUX))
def test_interpolant_endpoints(name):
    tab = TABLEAUX[name]
    s = tab.n_stages
    end = interp_weights(tab, 1.0)
    # Exact in the published coefficients; the float entries of P (up to ~550 for dopri8, whose
    # rows cancel to b_i) leave rounding of a few 1e-14.
    np.testing.assert_allclose(end[:s], tab.b, rtol=0, atol=1e-12)
    np.testing.assert_allclose(end[s:], 0.0, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(interp_weights(tab, 0.0), 0.0)
    # theta -> 0: b_i(theta) ~ theta * [i == 0], so the derivative at t_n is f_n.
    P = np.asarray(tab.interpolant)
    np.testing.assert_allclose(P[:, 0], np.eye(len(P))[0], rtol=0, atol=1e-15)


THETAS = (0.1, 0.25, 0.5, 0.7, 0.9, 1.0)


@pytest.mark.parametrize("name", sorted(TABLEAUX))
def test_interpolant_order_conditions(name):
    tab = TABLEAUX[name]
    A = full_matrix(tab)
    q = tab.interpolant_order
    memo: dict = {}
    trees = trees_up_to(q + 1)
    worst_next = 0.0
    for theta in THETAS:
        w = interp_weights(tab, theta)
        for t in trees:
            res = abs(w @ stage_weights(A, t, memo) - theta ** order(t) / density(t))
            if order(t) <= q:
                assert res < TOL, (theta, t, res)
            else:
                worst_next = max(worst_next, res)
    # The continuous extension is not of order q + 1 (else interpolant_order is understated).
    assert worst_next > 1e-6


def test_dopri8_dense_stages():
    tab = dopri8.TABLEAU
    assert tab.n_stages == 12 and tab.n_dense_stages == 4 and not tab.fsal
    assert tab.dense_stage_is_next_first
    np.testing.assert_allclose(tab.c_dense, [1.0, 0.1, 0.2, 7 / 9], rtol=0, atol=1e-15)
    # Dense stages are stage-order-1 consistent through the full matrix too.
    A = full_matrix(tab)
    np.testing.assert_allclose(A.sum(axis=1), list(tab.c) + list(tab.c_dense), atol=1e-14)
    assert len(tab.interpolant[0]) == 7


def test_tsit5_structure():
    tab = tsit5.TABLEAU
    assert tab.n_stages == 7 and tab.fsal and tab.n_dense_stages == 0
    assert len(tab.interpolant[0]) == 4


def test_dopri8_interpolant_matches_nested_form():
    """P reproduces Hairer's nested CONTD8 evaluation for random stage values."""
    tab = dopri8.TABLEAU
    rng = np.random.default_rng(0)
    n = tab.n_stages + tab.n_dense_stages
    K = rng.standard_normal(n)
    y0, h = 0.3, 0.7
    b = np.array(tab.b)
    D = np.zeros((4, n))
    for (i, j), value in dopri8._parse(dopri8._D_TEXT):
        D[i - 4, j - 1] = float(value)
    dy = h * b @ K[: tab.n_stages]
    r = [y0, dy, h * K[0] - dy]
    r.append(dy - h * K[tab.n_stages] - r[2])
    r.extend(h * D @ K)
    for theta in (0.0, 0.2, 0.5, 0.8, 1.0):
        s1 = 1 - theta
        nested = r[0] + theta * (
            r[1]
            + s1
            * (r[2] + theta * (r[3] + s1 * (r[4] + theta * (r[5] + s1 * (r[6] + theta * r[7])))))
        )
        assert abs(y0 + h * interp_weights(tab, theta) @ K - nested) < 1e-12


# --------------------------------------------------------------------------- (c) convergence
def rhs(t: float, y: np.ndarray) -> np.ndarray:
    """(u, v) rotate with state-dependent speed 1 + u^2 + v^2; w' = -2 t w^2."""
    u, v, w = y
    om = 1.0 + u * u + v * v
    return np.array([-om * v, om * u, -2.0 * t * w * w])


def exact(t: float) -> np.ndarray:
    # Initial data at t = 0: (u, v) = (0.6, 0.2) with r^2 = 0.4; w(0) = 1.
    r2 = 0.4
    phi = math.atan2(0.2, 0.6) + (1.0 + r2) * t
    return np.array([math.sqrt(r2) * math.cos(phi), math.sqrt(r2) * math.sin(phi), 1 / (1 + t * t)])


def one_step(tab, t0: float, y0: np.ndarray, h: float, thetas) -> tuple[np.ndarray, list]:
    s = tab.n_stages
    rows = [list(r) for r in tab.a] + [list(r) for r in tab.a_dense]
    nodes = list(tab.c) + list(tab.c_dense)
    K = []
    for row, c in zip(rows, nodes):
        y = y0 + h * sum((a * k for a, k in zip(row, K)), np.zeros_like(y0))
        K.append(rhs(t0 + c * h, y))
    K = np.array(K)
    y1 = y0 + h * np.array(tab.b) @ K[:s]
    dense = [y0 + h * interp_weights(tab, th) @ K for th in thetas]
    return y1, dense


def observed_slope(hs, errs) -> float:
    return float(np.polyfit(np.log(hs), np.log(errs), 1)[0])


@pytest.mark.parametrize(
    "name, hs",
    [("dopri8", (0.4, 0.28, 0.2, 0.14, 0.1)), ("tsit5", (0.2, 0.1, 0.05, 0.025, 0.0125))],
)
def test_one_step_convergence(name, hs):
    tab = TABLEAUX[name]
    t0 = 0.3
    y0 = exact(t0)
    thetas = (0.2, 0.45, 0.7, 0.9)
    end_err, dense_err = [], []
    for h in hs:
        y1, dense = one_step(tab, t0, y0, h, thetas)
        end_err.append(np.abs(y1 - exact(t0 + h)).max())
        dense_err.append(max(np.abs(d - exact(t0 + th * h)).max() for th, d in zip(thetas, dense)))
    # Local error of an order-p formula is O(h^(p+1)). (For dopri8 the h^9 term of the end
    # point error is small on this problem: the observed slope is ~11 before rounding sets in.)
    end_slope = observed_slope(hs, end_err)
    dense_slope = observed_slope(hs, dense_err)
    assert end_slope > tab.order + 1 - 0.4, (end_slope, end_err)
    assert dense_slope > tab.interpolant_order + 1 - 0.4, (dense_slope, dense_err)
    # ... and not more than that by much, or the problem does not probe the stated order.
    assert dense_slope < tab.interpolant_order + 1 + 1.0, (dense_slope, dense_err)
