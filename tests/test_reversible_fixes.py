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


@pytest.mark.parametrize("make", [lambda a: 2 * a, torch.exp], ids=["2a", "exp"])
@pytest.mark.parametrize("method", ["reversible", "checkpoint", "backsolve"])
def test_params_with_a_shared_subgraph(make, method):
    # w is computed from the leaf a outside func: every step's VJP runs through the user's
    # subgraph w <- a, which must not be freed by the first one.
    a = torch.tensor([0.5, -1.0], dtype=DT, requires_grad=True)
    w = make(a)
    y0 = torch.tensor([1.0, 2.0], dtype=DT)

    def f(t, y):
        return -w * y + torch.sin(y)

    gradient = {
        "reversible": no.Reversible(params=[a]),
        "checkpoint": no.Checkpointed(params=[a]),
        "backsolve": no.Backsolve(params=[a]),
    }[method]
    kw = dict(solver="rk4", dt=0.05)
    got = _grad(no.solve(f, y0, [0.0, 1.0], gradient=gradient, **kw).ys[-1].sum(), a)
    ref = _grad(no.solve(f, y0, [0.0, 1.0], **kw).ys[-1].sum(), a)
    # Checkpointed is Direct's gradient to rounding; the reversible scheme's is 1.4e-6 from
    # rk4's; Backsolve integrates the adjoint equations (rk4 at dt=0.05: 8e-5 from Direct's).
    tol = {"checkpoint": 1e-9, "reversible": 1e-5, "backsolve": 1e-3}[method]
    torch.testing.assert_close(got, ref, rtol=tol, atol=1e-8)


@pytest.mark.parametrize(
    "make",
    [
        lambda P: no.Reversible(params=P),
        lambda P: no.Checkpointed(params=P),
        lambda P: no.Backsolve(params=P),
    ],
    ids=["reversible", "checkpoint", "backsolve"],
)
def test_duplicate_params_refused(make):
    w = torch.tensor([0.5, -1.0], dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=DT)
    with pytest.raises(ValueError, match=r"params=\.\.\.\)\[1\] is the same tensor as .*\[0\]"):
        no.solve(lambda t, y: -w * y, y0, [0.0, 1.0], solver="rk4", dt=0.1, gradient=make([w, w]))


def test_missing_params_warning_names_reversible():
    w = torch.tensor([0.5, -1.0], dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    with pytest.warns(UserWarning, match=r"Reversible\(params=\.\.\.\)"):
        sol = no.solve(
            lambda t, y: -w * y, y0, [0.0, 1.0], solver="rk4", dt=0.1, gradient="reversible"
        )
    sol.ys.sum().backward()


def test_coupling_must_be_a_number():
    with pytest.raises(ValueError, match=r"coupling=\.\.\.\) must be a Python number.*tensor"):
        no.Reversible(coupling=torch.tensor(0.9))
    with pytest.raises(ValueError, match="coupling"):
        no.Reversible(coupling=torch.tensor(0.9, requires_grad=True))
    assert no.Reversible(coupling=0.9).coupling == 0.9
