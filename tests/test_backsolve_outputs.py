"""Backsolve(outputs=...): how outputs inside forward steps enter the adjoint."""

import pytest
import torch

import neuralode


class Field(torch.nn.Module):
    def __init__(self, d=2, hidden=16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(hidden, d, generator=g, dtype=torch.float64))
        self.b1 = torch.nn.Parameter(0.5 * torch.randn(hidden, generator=g, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(
            torch.randn(d, hidden, generator=g, dtype=torch.float64) / hidden**0.5
        )

    def forward(self, t, y):
        return torch.tanh(y @ self.w1.T + self.b1) @ self.w2.T


def _grads(gradient, t, tol, y0=None, seed=0):
    f = Field(seed=seed)
    g = torch.Generator().manual_seed(1)
    y0 = torch.randn(8, 2, generator=g, dtype=torch.float64) if y0 is None else y0
    y0 = y0.clone().requires_grad_()
    w = torch.randn(*t.shape, 8, 2, generator=g, dtype=torch.float64)
    if t.dim() == 2:
        w = torch.randn(t.shape[1], 8, 2, generator=g, dtype=torch.float64)
    sol = neuralode.solve(f, y0, t, rtol=tol, atol=tol, gradient=gradient)
    (sol.ys * w).sum().backward()
    flat = torch.cat([p.grad.reshape(-1) for p in f.parameters()] + [y0.grad.reshape(-1)])
    return flat, sol.stats


def _rel(a, b):
    return float((a - b).norm() / b.norm())


T = torch.linspace(0.0, 2.0, 6, dtype=torch.float64)


@pytest.mark.parametrize("outputs", ["replay", "stop", "auto"])
def test_every_mode_converges_to_the_exact_gradient(outputs):
    ref, _ = _grads(neuralode.Direct(), T, 1e-12)
    got, stats = _grads(neuralode.Backsolve(outputs=outputs), T, 1e-10)
    assert _rel(got, ref) < 1e-7
    assert stats["backsolve_outputs"] in ("replay", "stop")
    if outputs != "auto":
        assert stats["backsolve_outputs"] == outputs


def test_stopping_at_outputs_follows_the_continuous_gradient_more_closely():
    ref, _ = _grads(neuralode.Direct(), T, 1e-12)
    errs = {}
    for outputs in ("replay", "stop"):
        got, stats = _grads(neuralode.Backsolve(outputs=outputs), T, 1e-6)
        errs[outputs] = _rel(got, ref)
    assert errs["stop"] < errs["replay"], errs


def test_auto_replays_when_outputs_outnumber_steps():
    many = torch.linspace(0.0, 2.0, 200, dtype=torch.float64)
    _, stats = _grads(neuralode.Backsolve(), many, 1e-4)
    assert stats["backsolve_outputs"] == "replay"
    _, stats = _grads(neuralode.Backsolve(), T, 1e-8)
    assert stats["backsolve_outputs"] == "stop"


def test_stop_with_per_sample_grids():
    g = torch.Generator().manual_seed(3)
    t = torch.sort(2.0 * torch.rand(8, 5, generator=g, dtype=torch.float64), dim=1).values
    t[:, 0] = 0.0
    ref, _ = _grads(neuralode.Direct(), t, 1e-12)
    got, stats = _grads(neuralode.Backsolve(outputs="stop"), t, 1e-10)
    assert stats["backsolve_outputs"] == "stop"
    assert _rel(got, ref) < 1e-7


def test_invalid_outputs_mode():
    with pytest.raises(ValueError, match="Backsolve\\(outputs=...\\)"):
        neuralode.Backsolve(outputs="restart")


def test_stops_a_few_ulps_apart():
    # Per-sample rows whose output times differ by rounding (0.1 * 3 vs 0.3): a backward
    # segment of 5.6e-17 between two stops must not underflow.
    t = torch.tensor([[0.0, 0.1 * 3, 1.0], [0.0, 0.3, 1.0]] * 4, dtype=torch.float64)
    ref, _ = _grads(neuralode.Direct(), t, 1e-12)
    got, stats = _grads(neuralode.Backsolve(outputs="stop"), t, 1e-10)
    assert _rel(got, ref) < 1e-8


def test_forward_dt_min_does_not_bind_the_backward_solve():
    ctrl = neuralode.PIController(rtol=1e-3, atol=1e-3, dt0=0.3, dt_min=0.2, dt_max=0.3)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)

    def grads(gradient, **kw):
        f = Field()
        y0 = torch.ones(8, 2, dtype=torch.float64, requires_grad=True)
        sol = neuralode.solve(f, y0, t, gradient=gradient, **kw)
        sol.ys[-1].sum().backward()  # the last forward step is 0.1 < dt_min
        return torch.cat([p.grad.reshape(-1) for p in f.parameters()] + [y0.grad.reshape(-1)])

    ref = grads(neuralode.Direct(), rtol=1e-12, atol=1e-12)  # the exact gradient, to ~1e-11
    for gradient in (neuralode.Direct(), neuralode.Backsolve(outputs="replay")):
        # Both within 1e-5 of it (1e-6 measured: steps of 0.3 at rtol 1e-3 on a smooth field).
        assert _rel(grads(gradient, controller=ctrl), ref) < 1e-5, gradient


@pytest.mark.parametrize("tols", [{}, {"rtol": 1e-10, "atol": 1e-12}])
def test_backsolve_max_steps_bounds_the_whole_backward_solve(tols):
    """Backsolve(max_steps=N) counts step attempts over the whole backward solve, also when it
    follows the forward steps segment by segment (no tolerances of its own given)."""
    w = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 5.0], dtype=torch.float64)

    def f(t, y):
        return -w * y

    def run(max_steps):
        back = neuralode.Backsolve(max_steps=max_steps, params=[w], **tols)
        sol = neuralode.solve(f, y0, t, rtol=1e-10, atol=1e-12, gradient=back)
        sol.ys[-1].sum().backward()
        return sol

    n_forward = run(None).stats["n_accepted"]  # 131 steps forward at this tolerance
    assert n_forward > 20
    with pytest.raises(neuralode.MaxStepsError, match=r"Backsolve\(max_steps=10\)"):
        run(10)
    run(20 * n_forward)  # a generous limit is not reached
