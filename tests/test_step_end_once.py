"""Two formulas written once (issue #12): the cubic Hermite basis (explicit methods without an
interpolant of their own and the implicit methods' extension) and "the end state exactly at a
step end" (shared and per-sample dense output, the per-row driver's outputs, compiled stepping).
"""

from __future__ import annotations

import pytest
import torch

import neuralode
from neuralode.solvers.implicit.base import hermite_weights
from neuralode.solvers.tableau import (
    HERMITE_BASIS,
    exact_at_step_end,
    hermite_interpolant,
    weights_at,
)

F64 = torch.float64


def test_hermite_basis_is_the_cubic_hermite_polynomials():
    th = torch.linspace(0.0, 1.0, 11, dtype=F64)
    want = torch.stack([th - 2 * th**2 + th**3, 3 * th**2 - 2 * th**3, th**3 - th**2], -1)
    P = torch.tensor(HERMITE_BASIS, dtype=F64)
    torch.testing.assert_close(weights_at(th, P), want, rtol=0, atol=1e-15)
    torch.testing.assert_close(hermite_weights(th), want, rtol=0, atol=1e-15)


def test_hermite_interpolant_of_a_tableau_is_the_same_basis():
    """y_{n+1} = y_n + h * slope is a two-stage 'method' with b = (0, 1) and f_{n+1} as a dense
    stage: its Hermite P is the basis itself; for a real method, b_i h01 plus h10 / h11."""
    P, a_dense, c_dense = hermite_interpolant(((), (0.0,)), (0.0, 1.0), (0.0, 0.0))
    assert P == HERMITE_BASIS and a_dense == ((0.0, 1.0),) and c_dense == (1.0,)
    b = (1 / 6, 1 / 3, 1 / 3, 1 / 6)  # rk4, not FSAL: a fifth row for f_{n+1}
    P, _, _ = hermite_interpolant(((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), b, (0, 0.5, 0.5, 1))
    h10, h01, h11 = (torch.tensor(r, dtype=F64) for r in HERMITE_BASIS)
    want = torch.stack([b[i] * h01 for i in range(4)] + [torch.zeros(3, dtype=F64)])
    want[0] += h10
    want[4] += h11
    torch.testing.assert_close(torch.tensor(P, dtype=F64), want, rtol=0, atol=1e-15)


def test_exact_at_step_end_broadcasts_over_rows_and_windows():
    vals = torch.arange(12.0, dtype=F64).view(3, 4)
    tau = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    y_end = torch.full((3, 4), -1.0, dtype=F64)
    got = exact_at_step_end(vals, tau, torch.tensor([1.0, 1.0, 2.0], dtype=F64), y_end)
    assert torch.equal(got[0], vals[0]) and bool((got[1:] == -1.0).all())
    # (R, W) times against each row's end, values (R, W, n, M) against the end (R, 1, n, M)
    vals = torch.zeros(2, 3, 2, 1, dtype=F64)
    taus = torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.4, 0.4]], dtype=F64)
    y_end = torch.ones(2, 1, 2, 1, dtype=F64)
    got = exact_at_step_end(vals, taus, torch.tensor([[0.3], [0.4]], dtype=F64), y_end)
    hit = got[:, :, 0, 0] == 1.0
    assert hit.tolist() == [[False, False, True], [False, True, True]]


@pytest.mark.parametrize("solver", ["dopri8", "rk4", "kvaerno5"])
@pytest.mark.parametrize("control", ["shared", "per_sample"])
def test_dense_output_at_the_step_ends_is_the_solution_there(solver, control):
    """The dense output at a landing time (a step end) is the state the solve returned there:
    the same values, not the interpolant's rounding of them (dopri8's 7th-order extension
    cancels heavily at theta = 1)."""

    def f(t, y):
        return torch.cat([y[:, 1:], -y[:, :1]], 1) * (1 + 0.1 * torch.cos(t).reshape(-1, 1))

    y0 = torch.tensor([[1.0, 0.0], [0.3, 0.7]], dtype=F64)
    t = torch.tensor([0.0, 0.8, 2.0], dtype=F64)
    kw = dict(rtol=1e-9, atol=1e-11) if solver != "rk4" else dict(dt=0.05)
    sol = neuralode.solve(f, y0, t, solver=solver, dense_output=True, batch_control=control, **kw)
    at = sol.evaluate(torch.tensor([0.8, 2.0, 1.3], dtype=F64))
    assert torch.equal(at[:2], sol.ys[1:])
    torch.testing.assert_close(at[2], sol.evaluate(torch.tensor([1.3], dtype=F64))[0])
