"""Tableau data of every built-in method: consistency, order conditions, derived properties.

These checks use only the coefficient arrays (no solver run). Butcher's order conditions are
checked here for the methods that ``test_tableaux_highorder.py`` does not cover (everything but
``dopri8`` and ``tsit5``), up to the stated order, together with a check that the order is
*sharp* (some condition of the next order fails), so a table that silently loses or misstates an
order is caught.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache

import numpy as np
import pytest
import torch

from neuralode import ButcherTableau
from neuralode.solvers import ADAPTIVE, FIXED_STEP, available, get_tableau

METHODS = available()

# The methods issue #2 asks for, with (order, embedded order, stages, interpolant order, FSAL).
EXPECTED = {
    "euler": (1, None, 1, 3, False),
    "midpoint": (2, None, 2, 3, False),
    "heun2": (2, None, 2, 3, False),
    "heun3": (3, None, 3, 3, False),
    "rk4": (4, None, 4, 3, False),
    "rk38": (4, None, 4, 3, False),
    "adaptive_heun": (2, 1, 2, 3, False),
    "fehlberg2": (2, 1, 3, 3, False),
    "bosh3": (3, 2, 4, 3, True),
    "dopri5": (5, 4, 7, 4, True),
    "tsit5": (5, 4, 7, 4, True),
    "dopri8": (8, 5, 12, 7, False),
}

# Order conditions for these are in test_tableaux_highorder.py (all trees up to order 8).
HIGH_ORDER_COVERED_ELSEWHERE = {"dopri8", "tsit5"}


def test_registry_holds_exactly_the_documented_methods():
    assert set(METHODS) == set(EXPECTED)
    assert set(ADAPTIVE) == {m for m, e in EXPECTED.items() if e[1] is not None}
    assert set(FIXED_STEP) == {m for m, e in EXPECTED.items() if e[1] is None}


@pytest.mark.parametrize("method", METHODS)
def test_stated_orders_stages_and_fsal(method):
    tab = get_tableau(method)
    order, emb, stages, interp, fsal = EXPECTED[method]
    assert tab.name == method
    assert tab.order == order
    assert tab.embedded_order == emb
    assert tab.adaptive == (emb is not None)
    assert tab.n_stages == stages
    assert tab.interpolant_order == interp
    assert tab.fsal is fsal


@pytest.mark.parametrize("method", METHODS)
def test_fsal_is_derived_from_the_arrays(method):
    """FSAL holds exactly when the last stage is f(t + h, y_{n+1}): last row of a == b, c = 1."""
    tab = get_tableau(method)
    s = tab.n_stages
    last_row = list(tab.a[-1]) + [0.0] * (s - len(tab.a[-1]))  # a[s-1] has s-1 entries
    last_row_is_b = np.allclose(np.array(last_row), np.array(tab.b), rtol=0, atol=1e-15)
    assert tab.fsal == (tab.c[-1] == 1.0 and last_row_is_b)


@pytest.mark.parametrize("method", METHODS)
def test_row_sums_of_a_equal_nodes_and_weights_sum_to_one(method):
    tab = get_tableau(method)
    s = tab.n_stages
    assert len(tab.a) == len(tab.c) == s
    for i, row in enumerate(tab.a):
        assert all(v == 0.0 for v in row[i:]), f"row {i} is not strictly lower triangular"
        assert math.fsum(row) == pytest.approx(tab.c[i], abs=1e-13)
    assert math.fsum(tab.b) == pytest.approx(1.0, abs=1e-13)
    if tab.b_hat is not None:
        assert len(tab.b_hat) == s
        assert math.fsum(tab.b_hat) == pytest.approx(1.0, abs=1e-13)
        # An embedded pair must differ, or the error estimate is identically zero.
        assert max(abs(x - y) for x, y in zip(tab.b, tab.b_hat)) > 1e-6
    for j, row in enumerate(tab.a_dense):
        assert math.fsum(row) == pytest.approx(tab.c_dense[j], abs=1e-13)


@pytest.mark.parametrize("method", METHODS)
def test_interpolant_reproduces_both_step_ends(method):
    """b_i(0) = 0 (the start state) and b_i(1) = b_i (the propagated solution)."""
    tab = get_tableau(method)
    w = tab.interpolant_weights(torch.tensor([0.0, 1.0], dtype=torch.float64))
    b_full = torch.tensor(list(tab.b) + [0.0] * tab.n_dense_stages, dtype=torch.float64)
    torch.testing.assert_close(w[0], torch.zeros_like(b_full), rtol=0, atol=0)
    torch.testing.assert_close(w[1], b_full, rtol=0, atol=1e-13)


@pytest.mark.parametrize("method", METHODS)
def test_interpolant_derivative_at_step_start_is_first_stage(method):
    """d/dtheta of b_i(theta) at 0 is [i == 0]: the dense output has slope f_n at t_n."""
    tab = get_tableau(method)
    P = np.array(tab.interpolant)
    expected = np.zeros(P.shape[0])
    expected[0] = 1.0
    np.testing.assert_allclose(P[:, 0], expected, rtol=0, atol=1e-15)


# ------------------------------------------------------------------ order conditions
def _trees(n: int) -> tuple[tuple, ...]:
    """All rooted trees with ``n`` vertices; a tree is the sorted tuple of its subtrees."""
    return tuple(sorted(_trees_cached(n), key=repr))


@cache
def _trees_cached(n: int) -> frozenset:
    if n == 1:
        return frozenset({()})
    out = set()
    for forest in _forests(n - 1, n - 1):
        out.add(tuple(sorted(forest, key=repr)))
    return frozenset(out)


@cache
def _forests(m: int, max_size: int) -> tuple[tuple, ...]:
    """Multisets of trees with total size m and each tree of size <= max_size."""
    if m == 0:
        return ((),)
    res = set()
    for k in range(1, min(m, max_size) + 1):
        for t in _trees_cached(k):
            for rest in _forests(m - k, k):
                res.add(tuple(sorted((t, *rest), key=repr)))
    return tuple(res)


def _size(t) -> int:
    return 1 + sum(_size(s) for s in t)


def _density(t) -> int:
    return _size(t) * math.prod(_density(s) for s in t)


def _phi(A: list[list[Fraction]], t) -> list[Fraction]:
    """Elementary weights Phi(t) (one per stage), exactly in rationals."""
    s = len(A)
    out = [Fraction(1)] * s
    for sub in t:
        ps = _phi(A, sub)
        a_ps = [sum((A[i][j] * ps[j] for j in range(s)), Fraction(0)) for i in range(s)]
        out = [o * x for o, x in zip(out, a_ps)]
    return out


def _residuals(tab: ButcherTableau, weights, order: int) -> dict[int, float]:
    """max |b . Phi(t) - 1/gamma(t)| over the trees of each order up to ``order``."""
    s = tab.n_stages
    A = [[Fraction(v) for v in row] + [Fraction(0)] * (s - len(row)) for row in tab.a]
    b = [Fraction(v) for v in weights]
    res = {}
    for n in range(1, order + 1):
        worst = 0.0
        for t in _trees(n):
            val = sum((bi * p for bi, p in zip(b, _phi(A, t))), Fraction(0))
            worst = max(worst, abs(float(val - Fraction(1, _density(t)))))
        res[n] = worst
    return res


def test_tree_counts_match_known_sequence():
    # Number of rooted trees with n vertices: OEIS A000081.
    assert [len(_trees(n)) for n in range(1, 7)] == [1, 1, 2, 4, 9, 20]


LOW_ORDER = [m for m in METHODS if m not in HIGH_ORDER_COVERED_ELSEWHERE]


@pytest.mark.parametrize("method", LOW_ORDER)
def test_order_conditions_hold_up_to_the_stated_order_and_no_further(method):
    tab = get_tableau(method)
    res = _residuals(tab, tab.b, tab.order + 1)
    for n in range(1, tab.order + 1):
        assert res[n] < 1e-14, f"order-{n} condition violated by {res[n]:.2e}"
    assert res[tab.order + 1] > 1e-6, "the method is of higher order than stated"


@pytest.mark.parametrize("method", [m for m in LOW_ORDER if get_tableau(m).adaptive])
def test_embedded_weights_have_the_stated_order(method):
    tab = get_tableau(method)
    res = _residuals(tab, tab.b_hat, tab.embedded_order + 1)
    for n in range(1, tab.embedded_order + 1):
        assert res[n] < 1e-14
    assert res[tab.embedded_order + 1] > 1e-6


@pytest.mark.parametrize("method", ADAPTIVE)
def test_error_order_is_one_above_the_lower_order(method):
    tab = get_tableau(method)
    assert tab.error_order() == min(tab.order, tab.embedded_order) + 1


# ------------------------------------------------------------------ validation of user tableaux
def _ok(**kw):
    base = dict(name="t", a=[[], [0.5]], b=[0, 1], c=[0, 0.5], order=2)
    base.update(kw)
    return ButcherTableau(**base)


def test_a_valid_custom_tableau_is_accepted_and_runs():
    tab = _ok()
    assert not tab.adaptive and not tab.fsal and tab.n_stages == 2
    assert repr(tab) == "ButcherTableau('t', order 2, 2 stages, fsal=False)"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(c=[0, 0.5, 1]), r"a has 2 rows, b has 2 entries and c has 3"),
        (dict(a=[[0.1], [0.5]], c=[0.1, 0.5]), r"row 0 of a has entries on or above the diagonal"),
        (dict(a=[[], [0.4]]), r"row 1 of a sums to 0.4 but c\[1\] = 0.5"),
        (dict(b=[0.5, 0.6]), r"sum\(b\) = 1.1, must be 1"),
        (dict(b_hat=[1, 0, 0], embedded_order=1), r"b_hat has 3 entries, expected 2"),
        (dict(b_hat=[1, 1], embedded_order=1), r"sum\(b_hat\) = 2.0, must be 1"),
        (dict(b_hat=[1, 0]), r"b_hat given without embedded_order"),
        (
            dict(a_dense=[[0, 1]], c_dense=[], interpolant=[[1], [0], [0]], interpolant_order=1),
            r"a_dense and c_dense differ in length",
        ),
        (
            dict(
                a_dense=[[0, 1, 0, 0]],
                c_dense=[1],
                interpolant=[[1], [0], [0]],
                interpolant_order=1,
            ),
            r"dense stage 0 refers to a later stage",
        ),
        (
            dict(a_dense=[[0, 1]], c_dense=[0.5], interpolant=[[0], [1], [0]], interpolant_order=1),
            r"dense row 0 sums to 1.0, node is 0.5",
        ),
        (dict(a_dense=[[0, 1]], c_dense=[1]), r"dense stages given without an interpolant"),
        (dict(interpolant=[[0, 0]], interpolant_order=2), r"interpolant has 1 rows, expected 2"),
        (
            dict(interpolant=[[1, -1], [0, 0]], interpolant_order=2),
            r"interpolant row 1 gives b_1\(1\) = 0.0, expected 1.0",
        ),
        (dict(interpolant=[[0, 0], [0, 1]]), r"interpolant given without interpolant_order"),
    ],
)
def test_invalid_tableau_is_rejected_with_a_precise_message(kw, match):
    with pytest.raises(ValueError, match=match):
        _ok(**kw)


def test_error_order_of_a_fixed_step_method_raises():
    with pytest.raises(ValueError, match=r"method 'rk4' has no embedded error estimate"):
        get_tableau("rk4").error_order()
