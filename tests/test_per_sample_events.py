"""Events under per-sample step control (``batch_control="per_sample"``, ``event=...``).

Each check compares numbers with a closed form, a float64 finite difference or the shared
(host-float) driver solving the same problem, never only that the code runs. Problems:

* free fall ``h'' = -g``: impact at ``t* = (v0 + sqrt(v0^2 + 2 g h0)) / g``, with
  ``dt*/dh0 = 1 / (g t* - v0)`` and ``dt*/dv0 = t* / (g t* - v0)``;
* decay ``y' = -k y`` (k a state component, or a parameter) to a level ``c``:
  ``t* = t0 + ln(y0 / c) / k``, ``dt*/dy0 = 1 / (k y0)``, ``dt*/dk = -(t* - t0) / k``,
  ``dt*/dc = -1 / (k c)``;
* the oscillator ``y = (a cos t + b sin t, ...)``: zero crossings of ``y[0]`` every pi;
* the bouncing ball with restitution ``e``: impacts from the analytic piecewise parabola.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import neuralode
from neuralode import Event

F64 = torch.float64
G = 9.81
PS = dict(batch_control="per_sample")
TIGHT = dict(rtol=1e-10, atol=1e-12)
GRADIENTS = ["direct", "checkpoint", "backsolve"]


def tensor(x, requires_grad=False):
    return torch.tensor(x, dtype=F64).requires_grad_(requires_grad)


def free_fall(t, y):
    return torch.stack([y[:, 1], torch.full_like(y[:, 1], -G)], dim=-1)


def drop_time(h0, v0=0.0):
    return (v0 + math.sqrt(v0 * v0 + 2 * G * h0)) / G


def decay_with_rate(t, y):
    """y: (B, 2) = (value, rate k); y' = -k y, k' = 0."""
    return torch.stack([-y[:, 1] * y[:, 0], torch.zeros_like(y[:, 0])], -1)


def oscillator(t, y):
    return torch.stack([y[:, 1], -y[:, 0]], -1)


def ground(t, y):
    return y[:, 0]


# =========================================================================== terminal events
def test_free_fall_terminal_events_match_closed_form_and_shared_path():
    """Balls hit the ground at their own times; one never does (100 m within 1.2 s)."""
    h0 = [1.0, 4.0, 100.0, 2.0]
    y0 = tensor([[h, 0.0] for h in h0])
    t = torch.linspace(0.0, 1.2, 13, dtype=F64)
    ev = Event(ground, direction=-1)
    sol = neuralode.solve(free_fall, y0, t, event=ev, **PS)
    ref = neuralode.solve(free_fall, y0, t, event=ev)  # shared driver, per-sample events
    want = tensor([drop_time(1.0), drop_time(4.0), math.nan, drop_time(2.0)])
    torch.testing.assert_close(sol.event_t, want, atol=1e-12, rtol=0, equal_nan=True)
    torch.testing.assert_close(sol.event_t, ref.event_t, atol=1e-12, rtol=0, equal_nan=True)
    assert sol.status == "success"  # one sample had no event
    assert sol.ys.shape == (13, 4, 2)
    for j, tj in enumerate(t.tolist()):
        for b, h in enumerate(h0):
            ts = want[b].item()
            s = tj if math.isnan(ts) else min(tj, ts)  # after its event a sample holds still
            torch.testing.assert_close(sol.ys[j, b], tensor([h - G * s * s / 2, -G * s]),
                                       atol=1e-10, rtol=0)  # fmt: skip
    torch.testing.assert_close(sol.ys, ref.ys, atol=1e-10, rtol=0)
    torch.testing.assert_close(sol.event_y, ref.event_y, atol=1e-10, rtol=0)
    torch.testing.assert_close(
        sol.t_final, torch.where(torch.isnan(want), 1.2, want), atol=1e-12, rtol=0
    )
    assert sol.stats["nfe_event_location"] > 0 and sol.stats["n_event_fn"] > 0
    # Every sample fired: status "event".
    all_hit = neuralode.solve(free_fall, y0[:2], t, event=ev, **PS)
    assert all_hit.status == "event"


def test_many_samples_with_compaction_match_the_closed_form():
    """40 balls from random heights and velocities: the working set is compacted as samples
    stop at their events; every impact time matches the closed form, the high ones never hit."""
    gen = torch.Generator().manual_seed(3)
    h0 = 0.2 + 10.0 * torch.rand(40, generator=gen, dtype=F64)
    v0 = 4.0 * torch.rand(40, generator=gen, dtype=F64) - 2.0
    y0 = torch.stack([h0, v0], 1)
    sol = neuralode.solve(free_fall, y0, tensor([0.0, 1.0]), event=Event(ground), **PS, **TIGHT)
    want = tensor([drop_time(h, v) for h, v in zip(h0.tolist(), v0.tolist())])
    want = torch.where(want <= 1.0, want, math.nan)
    assert 5 < int(torch.isnan(want).sum()) < 35
    torch.testing.assert_close(sol.event_t, want, atol=1e-10, rtol=0, equal_nan=True)


def test_per_sample_event_with_a_running_cost_integral():
    """integral= with per-sample events: the integral of y up to each event (y' = -y reaching
    1/2 at ln(2 y0)): y0 - 1/2."""
    y0 = tensor([[1.0], [2.0]])
    sol = neuralode.solve(lambda t, y: -y, y0, tensor([0.0, 3.0]), integral=lambda t, y: y,
                          event=Event(lambda t, y: y[:, 0] - 0.5), **PS, **TIGHT)  # fmt: skip
    torch.testing.assert_close(sol.event_t, tensor([math.log(2.0), math.log(4.0)]), atol=1e-9,
                               rtol=0)  # fmt: skip
    torch.testing.assert_close(sol.event_integral, tensor([[0.5], [1.5]]), atol=1e-9, rtol=0)


def test_decay_to_a_level_on_per_sample_grids_with_different_starts():
    """2-D t: rows start at different times; t* = t0_b + ln(y0/c)/k_b for each sample."""
    c = 0.25
    y0 = tensor([[1.0, 1.0], [2.0, 0.5], [3.0, 2.0], [0.2, 1.0]])  # the last starts below c
    t = tensor([[0.0, 1.0, 2.0, 4.0], [1.0, 2.0, 5.0, 8.0], [-1.0, -0.5, 0.0, 3.0],
                [0.0, 1.0, 2.0, 3.0]])  # fmt: skip
    sol = neuralode.solve(decay_with_rate, y0, t, event=Event(lambda t, y: y[:, 0] - c), **PS,
                          **TIGHT)  # fmt: skip
    want = [t[b, 0].item() + math.log(y0[b, 0].item() / c) / y0[b, 1].item() for b in range(3)]
    torch.testing.assert_close(sol.event_t, tensor(want + [math.nan]), atol=1e-9, rtol=0,
                               equal_nan=True)  # fmt: skip
    torch.testing.assert_close(sol.event_y[:3, 0], tensor([c] * 3), atol=1e-9, rtol=0)
    # Outputs before the event follow the closed form, later ones hold the level c.
    for b in range(4):
        for j in range(4):
            tj, y00, k = t[b, j].item(), y0[b, 0].item(), y0[b, 1].item()
            v = y00 * math.exp(-k * (tj - t[b, 0].item()))
            want_v = max(v, c) if b < 3 else v
            assert sol.ys[j, b, 0].item() == pytest.approx(want_v, abs=1e-8)


def test_reverse_time_rows_and_direction():
    """A row integrating backward in time finds its crossing (rising in reverse: direction=1
    on g = c - y, which rises as y grows going back from t0)."""
    y0 = tensor([[0.5, 1.0], [0.5, 1.0]])
    t = tensor([[0.0, 3.0], [0.0, -3.0]])  # forward the value decays, backward it grows
    up = Event(lambda t, y: y[:, 0] - 1.0, direction=1)  # crosses 1 only going backward
    sol = neuralode.solve(decay_with_rate, y0, t, event=up, **PS, **TIGHT)
    torch.testing.assert_close(sol.event_t, tensor([math.nan, -math.log(2.0)]), atol=1e-9,
                               rtol=0, equal_nan=True)  # fmt: skip
    down = Event(lambda t, y: y[:, 0] - 1.0, direction=-1)  # the same crossing is rising
    sol = neuralode.solve(decay_with_rate, y0, t, event=down, **PS, **TIGHT)
    assert bool(torch.isnan(sol.event_t).all())


def test_zero_at_the_initial_time_is_not_an_event():
    """g(t0) = 0 for sample 0: its next crossing (at pi) is the event, as on the shared path."""
    y0 = tensor([[0.0, 1.0], [1.0, 0.0]])
    t = tensor([0.0, 5.0])
    sol = neuralode.solve(oscillator, y0, t, event=Event(ground), **PS, **TIGHT)
    torch.testing.assert_close(sol.event_t, tensor([math.pi, math.pi / 2]), atol=1e-9, rtol=0)


def test_tuple_state_and_time_dependent_event_function():
    """A tuple state; g depends on each row's own time t (A,): h - 0.1 t crosses per row."""

    def fall(t, y):
        h, v = y
        return v, torch.full_like(v, -G)

    y0 = (tensor([[1.0], [4.0]]), tensor([[0.0], [0.0]]))
    ev = Event(lambda t, y: y[0][:, 0] - 0.1 * t, direction=-1)
    sol = neuralode.solve(fall, y0, tensor([0.0, 2.0]), event=ev, **PS, **TIGHT)
    ref = neuralode.solve(fall, y0, tensor([0.0, 2.0]), event=ev, **TIGHT)
    # h0 - g t^2 / 2 = 0.1 t
    want = [(-0.1 + math.sqrt(0.01 + 2 * G * h)) / G for h in (1.0, 4.0)]
    torch.testing.assert_close(sol.event_t, tensor(want), atol=1e-9, rtol=0)
    torch.testing.assert_close(sol.event_t, ref.event_t, atol=1e-9, rtol=0)
    assert isinstance(sol.ys, tuple) and sol.ys[0].shape == (2, 2, 1)
    torch.testing.assert_close(sol.event_y[0][:, 0], 0.1 * tensor(want), atol=1e-9, rtol=0)


def test_crossing_inside_a_long_step_with_a_method_with_dense_stages():
    """dopri8's continuous extension needs extra stages; loose tolerances, long steps."""
    y0 = tensor([[0.0, 1.0], [0.0, 2.0]])
    sol = neuralode.solve(oscillator, y0, tensor([0.0, 5.0]), solver="dopri8",
                          event=Event(ground), rtol=1e-6, atol=1e-9, **PS)  # fmt: skip
    torch.testing.assert_close(sol.event_t, tensor([math.pi] * 2), atol=1e-6, rtol=0)


# =========================================================================== gradients
@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("v0", [(0.0, 0.0), (0.5, -1.0)])
def test_event_time_and_state_gradients_free_fall(gradient, v0):
    y0 = tensor([[1.0, v0[0]], [4.0, v0[1]]], requires_grad=True)
    sol = neuralode.solve(free_fall, y0, tensor([0.0, 0.3, 3.0]), gradient=gradient,
                          event=Event(ground, direction=-1), **PS)  # fmt: skip
    ts = [drop_time(1.0, v0[0]), drop_time(4.0, v0[1])]
    torch.testing.assert_close(sol.event_t.detach(), tensor(ts), atol=1e-12, rtol=0)
    for b in range(2):
        (jac,) = torch.autograd.grad(sol.event_t[b], y0, retain_graph=True)
        denom = G * ts[b] - v0[b]
        want = torch.zeros(2, 2, dtype=F64)
        want[b] = tensor([1.0 / denom, ts[b] / denom])
        torch.testing.assert_close(jac, want, atol=1e-10, rtol=1e-8)
        # v* = -sqrt(v0^2 + 2 g h0): the event state moves with t*; the output at t = 3
        # (past both impacts) holds it.
        vstar = -math.sqrt(v0[b] ** 2 + 2 * G * y0[b, 0].item())
        want = torch.zeros(2, 2, dtype=F64)
        want[b] = tensor([G / vstar, v0[b] / vstar])
        (jac_ev,) = torch.autograd.grad(sol.event_y[b, 1], y0, retain_graph=True)
        (jac_out,) = torch.autograd.grad(sol.ys[-1, b, 1], y0, retain_graph=True)
        torch.testing.assert_close(jac_ev, want, atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(jac_out, want, atol=1e-10, rtol=1e-8)


class Decay(nn.Module):
    """y' = -k y with a learnable rate k shared by the batch."""

    def __init__(self, k):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k, dtype=F64))

    def forward(self, t, y):
        return -self.k * y


class Level(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c, dtype=F64))

    def forward(self, t, y):
        return y[:, 0] - self.c


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_event_time_gradients_with_respect_to_parameters_of_func_and_event(gradient):
    """dt*/dk = -(t* - t0)/k (func's parameter), dt*/dc = -1/(k c) (the event's), dt*/dy0."""
    k, c = 0.8, 0.3
    func, level = Decay(k), Level(c)
    y0 = tensor([[1.0], [2.0], [0.2]], requires_grad=True)  # the last never crosses
    t = tensor([[0.0, 1.0, 6.0], [0.5, 1.0, 6.0], [0.0, 1.0, 6.0]])
    sol = neuralode.solve(func, y0, t, gradient=gradient, event=Event(level), **PS, **TIGHT)
    d = [math.log(v / c) / k for v in (1.0, 2.0)]
    want_t = tensor([d[0], 0.5 + d[1], math.nan])
    torch.testing.assert_close(sol.event_t.detach(), want_t, atol=1e-9, rtol=0, equal_nan=True)
    loss = sol.event_t[0] + 2.0 * sol.event_t[1]
    g_k, g_c, g_y0 = torch.autograd.grad(loss, [func.k, level.c, y0])
    assert g_k.item() == pytest.approx(-(d[0] + 2.0 * d[1]) / k, rel=1e-7)
    assert g_c.item() == pytest.approx(-3.0 / (k * c), rel=1e-7)
    torch.testing.assert_close(g_y0, tensor([[1 / (k * 1.0)], [2.0 / (k * 2.0)], [0.0]]),
                               atol=1e-9, rtol=1e-7)  # fmt: skip


def test_event_time_gradients_agree_with_the_shared_path_on_a_neural_field():
    """A small MLP field: per-sample event times and their gradients equal the shared path's
    (same problem; agreement to the tolerance)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).to(F64)

    def field(t, y):
        return net(y) + tensor([0.0, -1.0])  # drifts downward: y[:, 1] crosses -0.5

    y0 = tensor([[0.1, 0.0], [-0.2, 0.3], [0.3, 0.1]], requires_grad=True)
    t = tensor([0.0, 0.5, 4.0])
    ev = Event(lambda t, y: y[:, 1] + 0.5, direction=-1)
    outs = []
    for kw in (PS, {}):
        sol = neuralode.solve(field, y0, t, event=ev, **kw, **TIGHT)
        loss = sol.event_t.sum() + sol.ys[-1].square().sum()
        outs.append((sol.event_t.detach(), torch.autograd.grad(loss, [y0, *net.parameters()])))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-8, rtol=0)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_event_time_gradient_with_respect_to_t0():
    """Autonomous decay: t* = t0 + ln(y0/c)/k, so dt*/dt0 = 1 (through the shifted start)."""
    t = tensor([[0.2, 5.0], [1.0, 5.0]], requires_grad=True)
    y0 = tensor([[1.0, 1.0], [2.0, 0.5]])
    sol = neuralode.solve(decay_with_rate, y0, t, event=Event(lambda t, y: y[:, 0] - 0.5),
                          **PS, **TIGHT)  # fmt: skip
    (g,) = torch.autograd.grad(sol.event_t.sum(), t)
    torch.testing.assert_close(g, tensor([[1.0, 0.0], [1.0, 0.0]]), atol=1e-8, rtol=0)


# =========================================================================== non-terminal events
def test_non_terminal_crossings_per_sample_and_solution_undisturbed():
    """y = (a cos t + b sin t): crossings every pi from each sample's first; rows of different
    lengths record different numbers of events (NaN-padded, time-major (K, B))."""
    y0 = tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    t = tensor([[0.0, 2.0, 10.0], [0.0, 3.0, 5.0], [0.0, 0.5, 1.0]])  # sample 2: none
    ev = Event(ground, terminal=False)
    sol = neuralode.solve(oscillator, y0, t, event=ev, **PS, **TIGHT)
    nan = math.nan
    want = tensor([[math.pi, math.pi / 2, nan], [2 * math.pi, 1.5 * math.pi, nan],
                   [3 * math.pi, nan, nan]])  # fmt: skip
    assert sol.event_t.shape == (3, 3) and sol.status == "success"
    torch.testing.assert_close(sol.event_t, want, atol=1e-9, rtol=0, equal_nan=True)
    torch.testing.assert_close(sol.event_y[:, :, 0].nan_to_num(), torch.zeros(3, 3, dtype=F64),
                               atol=1e-9, rtol=0)  # fmt: skip
    plain = neuralode.solve(oscillator, y0, t, **PS, **TIGHT)
    torch.testing.assert_close(sol.ys, plain.ys, atol=1e-8, rtol=0)


E = 0.8


def bounce(t, y):
    return y * tensor([1.0, -E])


@pytest.mark.parametrize("direction", [-1, 0])
def test_bouncing_balls_with_resets_match_the_shared_path_per_sample(direction):
    """Per-sample resets; each sample equals the shared driver's whole-state solve of it."""
    y0 = tensor([[1.0, 0.0], [2.0, 1.0], [0.5, -1.0]])
    t = torch.linspace(0.0, 2.5, 26, dtype=F64)
    ev = Event(ground, direction=direction, terminal=False, reset=bounce)
    sol = neuralode.solve(free_fall, y0, t, event=ev, **PS, **TIGHT)

    def one(t, y):
        return torch.stack([y[1], torch.full_like(y[1], -G)])

    ev1 = Event(lambda t, y: y[0], direction=direction, terminal=False,
                reset=lambda t, y: y * tensor([1.0, -E]))  # fmt: skip
    for b in range(3):
        ref = neuralode.solve(one, y0[b], t, event=ev1, **TIGHT)
        n = ref.event_t.shape[0]
        assert n >= 2
        torch.testing.assert_close(sol.event_t[:n, b], ref.event_t, atol=1e-9, rtol=0)
        assert bool(torch.isnan(sol.event_t[n:, b]).all())
        torch.testing.assert_close(sol.event_y[:n, b], ref.event_y, atol=1e-9, rtol=0)
        torch.testing.assert_close(sol.ys[:, b], ref.ys, atol=1e-9, rtol=0)


def test_max_events_per_sample():
    y0 = tensor([[1.0, 0.0], [2.0, 0.0]])
    ev = Event(ground, direction=-1, terminal=False, reset=bounce, max_events=2)
    sol = neuralode.solve(free_fall, y0, tensor([0.0, 3.0]), event=ev, **PS, **TIGHT)
    assert sol.event_t.shape == (2, 2)
    assert bool(torch.isfinite(sol.event_t).all())
    assert sol.status == "max_events"  # each sample stops at its second impact
    torch.testing.assert_close(sol.t_final, sol.event_t[-1])
    assert float(sol.ys[-1, :, 0].abs().max()) < 1e-9  # at the floor, not through it


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_non_terminal_event_time_gradients_match_finite_differences(gradient):
    """The second impact of a bouncing ball depends on h0 through both segments."""
    ev = Event(ground, direction=-1, terminal=False, reset=bounce)

    def second_impacts(y0, grad):
        return neuralode.solve(free_fall, y0, tensor([0.0, 2.0]), event=ev, gradient=gradient,
                               **PS, **TIGHT).event_t[1]  # fmt: skip

    y0 = tensor([[1.0, 0.0], [1.5, 0.5]], requires_grad=True)
    (g,) = torch.autograd.grad(second_impacts(y0, True).sum(), y0)
    eps = 1e-6
    fd = torch.zeros(2, 2, dtype=F64)
    with torch.no_grad():
        for b in range(2):
            for i in range(2):
                hi, lo = y0.detach().clone(), y0.detach().clone()
                hi[b, i] += eps
                lo[b, i] -= eps
                fd[b, i] = (second_impacts(hi, False)[b] - second_impacts(lo, False)[b]) / (2 * eps)
    torch.testing.assert_close(g, fd, atol=1e-6, rtol=1e-6)


# =========================================================================== errors
def test_event_function_with_a_wrong_shape_raises_naming_the_rule():
    with pytest.raises(
        ValueError, match=r"called like func, with t of shape \(A,\) .* got shape \(\) for A=2"
    ):
        neuralode.solve(free_fall, tensor([[1.0, 0.0], [2.0, 0.0]]), tensor([0.0, 1.0]),
                        event=Event(lambda t, y: y[:, 0].sum()), **PS)  # fmt: skip


def test_event_that_is_not_an_event_raises_type_error():
    with pytest.raises(TypeError, match=r"event must be a neuralode.Event, got function"):
        neuralode.solve(free_fall, tensor([[1.0, 0.0]]), tensor([0.0, 1.0]), event=ground, **PS)


def test_non_differentiable_event_function_raises_when_gradients_are_needed():
    y0 = tensor([[1.0, 0.0]], requires_grad=True)
    ev = Event(lambda t, y: (y[:, 0] > 0).to(F64) - 0.5)
    with pytest.raises(RuntimeError, match=r"the event function is not differentiable along"):
        neuralode.solve(free_fall, y0, tensor([0.0, 1.0]), event=ev, **PS)
    # Without gradients the located time is returned as it is.
    with torch.no_grad():
        sol = neuralode.solve(free_fall, y0, tensor([0.0, 1.0]), event=ev, **PS)
    assert sol.event_t.item() == pytest.approx(drop_time(1.0), abs=1e-9)


def test_tangential_crossing_is_not_differentiable():
    """sign(y - 1/2) changes sign with zero derivative: located, but no IFT gradient."""
    ev = Event(lambda t, y: torch.sign(y[:, 0] - 0.5))
    y0 = tensor([[0.0], [0.2]])
    sol = neuralode.solve(lambda t, y: torch.ones_like(y), y0, tensor([0.0, 1.0]), event=ev, **PS)
    torch.testing.assert_close(sol.event_t, tensor([0.5, 0.3]), atol=1e-10, rtol=0)
    with pytest.raises(RuntimeError, match="zero time derivative .* tangential crossing"):
        neuralode.solve(lambda t, y: torch.ones_like(y), y0.clone().requires_grad_(),
                        tensor([0.0, 1.0]), event=ev, **PS)  # fmt: skip


def test_shared_path_refusals_point_to_per_sample_control():
    """What the shared driver refuses for events, per-sample control does: the messages say so."""
    y0 = tensor([[1.0, 0.0], [4.0, 0.0]])
    t = tensor([0.0, 1.0])
    ev = Event(ground, terminal=False)
    with pytest.raises(
        ValueError, match=r"must be terminal\), or solve with batch_control='per_sample'"
    ):
        neuralode.solve(free_fall, y0, t, event=ev)
    with pytest.raises(ValueError, match=r"for a 2-D t .* use batch_control='per_sample'"):
        neuralode.solve(free_fall, y0, torch.stack([t, t]), event=Event(ground))
    # ... and there both work.
    sol = neuralode.solve(free_fall, y0, torch.stack([t, 2 * t]), event=Event(ground), **PS)
    torch.testing.assert_close(sol.event_t, tensor([drop_time(1.0), drop_time(4.0)]),
                               atol=1e-10, rtol=0)  # fmt: skip


@pytest.mark.parametrize("terminal", [True, False])
def test_a_single_output_time_has_nothing_to_locate(terminal):
    y0 = tensor([[1.0], [2.0]], requires_grad=True)
    ev = Event(lambda t, y: y[:, 0] - 0.5, terminal=terminal)
    sol = neuralode.solve(lambda t, y: -y, y0, tensor([0.0]), event=ev, **PS)
    torch.testing.assert_close(sol.ys[0], y0.detach(), atol=0, rtol=0)
    assert sol.event_t.shape == ((2,) if terminal else (0, 2))
    assert bool(torch.isnan(sol.event_t).all())
