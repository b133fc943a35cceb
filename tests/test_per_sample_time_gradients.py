"""Gradients with respect to the output times ``t`` under per-sample step control.

``dy(t_j)/dt_j = f(t_j, y(t_j))`` and ``dy(t_j)/dt_0 = -(dy(t_j)/dy0) f(t_0, y0)``; checked
against closed forms (decay), the shared driver (1-D t) and float64 finite differences (2-D t,
a time-dependent field), for every per-sample gradient method.
"""

from __future__ import annotations

import math

import pytest
import torch

import neuralode

F64 = torch.float64
PS = dict(batch_control="per_sample")
TIGHT = dict(rtol=1e-10, atol=1e-12)
GRADIENTS = ["direct", "checkpoint", "backsolve"]


def tensor(x, requires_grad=False):
    return torch.tensor(x, dtype=F64).requires_grad_(requires_grad)


def decay_with_rate(t, y):
    """y: (B, 2) = (value, rate k); y' = -k y, k' = 0."""
    return torch.stack([-y[:, 1] * y[:, 0], torch.zeros_like(y[:, 0])], -1)


def forced(t, y):
    """A time-dependent field; t is (A,) under per-sample control."""
    return -y * (1.0 + 0.5 * torch.sin(2.0 * t)).unsqueeze(1) + torch.cos(t).unsqueeze(1)


def forced_shared(t, y):  # the same field for a 0-d t (shared driver)
    return -y * (1.0 + 0.5 * torch.sin(2.0 * t)) + torch.cos(t)


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_two_d_t_closed_form_with_padding(gradient):
    """L = sum_j w_j y_b(t_bj), y_b(t) = y0_b exp(-k_b (t - t_b0)): dL/dt_bj = -w_j k y(t_bj)
    (j >= 1) and dL/dt_b0 = sum_j>=1 w_j k y(t_bj). Repeated (padding) times each get their own
    gradient; a row may run backward in time."""
    y0 = tensor([[1.0, 0.7], [2.0, 1.5], [0.5, 0.3]])
    t = tensor([[0.0, 0.5, 1.0, 1.0], [1.0, 1.2, 2.0, 3.0], [0.0, -0.5, -1.0, -2.0]], True)
    w = tensor([0.0, 1.0, -2.0, 3.0])
    sol = neuralode.solve(decay_with_rate, y0, t, gradient=gradient, **PS, **TIGHT)
    loss = (w.unsqueeze(1) * sol.ys[:, :, 0]).sum()
    (g,) = torch.autograd.grad(loss, t)
    want = torch.zeros(3, 4, dtype=F64)
    for b in range(3):
        y00, k, t0 = y0[b, 0].item(), y0[b, 1].item(), t[b, 0].item()
        for j in range(1, 4):
            yj = y00 * math.exp(-k * (t[b, j].item() - t0))
            want[b, j] = -w[j] * k * yj
            want[b, 0] += w[j] * k * yj
    torch.testing.assert_close(g, want, atol=1e-8, rtol=1e-7)
    assert sol.stats["nfe_t_gradient"] == 2


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_one_d_t_matches_the_shared_path(gradient):
    """A 1-D t shared by every sample, a time-dependent field: dL/dt equals the shared
    driver's (which has its own t-gradient code), and so do the gradients w.r.t. y0."""
    y0 = tensor([[1.0], [2.0], [-0.5]])
    grads = []
    for field, kw in ((forced, PS), (forced_shared, {})):
        t = tensor([0.1, 0.5, 1.2, 2.0], True)
        y = y0.clone().requires_grad_()
        ys = neuralode.solve(field, y, t, gradient=gradient, **kw, **TIGHT).ys
        loss = (ys.square() * tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1)).sum()
        grads.append(torch.autograd.grad(loss, [t, y]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-7)


def test_two_d_t_time_dependent_field_matches_finite_differences():
    y0 = tensor([[1.0], [-0.5]])
    t = tensor([[0.0, 0.4, 1.5], [0.3, 1.0, 2.5]], True)
    w = tensor([[1.0, -1.0], [2.0, 0.5], [-3.0, 1.5]]).unsqueeze(2)

    def loss(tt):
        return (w * neuralode.solve(forced, y0, tt, **PS, **TIGHT).ys).sum()

    (g,) = torch.autograd.grad(loss(t), t)
    eps = 1e-6
    fd = torch.zeros_like(t)
    with torch.no_grad():
        for b in range(2):
            for j in range(3):
                hi, lo = t.detach().clone(), t.detach().clone()
                hi[b, j] += eps
                lo[b, j] -= eps
                fd[b, j] = (loss(hi) - loss(lo)) / (2 * eps)
    torch.testing.assert_close(g, fd, atol=1e-6, rtol=1e-6)


def test_gradients_of_other_samples_survive_a_failed_sample():
    """throw=False: a sample that fails has NaN outputs; the t-gradient of the others is
    finite and correct (closed form), and the failed sample's is not NaN-poisoned into them."""

    def blowup(t, y):  # sample 1 (y0 = 2) reaches infinity at t = 0.5: y' = y^2
        return torch.where(y > 1.5, y * y, -y)

    y0 = tensor([[1.0], [2.0]])
    t = tensor([0.0, 0.2, 1.0], True)
    sol = neuralode.solve(blowup, y0, t, throw=False, **PS, **TIGHT)
    assert sol.status != "success"
    assert bool(torch.isnan(sol.ys[-1, 1]).all())
    (g,) = torch.autograd.grad(sol.ys[:, 0].sum(), t)
    want = tensor([math.exp(-0.2) + math.exp(-1.0), -math.exp(-0.2), -math.exp(-1.0)])
    torch.testing.assert_close(g, want, atol=1e-8, rtol=1e-7)


def test_shared_driver_refusal_of_a_2d_t_gradient_points_to_per_sample_control():
    y0 = tensor([[1.0, 0.7], [2.0, 1.5]])
    t = tensor([[0.0, 0.5], [0.0, 1.0]], True)
    with pytest.raises(ValueError, match=r"2-D \(per-sample\) t .* use batch_control='per_sample'"):
        neuralode.solve(decay_with_rate, y0, t)
    (g,) = torch.autograd.grad(neuralode.solve(decay_with_rate, y0, t, **PS).ys[-1, :, 0].sum(), t)
    want = [0.7 * math.exp(-0.35), 1.5 * 2.0 * math.exp(-1.5)]
    torch.testing.assert_close(g, tensor([[want[0], -want[0]], [want[1], -want[1]]]), atol=1e-6,
                               rtol=1e-6)  # fmt: skip
