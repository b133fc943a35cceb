"""The torchdiffeq-compatible face (``neuralode.odeint`` / ``odeint_adjoint``) checked by values.

The checks mirror torchdiffeq 0.2.5's own test-suite (``tests/problems.py``, ``odeint_tests.py``,
``api_tests.py``, ``norm_tests.py``): the same closed-form problems (constant, sine, linear, plus an
exponential), forward and reversed time, tuple states, custom norms, fixed-grid options, jump and
step locations, first steps, step limits, the time dtype and the scipy wrapper. Where torchdiffeq
is correct its output is computed live and ours must agree with it within the tolerances; where
neuralode deliberately differs (see the ``neuralode._compat`` docstring) the difference itself is
asserted, with torchdiffeq's value next to ours. A torchdiffeq-style training loop (the classic
``ode_demo`` spiral) closes the file.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import neuralode
from neuralode import odeint, odeint_adjoint

torchdiffeq = pytest.importorskip("torchdiffeq")
scipy_integrate = pytest.importorskip("scipy.integrate")
scipy_linalg = pytest.importorskip("scipy.linalg")


# --------------------------------------------------------------------------- problems
# torchdiffeq's tests/problems.py, with closed-form solutions. The states are (1,)-shaped here
# (torchdiffeq uses 0-d ones; 0-d states have their own test below).
class ConstantODE(nn.Module):
    """y' = a + (y - (a t + b))^5: the solution a t + b is linear, so every method is exact."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.2))
        self.b = nn.Parameter(torch.tensor(3.0))

    def forward(self, t, y):
        return self.a + (y - (self.a * t + self.b)) ** 5

    def y_exact(self, t):
        return (self.a * t + self.b).unsqueeze(-1)


class SineODE(nn.Module):
    """y' = 2y/t + t^4 sin 2t - t^2 + 4t^3 on [1, 8] (non-autonomous, growing like t^4)."""

    def forward(self, t, y):
        return 2 * y / t + t**4 * torch.sin(2 * t) - t**2 + 4 * t**3

    def y_exact(self, t):
        c, s = torch.cos(2 * t), torch.sin(2 * t)
        y = -0.5 * t**4 * c + 0.5 * t**3 * s + 0.25 * t**2 * c - t**3 + 2 * t**4
        return (y + (math.pi - 0.25) * t**2).unsqueeze(-1)


class LinearODE(nn.Module):
    """y' = A y with a seeded random 10x10 A (skew part plus a small symmetric part)."""

    def __init__(self, dim: int = 10):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        u = torch.randn(dim, dim, generator=gen, dtype=torch.float64) * 0.1
        self.A = nn.Parameter(2 * u - (u + u.T))
        self.dim = dim

    def forward(self, t, y):
        return (self.A @ y.reshape(self.dim, 1)).reshape(-1)

    def y_exact(self, t):
        a = self.A.detach().double().numpy()
        ys = [scipy_linalg.expm(a * (float(s) - 1.0)) @ np.ones(self.dim) for s in t]
        return torch.tensor(np.stack(ys)).to(t.dtype)


class ExponentialODE(nn.Module):
    """y' = y / 2 from y(1) = 1."""

    def forward(self, t, y):
        return 0.5 * y

    def y_exact(self, t):
        return torch.exp(0.5 * (t - 1.0)).unsqueeze(-1)


PROBLEMS = {
    "constant": ConstantODE,
    "sine": SineODE,
    "linear": LinearODE,
    "exponential": ExponentialODE,
}


def construct_problem(ode: str, *, reverse: bool = False, dtype=torch.float64, npts: int = 10):
    """(func, y0, t, exact solution at t) on t = linspace(1, 8, npts), as in torchdiffeq."""
    f = PROBLEMS[ode]().to(dtype)
    t = torch.linspace(1, 8, npts, dtype=dtype)
    with torch.no_grad():
        sol = f.y_exact(t).to(dtype)
    if reverse:
        t, sol = t.flip(0), sol.flip(0)
    return f, sol[0].clone(), t, sol


def rel_error(true, estimate) -> float:
    """torchdiffeq's measure: the largest relative error over all outputs."""
    return float(((true - estimate) / true).abs().max())


def _no_grad_odeint(lib, *args, **kwargs):
    with torch.no_grad():
        return lib.odeint(*args, **kwargs)


# --------------------------------------------------------------------------- forward accuracy
# torchdiffeq's thresholds (odeint_tests.TestSolverError), per method and problem.
def _eps(method: str, ode: str) -> float:
    if method == "adaptive_heun":
        return 4e-3
    if method == "bosh3":
        return 3e-3
    if ode == "linear":
        return 2e-3
    return 1e-4


# adaptive_heun (order 2) at torchdiffeq's default rtol=1e-7 needs ~10^4 steps per problem;
# 1e-5 keeps the test quick and its errors stay well inside torchdiffeq's 4e-3.
_TOLS = {"dopri8": dict(rtol=1e-12, atol=1e-14), "adaptive_heun": dict(rtol=1e-5, atol=1e-7)}
# Methods whose torchdiffeq implementation is the same method as ours, so the two must agree.
# Not dopri8 (torchdiffeq's is Prince-Dormand RK8(7)13M, ours Hairer's DOP853) nor adaptive_heun
# (torchdiffeq reuses the predictor's derivative as the next step's first stage; see below).
_SAME_AS_TORCHDIFFEQ = {"dopri5", "bosh3"}


# float32 as torchdiffeq tests it: not dopri8 (below float32 resolution at rtol=1e-12); not
# adaptive_heun either (slow, and covered in float64).
_DTYPE_METHODS = [
    (torch.float64, m) for m in ("dopri5", "tsit5", "bosh3", "dopri8", "adaptive_heun")
]
_DTYPE_METHODS += [(torch.float32, m) for m in ("dopri5", "tsit5", "bosh3")]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("ode", list(PROBLEMS))
@pytest.mark.parametrize(
    "dtype,method", _DTYPE_METHODS, ids=[f"{str(d)[6:]}-{m}" for d, m in _DTYPE_METHODS]
)
def test_adaptive_accuracy(dtype, method, ode, reverse):
    """torchdiffeq's TestSolverError: relative error against the closed form below torchdiffeq's
    thresholds, forward and reversed, float64 and float32; and torchdiffeq's own answer (same
    method, same tolerances) within the same threshold of ours."""
    f, y0, t, sol = construct_problem(ode, reverse=reverse, dtype=dtype)
    kw = _TOLS.get(method, {})
    y = _no_grad_odeint(neuralode, f, y0, t, method=method, **kw)
    assert y.shape == sol.shape and y.dtype == dtype
    assert torch.equal(y[0], y0)
    assert rel_error(sol, y) < _eps(method, ode)
    if method in _SAME_AS_TORCHDIFFEQ:
        ref = _no_grad_odeint(torchdiffeq, f, y0, t, method=method, **kw)
        assert rel_error(ref, y) < _eps(method, ode)


def test_dopri8_reaches_tight_tolerances():
    """At rtol=1e-12 our DOP853 reaches ~1e-13 relative error (torchdiffeq's dopri8, a different
    8(7) pair, gives ~1e-7 on these problems, hence no comparison with it)."""
    for ode in ("sine", "linear"):
        f, y0, t, sol = construct_problem(ode)
        y = _no_grad_odeint(neuralode, f, y0, t, method="dopri8", rtol=1e-12, atol=1e-14)
        assert rel_error(sol, y) < 1e-11


@pytest.mark.parametrize("ode", list(PROBLEMS))
def test_fehlberg2_matches_torchdiffeq(ode):
    """Fehlberg's 1(2) pair: large global errors by nature, but the same ones as torchdiffeq's."""
    f, y0, t, sol = construct_problem(ode)
    y = _no_grad_odeint(neuralode, f, y0, t, method="fehlberg2", rtol=1e-6, atol=1e-8)
    ref = _no_grad_odeint(torchdiffeq, f, y0, t, method="fehlberg2", rtol=1e-6, atol=1e-8)
    err, ref_err = rel_error(sol, y), rel_error(sol, ref)
    assert err <= 3 * ref_err + 1e-12
    assert ref_err <= 3 * err + 1e-12
    assert err < 5e-2


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("method", ["euler", "midpoint", "heun2", "heun3", "rk4"])
@pytest.mark.parametrize("ode", ["sine", "linear", "exponential"])
def test_fixed_grid_matches_torchdiffeq(ode, method, reverse):
    """Same grid (step_size), same method: the same numbers, and errors of the method's order.

    The output times lie on the grid (step 7/90 on linspace(1, 8, 10)), so neither library
    interpolates and the two must agree to rounding.
    """
    f, y0, t, sol = construct_problem(ode, reverse=reverse)
    opts = dict(step_size=7 / 90)
    y = _no_grad_odeint(neuralode, f, y0, t, method=method, options=opts)
    ref = _no_grad_odeint(torchdiffeq, f, y0, t, method=method, options=opts)
    assert rel_error(ref, y) < 1e-11
    # Halving the step divides the error by about 2^order.
    order = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}[method]
    half = _no_grad_odeint(neuralode, f, y0, t, method=method, options=dict(step_size=7 / 180))
    err, err_half = (sol - y).abs().max(), (sol - half).abs().max()
    assert 0.6 * 2**order < err / err_half < 1.6 * 2**order


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun3", "rk4", "rk4_classic", "rk38"])
def test_fixed_methods_exact_on_constant_problem(method):
    """torchdiffeq's fixed-solver check: the linear solution is reproduced to rounding."""
    f, y0, t, sol = construct_problem("constant")
    y = _no_grad_odeint(neuralode, f, y0, t, method=method, options=dict(step_size=0.25))
    assert rel_error(sol, y) < 1e-12


def test_rk4_is_kutta_38_rule_and_rk4_classic_is_not():
    """torchdiffeq's 'rk4' is the 3/8 rule; 'rk4_classic' is the classical method."""
    f = lambda t, y: -y + torch.sin(3 * t)  # noqa: E731
    y0 = torch.tensor([1.0], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    opts = dict(step_size=0.25)
    rk4 = odeint(f, y0, t, method="rk4", options=opts)
    ref = torchdiffeq.odeint(f, y0, t, method="rk4", options=opts)
    torch.testing.assert_close(rk4, ref, rtol=0, atol=1e-13)  # to rounding; classic is 1e-7 off
    torch.testing.assert_close(odeint(f, y0, t, method="rk38", options=opts), rk4)
    classic = odeint(f, y0, t, method="rk4_classic", options=opts)
    assert float((classic - rk4).abs().max()) > 1e-7  # a different (same-order) method
    exact = 1.3 * math.exp(-1) + 0.1 * math.sin(3) - 0.3 * math.cos(3)
    assert abs(float(classic[-1]) - exact) < 1e-4


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8", "adaptive_heun", "rk4"])
def test_no_integration_returns_initial_state(method):
    """torchdiffeq's TestNoIntegration: a single output time gives y0 back (fixed-step methods
    too, with or without a step size)."""
    for opts in ({}, dict(step_size=0.1)) if method == "rk4" else ({},):
        for ode in PROBLEMS:
            f, y0, t, sol = construct_problem(ode)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # rk4 without step_size warns
                y = _no_grad_odeint(neuralode, f, y0, t[:1], method=method, options=opts)
            assert y.shape == (1, *y0.shape)
            assert float((y[0] - sol[0]).abs().max()) < 1e-12


def test_scalar_state():
    """torchdiffeq's problems use 0-d states: y0 = torch.tensor(3.0) (tensor and tuple)."""
    f = lambda t, y: -y  # noqa: E731
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y0 = torch.tensor(1.0, dtype=torch.float64)
    y = odeint(f, y0, t)
    assert y.shape == (2,)
    assert abs(float(y[-1]) - math.exp(-1)) < 1e-6
    (ya,) = odeint(lambda t, y: (-y[0],), (y0,), t)
    assert ya.shape == (2,)
    assert abs(float(ya[-1]) - math.exp(-1)) < 1e-6


# --------------------------------------------------------------------------- tuple states
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8", "adaptive_heun"])
def test_tuple_state(method, reverse):
    """torchdiffeq's TestCollectionState, forward and decreasing time: each component of a tuple
    state is solved like the tensor alone, to torchdiffeq's 1e-12 on the constant problem."""
    f, y0, t, sol = construct_problem("constant", reverse=reverse)

    def tuple_f(t, y):
        return f(t, y[0]), f(t, y[1])

    with torch.no_grad():
        ya, yb = odeint(tuple_f, (y0, y0), t, method=method)
    assert float((sol - ya).abs().max()) < 1e-12
    assert float((sol - yb).abs().max()) < 1e-12


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_tuple_state_mixed_shapes_matches_torchdiffeq(reverse):
    """A tuple of differently shaped components (a harmonic oscillator split into position and
    velocity, plus a 2x2 exponential), against the closed form and torchdiffeq."""

    def f(t, y):
        x, v, m = y
        return v, -4.0 * x, -0.5 * m

    x0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    v0 = torch.tensor([0.0, 1.0], dtype=torch.float64)
    m0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    t = torch.linspace(0.0, 3.0, 7, dtype=torch.float64)
    if reverse:
        t = t.flip(0)
    tt = (t - t[0]).reshape(-1, 1)
    exact = (
        x0 * torch.cos(2 * tt) + v0 / 2 * torch.sin(2 * tt),
        -2 * x0 * torch.sin(2 * tt) + v0 * torch.cos(2 * tt),
        m0 * torch.exp(-0.5 * tt).reshape(-1, 1, 1),
    )
    ys = odeint(f, (x0, v0, m0), t, rtol=1e-9, atol=1e-11)
    ref = torchdiffeq.odeint(f, (x0, v0, m0), t, rtol=1e-9, atol=1e-11)
    for y, r, e in zip(ys, ref, exact):
        assert y.shape == e.shape
        torch.testing.assert_close(y, e, rtol=0, atol=1e-7)
        torch.testing.assert_close(y, r, rtol=0, atol=1e-7)


def test_tuple_tolerances():
    """rtol/atol tuples give one tolerance per component (torchdiffeq's _tuple_tol): the tight
    component sets the steps whichever position it has, and the results match torchdiffeq's."""

    def f(t, y):
        return -y[0], torch.cos(3 * t) * y[1]

    y0 = (torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    exact = (math.exp(-2), math.exp(math.sin(6) / 3))
    loose = odeint(f, y0, t, rtol=1e-3, atol=1e-5)
    errs = [abs(float(c[-1, 0]) - e) for c, e in zip(loose, exact)]
    assert max(errs) > 1e-7  # the loose tolerance alone is visibly inaccurate
    for tight in (0, 1):
        rtol = tuple(1e-10 if i == tight else 1e-3 for i in range(2))
        atol = tuple(1e-12 if i == tight else 1e-5 for i in range(2))
        ys = odeint(f, y0, t, rtol=rtol, atol=atol)
        ref = torchdiffeq.odeint(f, y0, t, rtol=rtol, atol=atol)
        assert abs(float(ys[tight][-1, 0]) - exact[tight]) < 1e-8
        for y, r in zip(ys, ref):
            torch.testing.assert_close(y, r, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- norms
def test_custom_norm_receives_the_state_structure():
    """torchdiffeq's test_norm: the norm sees a tensor shaped like y0, or a tuple like y0."""
    seen = []

    def norm(state):
        seen.append(
            tuple(state.shape) if torch.is_tensor(state) else [tuple(s.shape) for s in state]
        )
        first = state if torch.is_tensor(state) else state[0]
        return first.pow(2).mean().sqrt()

    t = torch.tensor([0.0, 1.0])
    odeint(lambda t, x: x, torch.ones(2, 2), t, options=dict(norm=norm))
    assert seen and all(s == (2, 2) for s in seen)
    seen.clear()
    x0 = (torch.ones(1), torch.tensor([[0.5, 0.5], [0.1, 0.1]]))
    odeint(lambda t, x: x, x0, t, options=dict(norm=norm))
    assert seen and all(s == [(1,), (2, 2)] for s in seen)


class _NeuralF(nn.Module):
    """torchdiffeq's norm_tests._NeuralF: a small oscillating MLP that counts its calls."""

    def __init__(self, width: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 2), nn.Tanh())
        self.nfe = 0

    def forward(self, t, x):
        self.nfe += 1
        return self.net(x) * t.mul(20).sin()


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8", "adaptive_heun"])
def test_larger_norm_costs_more_steps(method):
    """torchdiffeq's test_large_norm: 10x the norm makes the controller take more steps, and a
    max-norm solve is accurate to its tolerance (checked against a tight solve)."""
    x0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    f = _NeuralF(10, seed=3456789).double()
    kw = dict(rtol=1e-5, atol=1e-7) if method == "adaptive_heun" else {}
    with torch.no_grad():
        y = odeint(f, x0, t, method=method, options=dict(norm=lambda e: e.abs().max()), **kw)
        n_max = f.nfe
        f.nfe = 0
        odeint(f, x0, t, method=method, options=dict(norm=lambda e: 10 * e.abs().max()), **kw)
        n_large = f.nfe
        ref = odeint(f, x0, t, method="dopri8", rtol=1e-12, atol=1e-14)
    assert n_max < n_large
    tol = kw.get("rtol", 1e-7)
    assert float((y[-1] - ref[-1]).abs().max()) < 100 * tol


# --------------------------------------------------------------------------- fixed-grid options
def test_grid_constructor_equals_step_size_and_torchdiffeq():
    """A grid_constructor returning the step_size grid gives the step_size result; a nonuniform
    grid (also for decreasing time) gives torchdiffeq's numbers."""
    f, y0, t, _ = construct_problem("sine")

    def uniform(func, y0, t):
        n = math.ceil(float(t[-1] - t[0]) / 0.1 + 1)
        g = torch.arange(n, dtype=t.dtype) * 0.1 + t[0]
        g[-1] = t[-1]
        return g

    with torch.no_grad():
        a = odeint(f, y0, t, method="midpoint", options=dict(step_size=0.1))
        b = odeint(f, y0, t, method="midpoint", options=dict(grid_constructor=uniform))
    torch.testing.assert_close(a, b, rtol=1e-13, atol=0)

    def nonuniform(func, y0, t):
        # denser at the start, ends exactly on t[0] and t[-1] (decreasing if t is)
        s = torch.linspace(0, 1, 60, dtype=t.dtype) ** 2
        return t[0] + (t[-1] - t[0]) * s

    for tt in (t, t.flip(0)):
        z0 = construct_problem("sine")[3][0 if tt is t else -1]
        with torch.no_grad():
            ours = odeint(f, z0, tt, method="rk4", options=dict(grid_constructor=nonuniform))
            ref = torchdiffeq.odeint(
                f, z0, tt, method="rk4", options=dict(grid_constructor=nonuniform, interp="cubic")
            )
        # Output times fall between grid points: both use cubic Hermite between the same steps.
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=0)


def test_step_size_and_grid_constructor_are_exclusive():
    g = lambda f, y0, t: t  # noqa: E731
    with pytest.raises(ValueError, match="step_size or grid_constructor"):
        odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]), method="euler",
               options=dict(step_size=0.1, grid_constructor=g))  # fmt: skip


def test_interp_cubic_matches_torchdiffeq_and_linear_is_not_silently_ignored():
    """Between grid points ours is cubic Hermite: torchdiffeq's interp='cubic' exactly. An
    explicit interp='linear' must be honoured or warned about, not silently replaced."""
    f = lambda t, y: -y + torch.sin(3 * t)  # noqa: E731
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    t = torch.tensor([0.0, 0.33, 0.71, 1.0, 1.55], dtype=torch.float64)
    cubic = dict(step_size=0.2, interp="cubic")
    torch.testing.assert_close(
        odeint(f, y0, t, method="rk4", options=cubic),
        torchdiffeq.odeint(f, y0, t, method="rk4", options=cubic),
        rtol=0,
        atol=1e-14,
    )
    linear = dict(step_size=0.2, interp="linear")
    ref = torchdiffeq.odeint(f, y0, t, method="rk4", options=linear)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ours = odeint(f, y0, t, method="rk4", options=linear)
    honoured = float((ours - ref).abs().max()) < 1e-12
    warned = any("interp" in str(x.message) for x in w)
    assert honoured or warned


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun3", "rk4"])
def test_perturb_matches_torchdiffeq(method):
    """perturb=True evaluates f just after each step's start and just before its end.

    f is 0 before t = 1 and 1 from t = 1 on. With steps of 0.5, the step [0.5, 1] must see 0 at
    its end (the left limit) and [1, 1.5] 1 at its start, so y(2) = 1 exactly. Without perturb
    the 3/8 rule's last stage sees f(1) = 1 and gives 1.0625, as torchdiffeq does.
    """

    def f(t, y):
        return torch.ones_like(y) * (1.0 if float(t) >= 1.0 else 0.0)

    y0, t = torch.zeros(1, dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)
    for perturb in (False, True):
        opts = dict(step_size=0.5, perturb=perturb)
        ours = float(odeint(f, y0, t, method=method, options=opts)[-1])
        ref = float(torchdiffeq.odeint(f, y0, t, method=method, options=opts)[-1])
        assert ours == pytest.approx(ref, abs=1e-14), (perturb, ours, ref)
        if perturb:
            assert ours == pytest.approx(1.0, abs=1e-14)


def test_fixed_method_without_step_size_warns_and_steps_between_outputs():
    """(a) As torchdiffeq: one step per output interval, so rk4 on y' = -y over t = [0, 5]
    returns 1 - 5 + 25/2 - 125/6 + 625/24 = 13.7083 (true value e^-5 = 0.0067); we warn."""
    y0, t = torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.0, 5.0], dtype=torch.float64)
    with pytest.warns(UserWarning, match="step_size"):
        ours = float(odeint(lambda t, y: -y, y0, t, method="rk4")[-1])
    ref = float(torchdiffeq.odeint(lambda t, y: -y, y0, t, method="rk4")[-1])
    assert ours == pytest.approx(13.708333333333333, rel=1e-14)
    assert ours == pytest.approx(ref, rel=1e-14)
    # With a step size: no warning and the right answer.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        good = float(odeint(lambda t, y: -y, y0, t, method="rk4", options=dict(step_size=0.05))[-1])
    assert good == pytest.approx(math.exp(-5), rel=1e-6)


# --------------------------------------------------------------------------- jump_t / step_t
def _piecewise_calls():
    calls: list[float] = []

    def f(t, x):
        calls.append(float(t))
        return -0.5 * x if t < 0.5 else x**2

    return f, calls


def _piecewise_exact(x0: torch.Tensor, t: float) -> torch.Tensor:
    """x' = -x/2 for t < 1/2, x' = x^2 after: x(1/2) = x0 e^(-1/4), then 1/(1/x(1/2) - (t-1/2))."""
    x_half = x0 * math.exp(-0.25)
    return 1.0 / (1.0 / x_half - (t - 0.5))


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8"])
def test_jump_t_discontinuity(method):
    """torchdiffeq's TestStepLocations: telling the solver where f jumps costs fewer evaluations.

    Values match the closed form, f is never evaluated exactly at the jump (steps ending there
    see the left limit, the next step starts from the right one, as torchdiffeq's perturbation),
    and the solve needs fewer evaluations than without jump_t.
    """
    x0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    f, calls = _piecewise_calls()
    y = odeint(f, x0, t, method=method, options=dict(jump_t=torch.tensor([0.5])))
    n_jump, at_jump = len(calls), calls.count(0.5)
    calls.clear()
    odeint(f, x0, t, method=method)
    n_plain = len(calls)
    torch.testing.assert_close(y[-1], _piecewise_exact(x0, 1.0), rtol=1e-5, atol=0)
    assert at_jump == 0, f"f evaluated {at_jump} times exactly at the jump t=0.5"
    assert n_jump < n_plain, (n_jump, n_plain)


def test_jump_t_decreasing_time():
    """A jump crossed backwards: x' = x^2 for t > 1/2 run from t = 1 back to 0."""
    f, calls = _piecewise_calls()
    x1 = _piecewise_exact(torch.tensor([1.0, 2.0], dtype=torch.float64), 1.0)
    t = torch.tensor([1.0, 0.0], dtype=torch.float64)
    y = odeint(f, x1, t, options=dict(jump_t=[0.5]))
    torch.testing.assert_close(y[-1], torch.tensor([1.0, 2.0], dtype=torch.float64), rtol=1e-5,
                               atol=0)  # fmt: skip
    assert min(calls) >= 0.0 and max(calls) <= 1.0


def test_step_t_lands_on_the_time():
    """step_t: the solver lands exactly on the given time (f is evaluated there) without a
    restart; the result is unchanged within the tolerance."""
    calls: list[float] = []

    def f(t, y):
        calls.append(float(t))
        return -y + torch.sin(3 * t)

    y0 = torch.tensor([1.0], dtype=torch.float64)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    land = 0.7312345
    y = odeint(f, y0, t, options=dict(step_t=[land]))
    assert land in calls
    exact = 1.3 * math.exp(-2) + 0.1 * math.sin(6) - 0.3 * math.cos(6)
    assert abs(float(y[-1]) - exact) < 1e-6


# --------------------------------------------------------------------------- step-size options
@pytest.mark.parametrize("method", ["dopri5", "bosh3", "adaptive_heun"])
def test_first_step_sets_the_first_stage_times(method):
    """options['first_step'] = h: the first step's stages are at t0 + c_i h, as in torchdiffeq."""
    ours: list[float] = []
    ref: list[float] = []

    def rec(store):
        def f(t, y):
            store.append(float(t))
            return -y

        return f

    y0, t = torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    odeint(rec(ours), y0, t, method=method, options=dict(first_step=0.01))
    torchdiffeq.odeint(rec(ref), y0, t, method=method, options=dict(first_step=0.01))
    n = {"dopri5": 7, "bosh3": 4, "adaptive_heun": 2}[method]
    np.testing.assert_allclose(ours[:n], ref[:n], rtol=0, atol=1e-15)
    assert max(ours[:n]) == pytest.approx(0.01, abs=1e-15)


def test_max_step_min_step_and_factors():
    """max_step bounds every step; safety/ifactor/dfactor are honoured (a solve with ifactor=1
    and safety=1 never grows its step beyond first_step)."""
    calls: list[float] = []

    def f(t, y):
        calls.append(float(t))
        return -y

    y0, t = torch.ones(1, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    y = odeint(f, y0, t, method="bosh3", options=dict(max_step=0.01))
    starts = sorted(set(calls))
    assert max(b - a for a, b in zip(starts, starts[1:])) <= 0.01 + 1e-15
    assert len(calls) >= 3 * 100
    assert abs(float(y[-1]) - math.exp(-1)) < 1e-7
    calls.clear()
    odeint(f, y0, t, method="dopri5", rtol=1e3, atol=1e3,
           options=dict(first_step=0.1, ifactor=1.0, safety=1.0))  # fmt: skip
    assert len(calls) == 1 + 6 * 10  # ten steps of 0.1, FSAL: 6 new evaluations each


def test_max_num_steps_counts_the_whole_solve():
    """(b) 50 output times, ~540 steps needed, max_num_steps=200: torchdiffeq counts per output
    interval (~11 each) and lets it through; we count the whole solve and raise MaxStepsError."""

    def f(t, y):
        return torch.stack([y[1], -400.0 * y[0]])

    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t = torch.linspace(0, 2.5, 50, dtype=torch.float64)
    kw = dict(rtol=1e-8, atol=1e-8, options=dict(max_num_steps=200))
    ref = torchdiffeq.odeint(f, y0, t, **kw)
    torch.testing.assert_close(ref[-1, 0], torch.cos(torch.tensor(50.0, dtype=torch.float64)),
                               rtol=0, atol=1e-4)  # fmt: skip
    with pytest.raises(neuralode.MaxStepsError, match="max_steps=200") as info:
        odeint(f, y0, t, **kw)
    assert isinstance(info.value, RuntimeError)
    assert info.value.step == 200 and 0 < info.value.t < 2.5
    # Enough steps: the limit is not hit and the result is unchanged.
    ok = odeint(f, y0, t, rtol=1e-8, atol=1e-8, options=dict(max_num_steps=5000))
    torch.testing.assert_close(ok, odeint(f, y0, t, rtol=1e-8, atol=1e-8))
    with pytest.raises(neuralode.MaxStepsError):
        odeint(f, y0, t, method="rk4", options=dict(step_size=0.01, max_num_steps=100))


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8", "adaptive_heun"])
def test_func_never_evaluated_beyond_t1(method):
    """(c) Ours stays inside [t0, t1] in both directions; torchdiffeq's dopri5 steps past t1 and
    interpolates back (it evaluated f at t = 1.26 for t1 = 1 here)."""
    calls: list[float] = []

    def f(t, y):
        calls.append(float(t))
        return -y + torch.sin(5 * t)

    y0 = torch.ones(1, dtype=torch.float64)
    for t in ([0.0, 0.3, 1.0], [1.0, 0.6, 0.0]):
        calls.clear()
        odeint(f, y0, torch.tensor(t, dtype=torch.float64), method=method, rtol=1e-3, atol=1e-3)
        assert min(calls) >= 0.0 and max(calls) <= 1.0
    if method == "dopri5":
        calls.clear()
        t = torch.tensor([0.0, 1.0], dtype=torch.float64)
        torchdiffeq.odeint(f, y0, t, rtol=1e-3, atol=1e-3)
        assert max(calls) > 1.0  # the documented difference


def test_adaptive_heun_evaluates_f_at_each_new_step():
    """(d) y' = -2y + sin 3t, y(0) = 1, two Heun steps of 0.25 (huge tolerances, ifactor=1 keep
    the step at first_step): ours is Heun's method, 0.611167 (exact 0.589911). torchdiffeq
    reuses f at the Euler predictor as the next step's first stage and returns 0.637443."""

    def f(t, y):
        return -2 * y + torch.sin(3 * t)

    y0 = torch.tensor([1.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.5], dtype=torch.float64)
    y, h = y0, 0.25
    for k in range(2):  # Heun's method by hand
        s = torch.tensor(k * h, dtype=torch.float64)
        k1 = f(s, y)
        y = y + h / 2 * (k1 + f(s + h, y + h * k1))
    opts = dict(first_step=0.25, ifactor=1.0, safety=1.0)
    ours = float(odeint(f, y0, t, method="adaptive_heun", rtol=1e3, atol=1e3, options=opts)[-1])
    assert ours == pytest.approx(float(y), abs=1e-14)
    assert ours == pytest.approx(0.6111673239537883, abs=1e-12)
    native = neuralode.solve(f, y0, t, solver="adaptive_heun", dt=0.25).ys[-1]
    assert float(native) == pytest.approx(ours, abs=1e-14)
    ref = torchdiffeq.odeint(f, y0, t, method="adaptive_heun", rtol=1e3, atol=1e3, options=opts)
    assert float(ref[-1]) == pytest.approx(0.637442929579152, abs=1e-9)


# --------------------------------------------------------------------------- time dtype
def test_time_dtype_passed_to_func():
    """torchdiffeq hands func t in y0's (real) dtype, so code that concatenates t onto a float32
    state keeps working; options['dtype'] sets the dtype of t explicitly."""
    lin = nn.Linear(3, 2)

    def concat_t(t, y):  # the common "append time as a feature" pattern
        return lin(torch.cat([y, t.expand(y.shape[0], 1)], dim=1))

    y0 = torch.randn(4, 2)
    t = torch.tensor([0.0, 1.0])
    ref = torchdiffeq.odeint(concat_t, y0, t)
    with torch.no_grad():
        torch.testing.assert_close(odeint(concat_t, y0, t), ref, rtol=1e-5, atol=1e-6)

    seen: list[torch.dtype] = []

    def f(t, y):
        seen.append(t.dtype)
        return -y

    odeint(f, torch.ones(2, dtype=torch.float32), t, options=dict(dtype=torch.float32))
    assert set(seen) == {torch.float32}
    seen.clear()
    odeint(f, torch.ones(2, dtype=torch.float64), t, options=dict(dtype=torch.float64))
    assert set(seen) == {torch.float64}


# --------------------------------------------------------------------------- scipy_solver
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("solver", ["RK45", "DOP853"])
def test_scipy_solver(solver, reverse):
    """method='scipy_solver' forwards to solve_ivp: exactly solve_ivp's numbers and
    torchdiffeq's, and torchdiffeq's 1e-3 accuracy on its problems."""
    for ode in PROBLEMS:
        f, y0, t, sol = construct_problem(ode, reverse=reverse)

        def g(s, y, f=f):
            return f(s, y).detach()

        kw = dict(method="scipy_solver", rtol=1e-7, atol=1e-9, options=dict(solver=solver))
        y = odeint(g, y0, t, **kw)
        assert y.shape == sol.shape and y.dtype == sol.dtype
        assert rel_error(sol, y) < 1e-3
        ref = torchdiffeq.odeint(g, y0, t, **kw)
        torch.testing.assert_close(y, ref, rtol=1e-13, atol=0)
        direct = scipy_integrate.solve_ivp(
            lambda s, x: g(torch.tensor(s, dtype=torch.float64), torch.as_tensor(x)).numpy(),
            (float(t[0]), float(t[-1])),
            y0.numpy(),
            method=solver,
            t_eval=t.numpy(),
            rtol=1e-7,
            atol=1e-9,
        )
        np.testing.assert_allclose(y.numpy(), direct.y.T, rtol=1e-13, atol=0)


def test_scipy_solver_options():
    with pytest.warns(UserWarning, match="unknown options"):  # torchdiffeq warns and runs
        odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]), method="scipy_solver",
               options=dict(solver="RK45", foo=0.1))  # fmt: skip
    with pytest.warns(UserWarning, match="step_size"):
        odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]), method="scipy_solver",
               options=dict(solver="RK45", step_size=0.1))  # fmt: skip
    y = odeint(lambda t, y: -y, torch.ones(1, dtype=torch.float64),
               torch.tensor([0.0, 1.0], dtype=torch.float64), method="scipy_solver",
               options=dict(solver="DOP853", max_step=0.01))  # fmt: skip
    assert float(y[-1]) == pytest.approx(math.exp(-1), rel=1e-6)


# --------------------------------------------------------------------------- errors
def test_unknown_option_warns_naming_it():  # as torchdiffeq does (the native face raises)
    with pytest.warns(UserWarning, match="foo"):
        odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]), options=dict(foo=1))
    with pytest.warns(UserWarning, match="foo"):
        odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]), method="euler",
               options=dict(step_size=0.1, foo=1))  # fmt: skip


def test_option_without_effect_warns_like_torchdiffeq():
    y0 = torch.ones(1, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    f = lambda t, y: -y  # noqa: E731
    with pytest.warns(UserWarning, match="step_size"):
        ours = odeint(f, y0, t, method="dopri5", options=dict(step_size=0.1))
    with pytest.warns(UserWarning, match="step_size"):
        ref = torchdiffeq.odeint(f, y0, t, method="dopri5", options=dict(step_size=0.1))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-9)  # and the option is ignored
    with pytest.warns(UserWarning, match="first_step"):
        odeint(f, y0, t, method="euler", options=dict(step_size=0.1, first_step=0.1))


def test_misplaced_seminorm_raises():
    with pytest.raises(ValueError, match="adjoint_options"):
        odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]),
               options=dict(norm="seminorm"))  # fmt: skip
    func = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="adjoint_options"):
        odeint_adjoint(lambda t, y: func(y), torch.ones(2), torch.tensor([0.0, 1.0]),
                       options=dict(norm="seminorm"), adjoint_params=tuple(func.parameters()))  # fmt: skip


@pytest.mark.parametrize(
    "method", ["implicit_adams", "explicit_adams", "fixed_adams", "radauIIA5", "gl6"]
)
def test_torchdiffeq_multistep_and_implicit_methods_run(method):
    """torchdiffeq's Adams and implicit method names are available (issue #8); as in
    torchdiffeq, all of them are fixed-step methods on this face."""
    t = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)
    opts = dict(step_size=0.01)
    y = odeint(lambda t, y: -y, torch.ones(1, dtype=torch.float64), t, method=method, options=opts)
    torch.testing.assert_close(y[:, 0], torch.exp(-t), rtol=1e-5, atol=1e-6)


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="dopri5"):
        odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]), method="dopri6")


def test_adjoint_needs_a_module_or_params():
    with pytest.raises(ValueError, match="adjoint_params"):
        odeint_adjoint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]))


def test_event_fn_with_scipy_solver_raises():
    with pytest.raises(ValueError, match="event_fn"):
        odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]), method="scipy_solver",
               event_fn=lambda t, y: y.sum())  # fmt: skip


def test_event_fn_matches_torchdiffeq():
    """torchdiffeq's event mode: a ball dropped from 10 m hits the ground at sqrt(20 / 9.81)."""

    def f(t, y):
        return torch.stack([y[1], torch.full_like(y[1], -9.81)])

    def event_fn(t, y):
        return y[0]

    y0 = torch.tensor([10.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 5.0], dtype=torch.float64)
    t_ev, traj = odeint(f, y0, t, event_fn=event_fn)
    ref_t, ref_traj = torchdiffeq.odeint(f, y0, t, event_fn=event_fn)
    assert float(t_ev) == pytest.approx(math.sqrt(20 / 9.81), abs=1e-6)
    assert float(t_ev) == pytest.approx(float(ref_t), abs=1e-6)
    assert traj.shape == ref_traj.shape == (2, 2)
    torch.testing.assert_close(traj, ref_traj, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- gradients
def test_gradcheck_tuple_state_through_odeint():
    """torchdiffeq's api test_gradient: gradcheck w.r.t. y0 and the output times t."""
    f, y0, t, _ = construct_problem("constant")
    y0 = y0.detach().requires_grad_(True)
    t = t.detach().requires_grad_(True)

    def tuple_f(s, y):
        return f(s, y[0]), f(s, y[1])

    for i in range(2):
        for method in ("dopri5", "tsit5"):

            def fn(y0, t, i=i, method=method):
                return odeint(tuple_f, (y0, y0), t, method=method)[i]

            assert torch.autograd.gradcheck(fn, (y0, t))


def test_gradients_agree_across_libraries_and_methods():
    """dL/dtheta of an MLP vector field: odeint (autograd), odeint_adjoint (seminorm or not) and
    torchdiffeq's odeint / odeint_adjoint agree at tight tolerances."""
    torch.manual_seed(0)
    func = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    wrapped = _Autonomous(func)
    y0 = torch.randn(5, 3, dtype=torch.float64)
    t = torch.linspace(0, 1, 4, dtype=torch.float64)
    kw = dict(rtol=1e-10, atol=1e-12)

    def grads(solve, **extra):
        func.zero_grad()
        solve(wrapped, y0, t, **kw, **extra).pow(2).sum().backward()
        return torch.cat([p.grad.reshape(-1) for p in func.parameters()])

    ref = grads(odeint)
    for other in (
        grads(odeint_adjoint),
        grads(odeint_adjoint, adjoint_options=dict(norm="seminorm")),
        grads(torchdiffeq.odeint),
        grads(torchdiffeq.odeint_adjoint),
    ):
        torch.testing.assert_close(other, ref, rtol=1e-6, atol=1e-8)


class _Autonomous(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, t, y):
        return self.net(y)


# --------------------------------------------------------------------------- training loop
class _ODEFunc(nn.Module):
    """torchdiffeq's examples/ode_demo.py: an MLP applied to y^3."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0, std=0.1)
                nn.init.constant_(m.bias, val=0)

    def forward(self, t, y):
        return self.net(y**3)


def _spiral_data():
    true_a = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])
    true_y0 = torch.tensor([[2.0, 0.0]])
    t = torch.linspace(0.0, 25.0, 1000)
    with torch.no_grad():
        true_y = torchdiffeq.odeint(lambda t, y: torch.mm(y**3, true_a), true_y0, t)
    gen = torch.Generator().manual_seed(0)
    starts = torch.randperm(1000 - 10, generator=gen)[:20]
    batch_y0 = true_y[starts]  # (M, 1, 2)
    batch_t = t[:10]
    batch_y = torch.stack([true_y[starts + i] for i in range(10)], dim=0)  # (T, M, 1, 2)
    return batch_y0, batch_t, batch_y


def _train(solver, batch_y0, batch_t, batch_y, iters=20):
    torch.manual_seed(0)
    func = _ODEFunc()
    opt = torch.optim.Adam(func.parameters(), lr=1e-2)
    losses = []
    for _ in range(iters):
        opt.zero_grad()
        pred_y = solver(func, batch_y0, batch_t, rtol=1e-6, atol=1e-8)
        loss = torch.mean(torch.abs(pred_y - batch_y))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_ode_demo_training_reduces_the_loss():
    """20 Adam iterations of torchdiffeq's ode_demo on a fixed batch, with ``from neuralode
    import odeint`` in place of torchdiffeq's: the loss falls with odeint and with
    odeint_adjoint, and the two train alike (same losses to the adjoint's accuracy)."""
    data = _spiral_data()
    direct = _train(odeint, *data)
    adjoint = _train(odeint_adjoint, *data)
    assert direct[-1] < 0.5 * direct[0], direct
    assert adjoint[-1] < 0.5 * adjoint[0], adjoint
    np.testing.assert_allclose(adjoint, direct, rtol=1e-3)
