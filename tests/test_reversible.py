"""Reversible gradients (issue 16): the algebraically reversible Runge--Kutta scheme of McCallum &
Foster (2024), its exact gradients in constant autograd memory, its convergence order, and how
exactly the backward pass reconstructs the states."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import neuralode as no
from neuralode.gradients.reversible import reconstruction_error
from reversible_checks import assert_central_differences

DT = torch.float64


def _rel(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


class MLP(nn.Module):
    def __init__(self, d=3, hidden=16, seed=0, scale=1.0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d)).to(DT)
        self.scale = scale

    def forward(self, t, y):
        return self.scale * self.net(y) + 0.1 * torch.sin(t) * y


def _problem(seed=0):
    func = MLP(seed=seed)
    torch.manual_seed(seed + 100)
    y0 = torch.randn(4, 3, dtype=DT)
    t = torch.linspace(0.0, 1.0, 5, dtype=DT)
    c = torch.randn(5, 4, 3, dtype=DT)
    return func, y0, t, c


def _loss_and_grads(func, y0, t, c, gradient, create_graph=False, **kw):
    y0 = y0.detach().requires_grad_()
    sol = no.solve(func, y0, t, gradient=gradient, **kw)
    loss = (sol.ys * c).sum()
    grads = torch.autograd.grad(loss, [y0, *func.parameters()], create_graph=create_graph)
    return loss.detach(), grads, sol


# --------------------------------------------------------------------------- the scheme itself
def test_forward_is_the_reversible_scheme_written_by_hand():
    """Euler on y' = a y: y1 = lam y + (1 - lam) z + h a z, z1 = z - (-h) a y1 (the backward
    Euler increment from t1), written out in plain arithmetic."""
    a, lam, h, n = -0.7, 0.9, 0.1, 10
    y = z = 1.3
    ref = [y]
    for _ in range(n):
        y = lam * y + (1 - lam) * z + h * a * z
        z = z + h * a * y
        ref.append(y)
    t = torch.linspace(0, 1, n + 1, dtype=DT)
    sol = no.solve(
        lambda t, y: a * y,
        torch.tensor([1.3], dtype=DT),
        t,
        solver="euler",
        dt=h,
        gradient=no.Reversible(coupling=lam, restart_gap=None),
    )
    assert torch.allclose(sol.ys[:, 0], torch.tensor(ref, dtype=DT), rtol=1e-14, atol=0)
    assert sol.stats["n_steps"] == n
    assert sol.stats["nfe"] == 2 * n  # two Euler increments per step
    # With restarts (fixed steps): q = |y - z| / |y| after each step; its value one step after
    # a (re)start is the baseline; z restarts from y after a step where q grew by more than
    # restart_gap baselines (here after steps 2, 5 and 8: the parasitic mode grows by
    # lam / R**2 = 1.04 per step).
    y = z = 1.3
    ref, restarted, prev, base = [y], [], 0.0, None
    for i in range(n):
        y = lam * y + (1 - lam) * z + h * a * z
        z = z + h * a * y
        q = abs(y - z) / abs(y)
        if base is None:
            base, prev = max(q, 10 * 2.0**-52), q
        elif q - prev > 1.05 * base:
            z, prev, base = y, 0.0, None
            restarted.append(i)
        else:
            prev = q
        ref.append(y)
    assert restarted == [2, 5, 8]
    sol = no.solve(
        lambda t, y: a * y,
        torch.tensor([1.3], dtype=DT),
        t,
        solver="euler",
        dt=h,
        gradient=no.Reversible(coupling=lam, restart_gap=1.05),
    )
    assert torch.allclose(sol.ys[:, 0], torch.tensor(ref, dtype=DT), rtol=1e-14, atol=0)
    assert sol.stats["reversible_restarts"] == 3
    # FSAL dopri5 at fixed steps: its 7th stage only serves the error estimate, so each half
    # takes 6 evaluations; with error control the first half takes all 7.
    fixed = no.solve(
        lambda t, y: -y, torch.ones(1, dtype=DT), [0, 1], dt=0.1, gradient="reversible"
    )
    assert fixed.stats["nfe"] == 10 * 12


def test_string_and_coupling_validation():
    func, y0, t, _ = _problem()
    a = no.solve(func, y0, t, solver="rk4", dt=0.1, gradient="reversible").ys
    b = no.solve(func, y0, t, solver="rk4", dt=0.1, gradient=no.Reversible(0.999)).ys
    assert torch.equal(a, b)
    for bad in (0.0, -0.5, 1.5, "x", True):
        with pytest.raises(ValueError, match="coupling"):
            no.Reversible(coupling=bad)
    assert no.Reversible(coupling=1).coupling == 1.0


def test_unsupported_combinations_raise():
    func, y0, t, _ = _problem()
    with pytest.raises(ValueError, match="dense_output"):
        no.solve(func, y0, t, solver="rk4", dt=0.1, gradient="reversible", dense_output=True)
    with pytest.raises(ValueError, match="explicit Runge--Kutta"):
        no.solve(func, y0, t, solver="kvaerno5", gradient="reversible")
    with pytest.raises(ValueError, match=r"per_sample.*does not support gradient=Reversible"):
        no.solve(func, y0, t, gradient="reversible", batch_control="per_sample")


# --------------------------------------------------------------------------- exact gradients
def test_fixed_steps_gradient_equals_finite_differences_and_autograd_through_scheme():
    func, y0, t, c = _problem()
    kw = dict(solver="rk4", dt=0.05)
    loss, g_rev, sol = _loss_and_grads(func, y0, t, c, "reversible", **kw)
    assert sol.stats["n_steps"] == 20
    # Autograd through the same scheme: create_graph=True replays the reversible solve with a
    # graph and differentiates it by autograd.
    _, g_graph, _ = _loss_and_grads(func, y0, t, c, "reversible", create_graph=True, **kw)
    for a, b in zip(g_rev, g_graph):
        assert _rel(a, b) < 1e-12
    # Central finite differences of the reversible forward itself.
    assert_central_differences(func, y0, t, c, g_rev, kw)


def test_gradcheck_with_time_dependent_field_and_step_to_grid():
    torch.manual_seed(3)
    w = torch.randn(2, 2, dtype=DT, requires_grad=True)
    grid = [0.0, 0.1, 0.25, 0.3, 0.55, 0.7, 1.0]

    def f(t, y):
        return torch.tanh(y @ w) * torch.cos(t)

    def fn(y0, w_):
        return no.solve(
            f,
            y0,
            torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=DT),
            solver="midpoint",
            controller=no.StepToGrid(grid),
            gradient=no.Reversible(coupling=0.9, params=(w_,)),
        ).ys

    y0 = torch.randn(3, 2, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (y0, w), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_adaptive_tight_tolerance_agrees_with_direct():
    func, y0, t, c = _problem(seed=1)
    kw = dict(solver="dopri5", rtol=1e-11, atol=1e-13)
    _, g_rev, sol = _loss_and_grads(func, y0, t, c, "reversible", **kw)
    _, g_dir, _ = _loss_and_grads(func, y0, t, c, "direct", **kw)
    assert sol.stats["n_rejected"] >= 0 and sol.stats["n_steps"] >= 10
    for a, b in zip(g_rev, g_dir):
        assert _rel(a, b) < 1e-6
    # Also equal to autograd through the adaptive reversible solve (same accepted steps).
    _, g_graph, _ = _loss_and_grads(func, y0, t, c, "reversible", create_graph=True, **kw)
    for a, b in zip(g_rev, g_graph):
        assert _rel(a, b) < 1e-11


def test_tuple_state_and_per_sample_grid():
    torch.manual_seed(4)
    lin = nn.Linear(4, 4).to(DT)

    def f(t, y):
        q, p = y
        out = torch.tanh(lin(torch.cat([q, p], -1)))
        return p, out[:, :2] - q

    q0 = torch.randn(3, 2, dtype=DT, requires_grad=True)
    p0 = torch.randn(3, 2, dtype=DT, requires_grad=True)
    # Per-sample output grids: steps land on the union of all rows' times.
    t2 = torch.tensor([[0.0, 0.3, 1.0], [0.0, 0.5, 0.8], [0.0, 0.3, 0.6]], dtype=DT)
    kw = dict(solver="rk4", dt=0.1, gradient=no.Reversible(params=tuple(lin.parameters())))
    sol = no.solve(f, (q0, p0), t2, **kw)
    # Values: the same as a shared grid holding every landing time, row b picked for sample b.
    union = torch.unique(t2)
    shared = no.solve(f, (q0, p0), union, **kw)
    for b in range(3):
        for j in range(3):
            k = int((union == t2[b, j]).nonzero())
            assert torch.allclose(sol.ys[0][j, b], shared.ys[0][k, b], rtol=1e-13, atol=1e-15)
            assert torch.allclose(sol.ys[1][j, b], shared.ys[1][k, b], rtol=1e-13, atol=1e-15)
    loss = (sol.ys[0] ** 2).sum() + (sol.ys[1] * 0.3).sum()
    inputs = [q0, p0, *lin.parameters()]
    g = torch.autograd.grad(loss, inputs)
    g_graph = torch.autograd.grad(
        (lambda s: (s.ys[0] ** 2).sum() + (s.ys[1] * 0.3).sum())(no.solve(f, (q0, p0), t2, **kw)),
        inputs,
        create_graph=True,
    )
    for a, b in zip(g, g_graph):
        assert _rel(a, b) < 1e-12


# --------------------------------------------------------------------------- memory
def _saved_bytes(gradient, n):
    func = MLP(d=8, hidden=32, seed=2)
    y0 = torch.randn(16, 8, dtype=DT, requires_grad=True)
    seen = {}

    def pack(x):
        seen[(x.untyped_storage().data_ptr(), x.device)] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        sol = no.solve(func, y0, [0.0, 1.0], solver="rk4", dt=1.0 / n, gradient=gradient)
    sol.ys[-1].sum().backward()
    assert sol.stats["n_steps"] == n
    return sum(seen.values())


def test_autograd_memory_is_flat_in_the_number_of_steps():
    rev = [_saved_bytes("reversible", n) for n in (40, 400)]
    direct = [_saved_bytes("direct", n) for n in (40, 400)]
    assert rev[1] == rev[0]  # the final pair and the parameters, whatever the steps
    assert direct[1] > 8 * direct[0]  # Direct keeps every step's graph
    assert rev[0] < direct[0] / 10


# --------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("solver,order", [("midpoint", 2), ("heun3", 3), ("rk4", 4)])
def test_convergence_order(solver, order):
    """y' = y cos t, y(0) = 1: y(2) = exp(sin 2). Log-log slope of the error over dt."""
    exact = math.exp(math.sin(2.0))
    errs, ns = [], [20, 40, 80, 160]
    for n in ns:
        sol = no.solve(
            lambda t, y: y * torch.cos(t),
            torch.tensor([1.0], dtype=DT),
            [0.0, 2.0],
            solver=solver,
            dt=2.0 / n,
            gradient="reversible",
        )
        errs.append(abs(float(sol.ys[-1, 0]) - exact))
    slopes = [math.log(errs[i] / errs[i + 1], 2) for i in range(len(ns) - 1)]
    assert abs(slopes[-1] - order) < 0.25, slopes


def test_reconstruction_at_rounding_level_for_a_neural_field_over_many_steps():
    func = MLP(d=4, hidden=16, seed=5)
    y0 = torch.randn(8, 4, dtype=DT)
    err, sol = reconstruction_error(func, y0, [0.0, 2.0], solver="rk4", dt=2.0 / 2000)
    assert sol.stats["n_steps"] == 2000
    assert err < 1e-13


def test_contractive_problem_reconstruction_vs_backsolve():
    """y' = -50 y over [0, 10]: the reversible scheme needs a coupling matched to the decay
    (lam = R(h mu)^2); then the states are reconstructed to rounding, where solving the state
    backward (Backsolve's reconstruction) is only as good as its tolerance."""
    mu, dt = -50.0, 0.005
    a = mu * dt
    R = 1 + a + a * a / 2 + a**3 / 6 + a**4 / 24  # rk4's stability function
    y0 = torch.tensor([1.0], dtype=DT)

    def f(t, y):
        return mu * y

    err, sol = reconstruction_error(f, y0, [0.0, 10.0], coupling=R * R, solver="rk4", dt=dt)
    assert err < 1e-8
    assert float(sol.ys[-1, 0]) == pytest.approx(R**2000, rel=1e-3)
    # Backsolve's reconstruction: the state solved backward from y(10).
    y_end = torch.tensor([math.exp(-500.0)], dtype=DT)
    back = no.solve(f, y_end, [10.0, 0.0], solver="dopri5", rtol=1e-6, atol=0.0)
    back_err = abs(float(back.ys[-1, 0]) - 1.0)
    assert 1e-6 < back_err < 1e-3
    # 1 % away from the matched coupling the inverse amplifies by 1.01**2 per step; the
    # restarts and anchors (every 18 steps at this coupling) keep the reconstruction at
    # rounding (without them it had lost most digits) ...
    err_off, sol_off = reconstruction_error(
        f, y0, [0.0, 10.0], coupling=R * R * 1.01, solver="rk4", dt=dt
    )
    assert err_off < 1e-12
    assert sol_off.stats["reversible_anchors"] > 50
    # ... and without restarts the default coupling does not damp the parasitic mode: the
    # solution grows (to about 1e210 by t = 10) instead of decaying, and overflows a little
    # later (with restarts, the default, it is right: tests/test_reversible_restarts.py).
    no_restarts = no.Reversible(restart_gap=None)
    with pytest.warns(RuntimeWarning, match="parasitic mode has grown"):
        bad = no.solve(f, y0, [0.0, 10.0], solver="rk4", dt=dt, gradient=no_restarts)
    assert abs(float(bad.ys[-1, 0])) > 1e100
    assert bad.stats["reversible_gap"] > 1.0
    assert bad.stats["reversible_restarts"] == 0
    with pytest.raises(no.NonFiniteError, match="coupling"):
        no.solve(f, y0, [0.0, 16.0], solver="rk4", dt=dt, gradient=no_restarts)


def test_event_time_gradient_matches_direct():
    """A terminal event y_0 = 0 of y'' = -k (y = 1 + 2 t - k t^2 / 2): the event time and its
    gradient w.r.t. y0 and k through a reversible solve."""
    k = torch.tensor(1.3, dtype=DT, requires_grad=True)

    def f(t, y):
        return torch.stack([y[..., 1], -k * torch.ones_like(y[..., 0])], -1)

    ev = no.Event(lambda t, y: y[..., 0], terminal=True)
    y0 = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 10.0], dtype=DT)
    out = {}
    for name, g in (("direct", "direct"), ("reversible", no.Reversible(params=(k,)))):
        sol = no.solve(f, y0, t, solver="dopri5", rtol=1e-10, atol=1e-12, event=ev, gradient=g)
        out[name] = (sol.event_t.detach(), torch.autograd.grad(sol.event_t, [y0, k]))
    kk = 1.3
    t_star = (2 + math.sqrt(4 + 2 * kk)) / kk
    assert float(out["reversible"][0]) == pytest.approx(t_star, rel=1e-9)
    for a, b in zip(out["reversible"][1], out["direct"][1]):
        assert _rel(a, b) < 1e-7
    # dt*/dk from the implicit function theorem: dt*/dk = (t*^2 / 2) / (2 - k t*).
    assert float(out["reversible"][1][1]) == pytest.approx(
        (t_star**2 / 2) / (2 - kk * t_star), rel=1e-7
    )


# --------------------------------------------------------------------------- DETEST accuracy
# Global error (scaled as in test_engine_detest.py) of plain dopri5 and of its reversible version
# at rtol = 1e-6, atol = 1e-8, outputs at t = 0, 1, ..., 20, measured when this was written:
#   A3 2.0e-6 / 6.6e-6, A4 5.4e-7 / 2.7e-8, D1 1.4e-4 / 9.5e-5, D3 6.4e-5 / 1.0e-3;
# at rtol 1e-9 the reversible errors are 3.5e-9, 4.5e-10, 5.3e-7, 8.1e-7.
@pytest.mark.parametrize("name", ["A3", "A4", "D1", "D3"])
def test_detest_accuracy_against_plain_dopri5(name):
    from test_engine_detest import PROBLEMS, T_OUT

    _, f, y0, exact = PROBLEMS[name]
    ref = torch.as_tensor(exact(T_OUT))
    t = torch.tensor(T_OUT, dtype=DT)
    y0 = torch.tensor(y0, dtype=DT)
    errs = {}
    for g in ("direct", "reversible"):
        for rtol in (1e-6, 1e-9):
            ys = no.solve(
                lambda tt, y: f(tt, y, torch), y0, t, rtol=rtol, atol=rtol / 100, gradient=g
            ).ys
            errs[g, rtol] = float((ys - ref).abs().max() / max(1.0, float(ref.abs().max())))
    assert errs["reversible", 1e-6] <= 25 * errs["direct", 1e-6]
    assert errs["reversible", 1e-9] <= max(errs["reversible", 1e-6] / 30, 1e-9)


@pytest.mark.parametrize("name", ["C1", "B1"])
def test_detest_contracting_problems_are_flagged_without_restarts(name):
    """C1, the linear chain (eigenvalue -1, ten-fold): adaptive steps of 0.1-0.5 are far above
    (1 - coupling) / |mu|, so the parasitic mode grows like exp(t) and without restarts the
    default coupling gives a wrong solution; B1 (predator-prey) likewise through its contracting
    phases. The gap between y and z flags both (with restarts, the default, both are right:
    tests/test_reversible_restarts.py)."""
    from test_engine_detest import PROBLEMS, T_OUT

    _, f, y0, exact = PROBLEMS[name]
    t = torch.tensor(T_OUT, dtype=DT)
    with pytest.warns(RuntimeWarning, match="parasitic mode has grown"):
        sol = no.solve(
            lambda tt, y: f(tt, y, torch),
            torch.tensor(y0, dtype=DT),
            t,
            gradient=no.Reversible(restart_gap=None),
        )
    assert sol.stats["reversible_gap"] > 1.0
    if exact is not None:
        ref = torch.as_tensor(exact(T_OUT))
    else:
        ref = no.solve(
            lambda tt, y: f(tt, y, torch), torch.tensor(y0, dtype=DT), t, rtol=1e-10, atol=1e-12
        ).ys
    assert float((sol.ys - ref).abs().max()) > 1.0


def test_gradients_of_gradients_and_time_gradients():
    func, y0, t, c = _problem(seed=2)
    kw = dict(solver="rk4", dt=0.05)
    v = torch.randn_like(y0)

    def gv(y0_):
        y0_ = y0_.detach().requires_grad_()
        loss = (no.solve(func, y0_, t, gradient="reversible", **kw).ys * c).sum()
        (g,) = torch.autograd.grad(loss, y0_, create_graph=True)
        return g, y0_

    g, y0g = gv(y0)
    (hv,) = torch.autograd.grad((g * v).sum(), y0g)  # Hessian-vector product
    eps = 1e-5
    fd = (gv(y0 + eps * v)[0] - gv(y0 - eps * v)[0]).detach() / (2 * eps)
    assert _rel(hv, fd) < 1e-6
    # Gradients w.r.t. the output times (continuous formula) agree with Direct's.
    out = []
    for g_ in ("direct", "reversible"):
        tt = t.clone().requires_grad_()
        ys = no.solve(func, y0, tt, solver="dopri5", rtol=1e-10, atol=1e-12, gradient=g_).ys
        out.append(torch.autograd.grad((ys * c).sum(), tt)[0])
    assert _rel(out[1], out[0]) < 1e-6


def test_jump_times_use_one_sided_limits():
    """f = a y before t = 0.5 and b y after: with jump_t=[0.5], the second half of the step that
    ends at 0.5 sees a (left limit) and the first half of the next step sees b."""
    a, b, lam, h = -0.4, 0.9, 0.95, 0.1

    def rate(t):
        return a if t < 0.5 else b

    y = z = 1.0
    for k in range(10):  # without jump_t the step ending at 0.5 would see b
        t0, t1 = k * h, (k + 1) * h
        y_new = lam * y + (1 - lam) * z + h * rate(t0) * z
        z = z + h * (a if t1 <= 0.5 + 1e-12 else b) * y_new
        y = y_new
    sol = no.solve(
        lambda t, y: (a if float(t) < 0.5 else b) * y,
        torch.tensor([1.0], dtype=DT),
        [0.0, 1.0],
        solver="euler",
        controller=no.ConstantStep(h, jump_t=[0.5]),
        gradient=no.Reversible(coupling=lam, restart_gap=None),
    )
    assert float(sol.ys[-1, 0]) == pytest.approx(y, rel=1e-13)
    plain = no.solve(
        lambda t, y: (a if float(t) < 0.5 else b) * y,
        torch.tensor([1.0], dtype=DT),
        [0.0, 1.0],
        solver="euler",
        dt=h,
        gradient=no.Reversible(coupling=lam, restart_gap=None),
    )
    assert abs(float(plain.ys[-1, 0]) - y) > 1e-3  # without jump_t, t = 0.5 sees b
