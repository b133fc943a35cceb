"""Gradient methods meeting autograd (issue #3): vector fields that call autograd themselves
(a Hamiltonian network), outputs modified in place before backward(), and gradients of
gradients (create_graph=True)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import neuralode as no

DT = torch.float64
METHODS = ["direct", "backsolve", "checkpoint", "checkpoint3"]


def _gradient(name: str, params=None):
    return {
        "direct": lambda: no.Direct(),
        "backsolve": lambda: no.Backsolve(rtol=1e-11, atol=1e-11, params=params),
        "checkpoint": lambda: no.Checkpointed(params=params),
        "checkpoint3": lambda: no.Checkpointed(max_checkpoints=3, params=params),
    }[name]()


def _rel(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# --------------------------------------------------------------------------- 7. Hamiltonian network
class HNN(nn.Module):
    """``H(q, p)`` an MLP; ``f = (dH/dp, -dH/dq)`` by autograd with ``create_graph=True``.

    ``pattern`` is how the state is made differentiable inside func:
    ``"always"`` calls ``y.requires_grad_(True)`` (FFJORD's pattern); ``"if_needed"`` only when
    ``not y.requires_grad`` (a common pattern that keeps the caller's graph intact).
    """

    def __init__(self, pattern: str, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.H = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).to(DT)
        self.pattern = pattern

    def forward(self, t, y):
        with torch.enable_grad():
            if self.pattern == "always":
                y.requires_grad_(True)
            elif not y.requires_grad:
                y = y.requires_grad_()
            H = self.H(y).sum()
            (dH,) = torch.autograd.grad(H, y, create_graph=True)
        return torch.stack([dH[..., 1], -dH[..., 0]], -1)


def _hnn_grads(func, method):
    y0 = torch.tensor([[0.4, -0.3], [1.0, 0.5], [-0.8, 0.2]], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.6, 1.5], dtype=DT)
    sol = no.solve(func, y0, t, gradient=_gradient(method), rtol=1e-10, atol=1e-10)
    L = sol.ys.square().sum() + sol.ys[..., 0].sum()
    # The last bias does not enter dH: Direct reports None there, the others zeros.
    inputs = [y0, *func.parameters()]
    out = torch.autograd.grad(L, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(out, inputs)]


@pytest.mark.parametrize("pattern", ["always", "if_needed"])
@pytest.mark.parametrize("method", METHODS[1:])
def test_hamiltonian_network_gradients_match_direct(method, pattern):
    func = HNN(pattern)
    ref = _hnn_grads(func, "direct")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # see the next test
        got = _hnn_grads(func, method)
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        assert _rel(a, b) < 1e-7
    assert float(ref[0].abs().max()) > 0.1 and float(ref[1].abs().max()) > 1e-3


@pytest.mark.parametrize("method", ["backsolve", "checkpoint"])
def test_hamiltonian_network_gives_no_missing_parameter_warning(method):
    """The state made differentiable inside func is not a missing parameter."""
    func = HNN("always")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _hnn_grads(func, method)


# --------------------------------------------------------------------------- 8. in-place on outputs
def _decay_problem():
    w = torch.tensor([0.7, -0.4], dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    return (lambda t, y: -w * y + torch.sin(t) * y.square() * 0.1), w, y0


@pytest.mark.parametrize("method", METHODS)
def test_outputs_modified_in_place_before_backward(method):
    """Each method returns outputs that may be modified in place: the gradients are those of
    the same modification done out of place (the methods keep private copies of what their
    backward pass needs)."""
    f, w, y0 = _decay_problem()
    t = torch.tensor([0.0, 0.5, 1.0, 1.5], dtype=DT)
    kw = dict(rtol=1e-9, atol=1e-9)

    def solve():
        return no.solve(f, y0, t, gradient=_gradient(method, [w]), **kw).ys

    ys = solve()
    weight = torch.tensor([3.0, 0.0, 1.0, 1.0], dtype=DT).view(4, 1)
    ref = torch.autograd.grad((ys * weight).sum(), [y0, w])

    ys = solve()
    ys.mul_(3.0)
    ys[1].zero_()
    ys[2:].div_(3.0)
    got = torch.autograd.grad(ys.sum(), [y0, w])
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-13, atol=0)

    # The final state, modified in place, does not corrupt the backward pass.
    ys = solve()
    ys[-1].add_(100.0)
    got = torch.autograd.grad((ys * weight).sum(), [y0, w])
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-13, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_tuple_outputs_modified_in_place(method):
    w = torch.tensor(0.7, dtype=DT, requires_grad=True)
    q0 = torch.tensor([1.0], dtype=DT, requires_grad=True)
    p0 = torch.tensor([0.5], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)

    def solve():
        return no.solve(
            lambda t, s: (s[1], -w * torch.sin(s[0])),
            (q0, p0),
            t,
            gradient=_gradient(method, [w]),
            rtol=1e-9,
            atol=1e-9,
        ).ys

    qs, ps = solve()
    ref = torch.autograd.grad((2 * qs).sum() + ps.sum(), [q0, p0, w])
    qs, ps = solve()
    qs.mul_(2.0)
    got = torch.autograd.grad(qs.sum() + ps.sum(), [q0, p0, w])
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-13, atol=0)


# --------------------------------------------------------------------------- 9. gradients of gradients
def _penalty(method, y0v, wv, *, create_graph=True):
    """A gradient penalty: P = |dL/dy0|^2 + |dL/dw|^2 with L = sum y(t)^2 (fixed-step rk4)."""
    w = wv if wv.requires_grad else wv.clone().requires_grad_()
    y0 = y0v if y0v.requires_grad else y0v.clone().requires_grad_()

    def f(t, y):
        return torch.tanh(w * y) + 0.1 * torch.sin(t) * y.square()

    sol = no.solve(f, y0, [0.0, 0.5, 1.0], solver="rk4", dt=0.05, gradient=_gradient(method, [w]))
    gy, gw = torch.autograd.grad(sol.ys.square().sum(), [y0, w], create_graph=create_graph)
    return gy.square().sum() + gw.square().sum(), (gy, gw), (y0, w)


Y0 = torch.tensor([1.0, 2.0], dtype=DT)
W = torch.tensor([0.7, -0.3], dtype=DT)


def _fd_penalty_grad():
    eps = 1e-6
    out = []
    for x in (Y0, W):
        g = torch.zeros_like(x)
        for i in range(x.numel()):
            e = torch.zeros_like(x)
            e[i] = eps
            args_p = (Y0 + e, W) if x is Y0 else (Y0, W + e)
            args_m = (Y0 - e, W) if x is Y0 else (Y0, W - e)
            p = _penalty("direct", *args_p, create_graph=False)[0]
            m = _penalty("direct", *args_m, create_graph=False)[0]
            g[i] = (p - m) / (2 * eps)
        out.append(g)
    return out


def test_direct_gradient_penalty_matches_finite_differences():
    P, _, inputs = _penalty("direct", Y0, W)
    got = torch.autograd.grad(P, inputs)
    for a, b in zip(got, _fd_penalty_grad()):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-7), (a, b)


@pytest.mark.parametrize("method", ["checkpoint", "checkpoint3"])
def test_checkpointed_gradient_penalty_parameters(method):
    """Second derivatives through Checkpointed with respect to the parameters equal Direct's."""
    P, (gy, gw), (y0, w) = _penalty(method, Y0, W)
    Pd, (gyd, gwd), (y0d, wd) = _penalty("direct", Y0, W)
    assert _rel(gy, gyd) < 1e-12 and _rel(gw, gwd) < 1e-12
    (hw,) = torch.autograd.grad(P, w)
    (hwd,) = torch.autograd.grad(Pd, wd)
    assert _rel(hw, hwd) < 1e-10


@pytest.mark.parametrize("method", ["checkpoint", "checkpoint3"])
def test_checkpointed_gradient_penalty_initial_state(method):
    """Second derivatives through Checkpointed with respect to y0 equal Direct's (and finite
    differences): the replay in the double-backward pass must stay connected to y0."""
    P, _, (y0, _) = _penalty(method, Y0, W)
    Pd, _, (y0d, _) = _penalty("direct", Y0, W)
    (hy,) = torch.autograd.grad(P, y0)
    (hyd,) = torch.autograd.grad(Pd, y0d)
    assert _rel(hy, hyd) < 1e-10, (hy, hyd)


@pytest.mark.parametrize("method", ["direct", "checkpoint"])
def test_hessian_vector_product(method):
    """H v for L(y0) = sum y(1)^2 by double backward, against finite differences of the
    gradient."""

    def grad_at(y0v, create_graph):
        y0 = y0v.clone().requires_grad_()
        sol = no.solve(
            lambda t, y: -y.square() + torch.sin(t),
            y0,
            [0.0, 1.0],
            solver="rk4",
            dt=0.05,
            gradient=_gradient(method),
        )
        (g,) = torch.autograd.grad(sol.ys[-1].square().sum(), y0, create_graph=create_graph)
        return g, y0

    x = torch.tensor([0.5, 1.5], dtype=DT)
    v = torch.tensor([1.0, -2.0], dtype=DT)
    g, y0 = grad_at(x, True)
    (hv,) = torch.autograd.grad(g, y0, v)
    eps = 1e-6
    fd = (grad_at(x + eps * v, False)[0] - grad_at(x - eps * v, False)[0]) / (2 * eps)
    assert torch.allclose(hv, fd, rtol=1e-7, atol=1e-9), (hv, fd)


def test_backsolve_refuses_gradients_of_gradients():
    with pytest.raises(RuntimeError, match="create_graph=True.*'checkpoint'.*'direct'"):
        _penalty("backsolve", Y0, W)
    # Without create_graph the same solve differentiates fine.
    _, (gy, gw), _ = _penalty("backsolve", Y0, W, create_graph=False)
    _, (gyd, gwd), _ = _penalty("direct", Y0, W, create_graph=False)
    assert _rel(gy, gyd) < 1e-5 and _rel(gw, gwd) < 1e-5
