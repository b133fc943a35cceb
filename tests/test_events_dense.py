"""Dense output of event solves: ``solve(..., event=..., dense_output=True)`` then
``Solution.evaluate`` / ``evaluate_integral`` across events, under shared and per-sample control.

The reference is the bouncing ball, ``x'' = -g`` with the reset ``v -> -e v`` at ``x = 0``,
whose trajectory (and running integral of the height) has a closed form: before the first
impact ``x = h0 - g t^2 / 2``; after impact ``k`` (at ``t_k``) it leaves the floor at speed
``u_k = e^k sqrt(2 g h0)`` for a flight of ``2 u_k / g``. Written in torch, the closed form
also gives the exact gradients w.r.t. ``h0``, ``e`` and ``g``.
"""

from __future__ import annotations

import math

import pytest
import torch

import neuralode
from neuralode import Event

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
PS = dict(batch_control="per_sample")


def ball(tq: torch.Tensor, h0, e, g):
    """Closed form at times ``tq`` (Q,): height, velocity (right-continuous: after the
    bounce at an impact time), the integral of the height from 0, and the impact times."""
    h0, e, g = (torch.as_tensor(x, dtype=F64) for x in (h0, e, g))
    v1, tk = torch.sqrt(2 * g * h0), torch.sqrt(2 * h0 / g)
    x, v, q = h0 - g * tq**2 / 2, -g * tq, h0 * tq - g * tq**3 / 6
    qk, impacts = h0 * tk - g * tk**3 / 6, [tk]
    for k in range(1, 200):
        if float(tk.detach()) > float(tq.max()):
            break
        u = e**k * v1
        s = tq - tk
        after = s >= 0
        x = torch.where(after, u * s - g * s**2 / 2, x)
        v = torch.where(after, u - g * s, v)
        q = torch.where(after, qk + u * s**2 / 2 - g * s**3 / 6, q)
        span = 2 * u / g
        tk, qk = tk + span, qk + u * span**2 / 2 - g * span**3 / 6
        impacts.append(tk)
    return x, v, q, torch.stack(impacts)


def gravity(g):
    def f(t, y):  # y = (..., [height, velocity])
        return torch.stack([y[..., 1], -g * torch.ones_like(y[..., 1])], -1)

    return f


def bounce_event(e, per_sample: bool = False, floor=0.0, **kw):
    def reset(t, y):
        return y * torch.stack([torch.ones_like(e), -e])

    fn = (lambda t, y: y[:, 0] - floor) if per_sample else (lambda t, y: y[0] - floor)
    return Event(fn, direction=-1, terminal=False, reset=reset, **kw)


def away_from(tq: torch.Tensor, impacts: torch.Tensor, gap: float = 1e-6) -> torch.Tensor:
    """Mask of the query times farther than ``gap`` from every impact (the velocity jumps
    there: a query within the event-location error may fall on either side)."""
    return (tq.unsqueeze(1) - impacts.detach().unsqueeze(0)).abs().min(1).values > gap


# =========================================================================== shared control
def test_bouncing_ball_dense_output_matches_the_closed_form_across_bounces():
    h0, e, g = 1.0, 0.8, torch.tensor(9.81, dtype=F64)
    t = torch.linspace(0.0, 3.0, 7, dtype=F64)
    sol = neuralode.solve(gravity(g), torch.tensor([h0, 0.0], dtype=F64), t,
                          event=bounce_event(torch.tensor(e, dtype=F64)), dense_output=True,
                          **TOL)  # fmt: skip
    assert sol.event_t.shape == (6,)  # six bounces in [0, 3]
    tq = torch.linspace(0.0, 3.0, 1000, dtype=F64)
    x, v, _, impacts = ball(tq, h0, e, g)
    torch.testing.assert_close(sol.event_t, impacts[:6], atol=1e-9, rtol=0)
    yq = sol.evaluate(tq)
    assert yq.shape == (1000, 2)
    ok = away_from(tq, impacts)
    assert int(ok.sum()) >= 990
    torch.testing.assert_close(yq[ok, 0], x[ok], atol=1e-8, rtol=0)
    torch.testing.assert_close(yq[ok, 1], v[ok], atol=1e-8, rtol=0)
    # The dense output reproduces the outputs at t, and the solve's step times cover [0, 3].
    torch.testing.assert_close(sol.evaluate(t), sol.ys, atol=1e-12, rtol=0)
    st = sol.step_times
    assert st[0] == 0.0 and st[-1] == 3.0 and all(a < b for a, b in zip(st, st[1:]))


def test_at_an_event_time_evaluate_gives_the_state_after_the_reset():
    e, g = torch.tensor(0.8, dtype=F64), torch.tensor(9.81, dtype=F64)
    sol = neuralode.solve(gravity(g), torch.tensor([1.0, 0.0], dtype=F64),
                          torch.tensor([0.0, 2.0], dtype=F64), event=bounce_event(e),
                          dense_output=True, **TOL)  # fmt: skip
    for k in range(sol.event_t.shape[0]):
        te, ye = float(sol.event_t[k]), sol.event_y[k]
        after = sol.evaluate(te)
        torch.testing.assert_close(after, ye * torch.tensor([1.0, -0.8], dtype=F64), atol=1e-9,
                                   rtol=0)  # fmt: skip
        assert float(after[1]) > 0  # moving up: the bounce happened
        before = sol.evaluate(te - 1e-7)
        torch.testing.assert_close(before, ye, atol=1e-5, rtol=0)
        assert float(before[1]) < 0


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_at_the_max_events_th_event_the_solve_stops_before_the_reset(per_sample):
    e, g = torch.tensor(0.8, dtype=F64), torch.tensor(9.81, dtype=F64)
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    kw = PS if per_sample else {}
    sol = neuralode.solve(gravity(g), y0.unsqueeze(0) if per_sample else y0,
                          torch.tensor([0.0, 3.0], dtype=F64),
                          event=bounce_event(e, per_sample, max_events=2), **TOL, **kw)  # fmt: skip
    assert sol.status == "max_events"
    t2 = float(sol.event_t.reshape(-1)[1])
    _, _, _, impacts = ball(torch.tensor([3.0], dtype=F64), 1.0, 0.8, g)
    assert abs(t2 - float(impacts[1])) < 1e-9
    tq = torch.tensor([0.3, 1.0, t2], dtype=F64)
    yq = sol.evaluate(tq.unsqueeze(0) if per_sample else tq).reshape(3, 2)
    torch.testing.assert_close(yq[2], sol.event_y.reshape(2, 2)[1], atol=1e-9, rtol=0)
    assert float(yq[2, 1]) < 0  # still falling: no reset at the last event
    x, v, _, _ = ball(tq[:2], 1.0, 0.8, g)
    torch.testing.assert_close(yq[:2], torch.stack([x, v], 1), atol=1e-8, rtol=0)
    with pytest.raises(
        ValueError,
        match=r"outside (the|its) solved interval \[0\.0, 1\.17\d+\] "
        r"\(no extrapolation; (a sample's|the) solve stops at its Event\(max_events=2\)-th event\)",
    ):
        sol.evaluate(torch.tensor([[2.0]]) if per_sample else 2.0)  # fmt: skip


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["forward", "backward"])
def test_non_terminal_event_without_reset_equals_the_plain_dense_output(sign):
    # Harmonic oscillator y = (cos t, -sin t); events where cos t crosses zero, no reset: the
    # segments join into the same trajectory as the solve without events (forward in time, or
    # backward from 0 to -10).
    def osc(t, y):
        return torch.stack([y[1], -y[0]])

    y0, t = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 10.0 * sign], dtype=F64)
    ev = Event(lambda t, y: y[0], terminal=False)
    sol = neuralode.solve(osc, y0, t, event=ev, dense_output=True, rtol=1e-9, atol=1e-12)
    plain = neuralode.solve(osc, y0, t, dense_output=True, rtol=1e-9, atol=1e-12)
    expected = sign * (math.pi / 2 + math.pi * torch.arange(3, dtype=F64))
    torch.testing.assert_close(sol.event_t, expected, atol=1e-8, rtol=0)
    tq = torch.linspace(0.0, 10.0 * sign, 501, dtype=F64)
    yq = sol.evaluate(tq)
    torch.testing.assert_close(yq, plain.evaluate(tq), atol=1e-7, rtol=0)
    torch.testing.assert_close(yq, torch.stack([tq.cos(), -tq.sin()], 1), atol=1e-7, rtol=0)


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "non_terminal"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_an_event_that_never_fires_leaves_the_plain_dense_output(per_sample, terminal):
    y0, t = torch.tensor([[1.0], [2.0]], dtype=F64), torch.tensor([0.0, 2.0], dtype=F64)
    fn = (lambda t, y: y[:, 0] + 5) if per_sample else (lambda t, y: y[0, 0] + 5)
    kw = PS if per_sample else {}
    sol = neuralode.solve(lambda t, y: -y, y0, t, event=Event(fn, terminal=terminal), **kw)
    assert int((~torch.isnan(sol.event_t)).sum()) == 0
    tq = torch.linspace(0.0, 2.0, 9, dtype=F64)
    torch.testing.assert_close(sol.evaluate(tq)[..., 0], (-tq).exp().unsqueeze(1) * y0[:, 0],
                               atol=1e-6, rtol=0)  # fmt: skip


def test_terminal_event_evaluate_up_to_the_event_and_raises_past_it():
    g = torch.tensor(9.81, dtype=F64)
    ev = Event(lambda t, y: y[0], direction=-1)
    sol = neuralode.solve(gravity(g), torch.tensor([1.0, 0.0], dtype=F64),
                          torch.linspace(0.0, 2.0, 5, dtype=F64), event=ev, **TOL)  # fmt: skip
    t1 = math.sqrt(2 / 9.81)
    assert sol.status == "event" and abs(float(sol.event_t) - t1) < 1e-9
    tq = torch.linspace(0.0, t1 * (1 - 1e-9), 200, dtype=F64)
    x, v, _, _ = ball(tq, 1.0, 0.8, g)
    torch.testing.assert_close(sol.evaluate(tq), torch.stack([x, v], 1), atol=1e-9, rtol=0)
    # At the event time itself: the event state (no reset on a terminal event).
    torch.testing.assert_close(sol.evaluate(sol.event_t), sol.event_y, atol=1e-9, rtol=0)
    with pytest.raises(
        ValueError,
        match=r"at t=1\.0: outside the solved interval \[0\.0, 0\.45"
        r"\d+\] \(no extrapolation; a terminal event stops the solve there\)",
    ):
        sol.evaluate(torch.tensor([0.1, 1.0]))  # fmt: skip


def test_per_sample_terminal_events_under_shared_control_raise_per_sample():
    # Event function of shape (B,) under batch_control="shared": each sample's dense output
    # ends at its own event, as under per-sample control.
    g = torch.tensor(9.81, dtype=F64)
    y0 = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=F64)
    ev = Event(lambda t, y: y[:, 0], direction=-1)
    sol = neuralode.solve(gravity(g), y0, torch.linspace(0.0, 1.0, 3, dtype=F64), event=ev,
                          **TOL)  # fmt: skip
    stops = torch.sqrt(2 * y0[:, 0] / 9.81)
    torch.testing.assert_close(sol.event_t, stops, atol=1e-9, rtol=0)
    assert sol.evaluate(torch.tensor([0.1, 0.4])).shape == (2, 2, 2)
    with pytest.raises(ValueError, match=r"of sample 0 at t=0\.5: outside its solved interval"):
        sol.evaluate(torch.tensor([0.1, 0.5]))
    tq = torch.stack([torch.linspace(0.0, 0.45, 10), torch.linspace(0.0, 0.63, 10)]).to(F64)
    yq = sol.evaluate(tq)  # (B, Q) per-sample query -> (Q, B, 2)
    assert yq.shape == (10, 2, 2)
    for b in range(2):
        x, _, _, _ = ball(tq[b], float(y0[b, 0]), 0.8, g)
        torch.testing.assert_close(yq[:, b, 0], x, atol=1e-9, rtol=0)


def test_events_dense_output_is_on_by_default_with_direct_and_off_with_backsolve():
    g = torch.tensor(9.81, dtype=F64)
    args = (gravity(g), torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.5], dtype=F64))
    sol = neuralode.solve(*args, event=bounce_event(torch.tensor(0.8, dtype=F64)), **TOL)
    x, _, _, _ = ball(torch.tensor([1.0], dtype=F64), 1.0, 0.8, g)
    torch.testing.assert_close(sol.evaluate(1.0)[0], x[0], atol=1e-8, rtol=0)
    sol = neuralode.solve(*args, event=bounce_event(torch.tensor(0.8, dtype=F64)),
                          gradient="backsolve", **TOL)  # fmt: skip
    with pytest.raises(ValueError, match=r"has no dense output; solve with dense_output=True"):
        sol.evaluate(1.0)


@pytest.mark.parametrize("gradient", ["backsolve", "checkpoint"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_detached_dense_output_of_an_event_solve_carries_no_partial_gradient(gradient, per_sample):
    # Later segments start from the (differentiable) state after a reset: the values must still
    # come back detached, as the warning says, not with a gradient through that start only.
    e, g = torch.tensor(0.8, dtype=F64), torch.tensor(9.81, dtype=F64)
    y0 = torch.tensor([[1.0, 0.0], [2.0, 0.0]] if per_sample else [1.0, 0.0], dtype=F64)
    y0.requires_grad_(True)
    sol = neuralode.solve(gravity(g), y0, torch.tensor([0.0, 2.0], dtype=F64),
                          event=bounce_event(e, per_sample), gradient=gradient, dense_output=True,
                          **TOL, **(PS if per_sample else {}))  # fmt: skip
    with pytest.warns(UserWarning, match="detached values"):
        y = sol.evaluate(torch.tensor([0.3, 1.0, 1.9], dtype=F64))
    assert not y.requires_grad
    for b, h in enumerate((1.0, 2.0) if per_sample else (1.0,)):
        x, _, _, _ = ball(torch.tensor([0.3, 1.0, 1.9], dtype=F64), h, 0.8, g)
        torch.testing.assert_close(y[:, b, 0] if per_sample else y[:, 0], x, atol=1e-8, rtol=0)


def test_backsolve_event_dense_output_warns_that_it_is_detached():
    e, g = torch.tensor(0.8, dtype=F64), torch.tensor(9.81, dtype=F64)
    y0 = torch.tensor([1.0, 0.0], dtype=F64, requires_grad=True)
    sol = neuralode.solve(gravity(g), y0, torch.tensor([0.0, 1.5], dtype=F64),
                          event=bounce_event(e), gradient="backsolve", dense_output=True, **TOL)  # fmt: skip
    assert sol.ys.requires_grad
    with pytest.warns(UserWarning, match="detached values"):
        y = sol.evaluate(1.0)
    assert not y.requires_grad
    x, _, _, _ = ball(torch.tensor([1.0], dtype=F64), 1.0, 0.8, g)
    torch.testing.assert_close(y[0], x[0], atol=1e-8, rtol=0)


def _grads(per_sample: bool):
    """d/d(h0, e, g, c) of the sum of the heights evaluated at a few times across three bounces
    on a floor at height c (a parameter of the event function), through the solver and through
    the closed form (``c + ball(h0 - c)``)."""
    h0 = torch.tensor([1.0, 1.6], dtype=F64) if per_sample else torch.tensor(1.0, dtype=F64)
    h0.requires_grad_(True)
    e = torch.tensor(0.8, dtype=F64, requires_grad=True)
    g = torch.tensor(9.81, dtype=F64, requires_grad=True)
    c = torch.tensor(0.1, dtype=F64, requires_grad=True)
    tq = torch.tensor([0.2, 0.7, 0.95, 1.3, 1.8], dtype=F64)
    y0 = torch.stack([h0, torch.zeros_like(h0)], -1)
    kw = PS if per_sample else {}
    sol = neuralode.solve(gravity(g), y0, torch.tensor([0.0, 2.0], dtype=F64),
                          event=bounce_event(e, per_sample, c), dense_output=True, **TOL, **kw)  # fmt: skip
    got = torch.autograd.grad(sol.evaluate(tq)[..., 0].sum(), (h0, e, g, c))
    hs = h0.unbind() if per_sample else [h0]
    ref = sum((c + ball(tq, h - c, e, g)[0]).sum() for h in hs)
    for h in hs:  # the queries stay clear of the impacts and span two bounces or more
        impacts = ball(tq, float(h.detach()) - 0.1, 0.8, 9.81)[3]
        assert bool(away_from(tq, impacts, 2e-2).all()) and float(impacts[1]) < float(tq[-1])
    want = torch.autograd.grad(ref, (h0, e, g, c))
    return got, want


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_gradients_through_evaluate_across_bounces_match_the_closed_form(per_sample):
    got, want = _grads(per_sample)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# =========================================================================== per-sample control
def test_per_sample_bouncing_balls_with_different_heights_match_the_closed_form():
    h0 = [1.0, 2.0, 0.5]
    e, g = torch.tensor(0.8, dtype=F64), torch.tensor(9.81, dtype=F64)
    y0 = torch.tensor([[h, 0.0] for h in h0], dtype=F64)
    t = torch.linspace(0.0, 2.5, 4, dtype=F64)  # (h0 = 0.5 has bounced 100 times by 2.87)
    sol = neuralode.solve(gravity(g), y0, t, event=bounce_event(e, True), dense_output=True,
                          **TOL, **PS)  # fmt: skip
    tq = torch.linspace(0.0, 2.5, 1000, dtype=F64)
    yq = sol.evaluate(tq)  # shared query: every sample at every time
    assert yq.shape == (1000, 3, 2)
    for b, h in enumerate(h0):
        x, v, _, impacts = ball(tq, h, 0.8, g)
        n = int((~torch.isnan(sol.event_t[:, b])).sum())
        torch.testing.assert_close(sol.event_t[:n, b], impacts[:n], atol=1e-9, rtol=0)
        assert float(impacts[n]) > 2.5  # every impact in [0, 2.5] was found
        ok = away_from(tq, impacts)
        torch.testing.assert_close(yq[ok, b, 0], x[ok], atol=1e-8, rtol=0)
        torch.testing.assert_close(yq[ok, b, 1], v[ok], atol=1e-8, rtol=0)
        # At each of its event times: the state after the bounce.
        after = sol.evaluate(sol.event_t[:n, b].expand(3, n))[:, b]
        torch.testing.assert_close(after, sol.event_y[:n, b] * torch.tensor([1.0, -0.8], dtype=F64),
                                   atol=1e-9, rtol=0)  # fmt: skip
    torch.testing.assert_close(sol.evaluate(t), sol.ys, atol=1e-12, rtol=0)
    assert len(sol.step_times) == 3 and all(st[-1] == 2.5 for st in sol.step_times)


def test_per_sample_query_shapes_and_errors():
    e, g = torch.tensor(0.8, dtype=F64), torch.tensor(9.81, dtype=F64)
    y0 = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=F64)
    sol = neuralode.solve(gravity(g), y0, torch.tensor([0.0, 2.0], dtype=F64),
                          event=bounce_event(e, True), **TOL, **PS)  # fmt: skip
    assert sol.evaluate(0.5).shape == (2, 2)  # a scalar time: (B, 2)
    assert sol.evaluate(torch.tensor([0.5, 1.0, 1.5])).shape == (3, 2, 2)
    assert sol.evaluate(torch.rand(2, 7, dtype=F64) * 2).shape == (7, 2, 2)  # (B, Q) -> (Q, B, 2)
    with pytest.raises(
        ValueError, match=r"per-sample query t has 3 rows but the solve has batch 2"
    ):
        sol.evaluate(torch.zeros(3, 4, dtype=F64))
    with pytest.raises(
        ValueError,
        match=r"of sample 1 at t=2\.5: outside its solved interval "
        r"\[0\.0, 2\.0\]",
    ):
        sol.evaluate(torch.tensor([[1.0], [2.5]], dtype=F64))  # fmt: skip


def test_per_sample_terminal_events_raise_past_each_samples_own_event():
    g = torch.tensor(9.81, dtype=F64)
    y0 = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=F64)
    ev = Event(lambda t, y: y[:, 0], direction=-1)
    sol = neuralode.solve(gravity(g), y0, torch.tensor([0.0, 1.0], dtype=F64), event=ev,
                          dense_output=True, **TOL, **PS)  # fmt: skip
    stops = torch.sqrt(2 * y0[:, 0] / 9.81)
    torch.testing.assert_close(sol.event_t, stops, atol=1e-9, rtol=0)
    torch.testing.assert_close(sol.evaluate(sol.event_t.unsqueeze(1))[0], sol.event_y,
                               atol=1e-9, rtol=0)  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"of sample 0 at t=0\.5: outside its solved interval "
        r"\[0\.0, 0\.45\d+\] \(no extrapolation; a terminal event stops",
    ):
        sol.evaluate(torch.tensor([[0.5], [0.5]], dtype=F64))  # fmt: skip


def test_per_sample_tuple_state_across_bounces():
    e, g = torch.tensor(0.8, dtype=F64), torch.tensor(9.81, dtype=F64)

    def f(t, y):
        return (y[1], -g * torch.ones_like(y[1]))

    ev = Event(lambda t, y: y[0][:, 0], direction=-1, terminal=False,
               reset=lambda t, y: (y[0], -e * y[1]))  # fmt: skip
    y0 = (torch.tensor([[1.0], [2.0]], dtype=F64), torch.zeros(2, 1, dtype=F64))
    sol = neuralode.solve(f, y0, torch.tensor([0.0, 2.5], dtype=F64), event=ev, **TOL, **PS)
    tq = torch.linspace(0.0, 2.5, 300, dtype=F64)
    x, v = sol.evaluate(tq)
    assert x.shape == v.shape == (300, 2, 1)
    for b, h in enumerate((1.0, 2.0)):
        xr, vr, _, impacts = ball(tq, h, 0.8, g)
        ok = away_from(tq, impacts)
        torch.testing.assert_close(x[ok, b, 0], xr[ok], atol=1e-8, rtol=0)
        torch.testing.assert_close(v[ok, b, 0], vr[ok], atol=1e-8, rtol=0)


# =========================================================================== integrals
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_evaluate_integral_across_bounces(per_sample):
    # The integral of the height: continuous through the bounces (a reset leaves it alone).
    e, g = torch.tensor(0.8, dtype=F64), torch.tensor(9.81, dtype=F64)
    hs = [1.0, 2.0] if per_sample else [1.0]
    y0 = torch.tensor([[h, 0.0] for h in hs], dtype=F64)
    y0 = y0 if per_sample else y0[0]
    kw = PS if per_sample else {}
    sol = neuralode.solve(gravity(g), y0, torch.tensor([0.0, 2.5], dtype=F64),
                          event=bounce_event(e, per_sample), integral=lambda t, y: y[..., :1],
                          dense_output=True, **TOL, **kw)  # fmt: skip
    tq = torch.linspace(0.0, 2.5, 400, dtype=F64)
    q = sol.evaluate_integral(tq)
    assert q.shape == ((400, 2, 1) if per_sample else (400, 1))
    yq = sol.evaluate(tq)
    for b, h in enumerate(hs):
        x, _, qr, impacts = ball(tq, h, 0.8, g)
        ok = away_from(tq, impacts)
        got_q = q[:, b, 0] if per_sample else q[:, 0]
        got_x = yq[:, b, 0] if per_sample else yq[:, 0]
        torch.testing.assert_close(got_q, qr, atol=1e-8, rtol=0)
        torch.testing.assert_close(got_x[ok], x[ok], atol=1e-8, rtol=0)


def test_out_of_range_message_names_the_event_only_when_it_ended_the_solve():
    """(Reviewer) A successful solve queried outside [t0, t1], or a query before t0, must not
    blame max_events or a terminal event; a query past an early stop names it."""

    def fall(t, y):
        return torch.stack([y[..., 1], torch.full_like(y[..., 1], -9.81)], -1)

    def bounce(t, y):
        return torch.stack([y[..., 0], -0.8 * y[..., 1]], -1)

    y0 = torch.tensor([[1.0, 0.0], [1.5, 0.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    ev = neuralode.Event(lambda t, y: y[..., 0], direction=-1, terminal=False, reset=bounce)
    sol = neuralode.solve(fall, y0, t, event=ev, batch_control="per_sample")
    assert sol.status == "success"
    for q in (1.5, -0.1):
        with pytest.raises(ValueError, match=r"\[0\.0, 1\.0\] \(no extrapolation\)$"):
            sol.evaluate(torch.tensor([q], dtype=torch.float64))
    once = neuralode.Event(lambda t, y: y[..., 0], direction=-1, terminal=False, max_events=1,
                           reset=bounce)  # fmt: skip
    sol = neuralode.solve(fall, y0, 2 * t, event=once, batch_control="per_sample")
    with pytest.raises(ValueError, match=r"max_events=1\)-th event\)$"):
        sol.evaluate(torch.tensor([1.9], dtype=torch.float64))
    term = neuralode.Event(lambda t, y: y[0], direction=-1)
    sol = neuralode.solve(fall, y0[0], t, event=term)
    with pytest.raises(ValueError, match=r"\(no extrapolation\)$"):
        sol.evaluate(torch.tensor([-0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match="a terminal event stops the solve there"):
        sol.evaluate(torch.tensor([0.9], dtype=torch.float64))
