"""The same problem through every driver: the same values, step counts and failures.

Drivers: the host-float driver (``batch_control="shared"``), the masked per-row driver
(``batch_control="per_sample"``) and compiled stepping (``compile=True``). Where the arithmetic
is the same the step counts agree; values agree to the tolerance; a failing solve raises the
same exception type naming the same cause.
"""

from __future__ import annotations

import pytest
import torch

import neuralode
from neuralode import NonFiniteError, PIController, StepSizeUnderflowError

F64 = torch.float64


def _decay(t, y):
    return -y


# --------------------------------------------------------------------------- regressions
@pytest.mark.parametrize("batch_control", ["shared", "per_sample"])
def test_pure_relative_tolerance_with_a_component_that_stays_zero(batch_control):
    """rtol only (atol=0) and a component that stays 0: the error scale is floored in every
    driver (the per-sample driver used to divide 0 by 0 and raise NonFiniteError at t=0)."""
    y0 = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    sol = neuralode.solve(_decay, y0, t, rtol=1e-8, atol=0.0, batch_control=batch_control)
    torch.testing.assert_close(sol.ys[-1], y0 * torch.exp(torch.tensor(-1.0, dtype=F64)),
                               rtol=1e-7, atol=0)  # fmt: skip


@pytest.mark.parametrize("batch_control", ["shared", "per_sample"])
def test_a_step_of_exactly_dt_min_is_allowed(batch_control):
    """dt0 = dt_min = dt_max = 0.125: eight steps of exactly dt_min (the per-sample driver used to
    refuse h == dt_min and name the resolution of t as the cause)."""
    y0 = torch.ones(2, 1, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ctrl = PIController(dt0=0.125, dt_min=0.125, dt_max=0.125, rtol=1e-3, atol=1e-6)
    sol = neuralode.solve(_decay, y0, t, controller=ctrl, batch_control=batch_control)
    n = sol.stats["n_accepted"]
    assert (n.tolist() if isinstance(n, torch.Tensor) else [n]) == [8] * (
        2 if batch_control == "per_sample" else 1
    )
    torch.testing.assert_close(sol.ys[-1], torch.full((2, 1), 0.36787944117, dtype=F64),
                               rtol=1e-5, atol=0)  # fmt: skip


@pytest.mark.parametrize("batch_control", ["shared", "per_sample"])
def test_below_dt_min_names_dt_min_in_every_driver(batch_control):
    y0 = torch.ones(2, 1, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ctrl = PIController(dt0=0.1, dt_min=0.1, rtol=1e-12, atol=1e-14)
    with pytest.raises(StepSizeUnderflowError, match=r"is below dt_min=0\.1; the solution"):
        neuralode.solve(_decay, y0, t, controller=ctrl, batch_control=batch_control)


@pytest.mark.parametrize("batch_control", ["shared", "per_sample"])
def test_non_finite_func_at_the_start_names_the_cause_in_every_driver(batch_control):
    y0 = torch.ones(2, 1, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(NonFiniteError, match=r"func returned non-finite values \(NaN/inf\)"):
        neuralode.solve(lambda t, y: y / 0.0 - y / 0.0, y0, t, batch_control=batch_control)
