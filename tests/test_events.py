"""Events: location, gradients, non-terminal events with resets, errors, the torchdiffeq face.

Every check compares numbers with a closed form, a finite difference or torchdiffeq (where
torchdiffeq is right); none only runs the code. Problems are chosen so that the exact event time
is known:

* free fall ``h'' = -g``: ``t* = (v0 + sqrt(v0^2 + 2 g h0)) / g`` (``sqrt(2 h0 / g)`` when dropped);
* decay ``y' = -k y`` to a threshold ``h``: ``t* = ln(y0 / h) / k``;
* the harmonic oscillator ``y = (sin t, cos t)``: zero crossings at multiples of pi;
* ``y' = 1`` and ``y' = 3 t^2`` with rk4, which integrates (and interpolates) them exactly, so
  the position of a crossing inside a step is known to rounding.

Closed-form gradients come from the implicit function theorem applied to those formulas.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import neuralode
from neuralode import Event

F64 = torch.float64
G = 9.81  # m/s^2
TIGHT = dict(rtol=1e-10, atol=1e-12)
GRADIENTS = ["direct", "backsolve", "checkpoint"]


def val(x) -> float:
    """A 0-d (or one-element) tensor as a float, detached."""
    return float(x.detach())


def tensor(*values, requires_grad=False):
    return torch.tensor(values if len(values) != 1 else values[0], dtype=F64).requires_grad_(
        requires_grad
    )


# --------------------------------------------------------------------------- vector fields
def free_fall(t, y):
    """Batch of balls, y: (B, 2) = (height, velocity)."""
    return torch.stack([y[:, 1], torch.full_like(y[:, 1], -G)], dim=-1)


def ball(t, y):
    """One ball, y: (2,) = (height, velocity)."""
    return torch.stack([y[1], torch.full_like(y[1], -G)])


def oscillator(t, y):
    """y'' = -y as a first-order system; y0 = (0, 1) gives y = (sin t, cos t)."""
    return torch.stack([y[1], -y[0]])


def one(t, y):
    return torch.ones_like(y)


class Decay(nn.Module):
    """y' = -k y with a learnable rate k."""

    def __init__(self, k: float):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k, dtype=F64))

    def forward(self, t, y):
        return -self.k * y


def drop_time(h0, v0=0.0):
    """First time a ball thrown from height h0 with upward velocity v0 reaches the ground."""
    return (v0 + math.sqrt(v0 * v0 + 2 * G * h0)) / G


# =========================================================================== analytic event times
def test_free_fall_per_sample_event_times_and_states():
    """Two balls dropped from 1 m and 4 m: each stops at its own impact, the other keeps falling."""
    t1, t2 = drop_time(1.0), drop_time(4.0)
    assert t1 == pytest.approx(0.4515, abs=1e-4) and t2 == pytest.approx(0.9030, abs=1e-4)
    # Output times on both sides of each impact, and exactly at ball 1's impact.
    times = sorted({*torch.linspace(0.0, 1.2, 25).tolist(), t1})
    t = torch.tensor(times, dtype=F64)
    y0 = tensor([[1.0, 0.0], [4.0, 0.0]])
    sol = neuralode.solve(free_fall, y0, t, event=Event(lambda t, y: y[:, 0], direction=-1))

    assert sol.status == "event"
    assert sol.event_t.shape == (2,)
    torch.testing.assert_close(sol.event_t, tensor([t1, t2]), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        sol.event_y, tensor([[0.0, -G * t1], [0.0, -G * t2]]), atol=1e-10, rtol=0
    )
    assert sol.ys.shape == (len(times), 2, 2)
    for j, tj in enumerate(times):
        for b, (h0, ts) in enumerate(((1.0, t1), (4.0, t2))):
            s = min(tj, ts)  # a sample that has hit the ground stays at its event state
            want = tensor([h0 - G * s * s / 2, -G * s])
            torch.testing.assert_close(sol.ys[j, b], want, atol=1e-10, rtol=0)
    # Ball 2 is not stopped at ball 1's impact: at t1 it is at 4 - 1 = 3 m and still falling,
    # and between the impacts it keeps moving while ball 1 rests at its event state.
    j1 = times.index(t1)
    torch.testing.assert_close(sol.ys[j1, 1], tensor([3.0, -G * t1]), atol=1e-10, rtol=0)
    between = [j for j, tj in enumerate(times) if t1 < tj < t2]
    assert len(between) >= 5
    heights2 = sol.ys[between, 1, 0]
    assert bool((heights2[1:] < heights2[:-1]).all())
    torch.testing.assert_close(
        sol.ys[between, 0], sol.event_y[0].expand(len(between), 2), atol=0, rtol=0
    )


@pytest.mark.parametrize("y0,k,h", [(1.0, 1.0, 0.5), (3.0, 0.7, 0.2), (2.0, 2.5, 1.9)])
def test_exponential_decay_to_threshold(y0, k, h):
    """y' = -k y reaches h at ln(y0/h)/k; later outputs hold the event state (terminal event)."""
    t_star = math.log(y0 / h) / k
    t = torch.linspace(0.0, 2.0 * t_star, 9, dtype=F64)
    sol = neuralode.solve(
        lambda t, y: -k * y, tensor([y0]), t, event=Event(lambda t, y: y[0] - h), **TIGHT
    )
    assert sol.status == "event"
    assert val(sol.event_t) == pytest.approx(t_star, abs=1e-9)
    assert sol.t_final == pytest.approx(t_star, abs=1e-9)
    torch.testing.assert_close(sol.event_y, tensor([h]), atol=1e-9, rtol=0)
    want = torch.where(t < t_star, y0 * torch.exp(-k * t), torch.full_like(t, h))
    torch.testing.assert_close(sol.ys[:, 0], want, atol=1e-9, rtol=0)


def test_zero_of_the_event_function_at_t0_is_not_an_event():
    """sin t is zero at t0 = 0; the first crossing after t0 is at pi."""
    sol = neuralode.solve(
        oscillator, tensor([0.0, 1.0]), tensor([0.0, 5.0]), event=Event(lambda t, y: y[0]), **TIGHT
    )
    assert val(sol.event_t) == pytest.approx(math.pi, abs=1e-9)
    torch.testing.assert_close(sol.event_y, tensor([0.0, -1.0]), atol=1e-9, rtol=0)


def test_zero_at_t0_differs_from_torchdiffeq():
    """Documented difference: torchdiffeq reports the zero at t0 itself as the event."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    y0, t = tensor([0.0, 1.0]), tensor([0.0, 1.0])
    t_td, _ = torchdiffeq.odeint(oscillator, y0, t, event_fn=lambda t, y: y[0], **TIGHT)
    t_nl, sol = neuralode.odeint(oscillator, y0, t, event_fn=lambda t, y: y[0], **TIGHT)
    assert float(t_td) == 0.0
    assert val(t_nl) == pytest.approx(math.pi, abs=1e-9)
    torch.testing.assert_close(sol[1], tensor([0.0, -1.0]), atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    "which,direction,want",
    [
        # cos t: falls through zero at pi/2, rises at 3 pi/2
        ("cos", 0, math.pi / 2),
        ("cos", -1, math.pi / 2),
        ("cos", 1, 3 * math.pi / 2),
        # sin t - 1/2: rises at pi/6, falls at 5 pi/6
        ("sin-1/2", 0, math.pi / 6),
        ("sin-1/2", 1, math.pi / 6),
        ("sin-1/2", -1, 5 * math.pi / 6),
    ],
)
def test_direction_selects_the_crossing(which, direction, want):
    fn = {"cos": lambda t, y: y[1], "sin-1/2": lambda t, y: y[0] - 0.5}[which]
    sol = neuralode.solve(
        oscillator,
        tensor([0.0, 1.0]),
        tensor([0.0, 7.0]),
        event=Event(fn, direction=direction),
        **TIGHT,
    )
    assert val(sol.event_t) == pytest.approx(want, abs=1e-9)
    torch.testing.assert_close(
        sol.event_y, tensor([math.sin(want), math.cos(want)]), atol=1e-9, rtol=0
    )


# =========================================================================== event-time gradients
# y' = -k y, y(0) = y0, event y = h:  t* = ln(y0/h) / k
#   dt*/dh = -1/(k h)  (-2 at k = 1, h = 0.5),  dt*/dy0 = 1/(k y0),  dt*/dk = -t*/k
def decay_closed_form(y0, k, h):
    t_star = math.log(y0 / h) / k
    return t_star, {"h": -1.0 / (k * h), "y0": 1.0 / (k * y0), "k": -t_star / k}


DECAY_CASES = [(1.0, 1.0, 0.5), (2.0, 1.5, 0.3)]


@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("y0v,kv,hv", DECAY_CASES)
def test_event_time_gradients_solve(gradient, y0v, kv, hv):
    func = Decay(kv)
    h = tensor(hv, requires_grad=True)
    y0 = tensor([y0v], requires_grad=True)
    sol = neuralode.solve(
        func,
        y0,
        tensor([0.0, 10.0]),
        gradient=gradient,
        event=Event(lambda t, y: y[0] - h),
        **TIGHT,
    )
    t_star, want = decay_closed_form(y0v, kv, hv)
    assert val(sol.event_t) == pytest.approx(t_star, abs=1e-9)
    g_h, g_y0, g_k = torch.autograd.grad(sol.event_t, (h, y0, func.k))
    assert val(g_h) == pytest.approx(want["h"], rel=1e-7)
    assert val(g_y0) == pytest.approx(want["y0"], rel=1e-7)
    assert val(g_k) == pytest.approx(want["k"], rel=1e-7)


@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
@pytest.mark.parametrize("y0v,kv,hv", DECAY_CASES)
def test_event_time_gradients_odeint_event(interface, y0v, kv, hv):
    func = Decay(kv)
    h = tensor(hv, requires_grad=True)
    y0 = tensor([y0v], requires_grad=True)
    t_ev, traj = neuralode.odeint_event(
        func,
        y0,
        tensor(0.0),
        event_fn=lambda t, y: y[0] - h,
        odeint_interface=getattr(neuralode, interface),
        **TIGHT,
    )
    t_star, want = decay_closed_form(y0v, kv, hv)
    assert val(t_ev) == pytest.approx(t_star, abs=1e-9)
    torch.testing.assert_close(traj.detach(), tensor([[y0v], [hv]]), atol=1e-9, rtol=0)
    g_h, g_y0, g_k = torch.autograd.grad(t_ev, (h, y0, func.k))
    assert val(g_h) == pytest.approx(want["h"], rel=1e-7)
    assert val(g_y0) == pytest.approx(want["y0"], rel=1e-7)
    assert val(g_k) == pytest.approx(want["k"], rel=1e-7)


def test_event_fn_parameter_gradient_where_torchdiffeq_has_none():
    """dt*/dh = -2 at h = 0.5; torchdiffeq's odeint_event leaves h without a gradient."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    out = {}
    for name, mod in (("neuralode", neuralode), ("torchdiffeq", torchdiffeq)):
        func = Decay(1.0)
        h = tensor(0.5, requires_grad=True)
        y0 = tensor([1.0], requires_grad=True)
        t_ev, _ = mod.odeint_event(
            func, y0, tensor(0.0), event_fn=lambda t, y, h=h: y[0] - h, **TIGHT
        )
        out[name] = torch.autograd.grad(t_ev, (h, y0, func.k), allow_unused=True)
    g_h, g_y0, g_k = out["neuralode"]
    td_h, td_y0, td_k = out["torchdiffeq"]
    assert val(g_h) == pytest.approx(-2.0, rel=1e-7)
    assert td_h is None
    # Where torchdiffeq gives a gradient it agrees.
    assert val(g_y0) == pytest.approx(val(td_y0), rel=1e-6)
    assert val(g_k) == pytest.approx(val(td_k), rel=1e-6)


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_event_time_gradient_matches_finite_differences(gradient):
    """A non-autonomous problem without a hand-derived formula: y' = -k y + sin t, event y = h."""

    class Forced(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(tensor(0.8))

        def forward(self, t, y):
            return -self.k * y + torch.sin(t)

    def event_time(y0v, kv, hv, grad=False):
        func = Forced()
        with torch.no_grad():
            func.k.fill_(kv)
        h = tensor(hv, requires_grad=grad)
        y0 = tensor([y0v], requires_grad=grad)
        sol = neuralode.solve(
            func,
            y0,
            tensor([0.0, 10.0]),
            gradient=gradient,
            event=Event(lambda t, y: y[0] - h, direction=-1),
            rtol=1e-12,
            atol=1e-14,
        )
        if not grad:
            return val(sol.event_t)
        return torch.autograd.grad(sol.event_t, (y0, func.k, h))

    p = (2.0, 0.8, 0.9)
    auto = [float(g) for g in event_time(*p, grad=True)]
    eps = 1e-5
    for i in range(3):
        hi = list(p)
        lo = list(p)
        hi[i] += eps
        lo[i] -= eps
        fd = (event_time(*hi) - event_time(*lo)) / (2 * eps)
        assert auto[i] == pytest.approx(fd, rel=1e-5, abs=1e-7), (i, auto[i], fd)


@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("v0", [(0.0, 0.0), (0.5, -1.0)])
def test_per_sample_event_time_gradients(gradient, v0):
    """dt*/dh0 = 1/(g t* - v0) (= 1/(g t*) when dropped), dt*/dv0 = t*/(g t* - v0), per sample."""
    y0 = tensor([[1.0, v0[0]], [4.0, v0[1]]], requires_grad=True)
    sol = neuralode.solve(
        free_fall,
        y0,
        tensor([0.0, 0.3, 3.0]),
        gradient=gradient,
        event=Event(lambda t, y: y[:, 0], direction=-1),
    )
    ts = [drop_time(1.0, v0[0]), drop_time(4.0, v0[1])]
    torch.testing.assert_close(sol.event_t.detach(), tensor(ts), atol=1e-12, rtol=0)
    for b in range(2):
        (jac,) = torch.autograd.grad(sol.event_t[b], y0, retain_graph=True)
        denom = G * ts[b] - v0[b]
        want = torch.zeros(2, 2, dtype=F64)
        want[b] = tensor([1.0 / denom, ts[b] / denom])
        torch.testing.assert_close(jac, want, atol=1e-10, rtol=1e-8)
    # The event state includes the motion of t*: v* = -sqrt(v0^2 + 2 g h0), so
    # dv*/dh0 = g / v*, dv*/dv0 = v0 / v*; the output at t = 3 (past both impacts) holds it.
    for b in range(2):
        vstar = -math.sqrt(v0[b] ** 2 + 2 * G * val(y0[b, 0]))
        want = torch.zeros(2, 2, dtype=F64)
        want[b] = tensor([G / vstar, v0[b] / vstar])
        (jac_ev,) = torch.autograd.grad(sol.event_y[b, 1], y0, retain_graph=True)
        (jac_out,) = torch.autograd.grad(sol.ys[-1, b, 1], y0, retain_graph=True)
        torch.testing.assert_close(jac_ev, want, atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(jac_out, want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_event_state_gradient_includes_motion_of_event_time(gradient):
    """Oscillator from y0 = (a, b), event y[0] = c: gradient of y(t*) against finite differences.

    At y0 = (0, 1) the event state is (c, sqrt(1 - c^2)), so d y*[1]/dc = -c / sqrt(1 - c^2):
    y*[1] depends on c only through t*, so this is zero unless the motion of t* is included.
    """

    def event_state(a, b, cv, grad=False):
        y0 = tensor([a, b], requires_grad=grad)
        c = tensor(cv, requires_grad=grad)
        sol = neuralode.solve(
            oscillator,
            y0,
            tensor([0.0, 4.0]),
            gradient=gradient,
            event=Event(lambda t, y: y[0] - c),
            rtol=1e-12,
            atol=1e-14,
        )
        if not grad:
            return sol.event_y.detach()
        rows = [
            torch.cat(
                [
                    g.reshape(-1)
                    for g in torch.autograd.grad(sol.event_y[i], (y0, c), retain_graph=True)
                ]
            )
            for i in range(2)
        ]
        return torch.stack(rows)  # (2 outputs, 3 inputs: a, b, c)

    p = [0.0, 1.0, 0.6]
    jac = event_state(*p, grad=True)
    assert float(jac[1, 2]) == pytest.approx(-0.6 / 0.8, rel=1e-7)
    assert float(jac[0, 2]) == pytest.approx(1.0, rel=1e-7)  # y*[0] = c
    eps = 1e-5
    fd = torch.zeros(2, 3, dtype=F64)
    for i in range(3):
        hi, lo = list(p), list(p)
        hi[i] += eps
        lo[i] -= eps
        fd[:, i] = (event_state(*hi) - event_state(*lo)) / (2 * eps)
    torch.testing.assert_close(jac, fd, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_event_function_that_uses_autograd(gradient):
    """g = dV/dq - c with V(q) = k q^2 / 2 differentiated by torch.autograd.grad inside g.

    q = cos t, so g = k cos t - c and t* = arccos(c/k); at k = 2, c = 1: t* = pi/3,
    dt*/dc = -1/(k sin t*) = -1/sqrt(3), dt*/dk = cos t*/(k sin t*) = 1/(2 sqrt(3)).
    """
    k = tensor(2.0, requires_grad=True)
    c = tensor(1.0, requires_grad=True)

    def force_minus_c(t, y):
        # The monitor calls g without grad; the differentiable re-attachment calls it with a
        # state on the graph. create_graph keeps dV/dq differentiable w.r.t. q and k.
        with torch.enable_grad():
            q = y[0]
            q = q if q.requires_grad else q.detach().requires_grad_()
            potential = 0.5 * k * q**2
            (dv_dq,) = torch.autograd.grad(potential, q, create_graph=True)
        return dv_dq - c

    sol = neuralode.solve(
        oscillator,
        tensor([1.0, 0.0]),
        tensor([0.0, 3.0]),
        gradient=gradient,
        event=Event(force_minus_c),
        **TIGHT,
    )
    assert val(sol.event_t) == pytest.approx(math.pi / 3, abs=1e-9)
    g_k, g_c = torch.autograd.grad(sol.event_t, (k, c))
    assert val(g_c) == pytest.approx(-1 / math.sqrt(3), rel=1e-7)
    assert val(g_k) == pytest.approx(1 / (2 * math.sqrt(3)), rel=1e-7)


# =========================================================================== non-terminal events
def test_non_terminal_events_record_every_crossing():
    """Zero crossings of sin on [0, 10] at pi, 2 pi, 3 pi; the solution is not disturbed."""
    t = torch.linspace(0.0, 10.0, 41, dtype=F64)
    sol = neuralode.solve(
        oscillator, tensor([0.0, 1.0]), t, event=Event(lambda t, y: y[0], terminal=False), **TIGHT
    )
    assert sol.status == "success"
    torch.testing.assert_close(
        sol.event_t, tensor([math.pi, 2 * math.pi, 3 * math.pi]), atol=1e-9, rtol=0
    )
    torch.testing.assert_close(
        sol.event_y, tensor([[0.0, -1.0], [0.0, 1.0], [0.0, -1.0]]), atol=1e-9, rtol=0
    )
    torch.testing.assert_close(sol.ys, torch.stack([t.sin(), t.cos()], -1), atol=1e-8, rtol=0)


E = 0.8  # coefficient of restitution
H0 = 1.0


def bounce_reset(t, y):
    return y * tensor([1.0, -E])


def impact_times(n):
    """t1 = sqrt(2 h / g); t_{k+1} = t_k + 2 e^k v1 / g with v1 = sqrt(2 g h)."""
    v1 = math.sqrt(2 * G * H0)
    out = [math.sqrt(2 * H0 / G)]
    for k in range(1, n):
        out.append(out[-1] + 2 * E**k * v1 / G)
    return out


def bounce_height(t, impacts):
    """Analytic height at t, with bounces at the given impact times only (none after)."""
    if t <= impacts[0]:
        return H0 - G * t * t / 2
    k = max(i for i, ti in enumerate(impacts) if ti <= t)  # last impact before t
    s = t - impacts[k]
    return E ** (k + 1) * math.sqrt(2 * G * H0) * s - G * s * s / 2


@pytest.mark.parametrize("direction", [-1, 0])
def test_bouncing_ball_impacts_and_heights(direction):
    """Resets flip the velocity; impacts and heights follow the analytic piecewise parabola.

    direction=0 must give the same impacts: after a reset the ball leaves the ground upward from
    the zero of g at the restart time, which (like a zero at t0) is not a new crossing.
    """
    t = torch.linspace(0.0, 3.0, 61, dtype=F64)
    sol = neuralode.solve(
        ball,
        tensor([H0, 0.0]),
        t,
        event=Event(lambda t, y: y[0], direction=direction, terminal=False, reset=bounce_reset),
        **TIGHT,
    )
    want = impact_times(6)
    assert want[-1] < 3.0 < want[-1] + 2 * E**6 * math.sqrt(2 * G * H0) / G
    torch.testing.assert_close(sol.event_t, tensor(want), atol=1e-9, rtol=0)
    # Event states are taken before the reset: height 0, velocity -e^(k-1) v1.
    v1 = math.sqrt(2 * G * H0)
    torch.testing.assert_close(
        sol.event_y,
        torch.stack([torch.zeros(6, dtype=F64), -v1 * E ** torch.arange(6, dtype=F64)], -1),
        atol=1e-9,
        rtol=0,
    )
    heights = tensor([bounce_height(x, want) for x in t.tolist()])
    torch.testing.assert_close(sol.ys[:, 0], heights, atol=1e-9, rtol=0)


def test_max_events_is_respected():
    """At the max_events-th impact the solve stops (status "max_events"): later outputs hold
    the state at that impact, the ball does not fall through the floor."""
    t = torch.linspace(0.0, 3.0, 61, dtype=F64)
    sol = neuralode.solve(
        ball,
        tensor([H0, 0.0]),
        t,
        event=Event(
            lambda t, y: y[0], direction=-1, terminal=False, reset=bounce_reset, max_events=3
        ),
        **TIGHT,
    )
    want = impact_times(3)
    assert sol.event_t.shape == (3,)
    assert sol.status == "max_events" and "max_events=3" in sol.message
    torch.testing.assert_close(sol.event_t, tensor(want), atol=1e-9, rtol=0)
    before = t < want[-1]
    heights = tensor([bounce_height(x, want) for x in t[before].tolist()])
    torch.testing.assert_close(sol.ys[before, 0], heights, atol=1e-9, rtol=0)
    assert float(sol.ys[~before, 0].abs().max()) < 1e-9  # at the floor from the third impact


# =========================================================================== crossings inside steps
def test_crossing_inside_a_long_adaptive_step():
    """Loose tolerances give long steps; a crossing well inside one of them is found."""
    loose = dict(rtol=1e-3, atol=1e-6)
    y0, t = tensor([0.0, 1.0]), tensor([0.0, 5.0])
    ref = neuralode.solve(oscillator, y0, t, dense_output=True, **loose)  # the same steps
    sol = neuralode.solve(oscillator, y0, t, event=Event(lambda t, y: y[0]), **loose)
    t_star = val(sol.event_t)
    steps = ref.step_times
    i = max(j for j, s in enumerate(steps) if s < t_star)
    lo, hi = steps[i], steps[i + 1]
    frac = (t_star - lo) / (hi - lo)
    assert hi - lo > 0.5  # a long step ...
    # ... with the crossing well inside it, away from the end and the interior check points.
    assert 0.05 < frac < 0.95 and min(abs(frac - 1 / 3), abs(frac - 2 / 3)) > 0.05
    # pi to within the accuracy of the loose solve, and the reported event state on the event
    # surface (g(t*, y*) = 0) to rounding.
    assert abs(t_star - math.pi) < 2e-3
    assert abs(val(sol.event_y[0])) < 1e-12
    # Consistent with the continuous extension of the same steps to the solve's accuracy. (Not
    # to rounding: the reported time is the located root moved by one Newton step on the
    # differentiable re-solve that ends there, see neuralode.events._reroute.)
    assert abs(val(ref.evaluate(t_star)[0])) < 1e-4


def test_crossing_inside_a_fixed_step_is_exact_when_the_interpolant_is():
    """y' = 3 t^2 (y = t^3) with rk4 and one step [0, 1]: y = 0.2 at 0.2^(1/3) ~ 0.585."""
    sol = neuralode.solve(
        lambda t, y: 3 * t**2 * torch.ones_like(y),
        tensor([0.0]),
        tensor([0.0, 2.0]),
        solver="rk4",
        dt=1.0,
        event=Event(lambda t, y: y[0] - 0.2),
    )
    assert val(sol.event_t) == pytest.approx(0.2 ** (1 / 3), abs=1e-14)
    torch.testing.assert_close(sol.event_y, tensor([0.2]), atol=1e-14, rtol=0)


def double_crossing(y):
    # y = t: positive at 0, negative on (0.8, 1.3), positive after -- both crossings lie inside
    # the step [0, 3] and g has the same sign at both step ends (g(0) = 1.04, g(3) = 3.74).
    return (y[0] - 0.8) * (y[0] - 1.3)


@pytest.mark.parametrize("direction,want", [(0, 0.8), (-1, 0.8), (1, 1.3)])
def test_double_crossing_within_one_step(direction, want):
    """The pair (0.8, 1.3) straddles the interior check point at t = 1 (1/3 of the step).

    What cannot be guaranteed: a pair of crossings that both lie between two check points
    (see the next test).
    """
    assert double_crossing(tensor([0.0])) > 0 and double_crossing(tensor([3.0])) > 0
    assert double_crossing(tensor([1.0])) < 0
    sol = neuralode.solve(
        one,
        tensor([0.0]),
        tensor([0.0, 6.0]),
        solver="rk4",
        dt=3.0,
        event=Event(lambda t, y: double_crossing(y), direction=direction),
    )
    assert sol.stats["nfe"] == 4  # the differentiable solve took a single rk4 step
    assert val(sol.event_t) == pytest.approx(want, abs=1e-13)


def test_double_crossing_between_two_check_points_is_not_guaranteed():
    """Documented limitation: g = (t - 0.2)(t - 0.5) has both roots in (0, 1), i.e. between the
    check points 0 and 1/3 of a step of 3, so g is positive at every check point and the pair is
    not seen. A shorter step finds it."""
    fn = lambda t, y: (y[0] - 0.2) * (y[0] - 0.5)  # noqa: E731
    coarse = neuralode.solve(
        one, tensor([0.0]), tensor([0.0, 6.0]), solver="rk4", dt=3.0, event=Event(fn)
    )
    assert coarse.status == "success" and math.isnan(float(coarse.event_t))
    fine = neuralode.solve(
        one, tensor([0.0]), tensor([0.0, 6.0]), solver="rk4", dt=0.25, event=Event(fn)
    )
    assert fine.status == "event"
    assert float(fine.event_t) == pytest.approx(0.2, abs=1e-13)


def test_non_terminal_double_crossing_within_one_step():
    """Both crossings of the pair are recorded: after the event at 0.8, g is negative and comes
    back up at 1.3, inside the first third of the next step [0.8, 3.8]."""
    sol = neuralode.solve(
        one,
        tensor([0.0]),
        tensor([0.0, 6.0]),
        solver="rk4",
        dt=3.0,
        event=Event(lambda t, y: double_crossing(y), terminal=False),
    )
    torch.testing.assert_close(sol.event_t, tensor([0.8, 1.3]), atol=1e-13, rtol=0)


# =========================================================================== bad inputs
def test_event_rejects_invalid_settings():
    fn = lambda t, y: y[0]  # noqa: E731
    with pytest.raises(ValueError, match=r"direction=\.\.\.\) must be -1, 0 or 1, got 2"):
        Event(fn, direction=2)
    with pytest.raises(ValueError, match="reset=.*needs terminal=False"):
        Event(fn, reset=lambda t, y: y, terminal=True)
    with pytest.raises(ValueError, match="max_events=.*positive integer, got 0"):
        Event(fn, terminal=False, max_events=0)
    with pytest.raises(TypeError, match=r"fn=\.\.\.\) must be callable"):
        Event("y[0]")
    with pytest.raises(TypeError, match="reset=.*must be callable"):
        Event(fn, terminal=False, reset="flip")


def test_solve_rejects_bad_event_inputs():
    y0 = tensor([[1.0, 0.0], [4.0, 0.0]])
    t = tensor([0.0, 1.0])
    with pytest.raises(TypeError, match="event must be a neuralode.Event"):
        neuralode.solve(free_fall, y0, t, event=lambda t, y: y[:, 0])
    with pytest.raises(ValueError, match=r"per-sample events of shape \(B,\) must be terminal"):
        neuralode.solve(free_fall, y0, t, event=Event(lambda t, y: y[:, 0], terminal=False))
    with pytest.raises(ValueError, match=r"returned shape \(4,\); it must return a 0-d tensor"):
        neuralode.solve(free_fall, y0, t, event=Event(lambda t, y: y.reshape(-1)))
    with pytest.raises(ValueError, match=r"returned shape \(2, 1\); it must return a 0-d"):
        neuralode.solve(free_fall, y0, t, event=Event(lambda t, y: y[:, :1]))
    with pytest.raises(TypeError, match="returned float; it must return a tensor"):
        neuralode.solve(free_fall, y0, t, event=Event(lambda t, y: float(y[0, 0])))
    with pytest.raises(ValueError, match=r"needs a 1-D t"):
        neuralode.solve(
            free_fall, y0, torch.stack([t, t]), event=Event(lambda t, y: y[:, 0], direction=-1)
        )


def test_event_output_shape_change_during_the_solve_is_rejected():
    def changes_shape(t, y):
        g = y[:, 0] - 0.5
        return g if float(t) == 0.0 else torch.cat([g, g[:1]])

    with pytest.raises(ValueError, match=r"returned shape \(3,\); per-sample events need shape"):
        neuralode.solve(
            one, torch.zeros(2, 1, dtype=F64), tensor([0.0, 1.0]), event=Event(changes_shape)
        )


def test_tangential_crossing_is_not_differentiable():
    """sign(y - 1/2) changes sign but has zero derivative: the IFT gradient does not exist.

    Without a gradient to compute, the located time is returned; when one is needed the solve
    says why it cannot give it.
    """
    ev = Event(lambda t, y: torch.sign(y[0] - 0.5))
    sol = neuralode.solve(one, tensor([0.0]), tensor([0.0, 1.0]), event=ev)
    assert abs(float(sol.event_t) - 0.5) < 1e-10
    y0 = tensor([0.0]).requires_grad_()
    with pytest.raises(RuntimeError, match="zero time derivative .* tangential crossing"):
        neuralode.solve(one, y0, tensor([0.0, 1.0]), event=ev)


def test_scipy_solver_has_no_events():
    with pytest.raises(ValueError, match="scipy_solver' does not support event_fn"):
        neuralode.odeint(
            oscillator,
            tensor([0.0, 1.0]),
            tensor([0.0, 1.0]),
            method="scipy_solver",
            event_fn=lambda t, y: y[0],
        )


# =========================================================================== torchdiffeq face
def test_odeint_event_fn_returns_event_time_and_stacked_solution():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    y0, t = tensor([0.0, 1.0]), tensor([0.0, 1.0])
    fn = lambda t, y: y[0] - 0.5  # noqa: E731  sin t = 1/2 at pi/6
    t_nl, sol_nl = neuralode.odeint(oscillator, y0, t, event_fn=fn, **TIGHT)
    t_td, sol_td = torchdiffeq.odeint(oscillator, y0, t, event_fn=fn, **TIGHT)
    assert sol_nl.shape == (2, 2)
    assert torch.equal(sol_nl[0], y0)
    assert val(t_nl) == pytest.approx(math.pi / 6, abs=1e-9)
    torch.testing.assert_close(sol_nl[1], tensor([0.5, math.sqrt(3) / 2]), atol=1e-9, rtol=0)
    assert val(t_nl) == pytest.approx(float(t_td), abs=1e-8)
    torch.testing.assert_close(sol_nl, sol_td, atol=1e-8, rtol=0)


def test_odeint_event_fn_tuple_state_matches_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")

    def tuple_fall(t, y):
        return y[1], torch.full_like(y[1], -G)

    y0 = (tensor([2.0]), tensor([0.0]))
    fn = lambda t, y: y[0][0]  # noqa: E731
    t_nl, sol_nl = neuralode.odeint(tuple_fall, y0, tensor([0.0, 1.0]), event_fn=fn, **TIGHT)
    t_td, sol_td = torchdiffeq.odeint(tuple_fall, y0, tensor([0.0, 1.0]), event_fn=fn, **TIGHT)
    assert val(t_nl) == pytest.approx(drop_time(2.0), abs=1e-12)
    assert val(t_nl) == pytest.approx(float(t_td), abs=1e-8)
    assert isinstance(sol_nl, tuple) and len(sol_nl) == 2
    for a, b in zip(sol_nl, sol_td):
        assert a.shape == b.shape == (2, 1)
        torch.testing.assert_close(a, b, atol=1e-8, rtol=0)
    torch.testing.assert_close(sol_nl[1][1], tensor([-G * drop_time(2.0)]), atol=1e-10, rtol=0)


@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
def test_odeint_event_reverse_time(interface):
    """Backward from t0 = 0, sin t first equals c = 1/2 at t* = -7 pi / 6.

    With y = y0[0] cos t + y0[1] sin t: dt*/dy0 = -(cos t*, sin t*) / cos t* = (-1, tan(7 pi/6))
    and dt*/dc = 1 / cos t* = -2 / sqrt(3). torchdiffeq agrees on y0 and has no gradient for c.
    """
    torchdiffeq = pytest.importorskip("torchdiffeq")
    t_star = -7 * math.pi / 6
    res = {}
    for name, mod in (("neuralode", neuralode), ("torchdiffeq", torchdiffeq)):
        y0 = tensor([0.0, 1.0], requires_grad=True)
        c = tensor(0.5, requires_grad=True)
        kw = dict(odeint_interface=getattr(mod, interface))
        if interface == "odeint_adjoint":
            kw["adjoint_params"] = ()
        t_ev, traj = mod.odeint_event(
            oscillator,
            y0,
            tensor(0.0),
            event_fn=lambda t, y, c=c: y[0] - c,
            reverse_time=True,
            **kw,
            **TIGHT,
        )
        grads = torch.autograd.grad(t_ev, (y0, c), allow_unused=True)
        res[name] = (val(t_ev), traj.detach(), *grads)
    t_nl, traj_nl, gy0_nl, gc_nl = res["neuralode"]
    t_td, traj_td, gy0_td, gc_td = res["torchdiffeq"]
    assert t_nl == pytest.approx(t_star, abs=1e-9)
    assert t_nl == pytest.approx(t_td, abs=1e-8)
    want_state = tensor([0.0, 1.0], [0.5, math.cos(t_star)])
    torch.testing.assert_close(traj_nl, want_state, atol=1e-9, rtol=0)
    torch.testing.assert_close(traj_nl, traj_td, atol=1e-8, rtol=0)
    torch.testing.assert_close(gy0_nl, tensor([-1.0, math.tan(-t_star)]), atol=1e-8, rtol=0)
    torch.testing.assert_close(gy0_nl, gy0_td, atol=1e-6, rtol=0)
    assert val(gc_nl) == pytest.approx(-2 / math.sqrt(3), rel=1e-7)
    assert gc_td is None


def test_odeint_event_per_sample_times():
    """An event_fn of shape (B,) gives each sample its own event time (a neuralode extension)."""
    y0 = tensor([[1.0, 0.0], [4.0, 0.0]], requires_grad=True)
    t_ev, traj = neuralode.odeint_event(
        free_fall, y0, tensor(0.0), event_fn=lambda t, y: y[:, 0], **TIGHT
    )
    ts = tensor([drop_time(1.0), drop_time(4.0)])
    torch.testing.assert_close(t_ev.detach(), ts, atol=1e-12, rtol=0)
    assert traj.shape == (2, 2, 2)
    torch.testing.assert_close(
        traj[1].detach(), torch.stack([0 * ts, -G * ts], -1), atol=1e-10, rtol=0
    )
    (g,) = torch.autograd.grad(t_ev.sum(), y0)
    torch.testing.assert_close(g[:, 0], 1 / (G * ts), atol=0, rtol=1e-8)
