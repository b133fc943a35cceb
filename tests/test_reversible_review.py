"""Review findings on the reversible gradient: a blow-up ends the solve like every other method."""

import pytest
import torch

import neuralode

F64 = torch.float64


class Square(torch.nn.Module):
    """``y' = y**2``: from ``y(0) = 1`` the solution ``1 / (1 - t)`` blows up at ``t = 1``."""

    def forward(self, t, y):
        return y * y


def _blowup(throw: bool):
    t = torch.tensor([0.0, 0.5, 0.9, 1.5], dtype=F64)
    y0 = torch.ones(1, 1, dtype=F64, requires_grad=True)
    sol = neuralode.solve(
        Square(), y0, t, rtol=1e-10, atol=1e-12, throw=throw,
        gradient=neuralode.Reversible(), max_steps=5000,
    )  # fmt: skip
    return sol, y0


def test_blowup_underflows_instead_of_retrying():
    # The rejected-step shrink started from the step stretched by the sliver rule (a step a
    # few ulps long), which gave the same step again: 1265 accepted, 18735 rejected and
    # max_steps at max_steps=20000. Now the step size underflows within a few rejections.
    sol, y0 = _blowup(throw=False)
    assert sol.status == "dt_underflow"
    assert sol.stats["n_rejected"] < 50
    # Stops at the scheme's own blow-up: within the global error (rtol 1e-10) of t = 1.
    assert abs(sol.t_final - 1.0) < 1e-9
    ys = sol.ys.reshape(4)
    torch.testing.assert_close(
        ys[1:3].detach(), torch.tensor([2.0, 10.0], dtype=F64), rtol=1e-7, atol=0
    )
    assert torch.isnan(ys[3])  # not reached
    # d(y(0.5) + y(0.9)) / dy0 = 1 / 0.5**2 + 1 / 0.1**2 = 104, through the reached outputs.
    (ys[1] + ys[2]).backward()
    assert y0.grad.item() == pytest.approx(104.0, rel=1e-6)


def test_blowup_raises_underflow_with_throw():
    with pytest.raises(neuralode.StepSizeUnderflowError, match="step size underflow"):
        _blowup(throw=True)
