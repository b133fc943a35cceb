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


# --------------------------------------------------------------------------- the matrix
import neuralode._compiled as compiled  # noqa: E402
from neuralode import ConstantStep, MaxStepsError, StepToGrid  # noqa: E402

DRIVERS = ["shared", "per_sample", "compiled"]


def _osc(t, y):
    """A damped oscillator, row-wise (the same field for every driver)."""
    return torch.stack([y[:, 1], -y[:, 0] - 0.1 * y[:, 1]], 1)


def _blow_up(t, y):  # y' = y^2 from y(0) = 1: singular at t = 1
    return y * y


YB = torch.tensor([[1.0, 0.0], [0.5, 0.5], [-0.2, 1.0]], dtype=F64)
TB = torch.linspace(0.0, 3.0, 7, dtype=F64)


def _solve(driver, func, y0, t, **kw):
    if driver == "compiled":
        with torch.no_grad():
            return neuralode.solve(func, y0, t, compile=True, **kw)
    return neuralode.solve(func, y0, t, batch_control=driver, **kw)


@pytest.fixture(scope="module", autouse=True)
def _two_steps_per_call():
    """Compiled cases unroll 2 steps per call (shorter compilation, the same code)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiled, "STEPS_PER_CALL", 2)
        yield


# One compiled case per test (compilation is slow on 2 cores; the compiled code is the same
# for every tableau), every eager driver with each.
@pytest.mark.parametrize(
    ("driver", "solver"),
    [(d, s) for s in ("dopri5", "bosh3") for d in DRIVERS if d != "compiled" or s == "dopri5"],
)
def test_same_values_and_step_counts_through_every_driver(driver, solver):
    kw = dict(solver=solver, rtol=1e-8, atol=1e-10)
    sol = _solve(driver, _osc, YB, TB, **kw)
    if driver == "per_sample":
        # Each sample takes exactly the steps the shared driver takes for it alone.
        for b in range(YB.shape[0]):
            alone = neuralode.solve(_osc, YB[b : b + 1], TB, dense_output=False, **kw)
            assert int(sol.stats["n_accepted"][b]) == alone.stats["n_accepted"]
            assert int(sol.stats["n_rejected"][b]) == alone.stats["n_rejected"]
            torch.testing.assert_close(sol.ys[:, b], alone.ys[:, 0], rtol=1e-12, atol=1e-12)
    else:
        ref = neuralode.solve(_osc, YB, TB, dense_output=False, **kw)
        assert sol.stats["n_accepted"] == ref.stats["n_accepted"]
        assert sol.stats["n_rejected"] == ref.stats["n_rejected"]
        torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("driver", "fixed"),
    [(d, f) for f in ("dt", "grid") for d in DRIVERS if d != "compiled" or f == "dt"],
)
def test_fixed_steps_give_the_same_values_through_every_driver(driver, fixed):
    ctrl = ConstantStep(0.1) if fixed == "dt" else StepToGrid(torch.linspace(0.0, 3.0, 13))
    sol = _solve(driver, _osc, YB, TB, solver="rk4", controller=ctrl)
    ref = neuralode.solve(_osc, YB, TB, solver="rk4", controller=ctrl, dense_output=False)
    n = sol.stats["n_accepted"]
    assert (n.tolist() if isinstance(n, torch.Tensor) else [n]) == [ref.stats["n_accepted"]] * (
        YB.shape[0] if driver == "per_sample" else 1
    )
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("driver", DRIVERS)
def test_step_size_underflow_is_the_same_failure_everywhere(driver):
    y0 = torch.ones(2, 1, dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    with pytest.raises(StepSizeUnderflowError, match=r"step size underflow .* blow up") as ei:
        _solve(driver, _blow_up, y0, t)
    assert abs(ei.value.t - 1.0) < 1e-2


@pytest.mark.parametrize("driver", DRIVERS)
def test_max_steps_is_the_same_failure_everywhere(driver):
    with pytest.raises(MaxStepsError, match=r"reached max_steps=5") as ei:
        _solve(driver, _osc, YB, TB, max_steps=5)
    assert ei.value.step == 5


@pytest.mark.parametrize("driver", ["shared", "per_sample"])
def test_non_finite_values_are_the_same_failure_everywhere(driver):
    def f(t, y):
        return y * torch.where(y > 2.0, torch.nan, 1.0)

    with pytest.raises(NonFiniteError, match=r"non-finite values \(NaN/inf\)"):
        _solve(driver, f, torch.ones(2, 1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64))


@pytest.mark.parametrize("gradient", ["direct", "checkpoint", "backsolve"])
def test_gradients_agree_between_shared_and_per_sample_drivers(gradient):
    """Per-sample gradients of a batch equal the sum over samples solved alone (shared)."""
    w = torch.tensor([0.3, -0.2], dtype=F64, requires_grad=True)

    def f(t, y):
        return _osc(t, y) + w * y

    kw = dict(rtol=1e-9, atol=1e-11, gradient=gradient)
    if gradient != "direct":
        kw["gradient"] = (neuralode.Checkpointed if gradient == "checkpoint" else
                          neuralode.Backsolve)(params=[w])  # fmt: skip
    y0 = YB.clone().requires_grad_()
    ys = neuralode.solve(f, y0, TB, batch_control="per_sample", **kw).ys
    got = torch.autograd.grad(ys.square().sum(), [y0, w])
    want_y0, want_w = [], torch.zeros_like(w)
    for b in range(YB.shape[0]):
        yb = YB[b : b + 1].clone().requires_grad_()
        ysb = neuralode.solve(f, yb, TB, **kw).ys
        gy, gw = torch.autograd.grad(ysb.square().sum(), [yb, w])
        want_y0.append(gy)
        want_w = want_w + gw
    tol = dict(rtol=1e-9, atol=1e-11) if gradient != "backsolve" else dict(rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(got[0], torch.cat(want_y0), **tol)
    torch.testing.assert_close(got[1], want_w, **tol)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(solver="kvaerno5"), r"compile=True does not support solver 'kvaerno5'"),
        # (a custom norm compiles: tests/test_compiled_custom_norm.py; with a method that
        # does not, only the method is named)
        (dict(solver="kvaerno5", controller=neuralode.PIController(norm=lambda e: e.abs().max())),
         r"compile=True does not support solver 'kvaerno5' \(compiled stepping needs an "
         r"explicit Runge-Kutta method: e\.g\. dopri5, tsit5, bosh3, dopri8, rk4, euler\)\. "),
    ],
)  # fmt: skip
def test_what_compiled_stepping_still_refuses_raises_naming_it(kw, match):
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        neuralode.solve(_osc, YB, TB, compile=True, **kw)


def _pair(t, s):
    """A damped oscillator as a tuple state (position, velocity)."""
    return (s[1], -s[0] - 0.1 * s[1])


@pytest.mark.parametrize("driver", DRIVERS)
def test_tuple_states_give_the_same_values_and_steps_through_every_driver(driver):
    """The mixed norm (max over components) is the same in every driver: a small component is
    controlled as tightly as a large one, with the same step counts."""
    y0 = (YB[:, :1].contiguous(), 1e-3 * YB[:, 1:].contiguous())
    kw = dict(rtol=1e-8, atol=1e-10)
    sol = _solve(driver, _pair, y0, TB, **kw)
    if driver == "per_sample":
        for b in range(YB.shape[0]):
            alone = neuralode.solve(_pair, tuple(c[b : b + 1] for c in y0), TB, **kw)
            assert int(sol.stats["n_accepted"][b]) == alone.stats["n_accepted"]
            for c, a in zip(sol.ys, alone.ys):
                torch.testing.assert_close(c[:, b], a[:, 0], rtol=1e-12, atol=1e-14)
        return
    ref = neuralode.solve(_pair, y0, TB, dense_output=False, **kw)
    assert sol.stats["n_accepted"] == ref.stats["n_accepted"]
    for c, a in zip(sol.ys, ref.ys):
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-14)
