"""The torchdiffeq face under patterns found in real projects written for torchdiffeq 0.2.5.

Each test reproduces, in a few lines of our own, a usage seen when running published
torchdiffeq code (latent ODEs, augmented neural ODEs, FFJORD, neural CDEs, torchdiffeq's own
examples) against neuralode through a ``torchdiffeq`` shim; the expected behaviour is
torchdiffeq 0.2.5's, checked against closed forms where a value is involved.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from neuralode import odeint, odeint_adjoint, odeint_event

D64 = torch.float64


class _Decay(nn.Module):
    """dy/dt = -k y, with only accept/reject step callbacks (no ``callback_step``)."""

    def __init__(self, k=1.5):
        super().__init__()
        self.k = k
        self.accepted, self.rejected = [], []

    def forward(self, t, y):
        return -self.k * y

    def callback_accept_step(self, t0, y0, dt):
        self.accepted.append((float(t0), float(dt)))

    def callback_reject_step(self, t0, y0, dt):
        self.rejected.append((float(t0), float(dt)))


@pytest.mark.parametrize("solver", [odeint, odeint_adjoint])
def test_accept_and_reject_callbacks_alone_are_called(solver):
    """A func that records its accepted steps, but defines no callback_step (as code that logs
    step sizes does): torchdiffeq calls the accept and reject callbacks on their own."""
    f = _Decay()
    y0 = torch.tensor([1.0, 2.0], dtype=D64)
    t = torch.tensor([0.0, 4.0], dtype=D64)
    ys = solver(f, y0, t, rtol=1e-8, atol=1e-10, options=dict(first_step=3.0))
    assert len(f.accepted) >= 5
    assert len(f.rejected) >= 1  # a first step of 3.0 at this tolerance is rejected
    # the accepted steps follow each other from 0 and cover [0, 4] (torchdiffeq's last step may
    # end past 4 and interpolate; neuralode's ends on 4)
    assert f.accepted[0][0] == 0.0
    assert f.accepted[-1][0] < 4.0 <= sum(dt for _, dt in f.accepted) * (1 + 1e-12)
    for (t0, dt), (t1, _) in zip(f.accepted, f.accepted[1:]):
        assert t1 == pytest.approx(t0 + dt, rel=1e-12)
    torch.testing.assert_close(ys[-1], y0 * math.exp(-1.5 * 4.0), rtol=1e-6, atol=0)


class _RejectsOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.rejected = []

    def forward(self, t, y):
        return -1.5 * y

    def callback_reject_step(self, t0, y0, dt):
        assert isinstance(t0, torch.Tensor) and isinstance(dt, torch.Tensor)
        self.rejected.append((float(t0), float(dt)))


def test_reject_callback_alone_is_called():
    f = _RejectsOnly()
    y0 = torch.tensor([1.0], dtype=D64)
    t = torch.tensor([0.0, 4.0], dtype=D64)
    odeint(f, y0, t, rtol=1e-8, atol=1e-10, options=dict(first_step=3.0))
    assert len(f.rejected) >= 1
    assert f.rejected[0] == (0.0, 3.0)  # the first attempt, rejected


# --------------------------------------------------------------- events that reach zero and stay
def _fall(t, y):
    return torch.full_like(y, -0.1)


def _horizon_event(t, y):
    """torchdiffeq's learn_physics example: a real event (y = 0, at t = 10 here), and a
    terminal time made by returning zero past a horizon (1.5)."""
    if t > 1.5:
        return torch.zeros_like(t)
    return y.sum()


def _clamped_event(t, y):
    """Continuous, and zero for every t >= 1.5."""
    return torch.clamp(1.5 - t, min=0.0) * torch.ones_like(y.sum())


@pytest.mark.parametrize("event_fn", [_horizon_event, _clamped_event])
@pytest.mark.parametrize("t0_shape", [(), (1,)])
def test_event_is_where_g_first_reaches_zero_and_stays(event_fn, t0_shape):
    """An event function that becomes exactly zero and stays zero fires where it first gets
    there (torchdiffeq: 1.5 to its tolerance), not at whichever later time a check point or a
    step end happened to sample a zero."""
    y0 = torch.tensor([1.0], dtype=D64)
    t0 = torch.zeros(t0_shape, dtype=D64)
    t_ev, sol = odeint_event(_fall, y0, t0, event_fn=event_fn, rtol=1e-8, atol=1e-8)
    assert float(t_ev) == pytest.approx(1.5, abs=1e-7)
    torch.testing.assert_close(sol[-1], torch.tensor([0.85], dtype=D64), rtol=0, atol=1e-7)


def test_event_that_reaches_zero_exactly_at_a_step_end_is_located():
    """g = t - 1 with steps that land on t = 1 exactly (fixed step 0.25): the zero at the step end
    is the event."""
    y0 = torch.tensor([1.0], dtype=D64)
    t_ev, sol = odeint_event(
        _fall,
        y0,
        torch.tensor(0.0, dtype=D64),
        event_fn=lambda t, y: (1.0 - t) * torch.ones_like(y.sum()),
        method="rk4",
        options=dict(step_size=0.25),
    )
    assert float(t_ev) == pytest.approx(1.0, abs=1e-8)  # torchdiffeq: 5e-10 off
    torch.testing.assert_close(sol[-1], torch.tensor([0.9], dtype=D64), rtol=0, atol=1e-9)


def test_constant_event_value_warns_once_in_a_training_loop():
    """torchdiffeq's learn_physics example: the horizon event (g = zeros_like(t)) fires in every
    iteration while the state requires grad; the zero-gradient warning is shown once per call
    site under Python's default filter, not once per iteration."""
    k = torch.tensor(0.1, dtype=D64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for horizon in (1.5, 1.6, 1.7):

            def event_fn(t, y, horizon=horizon):
                if t > horizon:
                    return torch.zeros_like(t)
                return y.sum()

            t_ev, _ = odeint_event(
                lambda t, y: -k * torch.ones_like(y),
                torch.tensor([1.0], dtype=D64),
                torch.tensor(0.0, dtype=D64),
                event_fn=event_fn,
                rtol=1e-8,
                atol=1e-8,
            )
            assert float(t_ev) == pytest.approx(horizon, abs=1e-7)
    msgs = [str(w.message) for w in caught if "does not depend on" in str(w.message)]
    assert len(msgs) == 1
