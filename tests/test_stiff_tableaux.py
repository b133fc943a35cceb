"""Implicit and Rosenbrock tableaux: order conditions, structure, stability, validation.

Order conditions are checked on every rooted tree (Butcher's ``b . Phi(tau) = 1 / gamma(tau)``),
so a tableau has exactly its stated order: all conditions up to it hold, one above fails.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from neuralode.solvers import IMPLICIT, get_tableau
from neuralode.solvers.implicit import ImplicitTableau, RosenbrockTableau
from neuralode.solvers.implicit.rosenbrock import RODAS4_TABLEAU
from neuralode.solvers.implicit.tableaux import TABLEAUX


@functools.cache
def _trees(n: int):
    """Rooted trees with ``n`` vertices, each a sorted tuple of its subtrees."""
    if n == 1:
        return [()]
    out = set()

    def forests(m, largest):
        if m == 0:
            yield ()
            return
        for k in range(min(m, largest), 0, -1):
            for t in _trees(k):
                for rest in forests(m - k, k):
                    yield (t, *rest)

    for children in forests(n - 1, n - 1):
        out.add(tuple(sorted(children)))
    return sorted(out)


def _size(t) -> int:
    return 1 + sum(_size(c) for c in t)


def _gamma(t) -> int:
    g = _size(t)
    for c in t:
        g *= _gamma(c)
    return g


def _phi(t, A, c):
    v = np.ones(len(c))
    for child in t:
        v = v * (A @ _phi(child, A, c))
    return v


def _order(A, b, c, max_order=8) -> int:
    A, b, c = np.array(A), np.array(b), np.array(c)
    for p in range(1, max_order + 1):
        if any(abs(b @ _phi(t, A, c) - 1 / _gamma(t)) > 1e-12 for t in _trees(p)):
            return p - 1
    return max_order


def test_tree_counts():
    # OEIS A000081: 1, 1, 2, 4, 9, 20, 48 rooted trees with 1..7 vertices.
    assert [len(_trees(n)) for n in range(1, 8)] == [1, 1, 2, 4, 9, 20, 48]


@pytest.mark.parametrize("name", sorted(TABLEAUX))
def test_order_conditions_give_exactly_the_stated_order(name):
    tab = TABLEAUX[name]
    assert _order(tab.a, tab.b, tab.c) == tab.order
    if tab.b_hat is not None:
        assert _order(tab.a, tab.b_hat, tab.c) == tab.embedded_order


def test_gl4_has_the_gauss_nodes():
    # torchdiffeq's gl4 repeats the first node (1/2 - sqrt(3)/6) and converges at order 1.
    tab = TABLEAUX["gl4"]
    assert tab.c == pytest.approx([0.5 - math.sqrt(3) / 6, 0.5 + math.sqrt(3) / 6], abs=1e-15)
    assert tab.simplifying_conditions() == (4, 2)


@pytest.mark.parametrize(
    "name, dirk, esdirk, stiffly_accurate",
    [
        ("implicit_euler", True, False, True),
        ("implicit_midpoint", True, False, False),
        ("trapezoid", True, True, True),
        ("sdirk2", True, False, True),
        ("trbdf2", True, True, True),
        ("radauIIA3", False, False, True),
        ("radauIIA5", False, False, True),
        ("gl4", False, False, False),
        ("gl6", False, False, False),
        ("kvaerno5", True, True, True),
    ],
)
def test_structure_is_derived_from_the_arrays(name, dirk, esdirk, stiffly_accurate):
    tab = TABLEAUX[name]
    assert tab.diagonally_implicit is dirk
    assert tab.explicit_first_stage is esdirk
    assert tab.stiffly_accurate is stiffly_accurate
    method = get_tableau(name)
    assert method.fsal is stiffly_accurate
    assert method.dense_stage_is_next_first is (not stiffly_accurate)


def _stability(tab, z: complex) -> complex:
    A, b = np.array(tab.a, dtype=complex), np.array(tab.b, dtype=complex)
    s = len(b)
    return 1 + z * b @ np.linalg.solve(np.eye(s) - z * A, np.ones(s))


@pytest.mark.parametrize("name", sorted(TABLEAUX))
def test_a_stability_and_l_stability(name):
    tab = TABLEAUX[name]
    # A-stable: |R(z)| <= 1 on the imaginary axis (and so in the left half-plane).
    for y in np.logspace(-3, 4, 60):
        assert abs(_stability(tab, 1j * y)) <= 1 + 1e-12
    l_stable = {"implicit_euler", "sdirk2", "trbdf2", "radauIIA3", "radauIIA5", "kvaerno5"}
    r_inf = abs(_stability(tab, -1e9))
    if name in l_stable:
        assert r_inf < 1e-6
    else:  # midpoint, trapezoid, Gauss: |R(-inf)| = 1
        assert r_inf == pytest.approx(1.0, abs=1e-6)


def test_rodas4_structure():
    # In the original variables (alpha = a Gamma, b = m Gamma) the nodes and weights check out.
    t = RODAS4_TABLEAU
    s = t.n_stages
    G = np.linalg.inv(np.diag(np.full(s, 1 / t.gamma)) - np.array(t.C))
    b = np.array(t.m) @ G
    b_hat = (np.array(t.m) - np.array(t.e)) @ G
    beta = (np.array(t.a) @ G + np.tril(G, -1)).sum(1)
    assert b.sum() == pytest.approx(1.0, abs=1e-13)
    assert b_hat.sum() == pytest.approx(1.0, abs=1e-13)
    # Order 2 condition of a Rosenbrock method: sum b_i beta'_i = 1/2 - gamma.
    assert b @ beta == pytest.approx(0.5 - t.gamma, abs=1e-13)
    assert get_tableau("rodas4").adaptive and get_tableau("rodas4").error_order() == 4


def test_every_implicit_name_resolves():
    for name in IMPLICIT:
        m = get_tableau(name)
        assert m.name == name
        assert m is get_tableau(m)


# ---------------------------------------------------------------------------- validation
def test_tableau_validation_messages():
    with pytest.raises(ValueError, match="row 0 of a sums to"):
        ImplicitTableau("bad", a=[[0.5]], b=[1.0], c=[1.0], order=1)
    with pytest.raises(ValueError, match=r"sum\(b\)"):
        ImplicitTableau("bad", a=[[1.0]], b=[0.5], c=[1.0], order=1)
    with pytest.raises(ValueError, match="must be 2 x 2"):
        ImplicitTableau("bad", a=[[1.0, 0.0]], b=[0.5, 0.5], c=[1.0, 1.0], order=1)
    with pytest.raises(ValueError, match="zero diagonal entry"):
        ImplicitTableau("bad", a=[[0.5, 0.0], [1.0, 0.0]], b=[0.5, 0.5], c=[0.5, 1.0], order=1)
    with pytest.raises(ValueError, match="invertible"):
        ImplicitTableau("bad", a=[[0.5, 0.5], [0.5, 0.5]], b=[0.5, 0.5], c=[1.0, 1.0], order=1)
    with pytest.raises(ValueError, match="without embedded_order"):
        ImplicitTableau("bad", a=[[1.0]], b=[1.0], c=[1.0], order=1, b_hat=[1.0])
    with pytest.raises(ValueError, match="sum\\(b_hat\\)"):
        ImplicitTableau("bad", a=[[1.0]], b=[1.0], c=[1.0], order=1, b_hat=[2.0], embedded_order=1)


def test_rosenbrock_validation_messages():
    t = RODAS4_TABLEAU
    base = dict(
        name="x",
        gamma=t.gamma,
        a=t.a,
        C=t.C,
        alpha=t.alpha,
        gamma_t=t.gamma_t,
        m=t.m,
        e=t.e,
        order=4,
        embedded_order=3,
    )
    with pytest.raises(ValueError, match="nodes alpha"):
        RosenbrockTableau(**{**base, "alpha": [0.0, 0.4, 0.21, 0.63, 1.0, 1.0]})
    with pytest.raises(ValueError, match="gamma_t"):
        RosenbrockTableau(**{**base, "gamma_t": [0.25, 0, 0, 0, 0, 0]})
    with pytest.raises(ValueError, match="weights m give"):
        RosenbrockTableau(**{**base, "m": [0, 0, 0, 0, 1.0, 1.0]})
    with pytest.raises(ValueError, match="strictly lower"):
        RosenbrockTableau(**{**base, "a": np.eye(6).tolist()})
    RosenbrockTableau(**base)  # the table itself is valid
