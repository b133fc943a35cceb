"""Gradient methods under per-sample control (``batch_control="per_sample"``).

Checkpointed gradients replay the per-sample driver's iterations: equal to Direct to rounding.
The backsolve adjoint integrates ``(y, a)`` backward per sample: equal to Direct within the
tolerance, with autograd-saved memory that does not grow with the number of steps.
"""

from __future__ import annotations

import pytest
import torch

import neuralode
from neuralode import Backsolve

F64 = torch.float64
PS = dict(batch_control="per_sample")


class Field(torch.nn.Module):
    """A small time-dependent MLP vector field, row-wise (t is (A,))."""

    def __init__(self, d=2, hidden=12, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(0.5 * torch.randn(d, hidden, generator=g, dtype=F64))
        self.w2 = torch.nn.Parameter(0.5 * torch.randn(hidden, d, generator=g, dtype=F64))

    def forward(self, t, y):
        return torch.tanh(y @ self.w1) @ self.w2 * (1 + 0.2 * torch.sin(t)[:, None])


Y0 = torch.tensor([[0.5, -0.3], [1.0, 0.2], [-0.4, 0.8], [0.1, 0.1]], dtype=F64)
T2 = torch.tensor([[0.0, 0.3, 1.0], [0.0, 0.5, 2.0], [0.2, 0.7, 0.9], [1.0, 0.5, 0.0]], dtype=F64)


def _grads(func, gradient, solver="dopri5", t=T2, y0=Y0, **kw):
    y0 = y0.clone().requires_grad_()
    sol = neuralode.solve(func, y0, t, solver=solver, gradient=gradient, **PS, **kw)
    loss = (sol.ys**2).sum() + sol.ys[:, :, 0].sum()
    return sol, torch.autograd.grad(loss, [y0, *func.parameters()])


@pytest.mark.parametrize("solver", ["dopri5", "tsit5", "dopri8"])
def test_checkpointed_equals_direct_to_rounding(solver):
    func = Field()
    _, want = _grads(func, "direct", solver, rtol=1e-7, atol=1e-9)
    sol, got = _grads(func, "checkpoint", solver, rtol=1e-7, atol=1e-9)
    assert sol.stats["nfe_backward"] > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", ["dopri5", "bosh3"])
def test_backsolve_matches_direct_within_the_tolerance(solver):
    func = Field()
    _, want = _grads(func, "direct", solver, rtol=1e-10, atol=1e-12)
    sol, got = _grads(func, "backsolve", solver, rtol=1e-10, atol=1e-12)
    assert sol.stats["nfe_backward"] > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-8)


def test_backsolve_of_one_sample_does_not_depend_on_the_others():
    """Per-sample control: sample 0's gradient alone equals its gradient in the batch."""
    func = Field()
    t = T2[:1]
    y0 = Y0[:1].clone().requires_grad_()
    alone = neuralode.solve(func, y0, t, gradient="backsolve", **PS).ys
    (ga,) = torch.autograd.grad(alone.sum(), [y0])
    yb = Y0.clone().requires_grad_()
    batch = neuralode.solve(func, yb, T2, gradient="backsolve", **PS).ys
    (gb,) = torch.autograd.grad(batch[:, 0].sum(), [yb])
    torch.testing.assert_close(gb[0], ga[0], rtol=1e-12, atol=1e-14)
    assert bool((gb[1:] == 0).all())


def _saved_bytes(gradient, t_end):
    """Bytes autograd saves for the backward pass of one per-sample solve."""
    func = Field()
    total = [0]

    def pack(x):
        total[0] += x.numel() * x.element_size()
        return x

    y0 = Y0.clone().requires_grad_()
    t = torch.tensor([0.0, t_end], dtype=F64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        sol = neuralode.solve(func, y0, t, gradient=gradient, rtol=1e-8, atol=1e-10, **PS)
    return total[0], int(sol.stats["n_accepted"].sum())


def test_backsolve_saves_memory_flat_in_the_number_of_steps():
    short, n_short = _saved_bytes("backsolve", 1.0)
    long, n_long = _saved_bytes("backsolve", 20.0)
    assert n_long > 4 * n_short  # the long solve takes many more steps ...
    assert long == short  # ... and autograd keeps exactly as much
    direct_short, _ = _saved_bytes("direct", 1.0)
    direct_long, _ = _saved_bytes("direct", 20.0)
    assert direct_long > 4 * direct_short  # (Direct's saved memory grows: the measure works)


@pytest.mark.parametrize("gradient", ["checkpoint", "backsolve"])
def test_tuple_and_dict_states(gradient):
    def f(t, s):
        x, v = s
        return (v, -x - 0.1 * v * (1 + 0.0 * t[:, None]))

    def fd(t, s):
        dx, dv = f(t, (s["x"], s["v"]))
        return {"x": dx, "v": dv}

    x0 = torch.tensor([[1.0], [0.5]], dtype=F64)
    v0 = torch.tensor([[0.0], [0.3]], dtype=F64)
    t = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.5, 3.0]], dtype=F64)
    kw = dict(rtol=1e-10, atol=1e-12, **PS)
    tol = dict(rtol=1e-10, atol=1e-12) if gradient == "checkpoint" else dict(rtol=1e-6, atol=1e-8)
    for fn, make in ((f, lambda x, v: (x, v)), (fd, lambda x, v: {"x": x, "v": v})):
        grads = {}
        for g in ("direct", gradient):
            x, v = x0.clone().requires_grad_(), v0.clone().requires_grad_()
            ys = neuralode.solve(fn, make(x, v), t, gradient=g, **kw).ys
            parts = ys if isinstance(ys, tuple) else (ys["x"], ys["v"])
            loss = (parts[0] ** 2).sum() + parts[1].sum()
            grads[g] = torch.autograd.grad(loss, [x, v])
        for a, b in zip(grads[gradient], grads["direct"]):
            torch.testing.assert_close(a, b, **tol)


def test_dense_output_with_checkpointed_gradients():
    func = Field()
    sol = neuralode.solve(func, Y0, T2, gradient="checkpoint", dense_output=True, **PS)
    ref = neuralode.solve(func, Y0, T2, **PS)
    with torch.no_grad():
        q = torch.tensor([[0.6], [1.5], [0.8], [0.25]], dtype=F64)
        torch.testing.assert_close(sol.evaluate(q), ref.evaluate(q), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("gradient", "match"),
    [
        (Backsolve(dt=0.1), r"Backsolve\(dt=...\) needs a fixed-step solver for the backward solve \(e.g. solver='rk4'\), got 'dopri5'"),
        (Backsolve(solver="rk4"), r"Backsolve\(solver='rk4'\) with batch_control='per_sample' and adaptive forward steps needs an adaptive"),
    ],
)  # fmt: skip
def test_what_is_still_refused_raises_naming_it(gradient, match):
    with pytest.raises(ValueError, match=match):
        neuralode.solve(Field(), Y0, T2, gradient=gradient, **PS)
