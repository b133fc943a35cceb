"""Review findings on per-sample Backsolve (one continuous backward solve per sample).

- a parameter acting only past a ``jump_t``: the backward parameter integral evaluates each
  step's first stage at the one-sided time its first stage was evaluated at (not at the jump);
- a solve that starts (or, for the backward solve, ends) on a ``jump_t``: the first stage sees
  f's limit from inside the interval;
- non-terminal events with a sample failing (``throw=False``): finite gradients;
- the messages of create_graph=True and of the backward solve's ``max_steps``;
- ``stats["backsolve_outputs"]`` / ``["nfe_backward"]`` after backward with ``event=``.
"""

from __future__ import annotations

import math

import pytest
import torch

import neuralode

D = torch.float64


class _Switch(torch.nn.Module):
    """A rotation plus ``c * y`` for ``t >= 1.3`` only and ``d * y^2`` before it."""

    def __init__(self):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor([0.4, -0.3], dtype=D))
        self.d = torch.nn.Parameter(torch.tensor([0.2, 0.1], dtype=D))

    def forward(self, t, y):
        right = (t >= 1.3).to(y.dtype).unsqueeze(-1)
        rot = torch.stack([y[..., 1], -y[..., 0]], -1)
        return rot + right * self.c * y + (1 - right) * self.d * y * y


def _switch_grads(gradient, t_end, batch_control="per_sample"):
    f = _Switch()
    y0 = torch.tensor([[1.0, 0.5], [0.3, -0.7]], dtype=D)
    ctrl = neuralode.PIController(rtol=1e-10, atol=1e-10, jump_t=[1.3])
    t = torch.linspace(0.0, t_end, 7, dtype=D)
    sol = neuralode.solve(f, y0, t, controller=ctrl, gradient=gradient, batch_control=batch_control)
    sol.ys.sum().backward()
    return f.c.grad.clone(), f.d.grad.clone()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_parameter_acting_past_a_jump_t():
    """Before: dL/dc 2.8e-3 relative off (the integral's first stage at the jump itself)."""
    c_ref, d_ref = _switch_grads("direct", 3.0)
    c, d = _switch_grads(neuralode.Backsolve(), 3.0)
    assert _rel(c, c_ref) < 1e-7
    assert _rel(d, d_ref) < 1e-7
    c_sh, _ = _switch_grads(neuralode.Backsolve(), 3.0, "shared")
    assert _rel(c, c_sh) < 1e-7


def test_solve_ending_on_a_jump_t():
    """c acts only past 1.3 and the solve ends at 1.3: dL/dc = 0 (before: ~6e-8, the backward
    solve's first stage evaluated on the far side of the jump)."""
    c_ref, d_ref = _switch_grads("direct", 1.3)
    c, d = _switch_grads(neuralode.Backsolve(), 1.3)
    assert float(c_ref.abs().max()) == 0.0  # f never sees t >= 1.3 (exact: 0 * finite)
    assert float(c.abs().max()) < 1e-13
    assert _rel(d, d_ref) < 1e-8


def test_solve_backward_in_time_from_a_jump_t():
    """The forward driver itself starting on a jump_t (here solving back in time from it): its
    first stage sees f's limit from inside the interval, the pure rotation (closed form).
    Before: 1.9e-6 off at rtol 1e-8 (the first stage on the far side of the jump)."""

    def f(t, y):
        right = (t >= 1.3).to(y.dtype).unsqueeze(-1)
        return torch.stack([y[..., 1], -y[..., 0]], -1) + right * 100.0 * y

    y0 = torch.tensor([[1.0, 0.5], [0.3, -0.7]], dtype=D)
    t = torch.linspace(1.3, 0.0, 4, dtype=D)
    s = -1.3
    c, sn = math.cos(s), math.sin(s)
    exact = torch.stack([y0[:, 0] * c + y0[:, 1] * sn, -y0[:, 0] * sn + y0[:, 1] * c], -1)
    ctrl = neuralode.PIController(rtol=1e-8, atol=1e-8, jump_t=[1.3])
    sol = neuralode.solve(f, y0, t, controller=ctrl, batch_control="per_sample")
    assert float((sol.ys[-1] - exact).abs().max()) < 1e-7


class _Blow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(1.0, dtype=D))

    def forward(self, t, y):
        return self.k * y * y


def _event_grads(gradient, y0_rows):
    """dL/dk, dL/dy0 and dL/dt of a non-terminal event solve with throw=False; y' = k y^2
    from 0.6 blows up at t ~ 1.67 (inside [0, 2.5])."""
    f = _Blow()
    y0 = torch.tensor(y0_rows, dtype=D).unsqueeze(1).requires_grad_()
    t = torch.linspace(0, 2.5, 30, dtype=D, requires_grad=True)
    ev = neuralode.Event(lambda t, y: y[:, 0] - 0.35, terminal=False)
    sol = neuralode.solve(f, y0, t, batch_control="per_sample", gradient=gradient, throw=False,
                          event=ev, rtol=1e-9, atol=1e-9)  # fmt: skip
    torch.nan_to_num(sol.ys).sum().backward()
    return f.k.grad.clone(), y0.grad.clone(), t.grad.clone(), sol.stats.get("failed_samples")


@pytest.mark.parametrize(
    "gradient", ["direct", "checkpoint", neuralode.Backsolve()], ids=["direct", "ckpt", "bs"]
)
def test_nonterminal_event_with_a_failed_sample(gradient):
    """The failed sample's outputs past its failure are NaN constants (nan_to_num'd by the
    loss): the gradients are finite and, the samples being independent, the sums of those of
    the samples solved apart (before: NaN in dL/dk and dL/dt[-1])."""
    dk, dy0, dt, failed = _event_grads(gradient, [0.2, 0.6, 0.3])
    assert failed == [1]
    assert bool(torch.isfinite(dk)) and bool(torch.isfinite(dt).all())
    parts = [_event_grads(gradient, [v]) for v in (0.2, 0.6, 0.3)]
    assert parts[1][3] == [0] and parts[0][3] is None
    dk_ref = sum(p[0] for p in parts)
    dt_ref = sum(p[2] for p in parts)
    assert abs(float(dk - dk_ref)) <= 1e-6 * abs(float(dk_ref))
    assert float((dt - dt_ref).abs().max()) <= 1e-6 * float(dt_ref.abs().max())
    for b in range(3):
        assert float((dy0[b] - parts[b][1]).abs().max()) <= 1e-6 * float(parts[b][1].abs().max())


def test_create_graph_message_names_what_works():
    f = torch.nn.Linear(2, 2, dtype=D)
    y0 = torch.randn(3, 2, dtype=D, requires_grad=True)
    sol = neuralode.solve(lambda t, y: f(y), y0, torch.linspace(0, 1, 5, dtype=D),
                          batch_control="per_sample",
                          gradient=neuralode.Backsolve(params=list(f.parameters())))  # fmt: skip
    with pytest.raises(RuntimeError, match="only gradient='direct' supports them") as e:
        torch.autograd.grad(sol.ys.sum(), [y0], create_graph=True)
    assert "gradient='checkpoint' or" not in str(e.value)


def test_backward_max_steps_message():
    torch.manual_seed(0)
    f = torch.nn.Linear(2, 2, dtype=D)
    y0 = torch.randn(3, 2, dtype=D, requires_grad=True)
    gm = neuralode.Backsolve(max_steps=3, params=list(f.parameters()))
    sol = neuralode.solve(lambda t, y: torch.tanh(f(y)), y0, torch.linspace(0.5, 4, 20, dtype=D),
                          batch_control="per_sample", gradient=gm)  # fmt: skip
    with pytest.raises(neuralode.MaxStepsError) as e:
        sol.ys.sum().backward()
    msg = str(e.value)
    assert "the backward (adjoint) solve of sample 0 reached Backsolve(max_steps=3)" in msg
    assert "before it got back to its t0=0.5" in msg and "raise Backsolve(max_steps=...)" in msg
    assert "final time" not in msg


def _event_stats(batch_control, terminal=False, level=0.1, event=True):
    """Stats after two backward passes of a rotation solve with Backsolve(outputs="replay")
    and an event ``y_0 = level`` (never reached for level > 1.1: one segment)."""
    f = torch.nn.Linear(2, 2, dtype=D)
    with torch.no_grad():
        f.weight.copy_(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))
        f.bias.fill_(0.01)
    y0 = torch.tensor([[1.0, 0.2], [0.3, 0.4]], dtype=D, requires_grad=True)
    if batch_control == "per_sample":
        ev = neuralode.Event(lambda t, y: y[:, 0] - level, terminal=terminal)
    else:
        ev = neuralode.Event(lambda t, y: y[0, 0] - level, terminal=terminal)
    gm = neuralode.Backsolve(outputs="replay", params=list(f.parameters()))
    sol = neuralode.solve(lambda t, y: f(y), y0, torch.linspace(0, 8, 40, dtype=D),
                          batch_control=batch_control, event=ev if event else None,
                          gradient=gm)  # fmt: skip
    loss = sol.ys.square().sum()
    loss.backward(retain_graph=True)
    first = dict(sol.stats)
    loss.backward()  # a second pass replaces the counters, it does not add to them
    return first, sol


@pytest.mark.parametrize("batch_control", ["shared", "per_sample"])
@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "non-terminal"])
def test_backward_stats_with_events(batch_control, terminal):
    """Before: both keys missing (the event solve's stats were a copy made before backward)."""
    first, sol = _event_stats(batch_control, terminal)
    n_events = int(torch.isfinite(sol.event_t).sum())
    assert n_events >= (1 if terminal else 2)  # the non-terminal solve has several segments
    assert first["backsolve_outputs"] == "replay"
    assert isinstance(first["nfe_backward"], int) and first["nfe_backward"] > 0
    assert sol.stats["nfe_backward"] == first["nfe_backward"]
    if not terminal:  # one segment (no event): the counters of the solve without events
        one, _ = _event_stats(batch_control, level=5.0)
        plain, _ = _event_stats(batch_control, event=False)
        assert one["nfe_backward"] == plain["nfe_backward"]
        assert first["nfe_backward"] > one["nfe_backward"]  # the segments' counts summed


class _Oscillator(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0, dtype=D))
        self.c = torch.nn.Parameter(torch.tensor(0.1, dtype=D))

    def forward(self, t, y):
        return torch.stack([self.w * y[:, 1], -self.w * y[:, 0] - self.c * y[:, 1]], 1)


def _oscillator_backward(n_t, outputs):
    y0 = torch.tensor([[1.0, 0.0], [0.5, 0.3]], dtype=D, requires_grad=True)
    sol = neuralode.solve(_Oscillator(), y0, torch.linspace(0.0, 10.0, n_t, dtype=D),
                          gradient=neuralode.Backsolve(outputs=outputs),
                          batch_control="per_sample", rtol=1e-6, atol=1e-9)  # fmt: skip
    sol.ys.sum().backward()
    return sol.stats["backsolve_outputs"], sol.stats["nfe_backward"]


@pytest.mark.parametrize("n_t", [100, 200])
def test_auto_picks_the_cheaper_mode(n_t):
    """Damped oscillator over [0, 10], ~51 forward steps per sample: at len(t) = 100 (two
    outputs per step) stopping is cheaper (801 against 1,067 backward NFE, where "auto"
    replayed before), at 200 replaying (1,032 against 1,601)."""
    mode, nfe = _oscillator_backward(n_t, "auto")
    nfe_stop = _oscillator_backward(n_t, "stop")[1]
    nfe_replay = _oscillator_backward(n_t, "replay")[1]
    assert mode == ("stop" if n_t == 100 else "replay")
    assert nfe == min(nfe_stop, nfe_replay)
    assert max(nfe_stop, nfe_replay) > 1.25 * nfe  # the choice matters
