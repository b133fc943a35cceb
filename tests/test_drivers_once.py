"""The rules every eager driver shares, written once: the "cannot step" rule
(:func:`neuralode._failures.cannot_step`: the step limit, a non-finite step size, a step below
``dt_min`` or the resolution of ``t``) and the ``dt_max`` cap (:meth:`Controller.bounded`).

Eager drivers: the host-float driver (its fixed-step path with ``dense_output=False`` and its
general loop with dense output), the same loop recording states (``gradient="checkpoint"``),
the masked per-row driver (``batch_control="per_sample"``) and the reversible loop
(``gradient=Reversible()``). Each case runs through all of them and must give the same
exception type naming the same cause, or the same step counts.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import neuralode
from neuralode import (
    ConstantStep,
    MaxStepsError,
    NonFiniteError,
    PIController,
    StepSizeUnderflowError,
    StepToGrid,
)
from neuralode._failures import CAUSES, cannot_step
from neuralode.controllers.step_size import grid_point

F64 = torch.float64
EAGER = ["shared", "shared_loop", "checkpoint", "per_sample", "reversible"]


def _solve(driver, func, y0, t, **kw):
    if driver == "per_sample":
        return neuralode.solve(func, y0, t, batch_control="per_sample", **kw)
    if driver == "checkpoint":
        kw["gradient"] = "checkpoint"
    elif driver == "reversible":
        kw["gradient"] = neuralode.Reversible()
    # dense_output=False sends fixed steps down the host-float driver's fixed-step path
    return neuralode.solve(func, y0, t, dense_output=driver == "shared_loop", **kw)


def _count(n):
    return n.tolist() if isinstance(n, torch.Tensor) else [n]


def _decay(t, y):
    return -y


def _blow_up(t, y):  # y' = y^2 from y(0) = 1: singular at t = 1
    return y * y


Y0 = torch.ones(2, 1, dtype=F64)


# --------------------------------------------------------------------------- the rule itself
@pytest.mark.parametrize(
    ("ctrl", "h", "t", "attempts", "max_steps", "cause"),
    [
        (PIController(), 0.1, 0.0, 3, None, None),
        (PIController(), 0.1, 0.0, 5, 5, "max_steps"),
        (PIController(), math.nan, 0.0, 5, 5, "max_steps"),  # the step limit comes first
        (PIController(), math.nan, 1.0, 0, None, "nonfinite_h"),
        (PIController(), math.inf, 1.0, 0, None, "nonfinite_h"),
        (PIController(dt_min=0.1), 0.05, 1.0, 0, None, "underflow"),
        (PIController(dt_min=0.1), 0.1, 1.0, 0, None, None),  # exactly dt_min is allowed
        (PIController(), 1e-17, 1.0, 0, None, "underflow"),  # below the resolution of t
        (StepToGrid([0.0, 1.0]), math.inf, 0.5, 0, None, None),  # every step is a landing
        (ConstantStep(1e-11), 1e-11, 1e6, 0, None, "underflow"),  # t + h rounds to t
        (ConstantStep(0.1), 0.1, 1e6, 7, 7, "max_steps"),
    ],
)  # fmt: skip
def test_cannot_step_gives_the_same_cause_on_floats_and_per_row_tensors(
    ctrl, h, t, attempts, max_steps, cause
):
    """The host-float driver asks with floats, the per-row driver with (A,) tensors: one rule."""
    assert CAUSES[cannot_step(ctrl, h, t, attempts, max_steps)] == cause
    rows = cannot_step(
        ctrl,
        torch.tensor([h, 0.5], dtype=F64),
        torch.tensor([t, 0.0], dtype=F64),
        torch.tensor([attempts, 0]),
        max_steps,
    )
    assert [CAUSES[c] for c in rows.tolist()] == [cause, None]


def test_bounded_caps_floats_and_per_row_tensors_alike():
    ctrl = PIController(dt_max=0.25)
    assert ctrl.bounded(1.0) == 0.25 and ctrl.bounded(0.1) == 0.1
    assert math.isnan(ctrl.bounded(math.nan))  # a NaN stays NaN: reported as non-finite
    got = ctrl.bounded(torch.tensor([1.0, 0.1, math.nan], dtype=F64))
    torch.testing.assert_close(got, torch.tensor([0.25, 0.1, math.nan], dtype=F64), equal_nan=True)
    assert ConstantStep(0.3).bounded(0.3) == 0.3


# --------------------------------------------------------------------------- through every driver
@pytest.mark.parametrize("driver", EAGER)
def test_a_fixed_step_below_the_resolution_of_t_is_an_underflow_everywhere(driver):
    """dt = 1e-11 at t = 1e6 (where t + dt rounds to t): the host-float driver used to take
    zero-length steps forever (max_steps turns that into a failure here), the per-row driver
    raised StepSizeUnderflowError."""
    t = torch.tensor([1e6, 1e6 + 1e-6], dtype=F64)
    with pytest.raises(StepSizeUnderflowError, match=r"below the resolution of t") as ei:
        _solve(driver, _decay, Y0, t, solver="rk4", controller=ConstantStep(1e-11), max_steps=50)
    assert ei.value.t == 1e6 and ei.value.step == 0


def test_compiled_stepping_applies_the_same_rule_to_a_fixed_step():
    """compile=True (one compile: five Euler steps): the compiled step asks the same
    ``cannot_step`` and reports its cause code, so a fixed step below the resolution of t is
    the same StepSizeUnderflowError at the same time and step count as in the eager drivers."""
    t = torch.tensor([1e6, 1e6 + 2.4e-10], dtype=F64)  # two ulps of t apart
    ctrl = ConstantStep(5e-11)  # 5 steps, each rounding away at t = 1e6
    for compiled in (False, True):
        with pytest.raises(StepSizeUnderflowError, match=r"below the resolution of t") as ei:
            neuralode.solve(_decay, Y0, t, solver="euler", controller=ctrl, compile=compiled)
        assert ei.value.t == 1e6 and ei.value.step == 0
        assert ("compiled stepping" in str(ei.value)) == compiled


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("driver", EAGER)
def test_max_steps_is_the_same_failure_everywhere(driver, fixed):
    kw = dict(solver="rk4", dt=0.01) if fixed else dict(rtol=1e-10, atol=1e-12)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(MaxStepsError, match=r"reached max_steps=5") as ei:
        _solve(driver, _decay, Y0, t, max_steps=5, **kw)
    assert ei.value.step == 5
    assert 0.0 < ei.value.t < 1.0
    sol = _solve(driver, _decay, Y0, t, max_steps=5, throw=False, **kw)
    assert sol.status == MaxStepsError.status


@pytest.mark.parametrize("driver", EAGER)
def test_a_step_below_dt_min_is_the_same_failure_everywhere(driver):
    ctrl = PIController(dt0=0.1, dt_min=0.1, rtol=1e-12, atol=1e-14)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(StepSizeUnderflowError, match=r"is below dt_min=0\.1; the solution"):
        _solve(driver, _decay, Y0, t, controller=ctrl)


@pytest.mark.parametrize("driver", EAGER)
def test_a_singularity_is_the_same_underflow_everywhere(driver):
    t = torch.tensor([0.0, 2.0], dtype=F64)
    with pytest.raises(StepSizeUnderflowError, match=r"step size underflow .* blow up") as ei:
        _solve(driver, _blow_up, Y0, t)
    assert abs(ei.value.t - 1.0) < 1e-2


@pytest.mark.parametrize("driver", EAGER)
def test_non_finite_values_from_func_are_the_same_failure_everywhere(driver):
    """NaN past y = 2: every trial step is rejected until the step size underflows, which is
    then reported as func's non-finite values (NonFiniteError), not as a singularity."""

    def f(t, y):
        return y * torch.where(y > 2.0, torch.nan, 1.0)

    t = torch.tensor([0.0, 2.0], dtype=F64)
    with pytest.raises(NonFiniteError, match=r"func returned non-finite values \(NaN/inf\)") as ei:
        _solve(driver, f, Y0, t)
    assert abs(ei.value.t - math.log(2.0)) < 0.05  # where y reaches 2


@pytest.mark.parametrize("driver", EAGER)
def test_a_fixed_step_solve_that_turns_non_finite_fails_the_same_everywhere(driver):
    def f(t, y):
        return y * torch.where(t.reshape(-1, 1) > 0.5, torch.nan, 1.0)  # (t: 0-d or (A,))

    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(NonFiniteError, match=r"became non-finite \(NaN/inf\)"):
        _solve(driver, f, Y0, t, solver="rk4", dt=0.1)


# --------------------------------------------------------------------------- the dt_max cap
@pytest.mark.parametrize("driver", EAGER)
def test_dt_max_caps_every_step_in_every_driver(driver):
    """Loose tolerances on a slow decay: unbounded, a few long steps suffice; with dt_max = 0.25
    over [0, 4] at least 16 are needed, and the drivers with the same arithmetic (the shared
    loop, its checkpointed form and the per-row driver on each sample) take the same steps."""
    t = torch.tensor([0.0, 4.0], dtype=F64)
    loose = dict(rtol=1e-3, atol=1e-6)
    free = _solve(driver, _decay, Y0, t, controller=PIController(**loose))
    capped = _solve(driver, _decay, Y0, t, controller=PIController(dt_max=0.25, **loose))
    assert max(_count(free.stats["n_accepted"])) < 16
    n_acc = _count(capped.stats["n_accepted"])
    assert min(n_acc) >= 16
    torch.testing.assert_close(capped.ys[-1], Y0 * math.exp(-4.0), rtol=1e-3, atol=0)
    if driver != "reversible":  # (its error estimate is taken on the second state)
        ref = _solve("shared", _decay, Y0, t, controller=PIController(dt_max=0.25, **loose))
        assert set(n_acc) == {ref.stats["n_accepted"]}
        assert set(_count(capped.stats["n_rejected"])) == {ref.stats["n_rejected"]}


# --------------------------------------------------------------------------- the protocol
@dataclasses.dataclass(frozen=True)
class _HalfSteps(ConstantStep):
    """A user's controller: ConstantStep's grid at half its step size (its own ``propose``)."""

    def propose(self, t, h, t0, t_end, direction):
        return grid_point(t, t0, t_end, direction, self.dt / 2)


@pytest.mark.parametrize("driver", EAGER)
def test_every_driver_asks_the_controller_for_its_steps(driver):
    """The reversible loop used to branch on the controller's type (and stepped ConstantStep's
    grid itself): a controller's own ``propose`` is now honoured by every eager driver."""
    t = torch.linspace(0.0, 1.0, 5, dtype=F64)
    sol = _solve(driver, _decay, Y0, t, solver="rk4", controller=_HalfSteps(0.1))
    assert set(_count(sol.stats["n_accepted"])) == {20}
    torch.testing.assert_close(sol.ys[:, :, 0], torch.exp(-t).unsqueeze(1).expand(5, 2),
                               rtol=1e-7, atol=0)  # fmt: skip
