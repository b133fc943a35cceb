"""The one Runge--Kutta stage combination (``solvers.explicit_rk.stage_sum``): both lowerings
(eager: ``add``/``addmv``; traced by torch.compile: a chain of products) against a float64
reference, for a float step, per-row steps and a zero base; and the Direct solve's graph path
(the stages kept as a list) against the solve without a graph."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

import neuralode
from neuralode.solvers import get_tableau
from neuralode.solvers.explicit_rk import stage_sum

DOPRI5 = get_tableau("dopri5")


def _stages(n, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]


def _reference(y, h, w, ks):
    """``y + h sum_j w_j k_j`` elementwise in float64 with math.fsum (exact-ish)."""
    ys = y.double().reshape(-1).tolist() if y is not None else [0.0] * ks[0].numel()
    hs = h.double().reshape(-1).tolist() if isinstance(h, torch.Tensor) else [h] * len(ys)
    kk = [k.double().reshape(-1).tolist() for k in ks]
    return torch.tensor(
        [
            ys[n] + hs[n] * math.fsum(wj * kk[j][n] for j, wj in enumerate(w))
            for n in range(len(ys))
        ],
        dtype=torch.float64,
    )


def _traced(*args, **kw):
    """stage_sum's lowering under torch.compile (the chain Inductor fuses), run eagerly."""
    with mock.patch.object(torch.compiler, "is_compiling", return_value=True):
        return stage_sum(*args, **kw)


ROWS = [DOPRI5.a[1], DOPRI5.a[4], tuple(DOPRI5.b), (0.0, 0.5, 0.0)]


@pytest.mark.parametrize("w", ROWS, ids=["single", "a4", "b", "zeros"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_float_step_both_lowerings_match_reference(w, dtype):
    n = len(w)
    ks = _stages(n, (5, 3), dtype)
    y = _stages(1, (5, 3), dtype, seed=1)[0]
    h = 0.137
    ref = _reference(y, h, w, ks).view(5, 3)
    tol = dict(rtol=1e-14, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    eager = stage_sum(y, h, w, ks)
    assert eager.shape == y.shape and eager.dtype == dtype
    torch.testing.assert_close(eager.double(), ref, **tol)
    torch.testing.assert_close(_traced(y, h, w, ks).double(), ref, **tol)


@pytest.mark.parametrize("w", ROWS[1:], ids=["a4", "b", "zeros"])
def test_per_row_steps_flat_and_shaped(w):
    n = len(w)
    B, M = 4, 3
    ks = _stages(n, (B, M), torch.float64)
    y = _stages(1, (B, M), torch.float64, seed=2)[0]
    h = torch.tensor([0.1, -0.2, 0.0, 0.3], dtype=torch.float64)
    ref = _reference(y, h.unsqueeze(1).expand(B, M), w, ks).view(B, M)
    # Eagerly on the flat state with h expanded to it (the eager drivers' layout) ...
    hv = h.unsqueeze(1).expand(B, M).reshape(-1)
    flat = stage_sum(y.reshape(-1), hv, w, [k.reshape(-1) for k in ks])
    torch.testing.assert_close(flat.view(B, M), ref, rtol=1e-14, atol=1e-14)
    # ... and in the state's shape with h (B, 1) (the compiled step's layout), both lowerings.
    for fn in (stage_sum, _traced):
        torch.testing.assert_close(fn(y, h.unsqueeze(1), w, ks), ref, rtol=1e-14, atol=1e-14)


def test_zero_base_is_the_error_estimate():
    b_err = tuple(x - y for x, y in zip(DOPRI5.b, DOPRI5.b_hat))
    ks = _stages(7, (6,), torch.float64)
    h = 0.25
    ref = _reference(None, h, b_err, ks)
    K = torch.stack(ks).T  # (N, S): the eager drivers pass the stage matrix
    wt = torch.tensor(b_err, dtype=torch.float64)
    eager = stage_sum(None, h, b_err, K=K, wt=wt)
    torch.testing.assert_close(eager, ref, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(_traced(None, h, b_err, ks), ref, rtol=1e-13, atol=1e-15)
    out = torch.empty(6, dtype=torch.float64)
    assert stage_sum(None, h, b_err, K=K, wt=wt, out=out) is out
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-15)


def test_traced_lowering_skips_zero_coefficients():
    """A non-finite stage with a zero weight takes no part in the traced chain."""
    ks = [torch.ones(3), torch.full((3,), float("inf")), torch.ones(3)]
    out = _traced(torch.zeros(3), 0.5, (1.0, 0.0, 2.0), ks)
    torch.testing.assert_close(out, torch.full((3,), 1.5))


def _mlp_field(dtype):
    g = torch.Generator().manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net.to(dtype), (lambda t, y: net(y**3))


@pytest.mark.parametrize("solver", ["dopri5", "tsit5", "bosh3", "dopri8", "rk4"])
def test_graph_path_equals_the_path_without_graph(solver):
    """The Direct solve (stages kept as a list, stacked only for outputs) takes the same steps
    and gives the same values as the solve without a graph, and its gradient agrees with
    finite differences."""
    net, f = _mlp_field(torch.float64)
    y0 = torch.tensor([[0.5, 0.2], [0.9, -0.4], [-0.3, 0.7]], dtype=torch.float64)
    t = torch.linspace(0.0, 1.0, 7, dtype=torch.float64)
    kw = (
        dict(solver=solver, rtol=1e-7, atol=1e-9)
        if solver != "rk4"
        else dict(solver=solver, dt=0.1)
    )
    with torch.no_grad():
        ref = neuralode.solve(f, y0, t, **kw)
    y0g = y0.clone().requires_grad_(True)
    sol = neuralode.solve(f, y0g, t, **kw)
    assert sol.stats["nfe"] == ref.stats["nfe"]
    assert sol.stats["n_accepted"] == ref.stats["n_accepted"]
    torch.testing.assert_close(sol.ys.detach(), ref.ys, rtol=1e-12, atol=1e-12)
    # Dense output from the graph path's records (the stage lists stacked when recorded).
    mid = torch.tensor([0.05, 0.55], dtype=torch.float64)
    torch.testing.assert_close(
        sol.evaluate(mid).detach(), ref.evaluate(mid), rtol=1e-12, atol=1e-12
    )
    (g,) = torch.autograd.grad(sol.ys[-1, 1, 0], y0g)
    eps = 1e-6
    for j in range(2):
        e = torch.zeros_like(y0)
        e[1, j] = eps
        with torch.no_grad():
            up = neuralode.solve(f, y0 + e, t, **kw).ys[-1, 1, 0]
            dn = neuralode.solve(f, y0 - e, t, **kw).ys[-1, 1, 0]
        assert abs(float(g[1, j]) - float(up - dn) / (2 * eps)) < 1e-5


@pytest.mark.parametrize("w", ROWS[1:3], ids=["a4", "b"])
def test_large_state_chain_lowering(w):
    """From 2,048 elements a list of stages is summed by a chain of adds (no stacked copy)."""
    ks = _stages(len(w), (64, 40), torch.float64)
    y = _stages(1, (64, 40), torch.float64, seed=4)[0]
    ref = _reference(y, 0.3, w, ks).view(64, 40)
    torch.testing.assert_close(stage_sum(y, 0.3, w, ks), ref, rtol=1e-14, atol=1e-14)
    yg = y.clone().requires_grad_(True)
    kg = [k.clone().requires_grad_(True) for k in ks]
    stage_sum(yg, 0.3, w, kg).sum().backward()
    assert torch.equal(yg.grad, torch.ones_like(y))
    for k, wj in zip(kg, w):  # (a zero weight is skipped: that stage is not in the graph)
        if wj == 0.0:
            assert k.grad is None
        else:
            torch.testing.assert_close(k.grad, torch.full_like(k, 0.3 * wj), rtol=1e-15, atol=0)


def test_large_state_direct_gradient_matches_closed_form():
    """A Direct solve of y' = y A on a (64, 40) state (the chain lowering with a graph): values
    and the gradient of sum(y(1)) match y0 expm(A) and ones expm(A)^T."""
    g = torch.Generator().manual_seed(5)
    A = 0.3 * torch.randn(40, 40, generator=g, dtype=torch.float64)
    y0 = torch.randn(64, 40, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    sol = neuralode.solve(lambda t, y: y @ A, y0, t, rtol=1e-10, atol=1e-12)
    E = torch.linalg.matrix_exp(A)
    torch.testing.assert_close(sol.ys[-1].detach(), y0.detach() @ E, rtol=1e-8, atol=1e-8)
    sol.ys[-1].sum().backward()
    torch.testing.assert_close(
        y0.grad, torch.ones(64, 40, dtype=torch.float64) @ E.T, rtol=1e-8, atol=1e-8
    )
    with torch.no_grad():
        ref = neuralode.solve(lambda t, y: y @ A, y0, t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sol.ys.detach(), ref.ys, rtol=1e-11, atol=1e-11)
