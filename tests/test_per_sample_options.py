"""Per-sample control x the gradient methods' step options and the controller's norm.

``Backsolve(dt=...)``: the backward solve takes fixed steps of ``dt`` per sample (from each
output time back to the previous one); its gradients converge to Direct's at the order of the
backward method. ``PIController(norm=...)``: each sample's scaled error is measured by the norm
as the shared driver measures that sample solved alone, so each sample takes exactly the steps
of that solve. ``Checkpointed(max_checkpoints=...)``: at most that many iterations keep their
states, the rest are recomputed; gradients stay equal to Direct's to rounding.
``Backsolve(norm=...)`` keeps a precise ValueError.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neuralode
from neuralode import Backsolve, Checkpointed, PIController

F64 = torch.float64
PS = dict(batch_control="per_sample")


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).to(F64)

    def forward(self, t, y):
        return self.net(y)


Y0 = torch.tensor([[0.5, -0.3], [1.0, 0.2], [-0.4, 0.8]], dtype=F64)
T2 = torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.7, 2.0], [0.2, 1.0, 1.5]], dtype=F64)


def grads(func, gradient, **kw):
    y = Y0.clone().requires_grad_()
    ys = neuralode.solve(func, y, T2, gradient=gradient, **PS, **kw).ys
    return torch.autograd.grad(ys.square().sum(), [y, *func.parameters()])


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_backsolve_fixed_backward_steps_converge_at_the_order_of_rk4():
    """Adaptive forward (tight), rk4 backward with dt: the error against Direct falls ~16x
    when dt halves, and is small at dt = 0.05."""
    func = Field()
    tight = dict(rtol=1e-12, atol=1e-12)
    ref = grads(func, "direct", **tight)
    errs = [max_diff(grads(func, Backsolve(dt=dt, solver="rk4"), **tight), ref)
            for dt in (0.1, 0.05)]  # fmt: skip
    assert errs[1] < 1e-7
    assert 10.0 < errs[0] / errs[1] < 25.0, errs


def test_backsolve_dt_with_a_fixed_step_forward():
    """rk4 forward with dt = 0.05 and Backsolve(dt=0.05): the continuous adjoint on the same
    kind of grid agrees with Direct (the discrete gradient) to O(dt^4)."""
    func = Field()
    a = grads(func, Backsolve(dt=0.05), solver="rk4", dt=0.05)
    b = grads(func, "direct", solver="rk4", dt=0.05)
    assert max_diff(a, b) < 1e-7


def test_backsolve_dt_needs_a_fixed_step_backward_method():
    with pytest.raises(
        ValueError, match=r"Backsolve\(dt=...\) needs a fixed-step solver .*got 'tsit5'"
    ):
        grads(Field(), Backsolve(dt=0.1, solver="tsit5"))


# --------------------------------------------------------------------------- custom norm
def vdp(t, y):
    return torch.stack([y[:, 1], 2.0 * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], -1)


def vdp_tuple(t, y):
    x, v = y
    return v, 2.0 * (1 - x**2) * v - x


def max_norm(e):
    return e.abs().max()


def weighted_norm(e):  # tuple state: position error counts 4x
    x, v = e
    return torch.maximum(4.0 * x.abs().max(), v.abs().max())


@pytest.mark.parametrize("kind", ["tensor", "tuple"])
def test_custom_norm_gives_each_sample_the_steps_it_takes_alone(kind):
    """The per-row meaning of a custom norm: each sample accepts and rejects exactly the steps
    the shared driver takes for it alone with that norm (and they differ from the RMS norm's)."""
    y0 = torch.tensor([[2.0, 0.0], [0.5, 0.3], [1.0, -1.0]], dtype=F64)
    t = torch.linspace(0.0, 5.0, 6, dtype=F64)
    if kind == "tensor":
        func, norm, state = vdp, max_norm, y0
    else:
        func, norm, state = vdp_tuple, weighted_norm, (y0[:, :1], y0[:, 1:])
    ctrl = PIController(rtol=1e-6, atol=1e-8, norm=norm)
    sol = neuralode.solve(func, state, t, controller=ctrl, **PS)
    rms = neuralode.solve(func, state, t, rtol=1e-6, atol=1e-8, **PS)
    assert sol.stats["n_accepted"].tolist() != rms.stats["n_accepted"].tolist()
    for b in range(3):
        one = state[b : b + 1] if kind == "tensor" else tuple(c[b : b + 1] for c in state)
        alone = neuralode.solve(func, one, t, controller=ctrl)
        assert int(sol.stats["n_accepted"][b]) == alone.stats["n_accepted"]
        assert int(sol.stats["n_rejected"][b]) == alone.stats["n_rejected"]
        got = sol.ys[:, b] if kind == "tensor" else torch.cat([c[:, b] for c in sol.ys], -1)
        want = alone.ys[:, 0] if kind == "tensor" else torch.cat([c[:, 0] for c in alone.ys], -1)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_custom_norm_that_vmap_cannot_run_raises_naming_the_rule():
    ctrl = PIController(norm=lambda e: torch.tensor(float(e.abs().max()), dtype=F64))
    with pytest.raises(ValueError, match=r"PIController\(norm=...\) is applied to each sample's"):
        neuralode.solve(vdp, Y0, T2, controller=ctrl, **PS)


def test_custom_norm_must_return_a_scalar():
    ctrl = PIController(norm=lambda e: e.abs().amax(0))
    with pytest.raises(ValueError, match=r"must return a 0-d tensor .*got \(2,\)"):
        neuralode.solve(vdp, Y0, T2, controller=ctrl, **PS)


def test_backsolve_norm_is_refused_under_per_sample_control():
    with pytest.raises(
        ValueError, match=r"Backsolve\(norm=...\) is not supported with batch_control='per_sample'"
    ):
        grads(Field(), Backsolve(norm=max_norm))


# --------------------------------------------------------------------------- max_checkpoints
class TimeField(Field):
    def forward(self, t, y):
        return self.net(y) * (1.0 + 0.3 * torch.sin(3.0 * t)).unsqueeze(1)


@pytest.mark.parametrize("max_checkpoints", [2, 3, 7])
def test_checkpointed_with_bounded_states_equals_direct(max_checkpoints):
    """Samples with their own grids (the working set compacts); the states kept are bounded
    and the others recomputed (more backward evaluations), the gradients equal to rounding."""
    func = TimeField()
    gen = torch.Generator().manual_seed(1)
    y0 = torch.randn(6, 2, generator=gen, dtype=F64)
    t = torch.sort(3.0 * torch.rand(6, 5, generator=gen, dtype=F64), 1).values
    tight = dict(rtol=1e-9, atol=1e-11)

    def run(gradient):
        y = y0.clone().requires_grad_()
        sol = neuralode.solve(func, y, t, gradient=gradient, **PS, **tight)
        g = torch.autograd.grad(sol.ys.square().sum(), [y, *func.parameters()])
        return g, sol.stats

    ref, _ = run("direct")
    full, st_full = run("checkpoint")
    got, st = run(Checkpointed(max_checkpoints=max_checkpoints))
    assert st_full["n_checkpoints"] > 20  # one per iteration with an accepted step
    assert st["n_checkpoints"] <= max_checkpoints
    assert st["nfe_backward"] > st_full["nfe_backward"]  # the dropped states, recomputed
    assert max_diff(got, ref) < 1e-11
    assert max_diff(got, full) < 1e-11
