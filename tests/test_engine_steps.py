"""How the engine steps: evaluations of f, landing points, discontinuities, controllers, limits."""

from __future__ import annotations

import math

import pytest
import torch

import neuralode
from neuralode import (
    ConstantStep,
    MaxStepsError,
    PIController,
    StepSizeUnderflowError,
    StepToGrid,
)
from neuralode.solvers import ADAPTIVE, available, get_tableau

F64 = torch.float64
METHODS = available()


class Recorder:
    """Wraps a vector field and records every (t, y) it is called with."""

    def __init__(self, f):
        self.f = f
        self.calls: list[tuple[float, torch.Tensor]] = []

    def __call__(self, t, y):
        self.calls.append((float(t), y.detach().clone()))
        return self.f(t, y)

    @property
    def times(self) -> list[float]:
        return [t for t, _ in self.calls]


def _vdp(t, y):
    return torch.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])


# --------------------------------------------------------------------------- non-FSAL methods
def _forced(t: float, y: float) -> float:
    return -2.0 * y + math.sin(3.0 * t)


def _heun_step(t, y, h):
    k1 = _forced(t, y)
    k2 = _forced(t + h, y + h * k1)
    return y + h * (k1 + k2) / 2


def _fehlberg2_step(t, y, h):
    k1 = _forced(t, y)
    k2 = _forced(t + h / 2, y + h / 2 * k1)
    k3 = _forced(t + h, y + h * (k1 / 256 + 255 * k2 / 256))
    return y + h * (k1 / 512 + 255 * k2 / 256 + k3 / 512)


@pytest.mark.parametrize(
    ("method", "step"), [("adaptive_heun", _heun_step), ("fehlberg2", _fehlberg2_step)]
)
def test_non_fsal_methods_match_the_textbook_formulas(method, step):
    """y' = -2y + sin 3t, y(0) = 1, two steps of 0.25, each starting from f at the new point."""
    expected = step(0.25, step(0.0, 1.0, 0.25), 0.25)
    sol = neuralode.solve(
        lambda t, y: -2 * y + torch.sin(3 * t),
        torch.tensor([1.0], dtype=F64),
        torch.tensor([0.0, 0.5], dtype=F64),
        solver=method,
        controller=ConstantStep(0.25),
    )
    # To rounding (1e-14: the stages are summed in another order than the formula here).
    assert float(sol.ys[-1, 0]) == pytest.approx(expected, rel=1e-14, abs=1e-15)
    if method == "adaptive_heun":
        # Issue #2: 0.61117; reusing f at the embedded (Euler) point, as torchdiffeq 0.2.x does,
        # gives 0.63744 instead.
        assert float(sol.ys[-1, 0]) == pytest.approx(0.61117, abs=5e-6)


@pytest.mark.parametrize("method", [m for m in ADAPTIVE if not get_tableau(m).fsal])
def test_adaptive_non_fsal_steps_start_with_f_at_the_accepted_state(method):
    rec = Recorder(_vdp)
    sol = neuralode.solve(
        rec,
        torch.tensor([2.0, 0.0], dtype=F64),
        torch.tensor([0.0, 2.0], dtype=F64),
        solver=method,
        rtol=1e-4,
        atol=1e-6,
    )
    steps = sol.step_times
    # The accepted states themselves: outputs exactly at the step ends (same steps).
    states = neuralode.solve(
        _vdp,
        torch.tensor([2.0, 0.0], dtype=F64),
        torch.tensor(steps, dtype=F64),
        solver=method,
        rtol=1e-4,
        atol=1e-6,
    ).ys
    for tn, yn in zip(steps[:-1], states[:-1]):
        at_tn = [y for t, y in rec.calls if t == tn]
        assert any(torch.equal(y, yn) for y in at_tn), f"no evaluation of f at (t_n={tn}, y_n)"
    # Cost per attempt: S - 1 stages, plus f at each accepted step's start, plus one for the
    # initial step size selection.
    tab = get_tableau(method)
    n_acc, n_rej = sol.stats["n_accepted"], sol.stats["n_rejected"]
    assert sol.stats["nfe"] == n_acc + (tab.n_stages - 1) * (n_acc + n_rej) + 1


@pytest.mark.parametrize("method", [m for m in ADAPTIVE if get_tableau(m).fsal])
def test_fsal_methods_reuse_the_last_stage(method):
    sol = neuralode.solve(
        _vdp,
        torch.tensor([2.0, 0.0], dtype=F64),
        torch.tensor([0.0, 2.0], dtype=F64),
        solver=method,
        rtol=1e-4,
        atol=1e-6,
    )
    tab = get_tableau(method)
    attempts = sol.stats["n_accepted"] + sol.stats["n_rejected"]
    # f at t0, f for the initial step size, then S - 1 new stages per attempt.
    assert sol.stats["nfe"] == 2 + (tab.n_stages - 1) * attempts


# --------------------------------------------------------------------------- evaluation domain
@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("span", [(0.0, 3.0), (3.0, 0.0), (-1.0, -4.0)])
def test_func_is_never_evaluated_outside_the_interval(method, span):
    rec = Recorder(_vdp)
    t = torch.linspace(span[0], span[1], 7, dtype=F64)
    sol = neuralode.solve(
        rec, torch.tensor([2.0, 0.0], dtype=F64), t, solver=method, rtol=1e-5, atol=1e-7
    )
    lo, hi = min(span), max(span)
    outside = [s for s in rec.times if not lo <= s <= hi]
    assert outside == []
    assert sol.success and sol.step_times[-1] == span[1]
    assert len(rec.times) == sol.stats["nfe"]


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("span", [(0.0, 3.0), (3.0, 0.0)])
def test_output_times_never_shorten_steps(method, span):
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    kw = dict(solver=method, rtol=1e-5, atol=1e-7)
    two = neuralode.solve(_vdp, y0, torch.tensor(span, dtype=F64), **kw)
    many = neuralode.solve(_vdp, y0, torch.linspace(*span, 1000, dtype=F64), **kw)
    assert many.step_times == two.step_times
    assert many.stats["n_rejected"] == two.stats["n_rejected"]
    torch.testing.assert_close(many.ys[-1], two.ys[-1], rtol=0, atol=0)
    tab = get_tableau(method)
    extra = many.stats["nfe"] - two.stats["nfe"]
    if tab.fsal:
        assert extra == 0
    elif tab.n_dense_stages == 1:  # cubic Hermite: f at the end, reused by the next step
        assert extra <= 1  # ... except after the last step
    else:  # dopri8: DOP853's extra dense stages, once per step holding an output
        assert extra <= (tab.n_dense_stages - 1) * many.stats["n_accepted"] + 1


# --------------------------------------------------------------------------- fixed steps
def _rk4_decay_factor(h: float) -> float:
    """One RK4 step of y' = -y multiplies y by this stability polynomial."""
    return 1 - h + h**2 / 2 - h**3 / 6 + h**4 / 24


def test_constant_step_lands_exactly_on_the_end_time():
    sol = neuralode.solve(
        lambda t, y: -y,
        torch.ones(1, dtype=F64),
        torch.tensor([0.0, 1.0], dtype=F64),
        solver="rk4",
        controller=ConstantStep(0.3),
    )
    st = sol.step_times
    assert len(st) == 5 and st[-1] == 1.0
    assert [b - a for a, b in zip(st, st[1:])] == pytest.approx([0.3, 0.3, 0.3, 0.1], abs=1e-15)
    expected = _rk4_decay_factor(0.3) ** 3 * _rk4_decay_factor(0.1)
    assert float(sol.ys[-1, 0]) == pytest.approx(expected, rel=1e-14)
    assert sol.stats["nfe"] == 4 * 4


def test_constant_step_backward_and_larger_than_the_interval():
    sol = neuralode.solve(
        lambda t, y: -y,
        torch.ones(1, dtype=F64),
        torch.tensor([1.0, 0.0], dtype=F64),
        solver="rk4",
        dt=0.3,
    )
    assert sol.step_times[-1] == 0.0 and len(sol.step_times) == 5
    expected = _rk4_decay_factor(-0.3) ** 3 * _rk4_decay_factor(-0.1)
    assert float(sol.ys[-1, 0]) == pytest.approx(expected, rel=1e-14)
    one = neuralode.solve(
        lambda t, y: -y,
        torch.ones(1, dtype=F64),
        torch.tensor([0.0, 0.5], dtype=F64),
        solver="rk4",
        dt=2.0,
    )
    assert one.step_times == [0.0, 0.5]
    assert float(one.ys[-1, 0]) == pytest.approx(_rk4_decay_factor(0.5), rel=1e-14)


@pytest.mark.parametrize(("t_end", "n"), [(1.0, 10), (4.0, 6), (2.0, 7), (10.0, 100), (1.0, 3)])
def test_constant_step_takes_exactly_the_expected_number_of_steps(t_end, n):
    """dt = t_end / n gives n steps, not n steps plus a sliver of a few ulps at the end."""
    sol = neuralode.solve(
        lambda t, y: -y,
        torch.ones(1, dtype=F64),
        torch.tensor([0.0, t_end], dtype=F64),
        solver="rk4",
        dt=t_end / n,
    )
    st = sol.step_times
    assert st[-1] == t_end
    assert min(b - a for a, b in zip(st, st[1:])) > 0.5 * t_end / n
    assert sol.stats["n_accepted"] == n


def test_step_to_grid_uses_exactly_the_grid_steps():
    grid = [-0.5, 0.0, 0.1, 0.5, 0.55, 1.0, 2.0]  # points outside [0, 1] are ignored
    sol = neuralode.solve(
        lambda t, y: -y,
        torch.ones(1, dtype=F64),
        torch.tensor([0.0, 1.0], dtype=F64),
        solver="rk4",
        controller=StepToGrid(torch.tensor(grid, dtype=F64)),
    )
    assert sol.step_times == [0.0, 0.1, 0.5, 0.55, 1.0]
    assert sol.stats["n_accepted"] == 4 and sol.stats["n_rejected"] == 0
    assert sol.stats["nfe"] == 4 * 4
    expected = math.prod(_rk4_decay_factor(h) for h in (0.1, 0.4, 0.05, 0.45))
    assert float(sol.ys[-1, 0]) == pytest.approx(expected, rel=1e-14)
    back = neuralode.solve(
        lambda t, y: -y,
        torch.ones(1, dtype=F64),
        torch.tensor([1.0, 0.0], dtype=F64),
        solver="rk4",
        controller=StepToGrid(list(reversed(grid))),
    )
    assert back.step_times == [1.0, 0.55, 0.5, 0.1, 0.0]


# --------------------------------------------------------------------------- landing points
@pytest.mark.parametrize("method", ADAPTIVE)
def test_step_t_forces_landing_without_restarting(method):
    marks = [0.7, 1.3, 2.9]
    rec = Recorder(_vdp)
    sol = neuralode.solve(
        rec,
        torch.tensor([2.0, 0.0], dtype=F64),
        torch.tensor([0.0, 3.0], dtype=F64),
        solver=method,
        controller=PIController(rtol=1e-5, atol=1e-7, step_t=marks + [5.0]),
    )
    for m in marks:
        assert m in sol.step_times
        assert m in rec.times  # the next step starts there (FSAL stage or a fresh f)
    assert 5.0 not in sol.step_times  # a landing point outside the interval is ignored
    free = neuralode.solve(
        _vdp,
        torch.tensor([2.0, 0.0], dtype=F64),
        torch.tensor([0.0, 3.0], dtype=F64),
        solver=method,
        rtol=1e-5,
        atol=1e-7,
    )
    torch.testing.assert_close(sol.ys[-1], free.ys[-1], rtol=1e-3, atol=1e-3)
    # No restart: a landing costs at most one short step, not a new initial step selection.
    assert sol.stats["nfe"] <= free.stats["nfe"] + len(marks) * 2 * get_tableau(method).n_stages


def test_step_t_with_constant_steps():
    sol = neuralode.solve(
        lambda t, y: -y,
        torch.ones(1, dtype=F64),
        torch.tensor([0.0, 1.0], dtype=F64),
        solver="rk4",
        controller=ConstantStep(0.3, step_t=[0.45]),
    )
    assert sol.step_times[:3] == [0.0, 0.3, 0.45]
    assert sol.step_times[-1] == 1.0


def _step_up(t, y):
    """f = 0 before t = 1 and 1 from t = 1 on (right-continuous)."""
    return torch.ones_like(y) if float(t) >= 1.0 else torch.zeros_like(y)


@pytest.mark.parametrize("method", METHODS)
def test_jump_t_with_constant_steps_is_exact(method):
    """Every RK method integrates a piecewise constant f exactly if no stage straddles the jump."""
    sol = neuralode.solve(
        _step_up,
        torch.zeros(1, dtype=F64),
        torch.tensor([0.0, 2.0], dtype=F64),
        solver=method,
        controller=ConstantStep(0.3, jump_t=[1.0]),
    )
    assert 1.0 in sol.step_times
    assert float(sol.ys[-1, 0]) == pytest.approx(1.0, abs=1e-14)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_jump_t_adaptive_is_exact_and_sees_both_sides(method):
    rec = Recorder(_step_up)
    sol = neuralode.solve(
        rec,
        torch.zeros(1, dtype=F64),
        torch.tensor([0.0, 2.0], dtype=F64),
        solver=method,
        controller=PIController(rtol=1e-6, atol=1e-8, jump_t=[1.0]),
    )
    assert float(sol.ys[-1, 0]) == pytest.approx(1.0, abs=1e-14)
    # All stages of a step see the same constant, so every error estimate is exactly zero.
    assert sol.stats["n_rejected"] == 0
    assert any(1.0 - 1e-12 < s < 1.0 for s in rec.times)  # left limit, end of the step
    assert any(1.0 < s < 1.0 + 1e-12 for s in rec.times)  # right limit, start of the next


def test_jump_t_backward_sees_the_limit_from_the_integration_side():
    def f(t, y):  # 1 for t > 1, 0 for t <= 1
        return torch.ones_like(y) if float(t) > 1.0 else torch.zeros_like(y)

    for method in ("rk4", "dopri5", "bosh3"):
        sol = neuralode.solve(
            f,
            torch.zeros(1, dtype=F64),
            torch.tensor([2.0, 0.0], dtype=F64),
            solver=method,
            controller=ConstantStep(0.3, jump_t=[1.0]),
        )
        assert float(sol.ys[-1, 0]) == pytest.approx(-1.0, abs=1e-14), method


def test_without_jump_t_a_discontinuity_costs_rejections():
    """The contrast that makes jump_t worth having (and shows the check above can fail)."""
    sol = neuralode.solve(
        _step_up,
        torch.zeros(1, dtype=F64),
        torch.tensor([0.0, 2.0], dtype=F64),
        solver="bosh3",
        rtol=1e-6,
        atol=1e-8,
    )
    assert sol.stats["n_rejected"] > 0


# --------------------------------------------------------------------------- limits
def test_max_steps_counts_attempts_over_the_whole_solve():
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    t = torch.linspace(0.0, 10.0, 50, dtype=F64)
    kw = dict(rtol=1e-9, atol=1e-11)
    free = neuralode.solve(_vdp, y0, t, **kw)
    needed = free.stats["n_accepted"] + free.stats["n_rejected"]
    assert 200 < needed < 400  # each of the 49 output intervals needs far fewer than 200
    ok = neuralode.solve(_vdp, y0, t, max_steps=needed, **kw)
    torch.testing.assert_close(ok.ys, free.ys, rtol=0, atol=0)
    with pytest.raises(MaxStepsError, match=r"reached max_steps=200 step attempts at t=") as ei:
        neuralode.solve(_vdp, y0, t, max_steps=200, **kw)
    e = ei.value
    assert e.step == 200 and 0.0 < e.t < 10.0 and e.h > 0
    assert "raise max_steps, loosen rtol/atol" in str(e)
    part = neuralode.solve(_vdp, y0, t, max_steps=200, throw=False, **kw)
    assert part.status == "max_steps" and not part.success
    assert part.t_final == pytest.approx(e.t, abs=0)
    done = t <= part.t_final
    assert bool(torch.isnan(part.ys[~done]).all())
    torch.testing.assert_close(part.ys[done], free.ys[done], rtol=0, atol=0)
    assert part.message == str(e)


def test_dt_min_raises_step_size_underflow():
    ctrl = PIController(rtol=1e-10, atol=1e-12, dt_min=0.5)
    with pytest.raises(StepSizeUnderflowError, match=r"below dt_min=0\.5") as ei:
        neuralode.solve(
            _vdp,
            torch.tensor([2.0, 0.0], dtype=F64),
            torch.tensor([0.0, 5.0], dtype=F64),
            controller=ctrl,
        )
    assert ei.value.h < 0.5


def test_dt_max_bounds_every_step():
    sol = neuralode.solve(
        lambda t, y: -y,
        torch.ones(1, dtype=F64),
        torch.tensor([0.0, 5.0], dtype=F64),
        controller=PIController(rtol=1e-3, atol=1e-5, dt_max=0.25),
    )
    st = sol.step_times
    assert max(b - a for a, b in zip(st, st[1:])) <= 0.25 + 1e-15
    assert len(st) - 1 >= 20


def test_dt0_is_the_first_step():
    rec = Recorder(lambda t, y: -y)
    sol = neuralode.solve(
        rec,
        torch.ones(1, dtype=F64),
        torch.tensor([0.0, 1.0], dtype=F64),
        controller=PIController(rtol=1e-6, atol=1e-8, dt0=0.01),
    )
    assert sol.step_times[1] == pytest.approx(0.01, abs=1e-17)
    assert rec.times[1] == pytest.approx(0.01 / 5)  # first stage after t0 is at c2 * dt0


# --------------------------------------------------------------------------- controllers
def test_i_controller_is_the_default():
    c = PIController()
    assert (c.rtol, c.atol, c.pcoeff, c.icoeff) == (1e-6, 1e-8, 0.0, 1.0)
    assert (c.safety, c.ifactor, c.dfactor) == (0.9, 10.0, 0.2)
    # h_new / h = safety * err^(-1/k), clipped to [dfactor, ifactor]; k = 5 for dopri5.
    assert c.factor(0.5, 0.3, 5) == pytest.approx(0.9 * 0.5 ** (-1 / 5), rel=1e-15)
    assert c.factor(1e-12, 1.0, 5) == 10.0
    assert c.factor(0.0, 1.0, 5) == 10.0
    assert c.factor(1e6, 1.0, 5) == 0.2
    assert c.reject_factor(4.0, 5) == pytest.approx(0.9 * 4.0 ** (-1 / 5), rel=1e-15)
    assert c.reject_factor(math.inf, 5) == 0.2
    assert c.reject_factor(0.5, 5) == 1.0  # never an increase after a rejection


def test_pi_controller_formula():
    c = PIController(pcoeff=0.2, icoeff=0.65)
    expected = 0.9 * 0.5 ** (-(0.65 + 0.2) / 5) * 0.3 ** (0.2 / 5)
    assert c.factor(0.5, 0.3, 5) == pytest.approx(expected, rel=1e-15)


def test_pi_controller_is_accurate_and_changes_the_steps():
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    t = torch.tensor([0.0, 10.0], dtype=F64)
    ref = neuralode.solve(_vdp, y0, t, solver="dopri8", rtol=1e-13, atol=1e-13).ys[-1]
    i_ctrl = neuralode.solve(_vdp, y0, t, controller=PIController(rtol=1e-8, atol=1e-10))
    pi = neuralode.solve(
        _vdp, y0, t, controller=PIController(rtol=1e-8, atol=1e-10, pcoeff=0.2, icoeff=0.65)
    )
    assert float((pi.ys[-1] - ref).abs().max()) < 100 * 1e-8
    assert float((i_ctrl.ys[-1] - ref).abs().max()) < 100 * 1e-8
    assert pi.step_times != i_ctrl.step_times
    assert 0.7 < pi.stats["nfe"] / i_ctrl.stats["nfe"] < 1.4


def test_custom_norm_replaces_the_rms_norm():
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    t = torch.tensor([0.0, 5.0], dtype=F64)
    rms = neuralode.solve(_vdp, y0, t, controller=PIController(rtol=1e-6, atol=1e-8))
    same = neuralode.solve(
        _vdp,
        y0,
        t,
        controller=PIController(
            rtol=1e-6, atol=1e-8, norm=lambda e: e.abs().square().mean().sqrt()
        ),
    )
    sup = neuralode.solve(
        _vdp, y0, t, controller=PIController(rtol=1e-6, atol=1e-8, norm=lambda e: e.abs().max())
    )
    assert len(same.step_times) == len(rms.step_times)  # equal up to summation order
    assert same.step_times == pytest.approx(rms.step_times, rel=1e-8)
    assert sup.stats["nfe"] > rms.stats["nfe"]  # the max norm is >= the RMS norm: more steps
