"""Per-sample control x Rosenbrock and diagonally implicit methods (solvers/implicit/rows.py).

Per-sample parameters of the stiff problems live in the state (constant components), since
under per-sample control func sees only the rows still being integrated.
"""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from scipy.optimize import brentq

import neuralode
from neuralode import ConstantStep
from neuralode.gradients import Backsolve, Checkpointed

F64 = torch.float64
PS = dict(batch_control="per_sample")
STIFF = ["rodas4", "kvaerno5", "trbdf2"]
COUNTERS = ("n_jac", "n_lu", "n_newton", "n_newton_fail")


def relax(t, y):
    """``u' = -k (u - cos t)``, ``k' = 0``: stiff for large k, closed-form solution."""
    u, k = y[..., 0], y[..., 1]
    return torch.stack([-k * (u - torch.cos(t).to(u.dtype)), torch.zeros_like(k)], -1)


def relax_exact(t, u0, k):
    a = k / (k * k + 1)
    return a * (k * np.cos(t) + np.sin(t)) + (u0 - a * k) * np.exp(-k * t)


def robertson(t, y):
    """Robertson's chemical kinetics with per-sample rate constants ``(a, b, c)``."""
    y1, y2, y3, a, b, c = y.unbind(-1)
    r1, r2, r3 = a * y1, b * y2 * y3, c * y2 * y2
    z = torch.zeros_like(a)
    return torch.stack([-r1 + r2, r1 - r2 - r3, r3, z, z, z], -1)


def vdp(t, y):
    """Van der Pol with a per-sample stiffness ``mu``."""
    x, v, mu = y[..., 0], y[..., 1], y[..., 2]
    return torch.stack([v, mu * ((1 - x * x) * v) - x, torch.zeros_like(mu)], -1)


K = torch.tensor([1.0, 10.0, 100.0, 1e3, 1e4], dtype=F64)


def relax_y0():
    return torch.stack([torch.full((5,), 0.5, dtype=F64), K], 1)


# --------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("solver", STIFF)
def test_relaxation_with_k_from_1_to_1e4_matches_the_closed_form(solver):
    t = torch.linspace(0.0, 2.0, 5, dtype=F64)
    sol = neuralode.solve(relax, relax_y0(), t, solver=solver, rtol=1e-8, atol=1e-10, **PS)
    exact = relax_exact(t.numpy()[:, None], 0.5, K.numpy()[None, :])
    # Global errors of a few hundred times the local tolerance (the methods' own, see below).
    np.testing.assert_allclose(sol.ys[..., 0].numpy(), exact, rtol=0, atol=5e-6)
    # Stiff methods: the step count hardly grows with the stiffness (an explicit method's
    # would grow like k); a bound that catches a regression in step control.
    assert (
        int(sol.stats["n_accepted"].max())
        < {"rodas4": 1500, "kvaerno5": 300, "trbdf2": 3000}[solver]
    )
    assert sol.stats["n_jac"] > 0 and sol.stats["n_lu"] > 0


@pytest.mark.parametrize("solver", STIFF)
def test_robertson_with_per_sample_rates_against_scipy_radau(solver):
    rates = np.array([[0.04, 1e4, 3e7], [0.1, 3e3, 1e7], [0.01, 3e4, 6e7]])
    t = np.array([0.0, 0.5, 5.0, 40.0])
    y0 = torch.tensor([[1.0, 0.0, 0.0, *r] for r in rates], dtype=F64)
    sol = neuralode.solve(robertson, y0, torch.tensor(t, dtype=F64), solver=solver, rtol=1e-8,
                          atol=1e-12, **PS)  # fmt: skip
    for b, (a, bb, c) in enumerate(rates):

        def rhs(_, y, a=a, bb=bb, c=c):
            r1, r2, r3 = a * y[0], bb * y[1] * y[2], c * y[1] ** 2
            return [-r1 + r2, r1 - r2 - r3, r3]

        ref = solve_ivp(rhs, (0.0, 40.0), [1.0, 0.0, 0.0], method="Radau", t_eval=t,
                        rtol=1e-12, atol=1e-16).y.T  # fmt: skip
        got = sol.ys[:, b, :3].numpy()
        np.testing.assert_allclose(got[:, [0, 2]], ref[:, [0, 2]], rtol=0, atol=2e-6)
        np.testing.assert_allclose(got[:, 1], ref[:, 1], rtol=2e-5, atol=1e-11)  # y2 ~ 1e-5
        assert int(sol.stats["n_accepted"][b]) < (1500 if solver == "trbdf2" else 400)


# --------------------------------------------------------------------------- alone vs together
def _compare_with_alone(func, y0, t, solver, rtol, atol, **kw):
    """Every sample solved alone with shared control: the same accepted/rejected counts, the
    same values (to rounding, amplified at most by the Newton tolerance), and the counters of
    Jacobian blocks, factorisations and Newton iterations sum to the per-sample ones (to 1%)."""
    sol = neuralode.solve(func, y0, t, solver=solver, rtol=rtol, atol=atol, **PS, **kw)
    totals = dict.fromkeys(COUNTERS, 0)
    for b in range(y0.shape[0]):
        tb = t[b] if t.dim() == 2 else t
        alone = neuralode.solve(func, y0[b : b + 1], tb, solver=solver, rtol=rtol, atol=atol, **kw)
        assert alone.stats["n_accepted"] == int(sol.stats["n_accepted"][b]), b
        assert alone.stats["n_rejected"] == int(sol.stats["n_rejected"][b]), b
        ref = alone.ys[:, 0]
        scale = float(ref.abs().max())
        torch.testing.assert_close(sol.ys[:, b], ref, rtol=0, atol=1e-7 * scale)
        for key in COUNTERS:
            totals[key] += alone.stats.get(key, 0)
    for key in COUNTERS:  # (a Newton test at its threshold may flip with the rounding)
        assert abs(sol.stats.get(key, 0) - totals[key]) <= 0.01 * totals[key], key
    return sol


@pytest.mark.parametrize("solver", STIFF)
def test_each_sample_alone_takes_the_same_steps_relaxation(solver):
    t = torch.linspace(0.0, 2.0, 5, dtype=F64)
    sol = _compare_with_alone(relax, relax_y0(), t, solver, 1e-6, 1e-9)
    assert sol.stats["n_compactions"] >= 1  # the per-row state followed the compactions


@pytest.mark.parametrize("solver", STIFF)
def test_each_sample_alone_takes_the_same_steps_van_der_pol_with_newton_failures(solver):
    # Each sample over its own interval [0, mu] (a 2-D t); at rtol=1e-3 the Newton iterations
    # of the large steps fail and are retried (fresh Jacobian block, cold start), then rejected.
    mus = torch.tensor([1e2, 1e3, 1e5], dtype=F64)
    y0 = torch.stack([torch.full((3,), 2.0, dtype=F64), torch.zeros(3, dtype=F64), mus], 1)
    t = torch.stack([torch.zeros(3, dtype=F64), mus], 1)
    sol = _compare_with_alone(vdp, y0, t, solver, 1e-3, 1e-5)
    if solver != "rodas4":
        assert sol.stats["n_newton_fail"] > 0
        assert sol.stats["n_jac"] > 3  # blocks recomputed after slow convergence/failures


def test_rosenbrock_fixed_steps_per_sample_equal_each_sample_alone():
    t = torch.tensor([[0.0, 0.3, 1.0], [0.5, 0.9, 2.0]], dtype=F64)
    y0 = relax_y0()[[1, 4]]
    sol = neuralode.solve(relax, y0, t, solver="rodas4", controller=ConstantStep(0.05), **PS)
    for b in range(2):
        alone = neuralode.solve(relax, y0[b : b + 1], t[b], solver="rodas4",
                                controller=ConstantStep(0.05))  # fmt: skip
        torch.testing.assert_close(sol.ys[:, b], alone.ys[:, 0], rtol=1e-12, atol=1e-14)
        assert int(sol.stats["n_accepted"][b]) == alone.stats["n_accepted"]


def test_float32_state_runs_and_agrees_with_float64():
    t = torch.linspace(0.0, 2.0, 3, dtype=F64)
    sol = neuralode.solve(relax, relax_y0().float(), t.float(), solver="kvaerno5", rtol=1e-5,
                          atol=1e-7, **PS)  # fmt: skip
    assert sol.ys.dtype == torch.float32
    exact = relax_exact(t.numpy()[:, None], 0.5, K.numpy()[None, :])
    # (kvaerno5's global error at rtol=1e-5 and k=1e4 is about 1.4e-3 in float64 too.)
    np.testing.assert_allclose(sol.ys[..., 0].double().numpy(), exact, rtol=0, atol=3e-3)


# --------------------------------------------------------------------------- dense output
@pytest.mark.parametrize("solver", STIFF)
def test_dense_output_per_sample_equals_each_sample_alone(solver):
    t = torch.tensor([0.0, 2.0], dtype=F64)
    y0 = relax_y0()[[0, 2, 4]]
    sol = neuralode.solve(relax, y0, t, solver=solver, rtol=1e-7, atol=1e-9, dense_output=True,
                          **PS)  # fmt: skip
    tq = torch.tensor([[0.013, 0.77, 1.9], [0.002, 0.5, 1.999], [1e-5, 0.31, 1.5]], dtype=F64)
    v = sol.evaluate(tq)  # (Q, B, M)
    assert v.shape == (3, 3, 2)
    for b in range(3):
        alone = neuralode.solve(relax, y0[b : b + 1], t, solver=solver, rtol=1e-7, atol=1e-9,
                                dense_output=True)  # fmt: skip
        torch.testing.assert_close(v[:, b], alone.evaluate(tq[b])[:, 0], rtol=0, atol=1e-9)
        exact = relax_exact(tq[b].numpy(), 0.5, float(y0[b, 1]))
        np.testing.assert_allclose(v[:, b, 0].numpy(), exact, rtol=0, atol=2e-5)


# --------------------------------------------------------------------------- gradients
class Relax(torch.nn.Module):
    """``u' = -k (u - p cos t)`` with a shared parameter ``p``."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.tensor(1.3, dtype=F64))

    def forward(self, t, y):
        u, k = y[..., 0], y[..., 1]
        return torch.stack([-k * (u - self.p * torch.cos(t)), torch.zeros_like(k)], -1)


T_GRAD = torch.tensor([0.0, 0.1, 0.5], dtype=F64)
K_GRAD = torch.tensor([1.0, 30.0, 300.0], dtype=F64)


def _loss(f, y0, solver, tol, **kw):
    sol = neuralode.solve(f, y0, T_GRAD, solver=solver, rtol=tol, atol=tol * 1e-2, **PS, **kw)
    return (sol.ys[1:, :, 0] ** 2).sum()


@pytest.mark.parametrize("solver", STIFF)
def test_direct_gradients_equal_each_sample_alone_and_finite_differences(solver):
    f = Relax()
    y0 = torch.stack([torch.full((3,), 0.5, dtype=F64), K_GRAD], 1).requires_grad_()
    gy, gp = torch.autograd.grad(_loss(f, y0, solver, 1e-6), [y0, f.p])
    # The same discrete steps solved alone with shared control: equal to rounding.
    gp_alone = 0.0
    for b in range(3):
        yb = y0[b : b + 1].detach().clone().requires_grad_()
        sol = neuralode.solve(f, yb, T_GRAD, solver=solver, rtol=1e-6, atol=1e-8)
        g1 = torch.autograd.grad((sol.ys[1:, :, 0] ** 2).sum(), [yb, f.p])
        torch.testing.assert_close(gy[b], g1[0][0], rtol=1e-7, atol=1e-10)
        gp_alone = gp_alone + g1[1]
    torch.testing.assert_close(gp, gp_alone, rtol=1e-7, atol=1e-10)
    # Central differences of tight solves. The step sequence jumps with the inputs (noise of
    # the order of the tolerance in the loss), so the difference step is not tiny.
    tight = 1e-8 if solver == "trbdf2" else 1e-9  # (second order: many steps at 1e-9)
    gy_t, gp_t = torch.autograd.grad(_loss(f, y0, solver, tight), [y0, f.p])
    eps = 1e-4
    with torch.no_grad():
        for q, d in ((0, (0, 0)), (1, (1, 1)), (2, (2, 1))):
            e = torch.zeros_like(y0)
            e[d] = eps * max(1.0, float(y0[d]))
            fd = (_loss(f, y0 + e, solver, tight) - _loss(f, y0 - e, solver, tight)) / (2 * e[d])
            assert math.isclose(float(gy_t[d]), float(fd), rel_tol=1e-5, abs_tol=1e-6), (q, d)
        p0 = float(f.p)
        f.p.fill_(p0 + eps)
        lp = _loss(f, y0, solver, tight)
        f.p.fill_(p0 - eps)
        lm = _loss(f, y0, solver, tight)
        f.p.fill_(p0)
    assert math.isclose(float(gp_t), float((lp - lm) / (2 * eps)), rel_tol=1e-5)


def test_rosenbrock_checkpointed_gradients_equal_direct():
    f = Relax()
    y0 = torch.stack([torch.full((3,), 0.5, dtype=F64), K_GRAD], 1).requires_grad_()
    ref = torch.autograd.grad(_loss(f, y0, "rodas4", 1e-6), [y0, f.p])
    got = torch.autograd.grad(_loss(f, y0, "rodas4", 1e-6, gradient=Checkpointed()), [y0, f.p])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- events
@pytest.mark.parametrize("solver", ["rodas4", "kvaerno5"])
def test_terminal_event_per_sample_against_the_closed_form(solver):
    # u rises from 0 towards cos t; each sample crosses 0.3 at its own time.
    ev = neuralode.Event(lambda t, y: y[..., 0] - 0.3, terminal=True)
    y0 = torch.stack([torch.zeros(3, dtype=F64), K_GRAD], 1)
    t = torch.tensor([0.0, 3.0], dtype=F64)
    sol = neuralode.solve(relax, y0, t, solver=solver, rtol=1e-9, atol=1e-11, event=ev, **PS)
    for b, k in enumerate(K_GRAD.tolist()):
        want = brentq(lambda s, k=k: relax_exact(s, 0.0, k) - 0.3, 1e-9, 0.5, xtol=1e-14)
        assert math.isclose(float(sol.event_t[b]), want, rel_tol=1e-6), (b, k)


# --------------------------------------------------------------------------- refusals
M = "batch_control='per_sample'"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(solver="radauIIA5", dt=0.1), rf"{M} does not run the fully implicit method 'radauIIA5'"),
        (dict(solver="gl4", dt=0.1), r"fully implicit method 'gl4' \(its Newton system couples all stages"),
        (dict(solver=neuralode.solvers.get_tableau("kvaerno5").with_options(linear_solver="krylov")),
         rf"{M} runs 'kvaerno5' with linear_solver='dense' only .* got linear_solver='krylov'"),
        (dict(solver="implicit_euler", dt=0.1), rf"{M} runs Newton-based methods on adaptive steps only.*'implicit_euler' with ConstantStep"),
        (dict(solver="sdirk2", dt=0.1), r"a fixed step whose Newton iteration fails cannot be rejected"),
        (dict(solver="kvaerno5", gradient="checkpoint"), rf"{M} with the Newton-based method 'kvaerno5' does not support gradient=Checkpointed\(...\): a replay"),
        (dict(solver="trbdf2", gradient="backsolve"), rf"{M} with Backsolve integrates the adjoint system backward .*got backward solver 'trbdf2'"),
        (dict(solver="rodas4", gradient="backsolve"), r"explicit Runge-Kutta method .*got backward solver 'rodas4'; pass one \(Backsolve\(solver='dopri5'\)\)"),
        (dict(solver="dopri5", gradient=Backsolve(solver="kvaerno5")), r"got backward solver 'kvaerno5'"),
        (dict(solver="implicit_adams"), rf"{M} does not run solver 'implicit_adams': only explicit Runge-Kutta, Rosenbrock"),
    ],
)  # fmt: skip
def test_refused_combinations_name_the_method_and_why(kw, match):
    y0 = relax_y0()[:2]
    with pytest.raises(ValueError, match=match):
        neuralode.solve(relax, y0, torch.tensor([0.0, 1.0], dtype=F64), **PS, **kw)


@pytest.mark.parametrize("solver", ["rodas4", "kvaerno5"])
def test_backsolve_with_an_explicit_backward_solver_matches_direct(solver):
    # Mildly stiff (an explicit backward solve must resolve the fastest rate).
    f = Relax()
    y0 = torch.stack([torch.full((2,), 0.5, dtype=F64), torch.tensor([1.0, 5.0], dtype=F64)], 1)
    y0.requires_grad_()
    ref = torch.autograd.grad(_loss(f, y0, solver, 1e-9), [y0, f.p])
    bs = Backsolve(solver="dopri5", rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(_loss(f, y0, solver, 1e-9, gradient=bs), [y0, f.p])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------- Jacobian blocks
def _chain(n):
    """A stiff linear chain ``y' = -k L y`` (L tridiagonal, eigenvalues in (0, 4]) of n
    components, with the per-sample rate k as the last component."""

    def func(t, y):
        x, k = y[..., :-1], y[..., -1:]
        lap = 2 * x - torch.nn.functional.pad(x, (1, 0))[..., :-1]
        lap = lap - torch.nn.functional.pad(x, (0, 1))[..., 1:]
        return torch.cat([-k * lap, torch.zeros_like(k)], -1)

    return func


@pytest.mark.parametrize("solver", ["rodas4", "kvaerno5"])
def test_blocks_of_more_than_32_components_are_vectorised_and_exact(solver):
    # M = 41 > 32: the M vector-Jacobian products are batched (is_grads_batched); the steps
    # are those of each sample alone, whose shared stepper builds its Jacobian by jacrev.
    n = 40
    y0 = torch.cat([torch.linspace(0, 1, n, dtype=F64).sin().expand(3, n),
                    torch.tensor([[1.0], [1e2], [1e4]], dtype=F64)], 1)  # fmt: skip
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    sol = _compare_with_alone(_chain(n), y0, t, solver, 1e-6, 1e-9)
    # Against the matrix exponential of each sample's linear system.
    L = 2 * torch.eye(n, dtype=F64) - torch.diag(torch.ones(n - 1, dtype=F64), 1)
    L = L - torch.diag(torch.ones(n - 1, dtype=F64), -1)
    for b in range(3):
        want = torch.linalg.matrix_exp(-float(y0[b, -1]) * L) @ y0[b, :n]
        torch.testing.assert_close(sol.ys[-1, b, :n], want, rtol=0, atol=2e-5)


def test_func_hiding_its_state_dependence_gets_finite_difference_blocks():
    # func detaches the state: autograd sees no dependence, the blocks come from forward
    # differences (as the shared stepper's Jacobian does). (Not rodas4: a Rosenbrock method
    # needs the exact Jacobian for its order, and takes thousands of steps here.)
    def hidden(t, y):
        return relax(t, y.detach())

    t = torch.linspace(0.0, 1.0, 3, dtype=F64)
    sol = _compare_with_alone(hidden, relax_y0()[[0, 3]], t, "kvaerno5", 1e-6, 1e-9)
    exact = relax_exact(t.numpy()[:, None], 0.5, K.numpy()[[0, 3]][None, :])
    np.testing.assert_allclose(sol.ys[..., 0].numpy(), exact, rtol=0, atol=2e-4)  # (4 steps)


@pytest.mark.parametrize("solver", ["rodas4", "kvaerno5"])
def test_gradients_with_respect_to_a_2d_t_match_finite_differences(solver):
    y0 = relax_y0()[[1, 2]]
    t = torch.tensor([[0.0, 0.7], [0.1, 1.0]], dtype=F64, requires_grad=True)

    def end(tt):
        sol = neuralode.solve(relax, y0, tt, solver=solver, rtol=1e-8, atol=1e-10, **PS)
        return sol.ys[-1, :, 0].sum()

    (g,) = torch.autograd.grad(end(t), t)
    eps = 1e-6
    with torch.no_grad():
        for i in range(2):
            for j in range(2):
                e = torch.zeros_like(t)
                e[i, j] = eps
                fd = (end(t + e) - end(t - e)) / (2 * eps)
                assert math.isclose(float(g[i, j]), float(fd), rel_tol=1e-6, abs_tol=1e-7)


@pytest.mark.parametrize("solver", ["rodas4", "trbdf2"])
def test_dict_state_per_sample_equals_each_sample_alone(solver):
    # (A dict state's error norm is taken per leaf: compare like with like.)
    def relax_dict(t, s):
        d = relax(t, torch.cat([s["u"], s["k"]], -1))
        return {"u": d[..., :1], "k": d[..., 1:]}

    y0 = relax_y0()[[1, 3]]
    t = torch.linspace(0.0, 1.0, 3, dtype=F64)
    kw = dict(solver=solver, rtol=1e-7, atol=1e-9)
    sol = neuralode.solve(relax_dict, {"u": y0[:, :1], "k": y0[:, 1:]}, t, **kw, **PS)
    for b in range(2):
        alone = neuralode.solve(relax_dict, {"u": y0[b : b + 1, :1], "k": y0[b : b + 1, 1:]}, t,
                                **kw)  # fmt: skip
        torch.testing.assert_close(sol.ys["u"][:, b], alone.ys["u"][:, 0], rtol=1e-9, atol=1e-12)
        assert int(sol.stats["n_accepted"][b]) == alone.stats["n_accepted"]
    exact = relax_exact(t.numpy()[:, None], 0.5, y0[:, 1].numpy()[None, :])
    np.testing.assert_allclose(sol.ys["u"][..., 0].numpy(), exact, rtol=0, atol=5e-6)


@pytest.mark.parametrize(
    ("solver", "advice"),
    [
        ("kvaerno5", r"use 'direct' or Backsolve\(solver='dopri5'\), or batch_control='shared' with "
                     r"an explicit Runge-Kutta method"),
        ("rodas4", r"use 'direct', 'checkpoint' or Backsolve\(solver='dopri5'\)"),
        ("dopri5", r"use 'direct', 'checkpoint' or 'backsolve', or batch_control='shared'$"),
    ],
)  # fmt: skip
def test_reversible_per_sample_refusal_names_what_works_with_the_solver(solver, advice):
    # It named Checkpointed's reason and suggested batch_control='shared' for kvaerno5, which
    # Reversible refuses too (it wraps an explicit method); 'backsolve' for rodas4, refused too.
    y0 = torch.ones(2, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"two states share one step size\); " + advice):
        neuralode.solve(lambda t, y: -y, y0, t, solver=solver, gradient="reversible",
                        batch_control="per_sample")  # fmt: skip
    ok = {"kvaerno5": "direct", "rodas4": "checkpoint", "dopri5": "backsolve"}[solver]
    y0 = y0.clone().requires_grad_()
    ys = neuralode.solve(lambda t, y: -y, y0, t, solver=solver, batch_control="per_sample",
                         gradient=ok).ys  # fmt: skip
    ys[-1].sum().backward()  # the advice works: d y(1) / d y0 = e^-1
    torch.testing.assert_close(y0.grad, torch.full_like(y0, 0.36787944117144233), rtol=1e-5, atol=0)
