"""Per-sample control with landings and fixed steps: each sample as if solved alone.

Every sample of a per-sample solve takes the steps the shared driver takes for it alone (the
same controller formulas, landings and stage arithmetic), so values agree to rounding and step
counts agree exactly.
"""

from __future__ import annotations

import pytest
import torch

import neuralode
from neuralode import ConstantStep, PIController, StepToGrid

F64 = torch.float64


def _kink(t, y):
    """A vector field with a discontinuity at t = 0.5 (t is (A,) per row, or 0-d shared)."""
    if t.dim():
        return torch.where(t[:, None] > 0.5, -2 * y, -y)
    return -2 * y if t > 0.5 else -y


Y0 = torch.tensor([[1.0], [2.0]], dtype=F64)
T = torch.tensor([0.0, 0.25, 1.0], dtype=F64)


@pytest.mark.parametrize(
    ("controller", "solver"),
    [
        (PIController(jump_t=[0.5], rtol=1e-8, atol=1e-10), "dopri5"),
        (PIController(step_t=[0.3, 0.7], rtol=1e-6, atol=1e-9), "tsit5"),
        (ConstantStep(0.1, jump_t=[0.5]), "rk4"),
        (StepToGrid([0.0, 0.3, 0.5, 0.8, 1.0]), "rk4"),
    ],
)
def test_each_sample_takes_the_steps_it_takes_alone(controller, solver):
    ps = neuralode.solve(_kink, Y0, T, controller=controller, solver=solver,
                         batch_control="per_sample")  # fmt: skip
    for b in range(Y0.shape[0]):
        alone = neuralode.solve(_kink, Y0[b : b + 1], T, controller=controller, solver=solver)
        assert int(ps.stats["n_accepted"][b]) == alone.stats["n_accepted"]
        torch.testing.assert_close(ps.ys[:, b], alone.ys[:, 0], rtol=1e-9, atol=1e-12)


def test_jump_t_is_landed_on_and_f_is_evaluated_afresh_past_it():
    """Exact solution: y0 e^-t up to 0.5, then y(0.5) e^(-2(t-0.5)); a step across the kink
    would cost accuracy, landing on it keeps the error at the tolerance."""
    t = torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.5, 2.0]], dtype=F64)
    ctrl = PIController(jump_t=[0.5], rtol=1e-10, atol=1e-12)
    sol = neuralode.solve(_kink, Y0, t, controller=ctrl, batch_control="per_sample")
    half = torch.exp(torch.tensor(-0.5, dtype=F64))
    want_end = Y0[:, 0] * half * torch.exp(-2 * (t[:, 2] - 0.5))
    torch.testing.assert_close(sol.ys[2, :, 0], want_end, rtol=1e-8, atol=0)
    assert all(0.5 in steps for steps in sol.step_times)


def test_fixed_steps_follow_each_samples_own_grid():
    """ConstantStep per sample: a sample starting at t0_b steps on t0_b + k dt."""
    t = torch.tensor([[0.0, 1.0], [0.05, 1.05]], dtype=F64)
    sol = neuralode.solve(lambda t, y: -y, Y0, t, solver="rk4", dt=0.1, batch_control="per_sample")
    assert sol.stats["n_accepted"].tolist() == [10, 10]
    assert sol.step_times[1][:3] == pytest.approx([0.05, 0.15, 0.25], abs=1e-15)
    torch.testing.assert_close(sol.ys[-1, :, 0], Y0[:, 0] * torch.exp(torch.tensor(-1.0, dtype=F64)),
                               rtol=1e-6, atol=0)  # fmt: skip


def test_checkpointed_gradients_with_jumps_equal_direct():
    w = torch.tensor(0.7, dtype=F64, requires_grad=True)

    def f(t, y):
        return torch.where(t[:, None] > 0.5, -2 * w * y, -w * y)

    ctrl = PIController(jump_t=[0.5], rtol=1e-8, atol=1e-10)
    grads = []
    for g in ("direct", neuralode.Checkpointed(params=[w])):
        y0 = Y0.clone().requires_grad_()
        ys = neuralode.solve(f, y0, T, controller=ctrl, gradient=g, batch_control="per_sample").ys
        grads.append(torch.autograd.grad(ys.square().sum(), [y0, w]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_grid_that_does_not_cover_a_sample_raises():
    t = torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=F64)
    with pytest.raises(
        ValueError,
        match=r"StepToGrid\(grid=...\) spans \[0.0, 1.0\] but the solve runs over \[0.0, 2.0\]",
    ):
        neuralode.solve(lambda t, y: -y, Y0, t, solver="rk4", controller=StepToGrid([0.0, 0.5, 1.0]),
                        batch_control="per_sample")  # fmt: skip


def test_backsolve_with_fixed_steps_approximates_direct():
    """Fixed rk4 steps per sample, backward with the same controller: the gradient of the
    continuous problem to the method's accuracy (Direct: of the discrete solve)."""
    w = torch.tensor(0.7, dtype=F64, requires_grad=True)
    t = torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=F64)
    grads = []
    for g in ("direct", neuralode.Backsolve(params=[w])):
        y0 = Y0.clone().requires_grad_()
        ys = neuralode.solve(lambda t, y: -w * y, y0, t, solver="rk4", dt=0.01, gradient=g,
                             batch_control="per_sample").ys  # fmt: skip
        grads.append(torch.autograd.grad(ys.square().sum(), [y0, w]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
