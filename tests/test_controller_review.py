"""Regression tests for the controller protocol review: a propose that does not advance, the
landing merge scale shared by both controls."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import neuralode
from neuralode.controllers import Controller

F64 = torch.float64


@dataclass(frozen=True)
class _Stuck(Controller):
    back: bool = False

    def initial_step(self, *a):
        return 0.1

    def propose(self, t, h, t0, t_end, direction):
        return t - direction * h if self.back else t


@pytest.mark.parametrize("ctl", ["shared", "per_sample"])
@pytest.mark.parametrize("back", [False, True])
@pytest.mark.parametrize("max_steps", [None, 1000])
def test_propose_that_does_not_advance_raises(ctl, back, max_steps):
    y0 = torch.ones(2, 1, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match=r"_Stuck\.propose returned t_try=.* from t=0\.0"):
        neuralode.solve(lambda t, y: -y, y0, t, solver="rk4", controller=_Stuck(back=back),
                        batch_control=ctl, max_steps=max_steps)  # fmt: skip


def _step_times(y0, t, ctrl, ctl):
    ts = []

    def f(tt, y):
        ts.extend(tt.reshape(-1).tolist())
        return -y

    neuralode.solve(f, y0, t, solver="euler", controller=ctrl, batch_control=ctl)
    return sorted({round(x, 9) for x in ts if x < 10})


def test_landing_scale_ignores_landings_outside_the_interval():
    # A landing far outside sample 0's interval (1e6 + 0.5) must not widen its merge: the grid
    # point 1.0 is kept after 0.9 in both controls, and per-sample equals shared.
    ctrl = neuralode.ConstantStep(0.1, step_t=(0.3125, 1e6 + 0.5))
    expect = [0.0, 0.1, 0.2, 0.3, 0.3125, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    one = torch.ones(1, 1, dtype=F64)
    shared = _step_times(one, torch.tensor([0.0, 1.0], dtype=F64), ctrl, "shared")
    rows = _step_times(one, torch.tensor([0.0, 1.0], dtype=F64), ctrl, "per_sample")
    two = _step_times(torch.ones(2, 1, dtype=F64),
                      torch.tensor([[0.0, 1.0], [1e6, 1e6 + 1]], dtype=F64), ctrl, "per_sample")  # fmt: skip
    assert shared == expect
    assert [x for x in rows if x < 1.0] == expect  # (per-sample may also evaluate f at the end)
    assert [x for x in two if x < 1.0] == expect


_F32_01 = float(torch.tensor(0.1, dtype=torch.float32))  # 1.5e-9 above 0.1
_F32_03 = float(torch.tensor(0.3, dtype=torch.float32))  # 1.2e-8 above 0.3


def _accepted(ctrl, t, ctl, solver):
    ts = []

    def f(tt, y):
        ts.append(tt.reshape(-1)[0].item())
        return -y

    y0 = torch.ones(2, 1, dtype=F64)
    s = neuralode.solve(f, y0, t, solver=solver, controller=ctrl, batch_control=ctl)
    n = s.stats["n_accepted"]
    return (n.tolist() if isinstance(n, torch.Tensor) else [n, n]), ts


@pytest.mark.parametrize("ctl", ["shared", "per_sample"])
@pytest.mark.parametrize("backward", [False, True])
def test_near_duplicate_landings_merge_into_the_jump(ctl, backward):
    # step_t 0.1 (float64) and jump_t float32(0.1): one landing (the jump's), no sliver step:
    # ConstantStep(0.01) over [0, 0.3] takes its 30 steps.
    t = torch.tensor([0.3, 0.0] if backward else [0.0, 0.3], dtype=F64)
    ctrl = neuralode.ConstantStep(0.01, step_t=(0.1,), jump_t=(_F32_01,))
    n, ts = _accepted(ctrl, t, ctl, "rk4")
    assert n == [30, 30]
    assert not [x for x in ts if 0 < abs(x - 0.1) < 1e-9 or x == 0.1]  # (only the jump's sides)
    pi = neuralode.PIController(rtol=1e-6, atol=1e-8, step_t=(0.1,), jump_t=(_F32_01,))
    _, ts = _accepted(pi, t, ctl, "dopri5")
    near = {x for x in ts if abs(x - 0.1) < 1e-6}
    assert all(abs(x - _F32_01) < 1e-15 for x in near)


def test_steptogrid_jump_a_float32_rounding_off_a_grid_point():
    grid = torch.linspace(0, 1, 11, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    for ctl in ["shared", "per_sample"]:
        n, _ = _accepted(neuralode.StepToGrid(grid, jump_t=(_F32_03,)), t, ctl, "rk4")
        assert n == [10, 10]


def test_merge_landings_rule():
    from neuralode.controllers.base import merge_landings

    assert merge_landings((0.1,), (_F32_01,)) == (_F32_01,)
    assert merge_landings((0.1, _F32_01), ()) == (0.1,)  # keeps the float64 time
    assert merge_landings((0.5, 0.5625), ()) == (0.5, 0.5625)  # distinct float32 values
    assert merge_landings((1e6 + 0.3125, 1e6 + 0.375), ()) == (1e6 + 0.3125, 1e6 + 0.375)
    assert merge_landings((0.1, 0.1 + 1e-6), ()) == (0.1, 0.1 + 1e-6)


def _solve(ctrl, ctl="shared", solver="rk4"):
    y0 = torch.ones(2, 1, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    return neuralode.solve(lambda t, y: -y, y0, t, solver=solver, controller=ctrl,
                           batch_control=ctl)  # fmt: skip


@dataclass(frozen=True)
class _First(Controller):
    h0: object = 0.1

    def initial_step(self, *a):
        return self.h0


@pytest.mark.parametrize("ctl", ["shared", "per_sample"])
def test_initial_step_result_is_checked(ctl):
    with pytest.raises(ValueError, match=r"_First\.initial_step returned -0\.1"):
        _solve(_First(-0.1), ctl)
    with pytest.raises(ValueError, match=r"_First\.initial_step returned 0\.0"):
        _solve(_First(0.0), ctl)
    with pytest.raises(TypeError, match=r"_First\.initial_step must return .* got NoneType"):
        _solve(_First(None), ctl)
    s = _solve(_First(0.1), ctl)  # a valid first step still solves (rk4, 10 steps)
    assert abs(s.ys[-1, 0, 0].item() - math.exp(-1)) < 1e-6


def test_initial_step_tensor_under_shared_control():
    with pytest.raises(TypeError, match=r"_First\.initial_step must return .* got Tensor"):
        _solve(_First(torch.tensor(0.1, dtype=F64)), "shared")


@dataclass(frozen=True)
class _Adaptive(Controller):
    adaptive = True

    def initial_step(self, *a):
        return 0.01


@dataclass(frozen=True)
class _Grid(Controller):
    step_t: object = ()

    def initial_step(self, *a):
        return 0.1


@pytest.mark.parametrize("ctl", ["shared", "per_sample"])
def test_controller_fields_are_checked(ctl):
    with pytest.raises(TypeError, match=r"_Adaptive is adaptive but has no rtol or atol"):
        _solve(_Adaptive(), ctl, solver="dopri5")
    with pytest.raises(TypeError, match=r"_Grid\.step_t must be a tuple of Python floats"):
        _solve(_Grid(step_t=torch.tensor([0.55])), ctl)
    s = _solve(_Grid(step_t=(0.55,)), ctl)
    assert abs(s.ys[-1, 0, 0].item() - math.exp(-1)) < 1e-5
