"""The planned no-graph step (stage operations chosen once per buffer) against the general step.

Both make the same torch operations on the same data in one process, so their results are
compared exactly; a steps' worth of FSAL carry and a rejected attempt are included.
"""

from __future__ import annotations

import pytest
import torch

from neuralode._loop import VectorField
from neuralode._tree import flatten_state
from neuralode.solvers import get_tableau
from neuralode.solvers.explicit_rk import make_stepper

_W = torch.tensor([[-0.4, 1.0, 0.2], [-1.0, -0.3, 0.5], [0.1, -0.6, -0.2]], dtype=torch.float64)


def _field(y0, transposed):
    W = _W.to(y0.dtype)
    if transposed:  # a non-contiguous derivative (copied, not viewed, into the stage rows)
        func = lambda t, y: (W.T @ y.mT).mT * torch.cos(t)  # noqa: E731
    else:
        func = lambda t, y: torch.tanh(y @ W) * torch.cos(t)  # noqa: E731
    spec, flat = flatten_state(y0, batched=False)
    return VectorField(func, spec, y0.dtype), flat


def _run(method, y0, transposed, reuse):
    f, y = _field(y0, transposed)
    stepper = make_stepper(get_tableau(method), y.dtype, y.device)
    stepper.reuse_buffer = reuse
    t, k1, out = 0.0, f(0.0, y), []
    for h, accept in ((0.1, True), (0.3, False), (0.15, True), (0.2, True)):
        y_new, err, K = stepper.step(f, t, h, y, k1, t + h, False)
        out += [y_new.clone(), err.clone(), K.clone()]
        if accept:
            t, y = t + h, y_new
            k1 = stepper.carry_fsal(K) if stepper.fsal else f(t, y)
            k1 = k1 if k1.shape == y.shape else k1.view(*y.shape)  # (as the loop does)
            out.append(k1.clone())
    return out, f.nfe


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8", "fehlberg2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transposed", [False, True])
def test_planned_step_equals_the_general_step(method, dtype, transposed):
    y0 = torch.linspace(-1.0, 1.0, 12, dtype=dtype).reshape(2, 2, 3)
    planned, nfe_planned = _run(method, y0, transposed, reuse=True)
    general, nfe_general = _run(method, y0, transposed, reuse=False)
    assert nfe_planned == nfe_general
    for a, b in zip(planned, general, strict=True):
        assert a.shape == b.shape and torch.equal(a, b)


def test_plan_is_made_once_per_vector_field():
    y0 = torch.ones(4, 3, dtype=torch.float64)
    f, y = _field(y0, False)
    stepper = make_stepper(get_tableau("dopri5"), y.dtype, y.device)
    stepper.reuse_buffer = True
    stepper.step(f, 0.0, 0.1, y, f(0.0, y), 0.1, False)
    plan = stepper._plan
    stepper.step(f, 0.1, 0.1, y, f(0.1, y), 0.2, False)
    assert stepper._plan is plan
    g, _ = _field(y0, True)  # another vector field: a new plan
    stepper.step(g, 0.1, 0.1, y, g(0.1, y), 0.2, False)
    assert stepper._plan is not plan and stepper._plan[0] is g
