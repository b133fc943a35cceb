"""Reversible: the backward pass's reconstruction stays accurate at any coupling (anchor pairs
every anchor_interval(coupling) steps) and says so when it is not."""

import math
import warnings

import pytest
import torch
from torch import nn

import neuralode as no
from neuralode.gradients import _reversible_loop
from neuralode.gradients._reversible_loop import anchor_interval

DT = torch.float64


def _rk4_increment(f, t, x, h):
    k1 = f(t, x)
    k2 = f(t + h / 2, x + h / 2 * k1)
    k3 = f(t + h / 2, x + h / 2 * k2)
    k4 = f(t + h, x + h * k3)
    return h * (k1 + 2 * k2 + 2 * k3 + k4) / 6


def _scheme_by_hand(f, y0, h, n, lam):
    """The reversible rk4 scheme written out, without restarts: autograd through it is the
    reference gradient."""
    y = z = y0
    for i in range(n):
        t = i * h
        y_new = lam * y + (1 - lam) * z + _rk4_increment(f, t, z, h)
        z = z - _rk4_increment(f, t + h, y_new, -h)
        y = y_new
    return y


def test_anchor_interval():
    assert anchor_interval(1.0) is None
    assert anchor_interval(0.999) == 9205  # no anchors in solves under 9,205 steps
    for lam in (0.999, 0.9, 0.6065, 0.5):
        k = anchor_interval(lam)
        assert lam**-k <= 1e4 < lam ** -(k + 1)


def _slow_and_fast(lam=0.6065, n=2000):
    A = torch.tensor([-50.0, -0.5], dtype=DT, requires_grad=True)

    def f(t, y):
        return A * y

    y0 = torch.ones(2, dtype=DT)
    sol = no.solve(
        f,
        y0,
        [0.0, n * 0.005],
        solver="rk4",
        dt=0.005,
        gradient=no.Reversible(lam, params=[A], restart_gap=None),
    )
    return f, A, y0, sol


def test_small_coupling_gradient_is_exact_on_a_slow_mode():
    # lam = R(h mu)**2 for the fast mode; the slow one (mu = -0.5) is reconstructed with a
    # growth of 1 / lam = 1.65 per step: without anchors the gradient was [0, nan].
    f, A, y0, sol = _slow_and_fast()
    assert sol.stats["reversible_anchors"] == 2000 // anchor_interval(0.6065)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = torch.autograd.grad(sol.ys[-1, 1], A)[0]
    ref = torch.autograd.grad(_scheme_by_hand(f, y0, 0.005, 2000, 0.6065)[1], A)[0]
    torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-12)
    assert float(g[1]) == pytest.approx(10 * math.exp(-5.0), rel=1e-6)  # d exp(10 a)/da
    assert sol.stats["reversible_reconstruction_error"] < 1e-10


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).to(DT)

    def forward(self, t, y):
        return self.net(y)


@pytest.mark.parametrize("lam, n", [(0.9, 500), (0.5, 100)])
def test_small_coupling_gradient_is_exact_for_an_mlp(lam, n):
    func = _MLP()
    P = list(func.parameters())
    y0 = torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    sol = no.solve(
        func,
        y0,
        [0.0, 1.0],
        solver="rk4",
        dt=1.0 / n,
        gradient=no.Reversible(lam, restart_gap=None),
    )
    assert sol.stats["n_steps"] == n
    g = torch.autograd.grad(sol.ys[-1].pow(2).sum(), P)
    ref = torch.autograd.grad(_scheme_by_hand(func, y0, 1.0 / n, n, lam).pow(2).sum(), P)
    for a, b in zip(g, ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_inaccurate_reconstruction_warns(monkeypatch):
    # Without anchors the slow mode's reconstruction is lost: the backward
    # pass measures it at y0 and warns instead of returning a wrong gradient silently.
    monkeypatch.setattr(_reversible_loop, "anchor_interval", lambda lam: None)
    f, A, y0, sol = _slow_and_fast()
    assert sol.stats["reversible_anchors"] == 0
    with pytest.warns(RuntimeWarning, match="reconstructed the states with a relative error"):
        torch.autograd.grad(sol.ys[-1, 1], A)
    assert not sol.stats["reversible_reconstruction_error"] < 1e-3
