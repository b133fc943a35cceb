"""The torchdiffeq face as a drop-in: behaviours that code written for torchdiffeq relies on.

Event gradients are checked against a bouncing ball whose trajectory has a closed form (free fall
between bounces: dopri5 integrates a quadratic exactly, so the only error is the event location),
differentiated by autograd through the closed form.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import neuralode
from neuralode import odeint, odeint_adjoint, odeint_event

D64 = torch.float64
EPS_RESET = 1e-7  # lift after each bounce, so the next solve does not start on the event


# ----------------------------------------------------------------------------- closed form
def _fall_time(p, v, g, r):
    """Time until p + v s - g s^2 / 2 falls to r (the later root)."""
    return (v + torch.sqrt(v * v + 2 * g * (p - r))) / g


def ball_closed_form(t0, p0, v0, g, absorb, r, n):
    """Event times and post-bounce states of n bounces; also the segment starts."""
    t, p, v = t0, p0, v0
    segs, events = [(t, p, v)], []
    for _ in range(n):
        s = _fall_time(p, v, g, r)
        t = t + s
        v_hit = v - g * s
        events.append((t, r + 0 * p, v_hit))
        p, v = r + EPS_RESET, -v_hit * (1 - absorb)
        segs.append((t, p, v))
    return segs, events


class Ball(nn.Module):
    """y = (pos, vel); event pos - r; a reset lifts by EPS_RESET and damps the velocity."""

    def __init__(self, g=9.8, absorb=0.2, r=0.2):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(g, dtype=D64))
        self.absorb = nn.Parameter(torch.tensor(absorb, dtype=D64))
        self.r = nn.Parameter(torch.tensor(r, dtype=D64))

    def forward(self, t, y):
        pos, vel = y
        return vel, -self.g * torch.ones_like(vel)

    def event_fn(self, t, y):
        return y[0] - self.r

    def reset(self, y):
        pos, vel = y
        return pos + EPS_RESET, -vel * (1 - self.absorb)


def _chain(ball, t0, p0, v0, n, interface, **kw):
    """torchdiffeq's bouncing_ball.py pattern: each odeint_event starts at the previous event."""
    t, state = t0, (p0, v0)
    times, states = [], []
    for _ in range(n):
        te, sol = odeint_event(
            ball,
            state,
            t,
            event_fn=ball.event_fn,
            odeint_interface=interface,
            rtol=1e-10,
            atol=1e-10,
            **kw,
        )
        times.append(te)
        states.append(tuple(s[-1] for s in sol))
        state = ball.reset(states[-1])
        t = te
    return times, states


def _inputs():
    t0 = torch.tensor(0.3, dtype=D64, requires_grad=True)
    p0 = torch.tensor(10.0, dtype=D64, requires_grad=True)
    v0 = torch.tensor(0.5, dtype=D64, requires_grad=True)
    return t0, p0, v0


def _grads(out, ins):
    gs = torch.autograd.grad(out, ins, allow_unused=True, retain_graph=True)
    return [0.0 if g is None else float(g) for g in gs]


@pytest.mark.parametrize("interface", [odeint, odeint_adjoint], ids=["odeint", "adjoint"])
def test_chained_odeint_event_gradients_match_closed_form(interface):
    ball = Ball()
    t0, p0, v0 = _inputs()
    times, states = _chain(ball, t0, p0, v0, 3, interface)
    ins = [t0, p0, v0, ball.g, ball.absorb, ball.r]
    ref_ball = Ball()
    _, ev = ball_closed_form(t0, p0, v0, ref_ball.g, ref_ball.absorb, ref_ball.r, 3)
    ref_ins = [t0, p0, v0, ref_ball.g, ref_ball.absorb, ref_ball.r]
    assert float(times[-1].detach()) == pytest.approx(float(ev[-1][0].detach()), abs=1e-8)
    # d(last event time) and d(velocity at the last event) w.r.t. everything
    for got_out, ref_out in ((times[-1], ev[-1][0]), (states[-1][1], ev[-1][2])):
        got = _grads(got_out, ins)
        ref = _grads(ref_out, ref_ins)
        for name, a, b in zip(["t0", "p0", "v0", "g", "absorb", "r"], got, ref):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-7), name
    # the t0 gradient of an event time is exactly 1 (time-invariant ODE)
    assert _grads(times[-1], [t0])[0] == pytest.approx(1.0, abs=1e-7)


def test_chained_odeint_event_central_differences():
    """Finite differences of the whole chain (independent of the closed form)."""
    ball = Ball()

    def last_time(t0, p0, v0):
        with torch.no_grad():
            return float(_chain(ball, t0, p0, v0, 3, odeint)[0][-1])

    t0, p0, v0 = _inputs()
    got = _grads(_chain(ball, t0, p0, v0, 3, odeint)[0][-1], [t0, p0, v0])
    h = 1e-4
    base = [0.3, 10.0, 0.5]
    for i in range(3):
        up, dn = list(base), list(base)
        up[i] += h
        dn[i] -= h
        fd = (last_time(*_t64(up)) - last_time(*_t64(dn))) / (2 * h)
        assert got[i] == pytest.approx(fd, rel=1e-5, abs=1e-6)


def _t64(xs):
    return [torch.tensor(x, dtype=D64) for x in xs]


def test_odeint_event_gradcheck_t0_y0():
    ball = Ball()

    def fn(t0, p0, v0):
        times, states = _chain(ball, t0, p0, v0, 2, odeint)
        return times[-1], states[-1][1]

    assert torch.autograd.gradcheck(fn, _inputs(), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("gradient", ["direct", "backsolve"])
def test_terminal_event_gradient_wrt_every_output_time(gradient):
    ball = Ball()
    t0, p0, v0 = _inputs()
    # the ball hits r near t = 0.3 + 1.48; outputs before and after the event
    t = torch.tensor([0.3, 0.7, 1.2, 1.6, 2.5, 3.0], dtype=D64, requires_grad=True)
    grad = (
        neuralode.Backsolve(params=tuple(ball.parameters()))
        if gradient == "backsolve"
        else gradient
    )
    sol = neuralode.solve(
        ball,
        (p0, v0),
        torch.cat([t0.reshape(1), t[1:]]),
        rtol=1e-10,
        atol=1e-10,
        event=neuralode.Event(ball.event_fn),
        gradient=grad,
    )
    pos = sol.ys[0]
    w = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=D64)
    loss = (w * pos).sum() + sol.event_t + sol.event_y[1]
    ins = [t, t0, p0, v0, ball.g]
    got = torch.autograd.grad(loss, ins)

    ref_ball = Ball()
    tr = t.detach().clone().requires_grad_(True)
    t0r, p0r, v0r = _inputs()
    g = ref_ball.g
    _, ev = ball_closed_form(t0r, p0r, v0r, g, ref_ball.absorb, ref_ball.r, 1)
    te = ev[0][0]
    times = torch.cat([t0r.reshape(1), tr[1:]])
    s = torch.minimum(times, te.expand(6)) - t0r
    pos_ref = p0r + v0r * s - g / 2 * s * s
    loss_ref = (w * pos_ref).sum() + te + ev[0][2]
    ref = torch.autograd.grad(loss_ref, [tr, t0r, p0r, v0r, g])
    assert float(sol.event_t) == pytest.approx(float(te), abs=1e-8)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_per_sample_event_gradient_wrt_t():
    g = torch.tensor(9.8, dtype=D64, requires_grad=True)

    def f(t, y):
        return torch.stack([y[:, 1], -g * torch.ones_like(y[:, 1])], dim=1)

    y0 = torch.tensor([[5.0, 0.0], [2.0, 1.0]], dtype=D64, requires_grad=True)
    t = torch.tensor([0.1, 0.5, 0.8, 1.5], dtype=D64, requires_grad=True)
    sol = neuralode.solve(
        f, y0, t, rtol=1e-10, atol=1e-10, event=neuralode.Event(lambda t, y: y[:, 0])
    )
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], dtype=D64)
    loss = (w * sol.ys[:, :, 0]).sum() + sol.event_t.sum()
    got = torch.autograd.grad(loss, [t, y0, g])

    tr = t.detach().clone().requires_grad_(True)
    y0r = y0.detach().clone().requires_grad_(True)
    gr = g.detach().clone().requires_grad_(True)
    p, v = y0r[:, 0], y0r[:, 1]
    te = tr[0] + _fall_time(p, v, gr, 0.0)
    s = torch.minimum(tr[:, None], te[None, :]) - tr[0]  # (T, B)
    pos = p + v * s - gr / 2 * s * s
    loss_ref = (w * pos).sum() + te.sum()
    ref = torch.autograd.grad(loss_ref, [tr, y0r, gr])
    torch.testing.assert_close(sol.event_t.detach(), te.detach(), rtol=0, atol=1e-8)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gradient", ["direct", "backsolve"])
def test_non_terminal_event_gradients_through_later_segments(gradient):
    """Outputs after two bounces depend on t0, y0 and g through the event times."""
    ball = Ball()
    t0, p0, v0 = _inputs()
    t = torch.tensor([0.3, 1.0, 2.2, 3.0, 4.5], dtype=D64, requires_grad=True)
    grad = (
        neuralode.Backsolve(params=tuple(ball.parameters()))
        if gradient == "backsolve"
        else gradient
    )
    sol = neuralode.solve(
        ball,
        (p0, v0),
        torch.cat([t0.reshape(1), t[1:]]),
        rtol=1e-10,
        atol=1e-10,
        gradient=grad,
        event=neuralode.Event(ball.event_fn, terminal=False, reset=lambda t, y: ball.reset(y)),
    )
    assert sol.event_t.shape == (2,)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=D64)
    loss = (w * sol.ys[0]).sum() + (w * sol.ys[1]).sum() + sol.event_t[1]
    ins = [t, t0, p0, v0, ball.g, ball.absorb, ball.r]
    got = torch.autograd.grad(loss, ins)

    ref_ball = Ball()
    tr = t.detach().clone().requires_grad_(True)
    t0r, p0r, v0r = _inputs()
    segs, ev = ball_closed_form(t0r, p0r, v0r, ref_ball.g, ref_ball.absorb, ref_ball.r, 2)
    times = torch.cat([t0r.reshape(1), tr[1:]])
    pos, vel = [], []
    for tj in times:
        k = sum(int(float(tj) > float(e[0])) for e in ev)
        ts, ps, vs = segs[k]
        s = tj - ts
        pos.append(ps + vs * s - ref_ball.g / 2 * s * s)
        vel.append(vs - ref_ball.g * s)
    loss_ref = (w * torch.stack(pos)).sum() + (w * torch.stack(vel)).sum() + ev[1][0]
    ref = torch.autograd.grad(
        loss_ref, [tr, t0r, p0r, v0r, ref_ball.g, ref_ball.absorb, ref_ball.r]
    )
    torch.testing.assert_close(
        sol.event_t.detach(), torch.stack([e[0] for e in ev]).detach(), rtol=0, atol=1e-8
    )
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_event_fn_shape_may_switch_between_scalar_and_batch_of_one():
    """A state with leading dimension 1: shape () and (1,) from the event function both work."""
    calls = []

    def f(t, y):
        return y[1], -9.8 * torch.ones_like(y[1])

    def event_fn(t, y):
        calls.append(t)
        g = y[0] - 1.0
        return g if t < 0.5 else g.reshape(())  # (1,) early on, () later

    y0 = (torch.tensor([5.0], dtype=D64), torch.tensor([0.0], dtype=D64))
    te, sol = odeint_event(f, y0, torch.tensor(0.0, dtype=D64), event_fn=event_fn)
    assert float(te) == pytest.approx((2 * 4.0 / 9.8) ** 0.5, rel=1e-7)
    assert float(sol[0][-1]) == pytest.approx(1.0, abs=1e-7)
    assert len(calls) > 2


# ----------------------------------------------------------------------------- step callbacks
class _Logged(nn.Module):
    """y' = -y with every torchdiffeq callback recording (name, t0, dt)."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(1.0, dtype=D64))
        self.log = []
        for name in (
            "callback_step",
            "callback_accept_step",
            "callback_reject_step",
            "callback_step_adjoint",
            "callback_accept_step_adjoint",
            "callback_reject_step_adjoint",
        ):
            setattr(self, name, self._recorder(name))

    def _recorder(self, name):
        def cb(t0, y0, dt):
            assert isinstance(t0, torch.Tensor) and isinstance(dt, torch.Tensor)
            self.log.append((name, float(t0), float(dt)))

        return cb

    def forward(self, t, y):
        return -self.k * y


def test_fixed_step_callbacks_forward_and_adjoint():
    f = _Logged()
    y0 = torch.tensor([1.0, 2.0], dtype=D64)
    with pytest.warns(UserWarning, match="not called by fixed-step methods"):
        ys = odeint_adjoint(
            f, y0, torch.tensor([0.0, 1.0], dtype=D64), method="rk4", options=dict(step_size=0.1)
        )
    fwd = [e for e in f.log if e[0] == "callback_step"]
    assert len(fwd) == 10 and len(f.log) == 10  # no accept/reject callbacks for fixed steps
    assert [e[1] for e in fwd] == pytest.approx([0.1 * i for i in range(10)])
    assert all(e[2] == pytest.approx(0.1) for e in fwd)
    f.log.clear()
    ys.sum().backward()
    back = [e for e in f.log if e[0] == "callback_step_adjoint"]
    assert len(back) == 10 and len(f.log) == 10
    assert [e[1] for e in back] == pytest.approx([1.0 - 0.1 * i for i in range(10)])
    assert all(e[2] == pytest.approx(-0.1) for e in back)


def test_adaptive_callbacks_order_and_counts():
    """Every attempt: callback_step, then accept or reject; rejections do happen here."""
    f = _Logged()
    y0 = torch.tensor([1.0], dtype=D64)
    # a first step far too large forces rejections
    ys = odeint_adjoint(
        f,
        y0,
        torch.tensor([0.0, 5.0], dtype=D64),
        rtol=1e-8,
        atol=1e-10,
        options=dict(first_step=4.0),
    )
    log = list(f.log)
    steps = [e for e in log if e[0] == "callback_step"]
    acc = [e for e in log if e[0] == "callback_accept_step"]
    rej = [e for e in log if e[0] == "callback_reject_step"]
    assert len(rej) >= 1 and len(acc) >= 5
    assert len(steps) == len(acc) + len(rej)
    # strictly alternating: step, decision, step, decision, ...
    assert [e[0] for e in log[::2]] == ["callback_step"] * len(steps)
    for s, d in zip(log[::2], log[1::2]):
        assert d[1:] == s[1:]  # the decision is about the attempt just made
    assert sum(e[2] for e in acc) == pytest.approx(5.0)
    f.log.clear()
    ys.sum().backward()
    back = [e[0] for e in f.log]
    assert "callback_step" not in back and back.count("callback_step_adjoint") >= 1
    assert back.count("callback_step_adjoint") == back.count(
        "callback_accept_step_adjoint"
    ) + back.count("callback_reject_step_adjoint")
    assert sum(e[2] for e in f.log if e[0] == "callback_accept_step_adjoint") == pytest.approx(-5.0)


def test_scipy_solver_warns_that_callbacks_are_not_called():
    f = _Logged()
    with pytest.warns(UserWarning, match="does not call func's step callbacks"):
        odeint(
            f,
            torch.tensor([1.0], dtype=D64),
            torch.tensor([0.0, 1.0], dtype=D64),
            method="scipy_solver",
        )
    assert f.log == []


# ----------------------------------------------------------------------------- perturb / jump_t
@pytest.mark.parametrize("dtype", [torch.float32, D64])
@pytest.mark.parametrize("method", ["euler", "rk4", "midpoint", "gl4", "radauIIA5", "trapezoid"])
@pytest.mark.parametrize("adjoint", [False, True])
def test_perturb_never_evaluates_f_on_a_step_boundary(dtype, method, adjoint):
    seen = []

    def f(t, x):
        seen.append(float(t))
        return -x

    x0 = torch.tensor([1.0, 2.0], dtype=dtype, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=dtype)
    kw = dict(adjoint_params=()) if adjoint else {}
    solver = odeint_adjoint if adjoint else odeint
    xs = solver(f, x0, t, method=method, options=dict(step_size=0.5, perturb=True), **kw)
    assert seen and not {0.0, 0.5, 1.0} & set(seen)
    # just inside: within a few ulps of the boundaries in the state's dtype
    ulp = torch.finfo(dtype).eps
    assert 0 < min(seen) < ulp
    seen.clear()
    if adjoint:
        xs.sum().backward()
        assert seen and not {0.0, 0.5, 1.0} & set(seen)
    # the solution is the method's, unchanged by the perturbation (f is continuous here)
    ref = solver(lambda t, x: -x, x0, t, method=method, options=dict(step_size=0.5), **kw)
    torch.testing.assert_close(xs, ref, rtol=10 * ulp, atol=10 * ulp)


def test_perturb_without_it_f_is_evaluated_on_the_boundaries():
    seen = []

    def f(t, x):
        seen.append(float(t))
        return -x

    odeint(
        f, torch.tensor([1.0]), torch.tensor([0.0, 1.0]), method="rk4", options=dict(step_size=0.5)
    )
    assert {0.0, 0.5, 1.0} <= set(seen)


@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
def test_float32_jump_t_is_honoured(method):
    """y' = (-1)^floor(t): with jump_t at the integers f never sees the far side's value
    before a jump, so few steps are needed and the error is small -- in float32 too."""

    def run(jumps):
        nfe = [0]

        def f(t, y):
            nfe[0] += 1
            return torch.where(torch.floor(t) % 2 == 0, 1.0, -1.0).to(y.dtype) * torch.ones_like(y)

        opts = {} if jumps is None else dict(jump_t=jumps)
        y = odeint(
            f,
            torch.zeros(1),
            torch.tensor([0.0, 10.0]),
            rtol=1e-5,
            atol=1e-6,
            method=method,
            options=opts,
        )
        return float(y[-1]), nfe[0]

    y_plain, nfe_plain = run(None)
    y_jump, nfe_jump = run(torch.arange(1.0, 10.0))
    assert abs(y_jump - 0.0) < 1e-5  # exact answer 0: five rises and five falls
    assert nfe_jump < nfe_plain / 2


# ----------------------------------------------------------------------------- adjoint parameters
class _Counted(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[-0.5, 1.0], [-1.0, -0.5]], dtype=D64))
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return y @ self.w


def test_odeint_adjoint_forward_costs_what_odeint_costs():
    """No evaluation of func of its own for the parameter check."""
    y0 = torch.tensor([1.0, 0.5], dtype=D64, requires_grad=True)
    t = torch.linspace(0, 2, 5, dtype=D64)
    f1, f2 = _Counted(), _Counted()
    with torch.no_grad():
        odeint(f1, y0, t)
    odeint_adjoint(f2, y0, t)
    assert f2.nfe == f1.nfe


def test_no_warning_for_non_leaf_adjoint_params_and_their_gradients_arrive():
    import warnings

    raw = torch.tensor([0.3, -0.2], dtype=D64, requires_grad=True)
    coeffs = raw * 2.0  # not a leaf (as spline coefficients are)

    class F(nn.Module):
        def forward(self, t, y):
            return -y + coeffs * torch.sin(t)

    y0 = torch.tensor([1.0, 0.5], dtype=D64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=D64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ys = odeint_adjoint(F(), y0, t, adjoint_params=(coeffs,), rtol=1e-10, atol=1e-12)
        ys[-1].sum().backward()
    # d y(1) / d c_i = int_0^1 e^{-(1-s)} sin s ds, times 2 for raw
    ref = 2 * (math.sin(1.0) - math.cos(1.0) + math.exp(-1.0)) / 2
    torch.testing.assert_close(raw.grad, torch.full((2,), ref, dtype=D64), rtol=1e-7, atol=0)


def test_no_warning_when_func_makes_its_own_leaves():
    import warnings

    class F(nn.Module):
        def forward(self, t, y):
            k = torch.tensor(1.0, dtype=D64, requires_grad=True)  # a fresh leaf every call
            return -k * y

    y0 = torch.tensor([1.0], dtype=D64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ys = odeint_adjoint(F(), y0, torch.tensor([0.0, 1.0], dtype=D64), adjoint_params=())
        ys[-1].sum().backward()
    assert float(y0.grad) == pytest.approx(math.exp(-1.0), rel=1e-6)


def test_a_lost_gradient_is_still_reported():
    w = torch.tensor(0.7, dtype=D64, requires_grad=True)

    class F(nn.Module):
        def forward(self, t, y):
            return -w * y

    y0 = torch.tensor([1.0], dtype=D64, requires_grad=True)
    with pytest.warns(UserWarning, match="not among the parameters"):
        ys = odeint_adjoint(F(), y0, torch.tensor([0.0, 1.0], dtype=D64))
        ys[-1].sum().backward()
    assert w.grad is None


# ----------------------------------------------------------------------------- options
def test_unknown_options_warn_on_the_compatible_face_and_raise_natively():
    y0 = torch.tensor([1.0], dtype=D64)
    t = torch.tensor([0.0, 1.0], dtype=D64)
    with pytest.warns(UserWarning, match=r"unknown options \['solver_step'\].*ignored"):
        y = odeint(lambda t, y: -y, y0, t, options=dict(solver_step=0.1))
    assert float(y[-1]) == pytest.approx(math.exp(-1.0), rel=1e-6)
    with pytest.warns(UserWarning, match=r"adjoint_options \['grid_constructor'\] are ignored"):
        odeint_adjoint(lambda t, y: -y, y0, t, adjoint_params=(),
                       adjoint_options=dict(grid_constructor=None))  # fmt: skip
    with pytest.raises(TypeError):  # the native face stays strict
        neuralode.PIController(solver_step=0.1)


def _heun_textbook(f, y, t0, h, n):
    t = t0
    for _ in range(n):
        k1 = f(t, y)
        k2 = f(t + h, y + h * k1)
        y = y + h / 2 * (k1 + k2)
        t = t + h
    return y


def test_min_step_equal_to_max_step_forces_fixed_steps_on_an_adaptive_method():
    """first_step = min_step = max_step = h: every step is h, accepted whatever its error."""

    def f(t, y):
        return -2 * y + torch.sin(3 * t)

    y0 = torch.tensor([1.0], dtype=D64)
    h, n = 0.25, 8
    opts = dict(first_step=h, min_step=h, max_step=h)
    y = odeint(f, y0, torch.tensor([0.0, h * n], dtype=D64), rtol=1e-12, atol=1e-12,
               method="adaptive_heun", options=opts)  # fmt: skip
    ref = _heun_textbook(f, y0, torch.tensor(0.0, dtype=D64), h, n)
    torch.testing.assert_close(y[-1], ref, rtol=1e-14, atol=1e-14)


def test_min_step_accepts_the_step_at_min_step_instead_of_raising():
    def f(t, y):
        return torch.cos(10 * t) * torch.ones_like(y)

    y0 = torch.tensor([0.0], dtype=D64)
    t = torch.tensor([0.0, 4.0], dtype=D64)
    with pytest.raises(neuralode.StepSizeUnderflowError):  # natively: the default raises
        neuralode.solve(f, y0, t, controller=neuralode.PIController(rtol=1e-10, atol=1e-10,
                                                                    dt_min=0.1))  # fmt: skip
    forced = neuralode.PIController(rtol=1e-10, atol=1e-10, dt_min=0.1, force_dt_min=True)
    sol = neuralode.solve(f, y0, t, controller=forced)
    assert sol.stats["n_accepted"] == 40 and sol.stats["n_rejected"] == 0
    y = odeint(f, y0, t, rtol=1e-10, atol=1e-10, options=dict(min_step=0.1))
    torch.testing.assert_close(y[-1], sol.ys[-1])
    assert abs(float(y[-1]) - math.sin(40.0) / 10) < 1e-2  # error no longer controlled


def test_adjoint_norm_callable_sees_torchdiffeq_layout():
    adjoint_params = (torch.rand(7, dtype=D64, requires_grad=True),
                      torch.rand((), dtype=D64, requires_grad=True))  # fmt: skip
    calls = []

    def adjoint_norm(parts):
        calls.append(tuple(p.shape for p in parts))
        return max(p.abs().max() for p in parts)

    y0 = (torch.tensor(1.0, dtype=D64, requires_grad=True),
          torch.tensor([[0.5, 0.5], [0.1, 0.1]], dtype=D64))  # fmt: skip

    def f(t, y):
        return y[0] * adjoint_params[1], y[1] * adjoint_params[0][:4].view(2, 2)

    t = torch.tensor([0.0, 1.0], dtype=D64)
    ys = odeint_adjoint(f, y0, t, adjoint_params=adjoint_params,
                        adjoint_options=dict(norm=adjoint_norm))  # fmt: skip
    ys[0][-1].backward()
    assert calls and set(calls) == {
        (
            torch.Size([]),
            torch.Size([]),
            torch.Size([2, 2]),
            torch.Size([]),
            torch.Size([2, 2]),
            torch.Size([7]),
            torch.Size([]),
        )  # fmt: skip
    }
    # gradients as with the default norm, to the tolerance
    g_custom = y0[0].grad.clone()
    y0[0].grad = None
    odeint_adjoint(f, y0, t, adjoint_params=adjoint_params)[0][-1].backward()
    torch.testing.assert_close(g_custom, y0[0].grad, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- errors
def test_step_limit_is_both_max_steps_error_and_assertion_error():
    y0 = torch.tensor([1.0], dtype=D64)
    t = torch.tensor([0.0, 10.0], dtype=D64)
    with pytest.raises(AssertionError, match=r"^max_num_steps exceeded \(5>=5\): ") as info:
        odeint(lambda t, y: -y, y0, t, options=dict(max_num_steps=5))
    assert isinstance(info.value, neuralode.MaxStepsError)
    assert "raise max_steps" in str(info.value)  # neuralode's explanation follows
    with pytest.raises(AssertionError, match="max_num_steps exceeded"):
        odeint_adjoint(lambda t, y: -y, y0, t, adjoint_params=(), options=dict(max_num_steps=5))


def test_underflow_is_both_step_size_underflow_and_assertion_error():
    y0 = torch.tensor([1.0], dtype=D64)
    t = torch.tensor([0.0, 2.0], dtype=D64)
    with pytest.raises(AssertionError, match=r"^underflow in dt ") as info:
        odeint(lambda t, y: y * y, y0, t)  # blows up at t = 1
    assert isinstance(info.value, neuralode.StepSizeUnderflowError)
    assert info.value.t == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(AssertionError, match=r"^underflow in dt ") as info:
        odeint(lambda t, y: y * float("nan"), y0, t)
    assert isinstance(info.value, neuralode.NonFiniteError)
    # the native face raises neuralode's errors only
    with pytest.raises(neuralode.StepSizeUnderflowError) as info:
        neuralode.solve(lambda t, y: y * y, y0, t)
    assert not isinstance(info.value, AssertionError)


# ----------------------------------------------------------------------------- scipy_solver
@pytest.mark.parametrize("solver", ["RK45", "LSODA"])
def test_scipy_solver_single_time_and_reverse_time(solver):
    y0 = torch.tensor([1.0, 2.0], dtype=D64)
    opts = dict(solver=solver)
    y = odeint(lambda t, y: -y, y0, torch.tensor([0.5], dtype=D64), method="scipy_solver",
               options=opts)  # fmt: skip
    assert y.shape == (1, 2) and torch.equal(y[0], y0)
    t = torch.tensor([1.0, 0.5, 0.0], dtype=D64)
    y = odeint(lambda t, y: -y, y0, t, method="scipy_solver", options=opts, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(y, y0 * torch.exp(1.0 - t)[:, None], rtol=1e-6, atol=0)


def test_scipy_solver_adjoint_gradients_match_odeint():
    f = _Counted()
    y0 = torch.tensor([[2.0, 0.0]], dtype=D64, requires_grad=True)
    t = torch.linspace(0.0, 3.0, 5, dtype=D64, requires_grad=True)
    w = torch.linspace(0.1, 1.0, 10, dtype=D64).view(5, 1, 2)
    ys = odeint_adjoint(f, y0, t, method="scipy_solver", options=dict(solver="DOP853"),
                        rtol=1e-10, atol=1e-12)  # fmt: skip
    got = torch.autograd.grad((w * ys).sum(), [y0, t, f.w])
    ref_ys = odeint(f, y0, t, rtol=1e-10, atol=1e-12)
    ref = torch.autograd.grad((w * ref_ys).sum(), [y0, t, f.w])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- odeint_dense
def test_odeint_dense_matches_closed_form_and_torchdiffeq():
    y0 = torch.tensor([1.0, -2.0], dtype=D64, requires_grad=True)
    t0, t1 = torch.tensor(0.0, dtype=D64), torch.tensor(2.0, dtype=D64)
    fn = neuralode.odeint_dense(lambda t, y: -y, y0, t0, t1, rtol=1e-9, atol=1e-12)
    q = torch.tensor([0.0, 0.3, 1.7, 2.0], dtype=D64)
    y = fn(q)
    assert y.shape == (4, 2)
    torch.testing.assert_close(y, y0 * torch.exp(-q)[:, None], rtol=1e-7, atol=1e-9)
    assert fn(torch.tensor(0.3, dtype=D64)).shape == (2,)
    (g,) = torch.autograd.grad(fn(torch.tensor(1.0, dtype=D64)).sum(), y0)
    torch.testing.assert_close(g, torch.full((2,), math.exp(-1.0), dtype=D64), rtol=1e-7, atol=0)
    torchdiffeq = pytest.importorskip("torchdiffeq")
    ref = torchdiffeq.odeint_dense(lambda t, y: -y, y0.detach(), t0, t1, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        fn(torch.tensor(1.3, dtype=D64)), ref(torch.tensor(1.3, dtype=D64)), rtol=1e-7, atol=1e-9
    )
    with pytest.raises(ValueError, match="tensor y0"):
        neuralode.odeint_dense(lambda t, y: y, (y0,), t0, t1)


# ----------------------------------------------------------------------------- mixed dtypes
@pytest.mark.parametrize("interface", [odeint, odeint_adjoint], ids=["odeint", "adjoint"])
def test_mixed_dtype_tuple_state_is_promoted_as_torchdiffeq_does(interface):
    seen = set()

    def f(t, y):
        seen.add((t.dtype, y[0].dtype, y[1].dtype))
        return -y[0].float(), -2 * y[1]  # func may return the component's original dtype

    a = torch.tensor([1.0], dtype=torch.float32, requires_grad=True)
    b = torch.tensor([2.0], dtype=D64)
    kw = dict(adjoint_params=()) if interface is odeint_adjoint else {}
    ys = interface(f, (a, b), torch.tensor([0.0, 1.0]), rtol=1e-9, atol=1e-10, **kw)
    assert ys[0].dtype == ys[1].dtype == D64  # torchdiffeq's outputs are all promoted too
    assert seen == {(D64, D64, D64)}
    assert float(ys[0][-1].detach()) == pytest.approx(math.exp(-1.0), rel=1e-8)
    assert float(ys[1][-1]) == pytest.approx(2 * math.exp(-2.0), rel=1e-8)
    ys[0][-1].sum().backward()
    assert a.grad.dtype == torch.float32
    assert float(a.grad) == pytest.approx(math.exp(-1.0), rel=1e-6)


# ----------------------------------------------------------------------------- reference cycles
def test_module_keeping_its_adjoint_output_is_collectable():
    import gc
    import weakref

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2).to(D64)

        def forward(self, t, y):
            return self.lin(y)

    m = M()
    m.out = odeint_adjoint(m, torch.ones(1, 2, dtype=D64), torch.tensor([0.0, 1.0], dtype=D64))
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


def test_odeint_event_with_adjoint_leaves_no_cyclic_garbage():
    import gc

    ball = Ball()

    def once():
        t0, p0, v0 = _inputs()
        times, _ = _chain(ball, t0, p0, v0, 1, odeint_adjoint)
        times[-1].backward()

    once()
    gc.collect()
    gc.disable()
    try:
        before = gc.collect()
        once()
        found = gc.collect()
    finally:
        gc.enable()
    assert before == 0 and found == 0


def test_event_fn_constant_past_a_horizon_gives_a_constant_event_time_with_a_warning():
    """torchdiffeq's learn_physics.py: g = zeros_like(t) past a horizon ends the solve there;
    that event time depends on nothing, so its gradient is zero (said by a warning)."""
    g = torch.tensor(9.8, dtype=D64, requires_grad=True)

    def f(t, y):
        return y[1], -g * torch.ones_like(y[1])

    def event_fn(t, y):
        if t > 0.5:
            return torch.zeros_like(t)
        return y[0] - 0.0  # the floor is far below: never reached before the horizon

    y0 = (torch.tensor([100.0], dtype=D64), torch.tensor([0.0], dtype=D64))
    with pytest.warns(UserWarning, match="treated as a constant"):
        te, sol = odeint_event(f, y0, torch.tensor(0.0, dtype=D64), event_fn=event_fn)
    assert 0.5 < float(te) < 2.0  # somewhere past the horizon (g jumps to 0 there)
    assert not te.requires_grad
    (dg,) = torch.autograd.grad(sol[0][-1].sum(), g)  # the state still has its gradient
    assert float(dg) == pytest.approx(-0.5 * float(te) ** 2, rel=1e-6)


def test_adjoint_norm_replaced_on_grad_fn_is_used_with_torchdiffeq_layout():
    """torchdiffeq exposes adjoint_options on the output's grad_fn; replacing the norm there
    before backward() changes the backward solve's norm."""
    p = torch.rand(3, dtype=D64, requires_grad=True)

    def f(t, y):
        return -y * p.sum()

    y0 = torch.full((2, 2), 1.0, dtype=D64, requires_grad=True)
    ys = odeint_adjoint(f, y0, torch.tensor([0.0, 1.0], dtype=D64), adjoint_params=(p,))
    opts = ys.grad_fn.adjoint_options
    default = opts["norm"]
    seen = []

    def spy(parts):
        seen.append(tuple(x.shape for x in parts))
        return default(parts)

    opts["norm"] = spy
    ys.sum().backward()
    assert seen and set(seen) == {(torch.Size([]), (2, 2), (2, 2), (3,))}
    g_spy = y0.grad.clone()
    y0.grad = None
    odeint_adjoint(f, y0, torch.tensor([0.0, 1.0], dtype=D64), adjoint_params=(p,)).sum().backward()
    torch.testing.assert_close(g_spy, y0.grad, rtol=1e-5, atol=1e-8)


def test_odeint_adjoint_backward_failure_is_torchdiffeqs_assertion_error():
    """A failing backward solve raises what torchdiffeq raises there (scripts catch
    AssertionError around loss.backward()), and is still neuralode's MaxStepsError."""
    w = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(w.detach().clone())

        def forward(self, t, y):
            return -self.w * y

    f = Field()
    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 5.0], dtype=torch.float64)
    ys = neuralode.odeint_adjoint(
        f, y0, t, rtol=1e-10, atol=1e-12, adjoint_options=dict(max_num_steps=3)
    )
    with pytest.raises(AssertionError, match=r"^max_num_steps exceeded") as info:
        ys[-1].sum().backward()
    assert isinstance(info.value, neuralode.MaxStepsError)
    # The native face keeps neuralode's own class (not an AssertionError).
    back = neuralode.Backsolve(rtol=1e-10, atol=1e-12, max_steps=3)
    sol = neuralode.solve(f, y0, t, rtol=1e-10, atol=1e-12, gradient=back)
    with pytest.raises(neuralode.MaxStepsError) as info:
        sol.ys[-1].sum().backward()
    assert not isinstance(info.value, AssertionError)
