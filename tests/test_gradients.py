"""Gradient methods (issue #3): gradcheck, agreement between methods, t-gradients, the discrete
versus continuous gradient, and the memory bound of checkpointing.

Direct and Checkpointed differentiate the *discrete* solve; Backsolve approximates the gradient
of the *continuous* problem to its tolerances. ``gradcheck`` compares against finite differences
of the discrete forward, so every solve here is either fixed-step or run at tolerances tight
enough that the two gradients (and the dependence of adaptive step sizes on the inputs, which
Direct treats as constant) agree far below gradcheck's thresholds.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck
from torch.autograd.gradcheck import GradcheckError

import neuralode as no

DT = torch.float64

# Per solver: the step control used by the gradcheck tests. bosh3 is third order, so 1e-10 would
# take thousands of steps; 1e-7 keeps the continuous/discrete gap far below gradcheck's atol.
SOLVER_KW = {
    "dopri5": dict(rtol=1e-10, atol=1e-10),
    "tsit5": dict(rtol=1e-10, atol=1e-10),
    "bosh3": dict(rtol=1e-7, atol=1e-7),
    "rk4": dict(dt=0.05),
    "dopri8": dict(rtol=1e-10, atol=1e-10),
}


def _gradient(name: str, params):
    if name == "direct":
        return no.Direct()
    if name == "backsolve":
        return no.Backsolve(params=params)
    if name == "checkpoint":
        return no.Checkpointed(params=params)
    if name == "checkpoint3":
        return no.Checkpointed(max_checkpoints=3, params=params)
    raise AssertionError(name)


METHODS = ["direct", "backsolve", "checkpoint", "checkpoint3"]


def _field(W, b):
    """A nonlinear, non-autonomous vector field with parameters W (2, 2), b (2,)."""

    def f(t, y):
        return torch.tanh(y @ W.T + b) * torch.cos(t) - 0.3 * y

    return f


class MLPField(nn.Module):
    """``f(t, y) = cos(t) * MLP(y)``: the parameters are found from the module."""

    def __init__(self, d: int = 2, hidden: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d)).to(DT)
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.7)

    def forward(self, t, y):
        return self.net(y) * torch.cos(t)


def _grads(L, inputs):
    out = torch.autograd.grad(L, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(out, inputs)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# --------------------------------------------------------------------------- 1. gradcheck
@pytest.mark.parametrize("solver", list(SOLVER_KW))
@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_y0_params_and_t(method, solver):
    """gradcheck in float64 w.r.t. y0, the parameters (passed explicitly) and a 1-D t."""
    g = torch.Generator().manual_seed(1)
    W = (0.8 * torch.randn(2, 2, generator=g, dtype=DT)).requires_grad_()
    b = (0.5 * torch.randn(2, generator=g, dtype=DT)).requires_grad_()
    y0 = torch.tensor([0.6, -0.4], dtype=DT, requires_grad=True)
    t = torch.tensor([0.1, 0.65, 1.3], dtype=DT, requires_grad=True)

    def fn(y0, W, b, t):
        grad = _gradient(method, [W, b])
        return no.solve(_field(W, b), y0, t, solver=solver, gradient=grad, **SOLVER_KW[solver]).ys

    assert gradcheck(fn, (y0, W, b, t), atol=1e-6, rtol=1e-5)


def test_gradcheck_detects_a_wrong_gradient():
    """The gradcheck setup above is able to fail: a backsolve at loose adjoint tolerances gives a
    gradient too far from the discrete forward's finite differences."""
    W = torch.tensor([[0.9, -0.5], [0.4, 0.7]], dtype=DT, requires_grad=True)
    y0 = torch.tensor([0.6, -0.4], dtype=DT, requires_grad=True)

    def fn(y0, W):
        b = torch.zeros(2, dtype=DT)
        grad = no.Backsolve(rtol=1e-3, atol=1e-3, params=[W])
        return no.solve(_field(W, b), y0, [0.0, 2.0], rtol=1e-10, atol=1e-10, gradient=grad).ys

    with pytest.raises(GradcheckError):
        gradcheck(fn, (y0, W), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- 2. agreement
def _loss_and_grads(func, y0, t, gradient, **kw):
    y0 = y0.detach().requires_grad_()
    sol = no.solve(func, y0, t, gradient=gradient, **kw)
    w = torch.linspace(-1.0, 1.5, sol.ys.numel(), dtype=DT).reshape(sol.ys.shape)
    L = (sol.ys * w).sum() + (sol.ys**2).sum()
    return L, _grads(L, [y0, *func.parameters()]), sol


def test_all_methods_agree_with_each_other_and_finite_differences():
    func = MLPField()
    y0 = torch.tensor([[0.5, -1.0], [1.2, 0.3], [-0.7, 0.8]], dtype=DT)
    t = torch.linspace(0.0, 1.5, 5, dtype=DT)
    kw = dict(rtol=1e-10, atol=1e-10)
    ref = _loss_and_grads(func, y0, t, "direct", **kw)[1]
    for gradient in ["backsolve", "checkpoint", no.Checkpointed(max_checkpoints=3)]:
        got = _loss_and_grads(func, y0, t, gradient, **kw)[1]
        for a, b in zip(got, ref):
            assert _rel(a, b) < 1e-7, gradient

    # Directional finite differences over (y0, all parameters) at a tighter tolerance.
    params = list(func.parameters())
    saved = [p.detach().clone() for p in params]
    w = torch.linspace(-1.0, 1.5, len(t) * y0.numel(), dtype=DT).reshape(len(t), *y0.shape)

    def L_at(v, s):
        with torch.no_grad():
            for p, p0, vp in zip(params, saved, v[1:]):
                p.copy_(p0 + s * vp)
            ys = no.solve(func, y0 + s * v[0], t, rtol=1e-12, atol=1e-12).ys
            for p, p0 in zip(params, saved):
                p.copy_(p0)
        return float((ys * w).sum() + (ys**2).sum())

    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        v = [torch.randn(x.shape, generator=gen, dtype=DT) for x in [y0, *params]]
        eps = 1e-5
        fd = (L_at(v, eps) - L_at(v, -eps)) / (2 * eps)
        an = sum(float((g * vv).sum()) for g, vv in zip(ref, v))
        assert abs(fd - an) <= 1e-7 * max(1.0, abs(an)), (fd, an)


@pytest.mark.parametrize(
    "kw",
    [
        dict(solver="dopri5", rtol=1e-6, atol=1e-6),
        dict(solver="tsit5", rtol=1e-5, atol=1e-7),
        dict(solver="dopri8", rtol=1e-6, atol=1e-6),
        dict(solver="bosh3", rtol=1e-5, atol=1e-5),
        dict(solver="rk4", dt=0.03),
    ],
    ids=["dopri5", "tsit5", "dopri8", "bosh3", "rk4"],
)
@pytest.mark.parametrize("max_checkpoints", [None, 2, 3, 5])
def test_checkpointed_equals_direct(kw, max_checkpoints):
    """Checkpointed replays the recorded steps with the same arithmetic: equal to Direct to
    rounding (relative 1e-10), also when checkpoints are thinned and states are recomputed."""
    func = MLPField(seed=2)
    y0 = torch.tensor([[0.5, -1.0], [1.2, 0.3]], dtype=DT)
    t = torch.tensor([0.0, 0.13, 0.5, 0.51, 1.7, 2.0], dtype=DT)
    _, ref, sol_d = _loss_and_grads(func, y0, t, "direct", **kw)
    grad = no.Checkpointed(max_checkpoints=max_checkpoints)
    _, got, sol_c = _loss_and_grads(func, y0, t, grad, **kw)
    assert sol_d.stats["n_steps"] == sol_c.stats["n_steps"] >= 5
    for a, b in zip(got, ref):
        assert _rel(a, b) < 1e-10


def test_per_sample_grids_agree():
    """2-D t (one grid per sample): Checkpointed equals Direct, Backsolve is close."""
    func = MLPField(seed=4)
    y0 = torch.tensor([[0.5, -1.0], [1.2, 0.3], [-0.2, 0.9]], dtype=DT)
    t = torch.tensor([[0.0, 0.3, 0.9], [0.0, 0.5, 1.2], [0.0, 0.1, 0.2]], dtype=DT)
    _, ref, _ = _loss_and_grads(func, y0, t, "direct", rtol=1e-7, atol=1e-7)
    _, ck, _ = _loss_and_grads(
        func, y0, t, no.Checkpointed(max_checkpoints=2), rtol=1e-7, atol=1e-7
    )
    bs_grad = no.Backsolve(rtol=1e-11, atol=1e-11)
    _, bs, _ = _loss_and_grads(func, y0, t, bs_grad, rtol=1e-7, atol=1e-7)
    for a, b, c in zip(ck, bs, ref):
        assert _rel(a, c) < 1e-10
        assert _rel(b, c) < 1e-5


def test_backsolve_gap_to_direct_shrinks_with_tolerance():
    """Backsolve approximates the continuous gradient, Direct gives the discrete one: their gap
    is of the order of the tolerances and decreases as they tighten."""
    func = MLPField(seed=5)
    y0 = torch.tensor([[0.5, -1.0], [1.2, 0.3]], dtype=DT)
    t = torch.linspace(0.0, 2.0, 4, dtype=DT)
    gaps = []
    for tol in (1e-4, 1e-7, 1e-10):
        _, d, _ = _loss_and_grads(func, y0, t, "direct", rtol=tol, atol=tol)
        _, b, _ = _loss_and_grads(func, y0, t, "backsolve", rtol=tol, atol=tol)
        gaps.append(max(_rel(x, y) for x, y in zip(b, d)))
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[0] > 1e-6  # the loose solve really differs
    assert gaps[2] < 1e-7


# --------------------------------------------------------------------------- 3. t-gradients
def _y_exact(t, t0=0.2, y0=1.0):
    """y' = -y + sin t, y(t0) = y0."""
    p = lambda s: (math.sin(s) - math.cos(s)) / 2  # noqa: E731 - particular solution
    return (y0 - p(t0)) * math.exp(-(t - t0)) + p(t)


@pytest.mark.parametrize("method", METHODS)
def test_time_gradients_first_intermediate_last(method):
    """dL/dt_j for L = sum of outputs of y' = -y + sin t, y(0.2) = 1, t = (0.2, 0.7, 1.5):
    against finite differences of the closed form and of the solver."""

    def f(t, y):
        return -y + torch.sin(t)

    y0 = torch.tensor([1.0], dtype=DT)
    tv = [0.2, 0.7, 1.5]
    t = torch.tensor(tv, dtype=DT, requires_grad=True)
    grad = _gradient(method, [])
    sol = no.solve(f, y0, t, rtol=1e-11, atol=1e-11, gradient=grad)
    (gt,) = torch.autograd.grad(sol.ys.sum(), t)

    def L_exact(ts):
        return sum(_y_exact(s, t0=ts[0]) for s in ts)

    def L_solver(ts):
        ys = no.solve(f, y0, torch.tensor(ts, dtype=DT), rtol=1e-12, atol=1e-12).ys
        return float(ys.sum())

    eps = 1e-6
    for j in range(3):
        up, dn = list(tv), list(tv)
        up[j] += eps
        dn[j] -= eps
        fd_exact = (L_exact(up) - L_exact(dn)) / (2 * eps)
        fd_solver = (L_solver(up) - L_solver(dn)) / (2 * eps)
        assert abs(fd_exact - fd_solver) < 1e-7
        assert abs(float(gt[j]) - fd_exact) < 1e-8, (j, float(gt[j]), fd_exact)
    # The first time moves y0 along the flow: dL/dt0 = -(dy(0.7)/dy0 + dy(1.5)/dy0) f(t0, y0).
    f0 = -1.0 + math.sin(0.2)
    assert float(gt[0]) == pytest.approx(-(math.exp(-0.5) + math.exp(-1.3)) * f0, rel=1e-8)


def test_time_gradient_of_a_2d_t_raises():
    t = torch.tensor([[0.0, 1.0], [0.0, 0.5]], dtype=DT, requires_grad=True)
    y0 = torch.ones(2, 1, dtype=DT)
    with pytest.raises(ValueError, match="2-D .*per-sample.* t are not supported"):
        no.solve(lambda t, y: -y, y0, t)


# --------------------------------------------------------------------------- 4. discrete vs continuous
def _euler_da(gradient, **kw):
    a = torch.tensor(-0.8, dtype=DT, requires_grad=True)
    sol = no.solve(
        lambda t, y: a * y, torch.tensor([1.0], dtype=DT), [0.0, 1.0], **kw, gradient=gradient(a)
    )
    (g,) = torch.autograd.grad(sol.ys[-1].sum(), a)
    return float(g)


def test_euler_one_step_discrete_gradient_is_exact():
    """y' = a y, one Euler step h = 1: y(1) = (1 + a) y0, so dy(1)/da = 1 exactly."""
    kw = dict(solver="euler", dt=1.0)
    assert _euler_da(lambda a: no.Direct(), **kw) == 1.0
    assert _euler_da(lambda a: no.Checkpointed(params=[a]), **kw) == 1.0
    assert _euler_da(lambda a: no.Checkpointed(max_checkpoints=2, params=[a]), **kw) == 1.0


def test_euler_backsolve_gives_backward_euler_adjoint_and_converges():
    """Backsolve with the same single Euler step backward: g = a(1) y(1) h = 1 * 0.2 * 1 = 0.2.
    With fine steps it converges to the continuous sensitivity exp(-0.8) = 0.449."""
    bs = lambda a: no.Backsolve(params=[a])  # noqa: E731
    assert _euler_da(bs, solver="euler", dt=1.0) == pytest.approx(0.2, abs=1e-15)
    exact = math.exp(-0.8)
    coarse = abs(_euler_da(bs, solver="euler", dt=1e-2) - exact)
    fine = abs(_euler_da(bs, solver="euler", dt=1e-3) - exact)
    assert fine < 1e-3
    assert 8 < coarse / fine < 12  # first order
    assert _euler_da(bs, rtol=1e-10, atol=1e-10) == pytest.approx(exact, abs=1e-8)


# --------------------------------------------------------------------------- 11. checkpoint memory
def _checkpoint_stats(n_steps: int, max_checkpoints):
    w = torch.tensor(0.7, dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    sol = no.solve(
        lambda t, y: -w * y + torch.sin(t),
        y0,
        [0.0, 1.0],
        solver="rk4",
        dt=1.0 / n_steps,
        gradient=no.Checkpointed(max_checkpoints=max_checkpoints, params=[w]),
    )
    sol.ys.sum().backward()
    return sol.stats


@pytest.mark.parametrize("k", [2, 3, 5, 8, 16, 50])
def test_max_checkpoints_bounds_the_stored_states(k):
    """The number of stored states is read off the backward cost: with ``m`` states kept over
    ``N`` steps of a 4-stage method, each gap of ``L`` steps is recomputed without a graph
    (``L - 1`` steps) and then replayed with one (``L`` steps), so
    ``nfe_backward = 4 (2N - m)``. Then ``m <= k``, and thinning halves, so ``m > k / 2``."""
    N = 100
    full = _checkpoint_stats(N, None)
    assert full["nfe"] == full["nfe_backward"] == 4 * N  # one state per step, no recomputation
    st = _checkpoint_stats(N, k)
    assert st["nfe_backward"] % 4 == 0
    m = 2 * N - st["nfe_backward"] // 4
    assert k / 2 < m <= k
    # Recomputation costs at most the forward work again.
    assert full["nfe_backward"] < st["nfe_backward"] <= 2 * st["nfe"]
