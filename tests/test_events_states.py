"""Per-sample events on tuple and dict states: located and differentiated like tensor states."""

import math

import pytest
import torch

import neuralode

F64 = torch.float64
G = 9.81


def _fall_tuple(t, y):
    h, v = y
    return (v, torch.full_like(v, -G))


def _fall_dict(t, y):
    return {"h": y["v"], "v": torch.full_like(y["v"], -G)}


@pytest.mark.parametrize("kind", ["tuple", "dict"])
@pytest.mark.parametrize("gradient", ["direct", "backsolve", "checkpoint"])
def test_per_sample_event_on_structured_state_matches_free_fall(kind, gradient):
    h0 = torch.tensor([[1.0], [4.0], [0.5]], dtype=F64, requires_grad=True)
    v0 = torch.zeros(3, 1, dtype=F64)
    if kind == "tuple":
        y0, f = (h0, v0), _fall_tuple
        ev = neuralode.Event(lambda t, y: y[0][:, 0], direction=-1)
    else:
        y0, f = {"h": h0, "v": v0}, _fall_dict
        ev = neuralode.Event(lambda t, y: y["h"][:, 0], direction=-1)
    t = torch.linspace(0.0, 1.5, 4, dtype=F64)
    sol = neuralode.solve(f, y0, t, event=ev, gradient=gradient, rtol=1e-10, atol=1e-12)
    exact = (2 * h0.detach()[:, 0] / G).sqrt()
    torch.testing.assert_close(sol.event_t, exact, rtol=1e-8, atol=0)
    # The velocity at impact is -g t*, a second closed form through the state.
    v_event = sol.event_y[1] if kind == "tuple" else sol.event_y["v"]
    torch.testing.assert_close(v_event[:, 0], -G * exact, rtol=1e-7, atol=0)
    # d t* / d h0 = 1 / (g t*) per sample.
    (grad,) = torch.autograd.grad(sol.event_t.sum(), h0)
    torch.testing.assert_close(grad[:, 0], 1.0 / (G * exact), rtol=1e-6, atol=0)


def test_per_sample_event_on_tuple_state_outputs_after_the_event_hold_the_event_state():
    y0 = (torch.tensor([[1.0], [4.0]], dtype=F64), torch.zeros(2, 1, dtype=F64))
    ev = neuralode.Event(lambda t, y: y[0][:, 0], direction=-1)
    t = torch.tensor([0.0, 0.3, 0.6, 1.2], dtype=F64)
    sol = neuralode.solve(_fall_tuple, y0, t, event=ev, rtol=1e-10, atol=1e-12)
    h = sol.ys[0][:, :, 0]  # (T, B)
    # Sample 0 lands at 0.4515 s: its outputs at 0.6 and 1.2 hold the impact state (height 0);
    # sample 1 (lands at 0.903 s) is still falling at 0.6: 4 - g 0.36 / 2.
    assert abs(h[2, 0]) < 1e-8 and abs(h[3, 0]) < 1e-8
    assert h[2, 1] == pytest.approx(4.0 - 0.5 * G * 0.36, rel=1e-9)
    assert h[1, 0] == pytest.approx(1.0 - 0.5 * G * 0.09, rel=1e-9)
    assert math.isclose(float(sol.event_t[1]), math.sqrt(8.0 / G), rel_tol=1e-8)
