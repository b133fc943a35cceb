"""Adams methods: variable-step coefficients (exact on uneven grids), orders, stability of the
defaults, the adaptive predictor--corrector, the torchdiffeq face, and what a multistep
method cannot do (replay a single step).
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

import neuralode
from neuralode import StepToGrid
from neuralode.solvers import MULTISTEP, get_tableau
from neuralode.solvers.multistep import Adams, adams_weights

F64 = torch.float64


def _slope(ns, errs) -> float:
    return -float(np.polyfit(np.log(ns), np.log(errs), 1)[0])


# --------------------------------------------------------------------------- coefficients
@pytest.mark.parametrize(
    "nodes, expected",
    [
        # Adams--Bashforth 4: (55, -59, 37, -9) / 24 on f_n, f_{n-1}, f_{n-2}, f_{n-3}.
        (
            [0, -1, -2, -3],
            [Fraction(55, 24), Fraction(-59, 24), Fraction(37, 24), Fraction(-9, 24)],
        ),
        # Adams--Moulton 4: (9, 19, -5, 1) / 24 on f_{n+1}, f_n, f_{n-1}, f_{n-2}.
        ([1, 0, -1, -2], [Fraction(9, 24), Fraction(19, 24), Fraction(-5, 24), Fraction(1, 24)]),
        ([0], [1]),  # Euler
        ([1, 0], [Fraction(1, 2), Fraction(1, 2)]),  # trapezoidal rule
    ],
)
def test_weights_on_uniform_nodes_are_the_classical_coefficients(nodes, expected):
    assert adams_weights(nodes) == pytest.approx([float(x) for x in expected], abs=1e-14)


def test_weights_on_uneven_nodes_integrate_polynomials_exactly():
    rng = np.random.default_rng(0)
    nodes = np.concatenate([[0.0], -np.cumsum(rng.uniform(0.3, 2.0, 5))])
    w = np.array(adams_weights(nodes))
    for p in range(len(nodes)):  # int_0^1 s^p ds = 1 / (p + 1)
        assert w @ nodes**p == pytest.approx(1 / (p + 1), abs=1e-12)


# --------------------------------------------------------------------------- orders
# y' = cos(t) y, y = exp(sin t) on [0, 3]; error = max over the grid points. Two uneven grids:
# a smooth stretching (step ratios 0.7..1.3) and alternating steps h, 2h, h, 2h, ...
T = 3.0


def _smooth(n):
    s = np.arange(n + 1) / n
    return (T * (s + 0.3 * np.sin(2 * np.pi * s) / (2 * np.pi))).tolist()


def _alternating(n):
    h = np.where(np.arange(n) % 2 == 0, 1.0, 2.0)
    g = np.concatenate([[0.0], np.cumsum(h)])
    return (g / g[-1] * T).tolist()


def _grid_error(method, grid):
    sol = neuralode.solve(
        lambda t, y: torch.cos(t) * y,
        torch.tensor([1.0], dtype=F64),
        torch.tensor(grid, dtype=F64),
        solver=method,
        controller=StepToGrid(grid),
    )
    return float(np.abs(sol.ys[:, 0].numpy() - np.exp(np.sin(np.array(grid)))).max())


NS = (32, 64, 128)


def _ns(order):
    return NS if order < 6 else (64, 128, 256)


# Measured slopes (smooth / alternating): explicit 1: 1.0/1.0, 2: 1.9/2.0, 3: 2.8/2.9,
# 4: 3.9/4.0, 5: 4.8/4.9, 6: 5.7/6.0 (n = 64..256); implicit 2: 2.0/2.0, 3: 2.9/3.0,
# 4: 3.8/4.1, 5: 4.9/4.9, 6: 5.8/5.9 (n = 64..256).
@pytest.mark.parametrize("grid", [_smooth, _alternating], ids=["smooth", "alternating"])
@pytest.mark.parametrize(
    "name, order",
    [("explicit_adams", p) for p in range(1, 7)] + [("implicit_adams", p) for p in range(2, 7)],
)
def test_order_on_uneven_grids(grid, name, order):
    method = get_tableau(name).with_options(max_order=order)
    ns = _ns(order)
    errs = [_grid_error(method, grid(n)) for n in ns]
    assert _slope(ns, errs) == pytest.approx(order, abs=0.35), errs


def test_torchdiffeq_adams_is_first_order_on_uneven_grids():
    """torchdiffeq's Adams coefficients assume equal steps: on h, 2h, h, 2h, ... grids its
    implicit_adams converges at order 1 (measured 1.17, 1.09); ours at its order."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    errs = []
    for n in NS:
        g = torch.tensor(_alternating(n), dtype=F64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its "Functional iteration did not converge"
            ys = torchdiffeq.odeint(
                lambda t, y: torch.cos(t) * y,
                torch.tensor([1.0], dtype=F64),
                g,
                method="implicit_adams",
                options=dict(grid_constructor=lambda f, y0, t, g=g: g, max_order=4),
            )
        errs.append(float(np.abs(ys[:, 0].numpy() - np.exp(np.sin(g.numpy()))).max()))
    assert _slope(NS, errs) < 1.5
    ours = [_grid_error("implicit_adams", _alternating(n)) for n in NS]
    assert _slope(NS, ours) == pytest.approx(4, abs=0.3)
    assert ours[-1] < 1e-4 * errs[-1]


# --------------------------------------------------------------------------- stability
def _decay(method, h=0.01, t_end=5.0, **options):
    return neuralode.odeint(
        lambda t, y: -y,
        torch.tensor([1.0], dtype=F64),
        torch.tensor([0.0, t_end], dtype=F64),
        method=method,
        options=dict(step_size=h, **options),
    )[-1, 0]


@pytest.mark.parametrize("method", MULTISTEP)
def test_decay_with_h_001_is_accurate_with_the_defaults(method):
    assert abs(float(_decay(method)) - math.exp(-5.0)) < 1e-9


def test_torchdiffeq_explicit_adams_default_is_unstable():
    """torchdiffeq's explicit_adams defaults to max_order=12 (Adams--Bashforth of order 11),
    whose stability interval is far shorter than h |lambda| = 0.01: y' = -y blows up (error
    ~1e39 at t = 5). The same order here blows up too -- it is the order, not a coefficient
    bug -- which is why the default order is 4 (stable for h |lambda| < 0.3)."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    y = torchdiffeq.odeint(
        lambda t, y: -y,
        torch.tensor([1.0], dtype=F64),
        torch.tensor([0.0, 5.0], dtype=F64),
        method="explicit_adams",
        options=dict(step_size=0.01),
    )[-1, 0]
    assert abs(float(y) - math.exp(-5.0)) > 1e30
    assert abs(float(_decay("explicit_adams", max_order=12)) - math.exp(-5.0)) > 1e20


# --------------------------------------------------------------------------- adaptive PECE
@pytest.mark.parametrize("rtol", [1e-4, 1e-7, 1e-10])
def test_adaptive_implicit_adams_reaches_its_tolerance(rtol):
    def osc(t, y):
        return torch.stack([y[1], -y[0]])

    sol = neuralode.solve(
        osc,
        torch.tensor([1.0, 0.0], dtype=F64),
        torch.tensor([0.0, 20.0], dtype=F64),
        solver="implicit_adams",
        rtol=rtol,
        atol=rtol,
    )
    exact = torch.tensor([math.cos(20.0), -math.sin(20.0)], dtype=F64)
    assert float((sol.ys[-1] - exact).abs().max()) < 10 * rtol
    # Two evaluations per step (PECE) plus few corrections; rejections rare.
    assert sol.stats["nfe"] < 3.2 * (sol.stats["n_accepted"] + sol.stats["n_rejected"]) + 10
    assert sol.stats["n_rejected"] < 0.1 * sol.stats["n_accepted"] + 5


def test_higher_order_adams_saves_work_at_tight_tolerances():
    def osc(t, y):
        return torch.stack([y[1], -y[0]])

    nfe = {}
    for order in (4, 8):
        m = get_tableau("implicit_adams").with_options(max_order=order)
        sol = neuralode.solve(
            osc,
            torch.tensor([1.0, 0.0], dtype=F64),
            torch.tensor([0.0, 20.0], dtype=F64),
            solver=m,
            rtol=1e-10,
            atol=1e-10,
        )
        nfe[order] = sol.stats["nfe"]
    assert nfe[8] < 0.2 * nfe[4]  # measured 989 against 13052


def test_dense_output_is_cubic_hermite_of_order_four():
    errs = []
    ns = (16, 32, 64)
    for n in ns:
        h = 2.0 / n
        sol = neuralode.solve(
            lambda t, y: -2 * t * y**2,
            torch.tensor([1.0], dtype=F64),
            torch.tensor([0.0, 2.0], dtype=F64),
            solver="implicit_adams",
            dt=h,
        )
        tq = torch.cat([(torch.arange(n, dtype=F64) + th) * h for th in (0.3, 0.7)])
        errs.append(float((sol.evaluate(tq)[:, 0] - 1 / (1 + tq**2)).abs().max()))
    assert _slope(ns, errs) == pytest.approx(4, abs=0.3), errs


def test_history_restarts_after_a_discontinuity():
    # f jumps at t = 1: the history before it must not be used after it.
    def f(t, y):
        return torch.where(t < 1.0, -y, 2 * torch.ones_like(y))

    ctrl = neuralode.PIController(rtol=1e-9, atol=1e-11, jump_t=[1.0])
    sol = neuralode.solve(
        f,
        torch.tensor([1.0], dtype=F64),
        torch.tensor([0.0, 2.0], dtype=F64),
        solver="implicit_adams",
        controller=ctrl,
    )
    assert float(sol.ys[-1, 0]) == pytest.approx(math.exp(-1.0) + 2.0, abs=1e-8)


# --------------------------------------------------------------------------- torchdiffeq face
def test_odeint_options_map_onto_the_methods():
    y = _decay("implicit_adams", max_order=6, max_iters=2)
    assert abs(float(y) - math.exp(-5.0)) < 1e-12
    # explicit_adams: torchdiffeq's max_order k means Adams--Bashforth of order k - 1.
    from neuralode._compat_args import fixed_solver

    assert fixed_solver("explicit_adams", {"max_order": 5}).max_order == 4
    assert fixed_solver("implicit_adams", {"max_order": 5}).max_order == 5
    assert fixed_solver("gl4", {"max_iters": 3}).max_iters == 3
    with pytest.warns(UserWarning, match="no effect"):
        neuralode.odeint(
            lambda t, y: -y,
            torch.tensor([1.0], dtype=F64),
            torch.tensor([0.0, 1.0], dtype=F64),
            method="dopri5",
            options=dict(max_order=3),
        )


def test_odeint_adjoint_with_adams():
    class Decay(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(-1.0, dtype=F64))

        def forward(self, t, y):
            return self.a * y

    m = Decay()
    t = torch.linspace(0, 5, 11, dtype=F64)
    # Output times are added to the grid: no step has to be replayed on its own.
    ys = neuralode.odeint_adjoint(
        m,
        torch.tensor([1.0], dtype=F64),
        t,
        method="implicit_adams",
        options=dict(step_size=0.013),
    )
    ys[-1].sum().backward()
    assert float(m.a.grad) == pytest.approx(5 * math.exp(-5.0), rel=1e-6)


# --------------------------------------------------------------------------- limits
def test_checkpointed_gradients_are_refused():
    # Refused by the solve itself (not in backward()): a step cannot be replayed on its own.
    y0 = torch.tensor([1.0], dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="recomputes single steps.*'implicit_adams'"):
        neuralode.solve(
            lambda t, y: -y,
            y0,
            torch.tensor([0.0, 1.0], dtype=F64),
            solver="implicit_adams",
            dt=0.1,
            gradient="checkpoint",
        )


def test_direct_gradients_flow_through_the_history():
    a = torch.tensor(-1.0, dtype=F64, requires_grad=True)
    sol = neuralode.solve(
        lambda t, y: a * y,
        torch.tensor([1.0], dtype=F64),
        torch.tensor([0.0, 2.0], dtype=F64),
        solver="implicit_adams",
        rtol=1e-10,
        atol=1e-12,
    )
    (g,) = torch.autograd.grad(sol.ys[-1, 0], a)
    assert float(g) == pytest.approx(2 * math.exp(-2.0), rel=1e-7)


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="max_order must be an integer in \\[1, 12\\]"):
        Adams("x", implicit=False, max_order=13)
    with pytest.raises(ValueError, match="max_order must be an integer in \\[2, 12\\]"):
        get_tableau("implicit_adams").with_options(max_order=1)
    with pytest.raises(ValueError, match="max_iters"):
        get_tableau("implicit_adams").with_options(max_iters=0)
    with pytest.raises(ValueError, match="only implicit Adams"):
        Adams("x", implicit=False, error_estimate=True)
    with pytest.raises(ValueError, match="fixed-step method"):
        neuralode.solve(
            lambda t, y: -y, torch.tensor([1.0]), torch.tensor([0.0, 1.0]), solver="explicit_adams"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_tableau("fixed_adams").adaptive is False
