"""solve(..., integral=g): running-cost integrals against closed forms, gradients, grids, norms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import neuralode
from neuralode import Backsolve, Checkpointed, Direct, Event, PIController

D = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def decay(t, y):
    return -y


def squares(t, y):
    return y.square()


def test_integral_of_y_squared_closed_form():
    # y' = -y, y(0) = y0: int_0^t y^2 = y0^2 (1 - e^{-2t}) / 2, per component.
    y0 = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    t = torch.linspace(0.0, 2.0, 6, dtype=D)
    sol = neuralode.solve(decay, y0, t, integral=squares, **TOL)
    want = y0.square() * (1 - torch.exp(-2 * t))[:, None] / 2
    assert sol.integral.shape == (6, 3)
    torch.testing.assert_close(sol.integral, want, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(sol.ys, y0 * torch.exp(-t)[:, None], rtol=1e-8, atol=1e-10)
    # A scalar running cost gives shape (T,); dense output of the integral between outputs.
    sol = neuralode.solve(decay, y0, t, integral=lambda t, y: y.square().sum(), **TOL)
    assert sol.integral.shape == (6,)
    torch.testing.assert_close(sol.integral, want.sum(1), rtol=1e-8, atol=1e-10)
    tq = torch.tensor([0.3, 1.1], dtype=D)
    got = sol.evaluate_integral(tq)
    torch.testing.assert_close(
        got, y0.square().sum() * (1 - torch.exp(-2 * tq)) / 2, rtol=1e-6, atol=1e-8
    )
    torch.testing.assert_close(sol.evaluate(tq), y0 * torch.exp(-tq)[:, None], rtol=1e-6, atol=0)


def test_integral_time_dependent_and_backward_in_time():
    # g = t * y on y' = -y, y(0)=1, integrated from 0 down to -1: int_0^t s e^{-s} ds.
    y0 = torch.tensor([1.0], dtype=D)
    t = torch.tensor([0.0, -0.5, -1.0], dtype=D)
    sol = neuralode.solve(decay, y0, t, integral=lambda t, y: t.to(y.dtype) * y, **TOL)
    want = 1 - (t + 1) * torch.exp(-t)  # antiderivative of s e^{-s} from 0
    torch.testing.assert_close(sol.integral[:, 0], want, rtol=1e-8, atol=1e-10)


def test_tuple_and_dict_states_and_tensor_tolerances():
    y0 = (torch.tensor([1.0], dtype=D), torch.tensor([[2.0, 3.0]], dtype=D))

    def f(t, y):
        return (-y[0], -2 * y[1])

    def g(t, y):
        return y[0].sum() + y[1].sum()

    t = torch.tensor([0.0, 1.0], dtype=D)
    want = 1 * (1 - math.exp(-1)) + 5 * (1 - math.exp(-2)) / 2
    ctrl = PIController(rtol=(torch.full((1,), 1e-10, dtype=D), 1e-10), atol=1e-12)
    for kw in (TOL, dict(controller=ctrl)):
        sol = neuralode.solve(f, y0, t, integral=g, **kw)
        assert isinstance(sol.ys, tuple) and sol.ys[1].shape == (2, 1, 2)
        assert sol.integral[-1].item() == pytest.approx(want, rel=1e-8)
    yd = {"a": y0[0], "b": y0[1]}
    sol = neuralode.solve(
        lambda t, y: {"a": -y["a"], "b": -2 * y["b"]},
        yd,
        t,
        integral=lambda t, y: y["a"].sum() + y["b"].sum(),
        rtol=1e-10,
        atol={"a": 1e-12, "b": torch.full((1, 2), 1e-12, dtype=D)},
    )
    assert set(sol.ys) == {"a", "b"}
    assert sol.integral[-1].item() == pytest.approx(want, rel=1e-8)


class Rate(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.7, dtype=D))

    def forward(self, t, y):
        return -self.a * y + torch.sin(t).to(y.dtype)


class Cost(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.3, -0.4], dtype=D))

    def forward(self, t, y):
        return self.w * y.square() + y.sum()


GRADIENTS = [
    Direct(),
    Backsolve(),
    Backsolve(seminorm=True),
    Backsolve(outputs="replay"),
    Checkpointed(),
]


@pytest.mark.parametrize(
    "gradient",
    GRADIENTS,
    ids=["direct", "backsolve", "backsolve-seminorm", "backsolve-replay", "checkpointed"],
)
def test_integral_gradients_match_finite_differences(gradient):
    torch.manual_seed(0)
    f, g = Rate(), Cost()
    y0 = torch.tensor([0.8, -1.1], dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.5], dtype=D)
    weights = torch.tensor([[0.0, 0.0], [0.3, -1.0], [1.0, 0.5]], dtype=D)

    def loss(y0_):
        sol = neuralode.solve(f, y0_, t, integral=g, gradient=gradient, **TOL)
        return (sol.integral * weights).sum() + sol.ys[-1].sum()

    L = loss(y0)
    L.backward()
    params = [y0, f.a, g.w]
    grads = [p.grad.clone() for p in params]
    eps = 1e-6
    with torch.no_grad():
        for p, gr in zip(params, grads):
            flat = p.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + eps
                up = loss(y0.detach()).item()
                flat[i] = old - eps
                down = loss(y0.detach()).item()
                flat[i] = old
                fd = (up - down) / (2 * eps)
                assert gr.view(-1)[i].item() == pytest.approx(fd, rel=1e-5, abs=1e-7)


def test_integral_gradient_with_respect_to_output_time():
    y0 = torch.tensor([1.0], dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D, requires_grad=True)
    sol = neuralode.solve(decay, y0, t, integral=squares, **TOL)
    sol.integral[-1].sum().backward()
    # Q(T) = y0^2 (1 - e^{-2 (T - t0)}) / 2 (y0 is given at t0, so the whole trajectory moves
    # with t0): dQ/dT = e^{-2 (T - t0)} = -dQ/dt0.
    assert t.grad[1].item() == pytest.approx(math.exp(-2), rel=1e-8)
    assert t.grad[0].item() == pytest.approx(-math.exp(-2), rel=1e-8)


@pytest.mark.parametrize("batch_control", ["shared", "per_sample"])
def test_per_sample_grids(batch_control):
    # Rows with their own output times; y' = -k_b y, g = y^2 per sample.
    k = torch.tensor([0.5, 1.0, 2.0], dtype=D)
    y0 = torch.tensor([[1.0], [2.0], [-1.0]], dtype=D)
    t = torch.tensor([[0.0, 0.5, 1.0], [0.0, 1.0, 3.0], [0.0, 0.2, 0.2]], dtype=D)
    # The rate rides in the state (per-sample control passes only the rows still running).
    sol = neuralode.solve(
        lambda t, y: torch.stack([-y[:, 1] * y[:, 0], torch.zeros_like(y[:, 1])], 1),
        torch.cat([y0, k[:, None]], dim=1),
        t,
        integral=lambda t, y: y[:, :1].square().sum(1),
        batch_control=batch_control,
        **TOL,
    )
    want = y0.square() * (1 - torch.exp(-2 * k[:, None] * t)) / (2 * k[:, None])  # (B, T)
    assert sol.integral.shape == (3, 3)  # (T, B)
    torch.testing.assert_close(sol.integral, want.T, rtol=1e-7, atol=1e-10)
    tq = torch.tensor([[0.25], [2.0], [0.1]], dtype=D)
    wq = y0.square() * (1 - torch.exp(-2 * k[:, None] * tq)) / (2 * k[:, None])
    torch.testing.assert_close(sol.evaluate_integral(tq), wq.T, rtol=1e-5, atol=1e-8)


def test_error_norm_exclusion_changes_nfe():
    # A fast-oscillating running cost on a slow state: including it in the error norm forces
    # short steps; leaving it out gives the steps of the solve without the integral.
    y0 = torch.tensor([1.0, 0.5], dtype=D)
    t = torch.tensor([0.0, 4.0], dtype=D)

    def g(t, y):
        return torch.sin(25 * t).to(y.dtype) * y.sum().square()

    kw = dict(rtol=1e-6, atol=1e-8)
    plain = neuralode.solve(decay, y0, t, **kw)
    incl = neuralode.solve(decay, y0, t, integral=g, **kw)
    excl = neuralode.solve(decay, y0, t, integral=g, integral_in_error_norm=False, **kw)
    assert abs(excl.stats["nfe"] - plain.stats["nfe"]) <= 2
    assert incl.stats["nfe"] > 3 * plain.stats["nfe"]
    torch.testing.assert_close(excl.ys, plain.ys, rtol=1e-12, atol=1e-14)
    # Reference value by a tight solve: the controlled integral is accurate to the tolerance.
    ref = neuralode.solve(decay, y0, t, integral=g, rtol=1e-11, atol=1e-13).integral[-1]
    assert abs(incl.integral[-1] - ref).item() < 1e-5
    # The same through per-sample control and a controller with its own norm.
    y0b = y0[None]

    def gb(t, y):
        return torch.sin(25 * t).to(y.dtype) * y.sum(1).square()

    pb = neuralode.solve(decay, y0b, t, batch_control="per_sample", **kw)
    eb = neuralode.solve(
        decay, y0b, t, integral=gb, integral_in_error_norm=False, batch_control="per_sample", **kw
    )
    ib = neuralode.solve(decay, y0b, t, integral=gb, batch_control="per_sample", **kw)
    assert abs(eb.stats["nfe"] - pb.stats["nfe"]) <= 2 < 3 * pb.stats["nfe"] < ib.stats["nfe"]

    def max_norm(x):
        return x.abs().max()

    ctrl = PIController(rtol=1e-6, atol=1e-8, norm=max_norm)
    pn = neuralode.solve(decay, y0, t, controller=ctrl)
    en = neuralode.solve(decay, y0, t, controller=ctrl, integral=g, integral_in_error_norm=False)
    inn = neuralode.solve(decay, y0, t, controller=ctrl, integral=g)
    assert abs(en.stats["nfe"] - pn.stats["nfe"]) <= 2 < 3 * pn.stats["nfe"] < inn.stats["nfe"]


def test_integral_with_terminal_event():
    # y' = -y from 1 stops where y = 0.5 (t* = ln 2); int_0^t* y^2 = (1 - 1/4) / 2.
    y0 = torch.tensor([1.0], dtype=D)
    t = torch.tensor([0.0, 2.0], dtype=D)
    ev = Event(lambda t, y: y[0] - 0.5)
    sol = neuralode.solve(decay, y0, t, integral=squares, event=ev, **TOL)
    assert sol.event_t.item() == pytest.approx(math.log(2), rel=1e-8)
    assert sol.event_y.item() == pytest.approx(0.5, rel=1e-8)
    assert sol.event_integral.item() == pytest.approx(0.375, rel=1e-7)


def test_integral_with_resetting_events():
    # y' = -y from 1, reset to 2y whenever y falls to 0.5 (t = ln 2, 2 ln 2): each period adds
    # int y^2 = (1 - 1/4) / 2 = 0.375; the reset leaves the integral unchanged.
    ev = Event(lambda t, y: y[0] - 0.5, terminal=False, reset=lambda t, y: 2 * y)
    t = torch.tensor([0.0, 2.0], dtype=D)
    sol = neuralode.solve(decay, torch.tensor([1.0], dtype=D), t, integral=squares, event=ev, **TOL)
    torch.testing.assert_close(sol.event_t, torch.tensor([1.0, 2.0], dtype=D) * math.log(2))
    torch.testing.assert_close(
        sol.event_integral[:, 0], torch.tensor([0.375, 0.75], dtype=D), rtol=1e-7, atol=0
    )
    rest = 2.0 - 2 * math.log(2)
    assert sol.integral[-1].item() == pytest.approx(0.75 + (1 - math.exp(-2 * rest)) / 2, rel=1e-7)


def test_integral_with_fixed_steps():
    y0 = torch.tensor([1.0], dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    sol = neuralode.solve(decay, y0, t, integral=squares, solver="rk4", dt=0.01)
    assert sol.integral[-1].item() == pytest.approx((1 - math.exp(-2)) / 2, rel=1e-8)


def test_integral_errors():
    y0 = torch.tensor([1.0], dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    with pytest.raises(TypeError, match="integral must be callable"):
        neuralode.solve(decay, y0, t, integral=3.0)
    with pytest.raises(TypeError, match="integral_in_error_norm must be a bool"):
        neuralode.solve(decay, y0, t, integral=squares, integral_in_error_norm="no")
    with pytest.raises(TypeError, match="returned dtype torch.float32"):
        neuralode.solve(decay, y0, t, integral=lambda t, y: y.float())
    with pytest.raises(TypeError, match="must return a tensor"):
        neuralode.solve(decay, y0, t, integral=lambda t, y: 1.0)
    with pytest.raises(ValueError, match="same shape at every time"):
        neuralode.solve(decay, y0, t, integral=lambda t, y: y if float(t) == 0 else y.sum())
    with pytest.raises(ValueError, match=r"must return shape \(B, \.\.\.\) with B = 2"):
        neuralode.solve(
            decay,
            torch.ones(2, 1, dtype=D),
            torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=D),
            integral=lambda t, y: y.sum(),
        )
    with pytest.raises(ValueError, match="rtol for a tuple state"):
        neuralode.solve(
            lambda t, y: (-y[0], -y[1]), (y0, y0), t, integral=lambda t, y: y[0], rtol=[1e-6]
        )
    with pytest.raises(ValueError, match="no dense output"):
        neuralode.solve(decay, y0, t, integral=squares, dense_output=False).evaluate_integral(0.5)
    with pytest.raises(ValueError, match="needs a solve with integral"):
        neuralode.solve(decay, y0, t).evaluate_integral(0.5)
