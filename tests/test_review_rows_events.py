"""Review findings on per-sample control, events and func's time dtype (closed-form checks).

- A ``jump_t`` that is also an output time under ``batch_control="per_sample"``: the first stage
  after it is f at the right limit (not f at the jump, which a dense stage had overwritten it
  with), forward and backward in time, for fixed steps and non-FSAL adaptive methods, through
  the gradient replays and compiled stepping.
- ``Event(max_events=...)``: the solve stops at that event (status ``"max_events"``) instead of
  going on with the reset dropped; failure messages of event solves count the whole solve.
- ``odeint_event`` with an event that never fires raises instead of returning a NaN time.
- func's ``t`` under per-sample control is in the state's precision by default.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import neuralode
from neuralode import ConstantStep, Event, PIController, StepToGrid

F64 = torch.float64
PS = dict(batch_control="per_sample")


# ===================================================================== jump_t at an output time
def k_left(t):
    """Rate 1 up to and including t = 1, 3 after: f at the jump takes the left value."""
    k = torch.where(t <= 1.0, 1.0, 3.0).to(F64)
    return k[:, None] if k.dim() == 1 else k


def k_right(t):
    """Rate 1 before t = 1, 3 from t = 1 on: f at the jump takes the right value."""
    k = torch.where(t < 1.0, 1.0, 3.0).to(F64)
    return k[:, None] if k.dim() == 1 else k


def decay_left(t, y):
    return -k_left(t) * y


def decay_right(t, y):
    return -k_right(t) * y


def exact(y0, times):
    """y' = -k(t) y with k = 1 on (0, 1), 3 on (1, 2): y0 exp(-int_0^s k)."""
    rate = [s if s <= 1 else 1 + 3 * (s - 1) for s in times]
    return torch.stack([y0 * math.exp(-r) for r in rate])


def exact_back(y2, times):
    """The same from y(2) = y2 backward: y(s) = y2 exp(int_s^2 k)."""
    rate = [3 * (2 - s) if s >= 1 else 3 + (1 - s) for s in times]
    return torch.stack([y2 * math.exp(r) for r in rate])


def rel_err(ys, want):
    return float(((ys - want).abs() / want.abs()).max())


Y0 = torch.tensor([[1.0, 2.0]], dtype=F64)
T_OUT = [0.0, 0.5, 1.0, 1.5, 2.0]  # the jump t = 1 is an output time


CONTROLLERS = {
    # rk4 at dt = 0.1: 2.6e-4 with the jump honoured, 3.3e-2 without (a first-order error)
    "ConstantStep": (dict(solver="rk4", controller=ConstantStep(0.1, jump_t=(1.0,))), 1e-3),
    "StepToGrid": (
        dict(
            solver="rk4",
            controller=StepToGrid(torch.linspace(0, 2, 21, dtype=F64).tolist(), jump_t=(1.0,)),
        ),  # fmt: skip
        1e-3,
    ),
    # dopri8 at rtol 1e-10: 7e-14 with the jump honoured, 9e-10 without
    "PI dopri8": (
        dict(solver="dopri8", controller=PIController(rtol=1e-10, atol=1e-12, jump_t=(1.0,))),
        3e-12,
    ),
}


@pytest.mark.parametrize("name", list(CONTROLLERS))
def test_per_sample_jump_at_an_output_time_forward(name):
    kw, tol = CONTROLLERS[name]
    t = torch.tensor(T_OUT, dtype=F64)
    want = exact(Y0[0], T_OUT)
    shared = neuralode.solve(decay_left, Y0, t, **kw).ys[:, 0]
    rows = neuralode.solve(decay_left, Y0, t, **kw, **PS).ys[:, 0]
    assert rel_err(shared, want) < tol
    assert rel_err(rows, want) < tol
    torch.testing.assert_close(rows, shared, rtol=10 * tol, atol=0)


@pytest.mark.parametrize("solver, step, tol", [("rk4", 0.1, 1e-3), ("rk4", 0.03, 1e-5)])
def test_per_sample_jump_at_an_output_time_backward(solver, step, tol):
    """From y(2) backward to 0 (without the jump honoured: 3.3e-2 and 1.0e-2)."""
    t_out = [2.0, 1.5, 1.0, 0.5, 0.0]
    y2 = torch.tensor([[1.0, 2.0]], dtype=F64)
    want = exact_back(y2[0], t_out)
    ctrl = ConstantStep(step, jump_t=(1.0,))
    t = torch.tensor(t_out, dtype=F64)
    for bc in ("shared", "per_sample"):
        sol = neuralode.solve(decay_right, y2, t, solver=solver, controller=ctrl, batch_control=bc)
        assert rel_err(sol.ys[:, 0], want) < tol, bc


def test_output_inside_a_step_ending_on_a_jump_uses_the_left_limit():
    """An output inside the step that ends on the jump: the step's dense stage at c = 1 is f at
    the left limit, as in the shared driver (f at t = 1 itself is the right value here)."""
    t_out = [0.0, 0.95, 1.0, 1.55, 2.0]
    t = torch.tensor(t_out, dtype=F64)
    kw = dict(solver="rk4", controller=ConstantStep(0.1, jump_t=(1.0,)))
    want = exact(Y0[0], t_out)
    shared = neuralode.solve(decay_right, Y0, t, **kw).ys[:, 0]
    rows = neuralode.solve(decay_right, Y0, t, **kw, **PS).ys[:, 0]
    assert rel_err(shared, want) < 1e-3
    assert rel_err(rows, want) < 1e-3
    torch.testing.assert_close(rows, shared, rtol=1e-12, atol=0)


@pytest.mark.parametrize("batch_control", ["shared", "per_sample"])
@pytest.mark.parametrize("solver, tol", [("rk4", 1e-5), ("dopri8", 1e-9)])
def test_dense_output_inside_a_step_ending_on_a_jump(batch_control, solver, tol):
    """Dense output inside the step that ends on the jump: its dense stages at c = 1 see the
    left limit (they saw f at t = 1, the right value here: 2.4e-2 with rk4)."""
    q = [0.95, 1.0, 1.05]
    sol = neuralode.solve(decay_right, Y0, torch.tensor([0.0, 2.0], dtype=F64), solver=solver,
                          controller=ConstantStep(0.1, jump_t=(1.0,)), dense_output=True,
                          batch_control=batch_control)  # fmt: skip
    v = sol.evaluate(torch.tensor(q, dtype=F64))
    assert rel_err(v[:, 0], exact(Y0[0], q)) < tol


@pytest.mark.parametrize("gradient", ["checkpoint", "backsolve"])
@pytest.mark.parametrize("func, t_out", [(decay_left, T_OUT), (decay_right, [0, 0.95, 1, 2])])
def test_per_sample_jump_at_an_output_time_gradients(gradient, func, t_out):
    """y' = -k(t) y is linear: every output is y0 times a number, so d(sum ys)/dy0 is
    sum(ys) / y0 of the same discrete solve (Checkpointed replays it, outputs inside steps
    included; Backsolve approximates the continuous adjoint, exp(-int k))."""
    t = torch.tensor(t_out, dtype=F64)
    y0 = Y0.clone().requires_grad_()
    kw = dict(solver="rk4", controller=ConstantStep(0.1, jump_t=(1.0,)), gradient=gradient)
    ys = neuralode.solve(func, y0, t, **kw, **PS).ys
    (g,) = torch.autograd.grad(ys.sum(), y0)
    want = ys.detach().sum(0) / Y0 if gradient == "checkpoint" else exact(Y0 / Y0, t_out).sum(0)
    torch.testing.assert_close(g, want, rtol=1e-3 if gradient == "backsolve" else 1e-12, atol=0)


@pytest.mark.slow
def test_compiled_per_sample_jump_at_an_output_time():
    """Compiled per-sample stepping (one compile, ~30-60 s) honours the jump. With one sample
    it runs compiled: the chunk's times had stride T (a column of tau) in the first call and 1
    after, so the compiled code's guards failed and the solve fell back to the eager engine."""

    class Decay(torch.nn.Module):
        def forward(self, t, y):
            return decay_left(t, y)

    t = torch.tensor(T_OUT, dtype=F64)
    with torch.no_grad():
        sol = neuralode.solve(Decay(), Y0, t, solver="rk4", controller=ConstantStep(
            0.1, jump_t=(1.0,)), compile=True, **PS)  # fmt: skip
    assert sol.stats["compiled"] is True
    assert rel_err(sol.ys[:, 0], exact(Y0[0], T_OUT)) < 1e-3


# ======================================================================= max_events, counts
G = 9.81


def fall(t, y):
    return torch.stack([y[..., 1], torch.full_like(y[..., 1], -G)], dim=-1)


def bounce(e):
    return lambda t, y: torch.stack([y[..., 0] * 0, -e * y[..., 1]], -1)


def impacts(h0, e, n):
    """The first n impact times of a ball dropped from h0 with restitution e."""
    v1 = math.sqrt(2 * G * h0)
    times = [math.sqrt(2 * h0 / G)]
    for k in range(1, n):
        times.append(times[-1] + 2 * e**k * v1 / G)
    return times


TIGHT = dict(rtol=1e-10, atol=1e-12)


def test_max_events_stops_the_shared_solve_at_the_last_allowed_event():
    t = torch.linspace(0, 5, 11, dtype=F64)
    ev = Event(lambda t, y: y[..., 0].sum(), direction=-1, terminal=False, max_events=3,
               reset=bounce(0.8))  # fmt: skip
    sol = neuralode.solve(fall, torch.tensor([[1.0, 0.0]], dtype=F64), t, event=ev, **TIGHT)
    want = impacts(1.0, 0.8, 3)
    assert sol.status == "max_events" and "max_events=3" in sol.message
    torch.testing.assert_close(sol.event_t, torch.tensor(want, dtype=F64), atol=1e-9, rtol=0)
    assert abs(sol.t_final - want[-1]) < 1e-9
    after = t > want[-1]
    # the ball rests at the floor from its third impact on (the state there, before the reset)
    assert float(sol.ys[after, 0, 0].abs().max()) < 1e-9
    torch.testing.assert_close(sol.ys[after, 0, 1], sol.event_y[-1, 0, 1].expand(int(after.sum())))


def test_max_events_stops_each_sample_at_its_last_allowed_event():
    t = torch.linspace(0, 5, 11, dtype=F64)
    h0 = [1.0, 2.0]
    y0 = torch.tensor([[h, 0.0] for h in h0], dtype=F64)
    ev = Event(lambda t, y: y[:, 0], direction=-1, terminal=False, max_events=2,
               reset=bounce(0.8))  # fmt: skip
    sol = neuralode.solve(fall, y0, t, event=ev, **TIGHT, **PS)
    assert sol.status == "max_events" and "max_events=2" in sol.message
    want = torch.tensor([impacts(h, 0.8, 2) for h in h0], dtype=F64).T  # (K, B)
    torch.testing.assert_close(sol.event_t, want, atol=1e-9, rtol=0)
    torch.testing.assert_close(sol.t_final, want[-1], atol=1e-9, rtol=0)
    for b in range(2):
        after = t > want[-1, b]
        assert float(sol.ys[after, b, 0].abs().max()) < 1e-9  # at the floor, not through it


def test_event_failure_counts_the_attempts_of_the_whole_solve():
    """Zeno bouncing (restitution 0.5, no event limit hit first): the underflow message counts
    the step attempts of every segment, as the per-sample driver's does (108 on x86)."""
    t = torch.linspace(0, 5, 3, dtype=F64)
    y0 = torch.tensor([[1.0, 0.0]], dtype=F64)
    counts = {}
    for bc, fn in (("shared", lambda t, y: y[..., 0].sum()), ("per_sample", lambda t, y: y[:, 0])):
        ev = Event(fn, direction=-1, terminal=False, reset=bounce(0.5))
        with pytest.raises(neuralode.StepSizeUnderflowError) as info:
            neuralode.solve(fall, y0, t, event=ev, batch_control=bc, **TIGHT)
        counts[bc] = int(re.search(r"after (\d+) step attempts", str(info.value))[1])
        assert info.value.step == counts[bc]
    assert counts["shared"] > 50  # (was the last segment's count: 0)
    assert abs(counts["shared"] - counts["per_sample"]) <= 2


# ====================================================================== odeint_event, no event
def test_odeint_event_that_never_fires_raises():
    with pytest.raises(neuralode.SolveError, match="event_fn did not change sign up to t=1e"):
        neuralode.odeint_event(
            lambda t, y: -torch.ones_like(y), torch.tensor([0.0], dtype=F64),
            torch.tensor(0.0, dtype=F64), event_fn=lambda t, y: y[0] - 10.0,
        )  # fmt: skip


def test_odeint_event_that_fires_is_unchanged():
    et, ys = neuralode.odeint_event(
        lambda t, y: -torch.ones_like(y), torch.tensor([0.0], dtype=F64),
        torch.tensor(0.0, dtype=F64), event_fn=lambda t, y: y[0] + 2.5,
    )  # fmt: skip
    assert abs(float(et) - 2.5) < 1e-9 and abs(float(ys[-1, 0]) + 2.5) < 1e-9


# ================================================================== func's t in float32 solves
def test_float32_state_same_func_idiom_under_both_drivers():
    """y' = -(1 + t) y: y(1) = y0 exp(-1.5). func's t has the state's precision under
    per-sample control, so t[:, None] * y stays float32 (it was float64: TypeError)."""
    y0 = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    t = torch.linspace(0, 1, 3)
    seen = {}

    def rows(t, y):
        seen["per_sample"] = t.dtype
        return -y * (1 + t[:, None])

    def shared(t, y):
        seen["shared"] = t.dtype
        return -y * (1 + t)

    want = y0 * math.exp(-1.5)
    for f, bc in ((shared, "shared"), (rows, "per_sample")):
        sol = neuralode.solve(f, y0, t, batch_control=bc)
        assert sol.ys.dtype == torch.float32
        torch.testing.assert_close(sol.ys[-1], want, rtol=1e-5, atol=1e-6)
    assert seen == {"shared": torch.float64, "per_sample": torch.float32}


def test_per_sample_time_dtype_explicit_and_float64_state():
    seen = []

    def f(t, y):
        seen.append(t.dtype)
        return -y

    t = torch.linspace(0, 1, 3, dtype=F64)
    neuralode.solve(f, torch.ones(2, 1, dtype=F64), t, **PS)
    assert set(seen) == {torch.float64}
    seen.clear()
    neuralode.solve(f, torch.ones(2, 1), t, time_dtype=torch.float64, **PS)  # as asked
    assert set(seen) == {torch.float64}
