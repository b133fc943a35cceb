"""Reversible gradients on problems whose decay is too fast for the coupling (issue 16): the
restarts of the second state (``Reversible(restart_gap=...)``) keep the solution right, the
gradient exact and the reconstruction at rounding level, and cost memory only where they
happen."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import neuralode as no
from neuralode.gradients.reversible import reconstruction_error
from reversible_checks import assert_central_differences

DT = torch.float64


def _rel(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


class Damped(nn.Module):
    """A small MLP plus a decay ``-20 y``: with rk4 at dt = 0.02 the decay is |h mu| = 0.4 per
    step, 400 times the 1 - coupling that the default coupling damps."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).to(DT)

    def forward(self, t, y):
        return self.net(y) - 20.0 * y


def test_restart_gap_validation():
    for bad in (0.0, -1.0, "x", True):
        with pytest.raises(ValueError, match="restart_gap"):
            no.Reversible(restart_gap=bad)
    assert no.Reversible().restart_gap == 10.0
    assert no.Reversible(restart_gap=None).restart_gap is None
    assert no.Reversible(restart_gap=3).restart_gap == 3.0


@pytest.mark.parametrize("name", ["C1", "B1", "E2"])
def test_detest_contracting_problems_are_right_with_the_defaults(name):
    """The DETEST problems that go wrong without restarts (C1 error 3e6, B1 12, E2 step
    collapse) meet the engine suite's accuracy criterion (error <= FACTOR[class] * rtol against
    the closed form or scipy's DOP853 at 1e-13) with the default settings, silently: no
    warning, and the restarts are counted."""
    from test_engine_detest import FACTOR, PROBLEMS, T_OUT, _reference

    cls, f, y0, exact = PROBLEMS[name]
    ref = torch.as_tensor(exact(T_OUT) if exact is not None else _reference(name))
    scale = max(1.0, float(ref.abs().max()))
    t = torch.tensor(T_OUT, dtype=DT)
    for rtol in (1e-6, 1e-9):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sol = no.solve(
                lambda tt, y: f(tt, y, torch),
                torch.tensor(y0, dtype=DT),
                t,
                rtol=rtol,
                atol=rtol / 100,
                gradient="reversible",
            )
        err = float((sol.ys - ref).abs().max()) / scale
        assert err <= FACTOR[cls] * rtol, (rtol, err)
        assert 0 < sol.stats["reversible_restarts"] < sol.stats["n_steps"] / 5


def test_fast_decay_is_right_with_the_defaults():
    """y' = -50 y over [0, 10]: without restarts the default coupling makes it grow to 1e210
    (tests/test_reversible.py); with them the fixed-step solve is as accurate as plain rk4 at
    the same steps and the adaptive one meets its tolerance at every output."""
    t = torch.linspace(0.0, 10.0, 101, dtype=DT)
    exact = torch.exp(-50.0 * t)
    y0 = torch.ones(1, dtype=DT)

    def f(t, y):
        return -50.0 * y

    fixed = no.solve(f, y0, t, solver="rk4", dt=0.005, gradient="reversible").ys[:, 0]
    plain = no.solve(f, y0, t, solver="rk4", dt=0.005).ys[:, 0]
    # Pointwise, at every scale (y(10) = 7e-218): within twice the plain method's error (the
    # restart test is relative; measured 1.75x, restarts every 6 steps).
    assert bool(((fixed - exact).abs() <= 2 * (plain - exact).abs()).all())
    assert float((fixed - exact)[:2].abs().max()) < 2.5e-6  # plain rk4: 1.4e-6 at t = 0.1
    sol = no.solve(f, y0, t, gradient="reversible")  # dopri5, rtol 1e-6, atol 1e-8
    scaled = (sol.ys[:, 0] - exact).abs() / (1e-8 + 1e-6 * exact)
    assert float(scaled.max()) < 30.0
    assert sol.stats["reversible_restarts"] > 10
    assert sol.stats["reversible_gap"] < 1e-6


def _loss_grads(func, y0, t, c, gradient, create_graph=False, **kw):
    y0 = y0.detach().requires_grad_()
    sol = no.solve(func, y0, t, gradient=gradient, **kw)
    grads = torch.autograd.grad(
        (sol.ys * c).sum(), [y0, *func.parameters()], create_graph=create_graph
    )
    return grads, sol


def test_gradients_stay_exact_across_restarts():
    func = Damped()
    torch.manual_seed(1)
    y0 = torch.randn(4, 3, dtype=DT)
    t = torch.linspace(0.0, 2.0, 5, dtype=DT)
    c = torch.randn(5, 4, 3, dtype=DT)
    kw = dict(solver="rk4", dt=0.02)
    g, sol = _loss_grads(func, y0, t, c, "reversible", **kw)
    assert sol.stats["reversible_restarts"] > 5
    # Equal to autograd through the same scheme (the replay with a graph restarts at the same
    # steps; z = y there is an ordinary differentiable assignment).
    g_graph, _ = _loss_grads(func, y0, t, c, "reversible", create_graph=True, **kw)
    for a, b in zip(g, g_graph):
        assert _rel(a, b) < 1e-12
    # Central finite differences of the reversible forward with restarts.
    assert_central_differences(func, y0, t, c, g, kw)
    # Adaptive at a tight tolerance: restarts too, and the gradient agrees with Direct's.
    kw = dict(solver="dopri5", rtol=1e-10, atol=1e-12)
    g_ad, sol = _loss_grads(func, y0, t, c, "reversible", **kw)
    g_dir, _ = _loss_grads(func, y0, t, c, "direct", **kw)
    assert sol.stats["reversible_restarts"] > 0
    for a, b in zip(g_ad, g_dir):
        assert _rel(a, b) < 1e-6


def test_reconstruction_at_rounding_level_with_restarts():
    """Between restarts the backward pass inverts the steps; at a restart it takes the stored
    pair, so reconstruction errors do not carry over from one segment to the next."""
    err, sol = reconstruction_error(lambda t, y: -50.0 * y, torch.ones(1, dtype=DT), [0.0, 10.0])
    assert sol.stats["reversible_restarts"] > 10
    assert err < 1e-12
    torch.manual_seed(2)
    err, sol = reconstruction_error(
        Damped(), torch.randn(4, 3, dtype=DT), [0.0, 2.0], solver="rk4", dt=0.02
    )
    assert sol.stats["reversible_restarts"] > 5
    assert err < 1e-13


def _saved_bytes(func, y0, n, gradient="reversible"):
    seen = {}

    def pack(x):
        seen[(x.untyped_storage().data_ptr(), x.device)] = x.untyped_storage().nbytes()
        return x

    y0 = y0.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        sol = no.solve(func, y0, [0.0, 2.0], solver="rk4", dt=2.0 / n, gradient=gradient)
    sol.ys[-1].sum().backward()
    return sum(seen.values()), sol.stats


def test_memory_grows_only_with_the_restarts():
    """Autograd-saved memory is the final pair, the parameters and one pair (y, z) per
    restart: flat in the number of steps on a non-stiff field, and on the damped field the
    restarts' pairs, far fewer than the steps."""
    torch.manual_seed(3)
    y0 = torch.randn(16, 3, dtype=DT)
    state = y0.numel() * 8
    smooth = Damped(seed=4)
    smooth.forward = lambda t, y: smooth.net(y)  # no decay: non-stiff
    b40, s40 = _saved_bytes(smooth, y0, 40)
    b4000, s4000 = _saved_bytes(smooth, y0, 4000)
    assert s40["reversible_restarts"] == s4000["reversible_restarts"] == 0
    assert b40 == b4000
    stiff = Damped(seed=4)
    b_stiff, st = _saved_bytes(stiff, y0, 100)
    n_rs = st["reversible_restarts"]
    assert 0 < n_rs < 50
    # Two states per restart (one fewer if the last step restarts: then z_final is y_final).
    assert b40 + 2 * state * (n_rs - 1) <= b_stiff <= b40 + 2 * state * n_rs
    b_direct, _ = _saved_bytes(stiff, y0, 100, gradient="direct")
    assert b_stiff < b_direct / 5  # Direct keeps every step's graph


def test_rounding_alone_does_not_restart_in_float32():
    """In float32 rounding moves y and z apart by a few hundred ulps over 1,000 steps (3e-4
    relative on this field): the adaptive gap tolerances are floored at 1000 ulps and the
    fixed-step growth test's baseline at 10 ulps, so a non-stiff float32 solve does not
    restart, fixed or adaptive at the default rtol 1e-6."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 16))

    def f(t, y):
        return net(y)

    y0 = torch.randn(64, 16)
    with torch.no_grad():
        fixed = no.solve(f, y0, [0.0, 1.0], solver="rk38", dt=1e-3, gradient="reversible")
        adaptive = no.solve(f, y0, torch.linspace(0, 1, 11), gradient="reversible")
    assert fixed.stats["n_steps"] == 1000
    assert fixed.stats["reversible_restarts"] == 0
    assert adaptive.stats["reversible_restarts"] == 0
    # The gap tolerance floor: 1000 ulps relative, 10 ulps absolute.
    from neuralode.gradients._reversible_loop import gap_tolerances

    prob = type("P", (), {"rtol": 1e-9, "atol": 0.0})()
    rtol, atol = gap_tolerances(prob, torch.float32)
    assert rtol == pytest.approx(1000 * 2.0**-23) and atol == pytest.approx(10 * 2.0**-23)
    assert gap_tolerances(prob, torch.float64) == (1e-9, 10 * 2.0**-52)
