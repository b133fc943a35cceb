"""Dense output of the implicit Runge--Kutta methods: the quartic continuous extension of
``kvaerno5`` and ``radauIIA5`` (order 4, from the step's stage derivatives; solvers/implicit/
tableaux.py) against the cubic Hermite interpolant it replaces (order 3).

Before the quartic, kvaerno5's values at output times inside a step were 100-600x less accurate
than the tolerance (y' = -y (1 + t), the error at t = 0.5: 1.5e-4 at rtol = atol = 1e-6, 3.4e-6
at 1e-8, 6.2e-8 at 1e-10). The assertions below hold the measured figures with a margin.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import neuralode
from neuralode.solvers import get_tableau
from neuralode.solvers.implicit.irk import ImplicitRK
from neuralode.solvers.implicit.tableaux import TABLEAUX, ImplicitTableau

F64 = torch.float64
Y0 = torch.tensor([1.0, 2.0], dtype=F64)


def _col(t):
    """Time as a column against the state: per-sample control passes one time per row."""
    t = torch.as_tensor(t, dtype=F64)
    return t.unsqueeze(-1) if t.dim() else t


def _decay(t, y):
    return -y * (1 + _col(t))


def _exact(t):
    """y = y0 exp(-(t + t^2 / 2)) at times t (m,): (m, 2)."""
    return Y0[None] * torch.exp(-(t + t**2 / 2))[:, None]


def _slope(ns, errs):
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0]


# ---------------------------------------------------------------------------- the tableaux
def test_interpolant_orders_of_the_implicit_tableaux():
    """Quartic (order 4) where the tableau carries b_dense, cubic Hermite (order 3) elsewhere;
    every method's dense output is of order >= its order - 1 except gl6 (documented)."""
    orders = {name: tab.interpolant_order for name, tab in TABLEAUX.items()}
    assert orders["kvaerno5"] == 4 and orders["radauIIA5"] == 4
    assert {n for n, q in orders.items() if q == 3} == set(TABLEAUX) - {"kvaerno5", "radauIIA5"}
    assert get_tableau("kvaerno5").interpolant_order == 4
    assert [n for n, t in TABLEAUX.items() if t.interpolant_order < t.order - 1] == ["gl6"]


@pytest.mark.parametrize("name", ["kvaerno5", "radauIIA5"])
def test_quartic_weights_reproduce_polynomials_of_degree_four(name):
    """For y' = p'(t), p of degree 4, every stage derivative is p' at its node, so the quartic
    (order 4) reproduces p exactly inside the step; the cubic Hermite does not."""
    tab = TABLEAUX[name]
    c = np.array(tab.c)
    p = np.polynomial.Polynomial([0.3, -1.0, 0.5, 2.0, -1.5])
    dp = p.deriv()
    h, t0 = 0.7, 0.2
    theta = np.array([0.1, 0.35, 0.5, 0.9])
    ks = dp(t0 + c * h)
    q = np.array(tab.b_dense)
    d = q[0] * dp(t0) + q[1:] @ ks
    slope = (p(t0 + h) - p(t0)) / h
    th = theta
    herm = np.stack([th - 2 * th**2 + th**3, 3 * th**2 - 2 * th**3, th**3 - th**2], 1)
    cubic = p(t0) + h * herm @ np.array([dp(t0), slope, dp(t0 + h)])
    quartic = cubic + h * (th * (1 - th)) ** 2 * d
    np.testing.assert_allclose(quartic, p(t0 + th * h), rtol=0, atol=1e-13)
    assert np.abs(cubic - p(t0 + th * h)).max() > 1e-3


def test_b_dense_is_validated():
    tab = TABLEAUX["kvaerno5"]
    with pytest.raises(ValueError, match="b_dense has 7 entries; it needs 8"):
        dataclasses.replace(tab, b_dense=tab.b_dense[:7])
    with pytest.raises(ValueError, match="does not give a fourth-order continuous extension"):
        dataclasses.replace(tab, b_dense=[0.0, 1.0, 0, 0, 0, 0, 0, -1.0])
    with pytest.raises(ValueError, match="b_dense needs a stiffly accurate tableau"):
        ImplicitTableau(name="midpoint", a=[[0.5]], b=[1.0], c=[0.5], order=2, b_dense=[0.0, 0.0])


# ---------------------------------------------------------------------------- accuracy
# Measured (CPU, float64): error at the interior output t = 0.5 with the quartic / with the
# cubic Hermite before; the largest error at the step ends of the same solve.
#   rtol=atol   quartic   Hermite   step ends (max)
#   1e-6        1.6e-5    1.5e-4    9.3e-6
#   1e-8        9.8e-8    3.4e-6    1.3e-7
#   1e-10       6.6e-10   6.2e-8    2.3e-9
# Over a fine grid of [0, 2] the largest error inside steps is 2.1x / 2.6x / 5.6x the largest at
# the step ends (Hermite: 18x / 49x / 210x); the order-4 interpolant's error grows like h^5 where
# the controller, which watches the order-4 embedded solution, takes a longer step.
@pytest.mark.parametrize(
    "tol, bound, ratio", [(1e-6, 4e-5, 3.0), (1e-8, 3e-7, 3.5), (1e-10, 3e-9, 7.0)]
)
def test_kvaerno5_interior_outputs_are_as_accurate_as_its_steps(tol, bound, ratio):
    t = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=F64)
    sol = neuralode.solve(_decay, Y0, t, solver="kvaerno5", rtol=tol, atol=tol, dense_output=True)
    err = (sol.ys - _exact(t)).abs().amax(1)
    assert float(err[1]) < bound, float(err[1])
    # Inside the steps no worse than a few times the method's own error at its step ends.
    ends = torch.tensor(sol.step_times, dtype=F64)
    end_err = float((sol.evaluate(ends) - _exact(ends)).abs().max())
    tq = torch.linspace(0.0, 2.0, 161, dtype=F64)
    dense_err = float((sol.evaluate(tq) - _exact(tq)).abs().max())
    assert dense_err < ratio * end_err, (dense_err, end_err)


def test_kvaerno5_lorenz_interior_outputs():
    """Lorenz on [0, 1], 101 outputs (nearly all inside steps), rtol = atol = 1e-10, against
    dopri8 at 1e-13: 1.1e-6 with the cubic Hermite; the quartic measures 4.1e-8 (dopri5:
    5.4e-9)."""

    def lorenz(t, y):
        x, u, z = y.unbind(-1)
        return torch.stack([10 * (u - x), x * (28 - z) - u, x * u - 8 / 3 * z], -1)

    t = torch.linspace(0, 1, 101, dtype=F64)
    y0 = torch.ones(3, dtype=F64)
    ref = neuralode.solve(lorenz, y0, t, solver="dopri8", rtol=1e-13, atol=1e-13).ys
    sol = neuralode.solve(lorenz, y0, t, solver="kvaerno5", rtol=1e-10, atol=1e-10)
    assert float((sol.ys - ref).abs().max()) < 1.5e-7


@pytest.mark.parametrize("method", ["kvaerno5", "radauIIA5"])
def test_quartic_dense_output_converges_at_order_five_on_a_fixed_grid(method):
    """Global error at interior points O(h^min(p, q + 1)) = O(h^5) (the cubic Hermite: h^4)."""
    T = 2.0
    ns = (8, 16, 32)
    errs = []
    for n in ns:
        h = T / n
        sol = neuralode.solve(
            lambda t, y: -2 * t * y**2,
            torch.tensor([1.0], dtype=F64),
            torch.tensor([0.0, T], dtype=F64),
            solver=method,
            dt=h,
            dense_output=True,
        )
        tq = torch.cat([(torch.arange(n, dtype=F64) + th) * h for th in (0.3, 0.5, 0.7)])
        errs.append(float((sol.evaluate(tq)[:, 0] - 1 / (1 + tq**2)).abs().max()))
    assert _slope(ns, errs) >= 4.5, errs


def test_quartic_is_smooth_on_a_stiff_problem():
    """Van der Pol, mu = 1000 (stiff): values inside steps against a tight scipy Radau solution
    stay at the tolerance (the quartic uses only stage derivatives on the solution)."""
    from scipy.integrate import solve_ivp

    mu = 1000.0

    def vdp(t, y):
        return torch.stack([y[..., 1], mu * ((1 - y[..., 0] ** 2) * y[..., 1]) - y[..., 0]], -1)

    t = torch.linspace(0.0, 1500.0, 31, dtype=F64)
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    ref = solve_ivp(
        lambda s, y: [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]],
        (0, 1500), y0.numpy(), method="Radau", rtol=1e-12, atol=1e-12, t_eval=t.numpy(),
    ).y.T  # fmt: skip
    sol = neuralode.solve(vdp, y0, t, solver="kvaerno5", rtol=1e-7, atol=1e-7)
    err = np.abs(sol.ys[:, 0].numpy() - ref[:, 0]).max()  # y0 component: O(1), smooth
    assert err < 1e-4, err


@pytest.mark.parametrize("k, bound", [(1e3, 3.5e-5), (1e6, 4e-2)])
def test_stiff_relaxation_interior_outputs(k, bound):
    """y' = -k (y - cos t), outputs every 0.05 inside steps of up to ~0.2, rtol = 1e-6, atol =
    1e-8. Stiff, every derivative-based interpolant amplifies the solution's error by k (f at the
    step ends): measured 2.5e-5 / 2.5e-2 (cubic Hermite 1.8e-5 / 2.4e-2; rodas4 3.2e-5 / 1.6e-2;
    scipy Radau 2.8e-5 / 4.7e-3). The quartic's stiff-limit condition on b_dense keeps stage 2's
    defect out: without it (plain minimum-norm weights) 4.5e-5 / 6.6e-2."""

    def f(t, y):
        return -k * (y - torch.cos(torch.as_tensor(t, dtype=F64)))

    t = torch.linspace(0.0, 3.0, 61, dtype=F64)
    a = k / (k * k + 1)
    exact = a * (k * torch.cos(t) + torch.sin(t)) + (0.5 - a * k) * torch.exp(-k * t)
    sol = neuralode.solve(f, torch.tensor([0.5], dtype=F64), t, solver="kvaerno5", rtol=1e-6,
                          atol=1e-8)  # fmt: skip
    err = float((sol.ys[:, 0] - exact).abs().max())
    assert err < bound, err
    if k == 1e6:
        # The remedy the README gives: steps that end on the output times (1.4e-10 measured).
        ctrl = neuralode.PIController(rtol=1e-6, atol=1e-8, step_t=tuple(t.tolist()))
        sol = neuralode.solve(f, torch.tensor([0.5], dtype=F64), t, solver="kvaerno5",
                              controller=ctrl)  # fmt: skip
        assert float((sol.ys[:, 0] - exact).abs().max()) < 1e-7


# ---------------------------------------------------------------------------- drivers
def test_per_sample_equals_shared_and_keeps_the_accuracy():
    """batch_control='per_sample': each sample takes the steps it takes alone, so its values at
    interior outputs equal the shared solve's of that sample (to rounding)."""
    tol = 1e-8
    y0 = torch.stack([Y0, 3 * Y0])  # (2, 2)
    t = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=F64)
    rows = neuralode.solve(
        _decay, y0, t, solver="kvaerno5", rtol=tol, atol=tol, batch_control="per_sample",
        dense_output=True,
    )  # fmt: skip
    tq = torch.tensor([0.13, 0.5, 0.77, 1.61], dtype=F64)
    for b in range(2):
        alone = neuralode.solve(
            _decay, y0[b], t, solver="kvaerno5", rtol=tol, atol=tol, dense_output=True
        )
        torch.testing.assert_close(rows.ys[:, b], alone.ys, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(rows.evaluate(tq)[:, b], alone.evaluate(tq), rtol=1e-10,
                                   atol=1e-13)  # fmt: skip
    err = (rows.ys - (_exact(t)[:, None] * torch.tensor([1.0, 3.0], dtype=F64)[:, None])).abs()
    assert float(err[1].max()) < 3 * 3e-7  # the shared bound at 1e-8, sample 2 three times larger


def test_per_sample_outputs_per_sample_times():
    """2-D t (own output times per sample) under per-sample control: the quartic's accuracy."""
    tol = 1e-6
    y0 = torch.stack([Y0, Y0])
    t = torch.tensor([[0.0, 0.5, 2.0], [0.0, 0.37, 2.0]], dtype=F64)
    sol = neuralode.solve(_decay, y0, t, solver="kvaerno5", rtol=tol, atol=tol,
                          batch_control="per_sample")  # fmt: skip
    for b in range(2):
        err = (sol.ys[:, b] - _exact(t[b])).abs().max()
        assert float(err) < 4e-5, float(err)


# ---------------------------------------------------------------------------- gradients
def _evaluate_sum(theta, method, **kw):
    def f(t, y):
        return -theta * y * (1 + t)

    sol = neuralode.solve(
        f, Y0, torch.tensor([0.0, 1.0], dtype=F64), solver=method, dense_output=True, **kw
    )
    tq = torch.tensor([0.1, 0.45, 0.83], dtype=F64)
    return (sol.evaluate(tq) * torch.tensor([1.0, -0.5], dtype=F64)).sum()


@pytest.mark.parametrize("method", ["kvaerno5", "radauIIA5"])
def test_gradient_through_evaluate_matches_finite_differences(method):
    """Fixed steps (a smooth map of the parameter): the gradient through the quartic (its
    correction row built from the stages attached by the implicit function theorem) equals
    central differences."""
    theta = torch.tensor(0.8, dtype=F64, requires_grad=True)
    val = _evaluate_sum(theta, method, dt=0.25)
    (g,) = torch.autograd.grad(val, theta)
    eps = 1e-6
    with torch.no_grad():
        fd = (
            _evaluate_sum(theta + eps, method, dt=0.25)
            - _evaluate_sum(theta - eps, method, dt=0.25)
        ) / (2 * eps)
    assert float(g) == pytest.approx(float(fd), rel=1e-7)


def test_gradient_through_evaluate_per_sample_equals_shared():
    theta = torch.tensor(0.8, dtype=F64, requires_grad=True)
    tq = torch.tensor([0.1, 0.45, 0.83], dtype=F64)
    y0 = torch.stack([Y0, 2 * Y0])

    def f(t, y):
        return -theta * y * (1 + _col(t))

    grads = []
    for control in ("shared", "per_sample"):
        sol = neuralode.solve(f, y0, torch.tensor([0.0, 1.0], dtype=F64), solver="kvaerno5",
                              rtol=1e-8, atol=1e-8, dense_output=True,
                              batch_control=control)  # fmt: skip
        grads.append(torch.autograd.grad(sol.evaluate(tq)[:, 0].sum(), theta)[0])
    # Shared control steps the batch together (other steps than sample 0 alone): the two
    # gradients agree to the tolerance, not to rounding.
    assert float(grads[1]) == pytest.approx(float(grads[0]), rel=1e-6)


# ---------------------------------------------------------------------------- substeps
def test_fixed_steps_split_in_halves_keep_a_quartic_through_the_midpoint():
    """A fixed step whose Newton iteration fails is taken as two halves; its dense output is
    the quartic through y_n, f_n, y_mid, y_{n+1}, f_{n+1}. y' = -2 y^3 (y = 1 / sqrt(1 + 4t))
    with dt = 0.25 and max_iters=5: 8 splits; the largest error inside steps measures 3.2e-4
    (with the cubic Hermite over each whole step: 3.3e-3)."""
    method = ImplicitRK(TABLEAUX["kvaerno5"], max_iters=5)
    with pytest.warns(RuntimeWarning, match="smaller substeps"):
        sol = neuralode.solve(
            lambda t, y: -2.0 * y**3,
            torch.tensor([1.0], dtype=F64),
            torch.tensor([0.0, 2.0], dtype=F64),
            solver=method,
            dt=0.25,
            dense_output=True,
        )
    assert sol.stats["n_substeps"] >= 1
    tq = torch.linspace(0.0, 2.0, 81, dtype=F64)
    err = (sol.evaluate(tq)[:, 0] - 1 / torch.sqrt(1 + 4 * tq)).abs().max()
    assert float(err) < 1e-3, float(err)


def test_matrix_free_kvaerno5_has_the_same_dense_output():
    """linear_solver='krylov' runs the same stages (GMRES inside Newton): the same quartic."""
    t = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=F64)
    kw = dict(rtol=1e-8, atol=1e-8)
    dense = neuralode.solve(_decay, Y0, t, solver="kvaerno5", **kw)
    krylov = get_tableau("kvaerno5").with_options(linear_solver="krylov")
    free = neuralode.solve(_decay, Y0, t, solver=krylov, **kw)
    assert float((free.ys - _exact(t)).abs()[1].max()) < 3e-7
    torch.testing.assert_close(free.ys, dense.ys, rtol=1e-7, atol=1e-9)
