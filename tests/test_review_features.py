"""A user's review of the new features in combination: integral=, regularisers, Reversible,
PIController(force_dt_min=True), compile=True. Each test is a defect that was found (values or
gradients against closed forms or the Direct float64 reference)."""

from __future__ import annotations

import math

import pytest
import torch

import neuralode
from neuralode.regularizers import JacobianFrobenius, sample_noise

D = torch.float64


def _relax(t, y):
    # y' = -5 (y - cos t), y(0) = 1: y = e^{-5t} / 26 + (25 cos t + 5 sin t) / 26.
    return -5.0 * (y - torch.cos(t))


def _relax_exact(t: float) -> float:
    return (math.exp(-5 * t) + 25 * math.cos(t) + 5 * math.sin(t)) / 26


@pytest.mark.parametrize("gradient", ["direct", "backsolve", "checkpoint", "reversible"])
def test_force_dt_min_fixed_steps_every_gradient(gradient):
    # dt0 = dt_min = dt_max = h with force_dt_min: fixed steps h with an adaptive method (the
    # documented recipe). 0.05 does not divide 0.5 in binary: ten additions end one ulp short
    # of t_end. Reversible ignored force_dt_min (underflow at t=0); Backsolve's backward solve
    # failed on the sliver step of one ulp the forward took to reach t_end.
    h = 0.05
    if gradient == "reversible":  # restarts depend on the tolerances, which differ below
        gradient = neuralode.Reversible(restart_gap=None)
    ctrl = neuralode.PIController(
        rtol=1e-12, atol=1e-12, dt0=h, dt_min=h, dt_max=h, force_dt_min=True
    )
    y0 = torch.tensor([1.0], dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.5], dtype=D)
    sol = neuralode.solve(_relax, y0, t, controller=ctrl, gradient=gradient)
    sol.ys[-1].sum().backward()
    assert sol.stats["n_accepted"] == 10
    # The same steps without force_dt_min: dopri5 with ConstantStep(h) (the reversible scheme
    # is another solve; its own fixed-step run is the reference).
    ref_grad = gradient if isinstance(gradient, neuralode.Reversible) else "direct"
    y1 = y0.detach().clone().requires_grad_()
    ref = neuralode.solve(_relax, y1, t, dt=h, gradient=ref_grad)
    ref.ys[-1].sum().backward()
    torch.testing.assert_close(sol.ys[-1], ref.ys[-1], rtol=1e-12, atol=1e-14)
    assert abs(float(sol.ys[-1].detach()) - _relax_exact(0.5)) < 1e-6
    # Backsolve approximates the continuous gradient dy(0.5)/dy0 = e^{-2.5}; the others are the
    # exact gradients of the same steps.
    if gradient != "backsolve":
        torch.testing.assert_close(y0.grad, y1.grad, rtol=1e-10, atol=1e-14)
    assert abs(float(y0.grad) / math.exp(-2.5) - 1) < 1e-4


@pytest.mark.parametrize("gradient", ["backsolve", "reversible"])
def test_force_dt_min_accepts_steps_at_dt_min(gradient):
    # Tolerances no step of dt_min can meet: force_dt_min accepts the steps of dt_min instead
    # of failing (the default driver does; Reversible raised StepSizeUnderflowError, Backsolve's
    # backward solve failed on the forward's last sliver step).
    ctrl = neuralode.PIController(rtol=1e-12, atol=1e-12, dt_min=0.05, force_dt_min=True)
    y0 = torch.tensor([1.0], dtype=D, requires_grad=True)
    sol = neuralode.solve(_relax, y0, torch.tensor([0.0, 0.5], dtype=D), controller=ctrl,
                          gradient=gradient)  # fmt: skip
    sol.ys[-1].sum().backward()
    assert sol.status == "success"
    assert sol.stats["n_accepted"] == 10
    # Steps of dt_min: the error is not controlled, but dopri5 at h = 0.05 is accurate here.
    assert abs(float(sol.ys[-1].detach()) - _relax_exact(0.5)) < 1e-6
    assert abs(float(y0.grad) / math.exp(-2.5) - 1) < 1e-4


def test_jacobian_frobenius_hutchinson_per_sample_says_why():
    # batch_control='per_sample' passes only the rows still being integrated; the fixed
    # Hutchinson noise cannot follow them. It failed mid-solve with a bare shape message.
    f = lambda t, z: -z * torch.tensor([1.0, 3.0], dtype=D)  # noqa: E731
    z0 = torch.tensor([[0.5, -1.0], [1.2, 0.3], [0.0, 0.7]], dtype=D)
    t = torch.tensor([[0.0, 1.0], [0.0, 0.5], [0.0, 2.0]], dtype=D)  # rows finish apart
    g = JacobianFrobenius(f, "hutchinson", sample_noise(z0))
    with pytest.raises(ValueError, match="per_sample.*estimator='exact'"):
        neuralode.solve(f, z0, t, integral=g, batch_control="per_sample")
    # The exact estimator works there: ||diag(-1, -3)||_F^2 = 10 per unit of time.
    sol = neuralode.solve(f, z0, t, integral=JacobianFrobenius(f), batch_control="per_sample")
    torch.testing.assert_close(sol.integral[-1], 10.0 * t[:, -1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gradient", ["direct", "backsolve", "checkpoint", "reversible"])
def test_time_gradients_tensor_state_every_gradient(gradient):
    # y' = -y: L = sum y(t_2) = sum y0 e^{-(t_2 - t_0)}; dL/dt_2 = -L, dL/dt_0 = L, dL/dt_1 = 0.
    # Backsolve returns a tensor state's outputs in y0's shape, and the t-gradient correction
    # then failed to stack them with f(t0, y0) in the flat layout (RuntimeError).
    y0 = torch.tensor([1.0, -2.0], dtype=D)
    t = torch.tensor([0.2, 0.7, 1.5], dtype=D, requires_grad=True)
    sol = neuralode.solve(lambda t, y: -y, y0, t, gradient=gradient, rtol=1e-11, atol=1e-12)
    loss = sol.ys[-1].sum()
    loss.backward()
    want = float(y0.sum()) * math.exp(-1.3)
    assert abs(float(loss.detach()) - want) < 1e-8
    torch.testing.assert_close(t.grad, torch.tensor([want, 0.0, -want], dtype=D), atol=1e-8,
                               rtol=0)  # fmt: skip


@pytest.mark.slow
def test_compile_with_integral_and_gradients():
    # compile=True supports tuple states, so integral= (one more state component) works with
    # it; it raised "compile=True supports a single-tensor state".
    class Decay(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(0.7, dtype=D))

        def forward(self, t, y):
            return -self.a * y

    t = torch.tensor([0.0, 0.5, 1.0], dtype=D)
    out = []
    for compile in (False, True):
        m = Decay()
        y0 = torch.tensor([1.0, 2.0], dtype=D, requires_grad=True)
        sol = neuralode.solve(m, y0, t, compile=compile, integral=lambda t, y: y.square().sum(),
                              rtol=1e-8, atol=1e-8)  # fmt: skip
        sol.integral[-1].backward()
        out.append((sol.integral.detach(), m.a.grad, y0.grad))
    assert sol.stats["compiled"]
    # int_0^t |y0|^2 e^{-2 a s} ds = 5 (1 - e^{-2 a t}) / (2 a)
    want = 5 * (1 - torch.exp(-1.4 * t)) / 1.4
    torch.testing.assert_close(out[1][0], want, rtol=1e-6, atol=1e-9)
    for eager, compiled in zip(out[0], out[1]):
        torch.testing.assert_close(compiled, eager, rtol=1e-9, atol=1e-12)
    # Solving again (the same field, a new lambda for g, as in a training loop) reuses the
    # compiled code: the augmented field was a new module at every solve, so every call
    # compiled again.
    from neuralode import _compiled

    entries = None
    for i in range(4):
        sol = neuralode.solve(m, y0, t, compile=True, integral=lambda t, y: y.square().sum(),
                              rtol=1e-8, atol=1e-8)  # fmt: skip
        assert sol.stats["compiled"]
        torch.testing.assert_close(sol.integral.detach(), out[1][0], rtol=1e-12, atol=0)
        if i == 1:  # the first two may compile (a lambda of new code; then the number of steps
            entries = dict(_compiled._compiled)  # per call follows the previous solve's)
    assert _compiled._compiled.keys() == entries.keys()
    assert all(_compiled._compiled[k] is v for k, v in entries.items())


@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (1.0, 0.0), (0.5, -1.5)])
def test_cnf_regularizers_positive_whichever_way_time_runs(t0, t1):
    # f = A z: ||df/dz||_F^2 = ||A||_F^2 along every trajectory, so its integral over the
    # interval is ||A||_F^2 |t1 - t0|; the kinetic energy is int ||A z(s)||^2 ds with
    # z(s) = e^{A (s - t1)} x. With t0 > t1 both came out negative (the loss then rewarded
    # large kinetic energy and Jacobians).
    from neuralode.models import CNF

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.A = torch.nn.Parameter(torch.tensor([[0.3, -0.2], [0.1, -0.5]], dtype=D))

        def forward(self, t, z):
            return z @ self.A.T

    field = Linear()
    x = torch.tensor([[0.5, -1.0], [1.2, 0.3]], dtype=D)
    flow = CNF(field, t0=t0, t1=t1, rtol=1e-10, atol=1e-10,
               regularizers={"kinetic": 1.0, "jacobian": 1.0})  # fmt: skip
    _, regs = flow.log_prob_and_regularizers(x)
    A = field.A.detach()
    span = abs(t1 - t0)
    torch.testing.assert_close(
        regs["jacobian"], A.square().sum().expand(2) * span, rtol=1e-9, atol=1e-12
    )
    s = torch.linspace(t0, t1, 2001, dtype=D)  # Simpson's rule over the interval
    vals = torch.stack([(x @ torch.linalg.matrix_exp(A * (si - t1)).T @ A.T).square().sum(1)
                        for si in s])  # fmt: skip
    w = torch.ones(2001, dtype=D)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    kinetic = (w[:, None] * vals).sum(0) * span / 2000 / 3
    torch.testing.assert_close(regs["kinetic"], kinetic, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("batch_control", ["shared", "per_sample"])
def test_backsolve_output_times_one_ulp_apart(batch_control):
    # y' = -a y with outputs at 0.5 and the next float: L = sum_j y(t_j) . w, dL/dy0 =
    # sum_j e^{-a t_j} w, dL/da = -sum_j t_j e^{-a t_j} y0 . w. The per-sample backward solve
    # raised StepSizeUnderflowError on the one-ulp segment between the two outputs.
    a = torch.tensor(0.8, dtype=D, requires_grad=True)
    y0 = torch.tensor([[1.0, 2.0], [-0.5, 0.3]], dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.5, math.nextafter(0.5, 1.0), 1.0], dtype=D)
    w = torch.tensor([1.0, -3.0], dtype=D)

    class Decay(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(a.detach().clone())

        def forward(self, t, y):
            return -self.a * y

    field = Decay()
    sol = neuralode.solve(field, y0, t, gradient="backsolve", batch_control=batch_control,
                          rtol=1e-11, atol=1e-12)  # fmt: skip
    (sol.ys * w).sum().backward()
    e = torch.exp(-0.8 * t)
    torch.testing.assert_close(y0.grad, e.sum() * w.expand(2, 2), rtol=1e-8, atol=1e-10)
    want_a = -(t * e).sum() * (y0.detach() * w).sum()
    torch.testing.assert_close(field.a.grad, want_a, rtol=1e-8, atol=1e-10)
