"""Regressions of the Reversible gradient method (and the same bugs in Checkpointed/Backsolve):
vector fields without a graph, parameters with a shared subgraph, duplicated parameters,
argument checks."""

import pytest
import torch

import neuralode as no

DT = torch.float64


def _grad(out, x):
    return torch.autograd.grad(out, x)[0]


@pytest.mark.parametrize("kw", [dict(solver="rk4", dt=0.05), dict(solver="dopri5")])
def test_field_independent_of_state_and_params(kw):
    # f = cos(t): no graph in either increment; y(1) = y0 + sin(1), so dy(1)/dy0 = 1.
    y0 = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    sol = no.solve(
        lambda t, y: torch.cos(t) * torch.ones_like(y), y0, [0.0, 1.0], gradient="reversible", **kw
    )
    torch.testing.assert_close(
        sol.ys[-1], y0.detach() + torch.sin(torch.tensor(1.0, dtype=DT)), rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(_grad(sol.ys[-1].sum(), y0), torch.ones(2, dtype=DT))
