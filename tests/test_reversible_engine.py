"""The Reversible driver on the engine's shared formulas: the first stage's time at a jump_t,
float32 time beside a jump, the underflow rule, the failure messages, the NaN fill of outputs
not reached, and a stiff problem integrated backward in time (a clear error, where it starts).

Each test compares against a known value or the engine's own answer (Direct), where the
Reversible loop's earlier copies of these formulas gave a different one."""

import math

import pytest
import torch

import neuralode as no
from neuralode.controllers import ConstantStep, PIController

DT = torch.float64


def _solve(f, y0, t, gradient="reversible", **kw):
    return no.solve(f, y0, torch.tensor(t, dtype=DT), gradient=gradient, **kw)


@pytest.mark.parametrize("gradient", ["reversible", "direct"])
def test_jump_at_t0_first_stage_sees_right_limit(gradient):
    # f jumps from 0 to 1 at t = 1 = t0, so y(2) = y0 + 1 exactly for any RK method whose first
    # stage sees f's limit from inside the interval. The Reversible loop evaluated its first
    # stage at t0 itself (f = 0 there): y(2) was y0 + 1 - dt / 6 with rk4.
    y0 = torch.tensor([0.5, -1.0], dtype=DT, requires_grad=True)
    ctrl = ConstantStep(dt=0.25, jump_t=(1.0,))
    sol = _solve(lambda t, y: (t > 1).to(y.dtype) * torch.ones_like(y), y0, [1.0, 2.0],
                 gradient, solver="rk4", controller=ctrl)  # fmt: skip
    torch.testing.assert_close(sol.ys[-1], y0.detach() + 1.0, rtol=0, atol=1e-12)
    (g,) = torch.autograd.grad(sol.ys[-1].sum(), y0)
    torch.testing.assert_close(g, torch.ones(2, dtype=DT), rtol=0, atol=1e-12)


@pytest.mark.parametrize("gradient", ["reversible", "direct"])
@pytest.mark.parametrize("time_dtype", [torch.float32, torch.float64])
def test_float32_time_beside_a_jump(gradient, time_dtype):
    # f = 1 before t = 1 and 0 from there on: y(2) = y0 + 1 when the last stage of the step
    # ending on the jump sees the left limit. With float32 time the double just below 1 rounds
    # back onto 1 (f = 0 there): the Reversible loop's math.nextafter lost 0.25 / 6 with rk4.
    y0 = torch.tensor([0.5, -1.0], dtype=DT)
    ctrl = ConstantStep(dt=0.25, jump_t=(1.0,))
    sol = _solve(lambda t, y: (t < 1).to(y.dtype) * torch.ones_like(y), y0, [0.0, 2.0],
                 gradient, solver="rk4", controller=ctrl, time_dtype=time_dtype)  # fmt: skip
    torch.testing.assert_close(sol.ys[-1], y0 + 1.0, rtol=0, atol=1e-12)


def test_underflow_below_resolution_of_t_as_the_engine():
    # At t0 = 1e15 (ulp 0.125) a first step of 0.25 is 2 ulps: its stage times t0 + c h round to
    # a handful of values. The engine's rule (controllers.step_size.underflows: below 4 ulps of t)
    # refuses it; the Reversible loop's own rule (t + h == t) stepped on. Both gradient methods
    # now stop at the same place with the same message.
    y0 = torch.tensor([1.0], dtype=DT)
    ctrl = PIController(dt0=0.25)
    errs = {}
    for gradient in ("reversible", "direct"):
        with pytest.raises(no.StepSizeUnderflowError) as info:
            _solve(lambda t, y: -y, y0, [1e15, 1e15 + 4.0], gradient, controller=ctrl)
        errs[gradient] = info.value
    rev, direct = errs["reversible"], errs["direct"]
    assert rev.t == direct.t == 1e15 and rev.step == direct.step == 0
    assert str(rev).replace(" (reversible solve)", "") == str(direct)
    assert "below the resolution of t" in str(rev)


def test_dt_min_edge_as_the_engine():
    # A step of exactly dt_min is allowed (force_dt_min keeps the step there), below it the
    # solve stops: both gradient methods take the same number of steps of size dt_min.
    f = lambda t, y: -50.0 * y  # noqa: E731
    y0 = torch.tensor([1.0], dtype=DT)
    ctrl = PIController(rtol=1e-12, atol=1e-12, dt_min=0.01, dt0=0.01, force_dt_min=True)
    sols = {g: _solve(f, y0, [0.0, 0.1], g, solver="dopri5", controller=ctrl) for g in
            ("reversible", "direct")}  # fmt: skip
    assert sols["reversible"].stats["n_accepted"] == sols["direct"].stats["n_accepted"] == 10
    torch.testing.assert_close(sols["reversible"].ys, sols["direct"].ys, rtol=1e-3, atol=0)


def test_max_steps_message_is_the_engines():
    y0 = torch.tensor([1.0, 2.0], dtype=DT)
    with pytest.raises(no.MaxStepsError) as info:
        _solve(lambda t, y: -y, y0, [0.0, 1.0], solver="rk4", dt=0.1, max_steps=3)
    msg = str(info.value)
    assert msg.startswith("reached max_steps=3 step attempts at t=0.30000000000000004 (accepted 3")
    assert "(reversible solve); raise max_steps" in msg
    assert info.value.step == 3


def test_outputs_not_reached_are_nan():
    # throw=False and the step limit: outputs at t0 and those reached are kept, the rest NaN
    # (the engine's fill).
    y0 = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    sol = _solve(lambda t, y: -y, y0, [0.0, 0.2, 0.5, 1.0], solver="rk4", dt=0.1, max_steps=3,
                 throw=False)  # fmt: skip
    assert sol.status == no.MaxStepsError.status
    assert torch.isnan(sol.ys[2:]).all()
    torch.testing.assert_close(sol.ys[0], y0.detach(), rtol=0, atol=0)
    torch.testing.assert_close(sol.ys[1], y0.detach() * math.exp(-0.2), rtol=1e-6, atol=0)


def _van_der_pol(t, y):
    x, v = y[..., 0], y[..., 1]
    return torch.stack((v, 100.0 * (1 - x**2) * v - x), -1)


def test_stiff_backward_in_time_is_a_clear_error():
    # Van der Pol (mu = 100) from t = 1 back to 0 with rk4 at dt = 0.01: Direct's plain rk4
    # stays finite, the reversible pair does not (the parasitic mode). That was a NonFiniteError
    # naming only the final time; it now stops at the first non-finite state and says what to
    # try; the adaptive solver gets through (and agrees with Direct's gradient).
    y0 = torch.tensor([2.0, 0.0], dtype=DT, requires_grad=True)
    with pytest.raises(no.NonFiniteError) as info:
        _solve(_van_der_pol, y0, [1.0, 0.0], solver="rk4", dt=0.01)
    err = info.value
    assert 0.0 < err.t < 1.0 and err.step < 100
    msg = str(err)
    assert f"at t={err.t:.17g}" in msg and "stiff" in msg and "solver='dopri5'" in msg
    grads = {}
    for gradient in ("reversible", "direct"):
        sol = _solve(_van_der_pol, y0, [1.0, 0.0], gradient, rtol=1e-9, atol=1e-9)
        (grads[gradient],) = torch.autograd.grad(sol.ys[-1].sum(), y0)
    torch.testing.assert_close(grads["reversible"], grads["direct"], rtol=1e-5, atol=1e-7)


def test_stiff_backward_throw_false_reports_status():
    y0 = torch.tensor([2.0, 0.0], dtype=DT)
    sol = _solve(_van_der_pol, y0, [1.0, 0.0], solver="rk4", dt=0.01, throw=False)
    assert sol.status == no.NonFiniteError.status and "stiff" in sol.message
    assert torch.isnan(sol.ys[-1]).all()
