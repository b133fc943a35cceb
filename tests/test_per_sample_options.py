"""Per-sample control x the gradient methods' step options and the controller's norm.

``Backsolve(dt=...)``: the backward solve takes fixed steps of ``dt`` per sample (from each
output time back to the previous one); its gradients converge to Direct's at the order of the
backward method. ``Checkpointed(max_checkpoints=...)`` and ``PIController(norm=...)`` keep a
precise ValueError (tested here and in test_per_sample_gradients.py / test_per_sample_control.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neuralode
from neuralode import Backsolve

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
