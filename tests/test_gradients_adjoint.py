"""The backsolve adjoint and its torchdiffeq face (issue #3): the cost bound over output times,
seminorm, parameter discovery and the missing-parameter warning, ``odeint_adjoint`` options,
tuple and complex states, and the user-facing errors of the gradient methods."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import neuralode as no
from neuralode import odeint, odeint_adjoint

DT = torch.float64
MISSING = "require grad but are not among the parameters"


class MLPField(nn.Module):
    """``f(t, y) = MLP(y)`` with d = 2, hidden 32 (float64, seeded)."""

    def __init__(self, seed: int = 0, d: int = 2, hidden: int = 32):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d)).to(DT)

    def forward(self, t, y):
        return self.net(y)


def _rel(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# --------------------------------------------------------------------------- 5. cost bound
def _backward_nfe(n_out: int, seminorm: bool, seed: int = 0, **adjoint_tol) -> dict:
    func = MLPField(seed)
    torch.manual_seed(seed + 100)
    y0 = torch.randn(4, 2, dtype=DT)
    t = torch.linspace(0.0, 1.0, n_out, dtype=DT)
    grad = no.Backsolve(seminorm=seminorm, **adjoint_tol)
    sol = no.solve(func, y0, t, rtol=1e-6, atol=1e-6, gradient=grad)
    sol.ys.sum().backward()
    return sol.stats


@pytest.mark.parametrize("seminorm", [False, True], ids=["norm", "seminorm"])
def test_backward_cost_does_not_grow_with_output_times(seminorm):
    """Once every forward step holds outputs, more output times cost nothing more."""
    s100, s1000 = _backward_nfe(100, seminorm), _backward_nfe(1000, seminorm)
    assert s100["nfe"] == s1000["nfe"]
    assert s100["nfe_backward"] == s1000["nfe_backward"]
    # One replay of each forward step holding outputs, at most the forward's evaluations plus
    # one per step: its first stage at the forward's y put back there (not the reconstructed y
    # the previous backward segment ended on).
    assert 0 < s1000["nfe_backward_replay"] <= s1000["nfe"] + s1000["n_steps"]


@pytest.mark.parametrize("seminorm", [False, True], ids=["norm", "seminorm"])
def test_backward_cost_bound_over_output_times(seminorm):
    """Issue #3's bound: backward NFE at len(t) = 1000 is at most twice that at len(t) = 2
    (the forward takes about 20 evaluations at rtol = atol = 1e-6 here), plus one evaluation
    per forward step replayed: its first stage at the forward's y, put back there (19 and 40
    here; 37 before the backward solve put y back, with a wrong gradient on contracting
    dynamics: tests/test_backsolve_reanchor.py)."""
    s2, s1000 = _backward_nfe(2, seminorm), _backward_nfe(1000, seminorm)
    assert 15 <= s2["nfe"] <= 30
    assert s1000["nfe_backward"] <= 2 * s2["nfe_backward"] + s1000["n_steps"], (s2, s1000)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_backward_cost_bound_holds_across_seeds(seed):
    s2, s1000 = _backward_nfe(2, False, seed), _backward_nfe(1000, False, seed)
    assert s1000["nfe_backward"] <= 2 * s2["nfe_backward"] + s1000["n_steps"], (s2, s1000)


def test_seminorm_saves_backward_evaluations():
    """Leaving the parameter adjoint out of the error norm must not cost more, and saves
    evaluations when the backward solve chooses its own steps (explicit adjoint tolerances; at
    the forward's tolerances it proposes the forward's steps, which both norms accept here);
    the gradients stay accurate."""
    for tol in ({}, {"rtol": 1e-6, "atol": 1e-6}):
        plain, semi = _backward_nfe(2, False, **tol), _backward_nfe(2, True, **tol)
        assert plain["nfe"] == semi["nfe"]
        assert semi["nfe_backward"] <= plain["nfe_backward"]
    assert semi["nfe_backward"] < plain["nfe_backward"]

    func = MLPField(0)
    y0 = torch.randn(4, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 1.0], dtype=DT)
    grads = {}
    for name, g in [("direct", "direct"), ("semi", no.Backsolve(seminorm=True))]:
        sol = no.solve(func, y0, t, rtol=1e-9, atol=1e-9, gradient=g)
        grads[name] = torch.autograd.grad(sol.ys.sum(), list(func.parameters()))
    for a, b in zip(grads["semi"], grads["direct"]):
        assert _rel(a, b) < 1e-6


# --------------------------------------------------------------------------- 6. parameters
def _closure_field(w, b):
    def f(t, y):
        return torch.tanh(w * y + b) - 0.5 * y

    return f


@pytest.mark.parametrize("method", ["backsolve", "checkpoint"])
def test_parameters_found_from_an_nn_module(method):
    func = MLPField(3, hidden=8)
    y0 = torch.tensor([[0.3, -0.8]], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=DT)
    inputs = [y0, *func.parameters()]
    kw = dict(rtol=1e-10, atol=1e-10)
    ref = torch.autograd.grad(no.solve(func, y0, t, **kw).ys.square().sum(), inputs)
    sol = no.solve(func, y0, t, gradient=method, **kw)
    got = torch.autograd.grad(sol.ys.square().sum(), inputs)
    for a, b in zip(got, ref):
        assert _rel(a, b) < 1e-7


@pytest.mark.parametrize("cls", [no.Backsolve, no.Checkpointed])
def test_explicit_params(cls):
    """A plain function closing over tensors: pass them explicitly. Tensors in params that do
    not require grad are ignored."""
    w = torch.tensor([0.8, -1.2], dtype=DT, requires_grad=True)
    b = torch.tensor([0.1, 0.2], dtype=DT, requires_grad=True)
    y0 = torch.tensor([0.5, 1.0], dtype=DT, requires_grad=True)
    t = [0.0, 0.5, 1.5]
    kw = dict(rtol=1e-10, atol=1e-10)
    f = _closure_field(w, b)
    ref = torch.autograd.grad(no.solve(f, y0, t, **kw).ys.sum(), [y0, w, b])
    frozen = torch.ones(3, dtype=DT)
    sol = no.solve(f, y0, t, gradient=cls(params=[w, frozen, b]), **kw)
    got = torch.autograd.grad(sol.ys.sum(), [y0, w, b])
    for a, r in zip(got, ref):
        assert _rel(a, r) < 1e-7


@pytest.mark.parametrize("cls", [no.Backsolve, no.Checkpointed])
def test_params_must_be_tensors(cls):
    with pytest.raises(TypeError, match=r"params=\.\.\.\)\[1\] is float, expected a tensor"):
        no.solve(
            lambda t, y: -y,
            torch.ones(2, dtype=DT, requires_grad=True),
            [0.0, 1.0],
            gradient=cls(params=[torch.ones(1, requires_grad=True), 2.0]),
        )


@pytest.mark.parametrize(
    "gradient, who",
    [
        (lambda w: no.Backsolve(), "backsolve adjoint"),
        (lambda w: no.Checkpointed(), "checkpointed"),
        (lambda w: no.Backsolve(params=[torch.zeros(1, requires_grad=True)]), "backsolve adjoint"),
    ],
)
def test_missing_parameter_warns(gradient, who):
    """func closes over a tensor that requires grad but is not among the params: warn, and its
    gradient is indeed missing (left None) while y0's is correct."""
    w = torch.tensor([0.8, -1.2], dtype=DT, requires_grad=True)
    b = torch.zeros(2, dtype=DT)
    y0 = torch.tensor([0.5, 1.0], dtype=DT, requires_grad=True)
    # (the backsolve adjoint confirms the loss on the backward solve's first evaluation)
    with pytest.warns(UserWarning, match=f"{MISSING} of the {who} gradient.*shapes \\(2,\\)"):
        sol = no.solve(_closure_field(w, b), y0, [0.0, 1.0], gradient=gradient(w))
        sol.ys.sum().backward()
    assert w.grad is None
    y0_ref = y0.detach().clone().requires_grad_()
    no.solve(
        _closure_field(w.detach(), b), y0_ref, [0.0, 1.0], gradient="direct"
    ).ys.sum().backward()
    torch.testing.assert_close(y0.grad, y0_ref.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("gradient", ["backsolve", "checkpoint"])
def test_missing_parameter_warns_when_y0_needs_no_gradient(gradient):
    """The one differentiable input is a tensor func closes over: without the warning the
    output silently does not require grad and backward() fails with a generic message."""
    w = torch.tensor([0.8, -1.2], dtype=DT, requires_grad=True)
    y0 = torch.tensor([0.5, 1.0], dtype=DT)
    with pytest.warns(UserWarning, match=MISSING):
        no.solve(_closure_field(w, torch.zeros(2, dtype=DT)), y0, [0.0, 1.0], gradient=gradient)


def test_no_warning_when_all_parameters_are_known():
    w = torch.tensor([0.8, -1.2], dtype=DT, requires_grad=True)
    y0 = torch.tensor([0.5, 1.0], dtype=DT, requires_grad=True)
    f = _closure_field(w, torch.zeros(2, dtype=DT))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for g in (no.Backsolve(params=[w]), no.Checkpointed(params=[w]), no.Direct()):
            no.solve(f, y0, [0.0, 1.0], gradient=g).ys.sum().backward()
        no.solve(MLPField(), y0.view(1, 2), [0.0, 1.0], gradient="backsolve")


def test_odeint_adjoint_plain_function_needs_adjoint_params():
    y0 = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    with pytest.raises(ValueError, match=r"nn\.Module.*adjoint_params=\(\)"):
        odeint_adjoint(lambda t, y: -y + torch.sin(t), y0, t)
    # adjoint_params=() is enough for gradients with respect to y0 only.
    ys = odeint_adjoint(lambda t, y: -y + torch.sin(t), y0, t, adjoint_params=())
    (g,) = torch.autograd.grad(ys.sum(), y0)
    ref = torch.ones(2, dtype=DT) * (
        1 + torch.exp(torch.tensor(-0.5, dtype=DT)) + torch.exp(torch.tensor(-1.0, dtype=DT))
    )
    assert torch.allclose(g, ref, rtol=1e-6, atol=0)


def test_odeint_adjoint_finds_module_parameters():
    func = MLPField(1, hidden=8)
    y0 = torch.tensor([[0.3, -0.8]], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=DT)
    inputs = [y0, *func.parameters()]
    ref = torch.autograd.grad(odeint(func, y0, t, rtol=1e-10, atol=1e-10).sum(), inputs)
    got = torch.autograd.grad(odeint_adjoint(func, y0, t, rtol=1e-10, atol=1e-10).sum(), inputs)
    for a, b in zip(got, ref):
        assert _rel(a, b) < 1e-7


# --------------------------------------------------------------------------- 10. odeint_adjoint
def _decay():
    w = torch.tensor(0.7, dtype=DT, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    return (lambda t, y: -w * y + torch.sin(t)), w, y0, t


def _adjoint_grads(**kw):
    f, w, y0, t = _decay()
    ys = odeint_adjoint(f, y0, t, adjoint_params=(w,), **kw)
    return torch.autograd.grad(ys.sum(), [y0, w])


def _reference_grads():
    f, w, y0, t = _decay()
    return torch.autograd.grad(odeint(f, y0, t, rtol=1e-12, atol=1e-12).sum(), [y0, w])


def _err(got, ref) -> float:
    return max(_rel(a, b) for a, b in zip(got, ref))


def test_odeint_adjoint_seminorm_option():
    ref = _reference_grads()
    assert (
        _err(_adjoint_grads(rtol=1e-10, atol=1e-10, adjoint_options=dict(norm="seminorm")), ref)
        < 1e-8
    )
    assert _err(_adjoint_grads(adjoint_options=dict(norm="default")), ref) < 1e-5


def test_odeint_adjoint_misplaced_seminorm_raises():
    f, w, y0, t = _decay()
    with pytest.raises(ValueError, match="belongs in adjoint_options"):
        odeint_adjoint(f, y0, t, adjoint_params=(w,), options=dict(norm="seminorm"))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(adjoint_options=dict(norm="max")), "must be 'seminorm', 'default' or a callable"),
        (
            dict(adjoint_options=dict(step_size=-0.1)),
            r"adjoint_options\['step_size'\] must be positive",
        ),
    ],
)
def test_odeint_adjoint_rejects_bad_arguments(kw, match):
    f, w, y0, t = _decay()
    with pytest.raises(ValueError, match=match):
        odeint_adjoint(f, y0, t, adjoint_params=(w,), **kw)


def test_odeint_adjoint_tolerances_honoured():
    """A tight forward solve: the gradient error follows the adjoint tolerances, and the
    default adjoint tolerances are the forward ones."""
    ref = _reference_grads()
    fwd = dict(rtol=1e-11, atol=1e-11)
    loose = _err(_adjoint_grads(**fwd, adjoint_rtol=1e-3, adjoint_atol=1e-3), ref)
    mid = _err(_adjoint_grads(**fwd, adjoint_rtol=1e-6, adjoint_atol=1e-6), ref)
    default = _err(_adjoint_grads(**fwd), ref)
    assert loose > 10 * mid > 100 * default
    assert default < 1e-8
    # adjoint_atol alone is honoured as well.
    rel_only = _err(_adjoint_grads(**fwd, adjoint_rtol=1e-11, adjoint_atol=1e-2), ref)
    assert rel_only < loose


def test_odeint_adjoint_method_honoured():
    fwd = dict(rtol=1e-10, atol=1e-10)
    ref = _reference_grads()
    default = _adjoint_grads(**fwd, adjoint_rtol=1e-5, adjoint_atol=1e-5)
    same = _adjoint_grads(**fwd, adjoint_rtol=1e-5, adjoint_atol=1e-5, adjoint_method="dopri5")
    other = _adjoint_grads(**fwd, adjoint_rtol=1e-5, adjoint_atol=1e-5, adjoint_method="bosh3")
    for a, b in zip(default, same):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(default, other))
    assert _err(other, ref) < 1e-4
    with pytest.raises(ValueError):
        _adjoint_grads(adjoint_method="no_such_method")


def test_odeint_adjoint_fixed_step_adjoint_method_with_adaptive_forward():
    """adjoint_method='rk4' (no error estimate) after an adaptive forward solve: either it
    works, or the call itself raises a ValueError naming adjoint_method -- not a failure deep
    inside backward() about an internal method name."""
    f, w, y0, t = _decay()
    try:
        ys = odeint_adjoint(f, y0, t, adjoint_params=(w,), adjoint_method="rk4")
    except ValueError as e:
        assert "adjoint_method" in str(e)
        return
    got = torch.autograd.grad(ys.sum(), [y0, w])
    assert _err(got, _reference_grads()) < 1e-3


def test_odeint_adjoint_fixed_step_forward():
    ref = _reference_grads()
    got = _adjoint_grads(method="rk4", options=dict(step_size=0.05))
    assert _err(got, ref) < 1e-6


def test_odeint_adjoint_tuple_state_with_tuple_tolerances():
    """torchdiffeq's odeint_adjoint crashes on tuple rtol/atol; here the gradients match odeint."""
    w = torch.tensor(0.7, dtype=DT, requires_grad=True)
    q0 = torch.tensor([1.0, 0.5], dtype=DT, requires_grad=True)
    p0 = torch.tensor([0.0, 0.3], dtype=DT, requires_grad=True)
    t = torch.linspace(0.0, 2.0, 4, dtype=DT)

    def f(t, s):
        q, p = s
        return p, -w * torch.sin(q)

    tol = dict(rtol=(1e-10, 1e-11), atol=(1e-10, 1e-12))

    def grads(fn, **kw):
        qs, ps = fn(f, (q0, p0), t, **tol, **kw)
        return torch.autograd.grad(qs.square().sum() + ps.sum(), [q0, p0, w])

    ref = grads(odeint)
    got = grads(odeint_adjoint, adjoint_params=(w,))
    for a, b in zip(got, ref):
        assert _rel(a, b) < 1e-8


def test_odeint_adjoint_complex_state_real_parameter():
    """y' = (i w - 0.1) y, complex y with a real w: the gradient with respect to w is real and
    matches finite differences (and odeint's)."""
    z0 = torch.tensor([1 + 0.5j, -0.2 + 1j], dtype=torch.complex128)
    t = torch.tensor([0.0, 0.7, 1.5], dtype=DT)

    def loss(w, fn=odeint_adjoint, **kw):
        ys = fn(lambda t, y: (1j * w - 0.1) * y, z0, t, rtol=1e-11, atol=1e-11, **kw)
        return ys.real.square().sum() + ys.imag.sum()

    w = torch.tensor(1.3, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(loss(w, adjoint_params=(w,)), w)
    assert g.dtype == DT
    (g_direct,) = torch.autograd.grad(loss(w, fn=odeint), w)
    eps = 1e-6
    with torch.no_grad():
        fd = (loss(w + eps, adjoint_params=()) - loss(w - eps, adjoint_params=())) / (2 * eps)
    assert float(g) == pytest.approx(float(fd), rel=1e-7)
    assert float(g) == pytest.approx(float(g_direct), rel=1e-8)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "make, exc, match",
    [
        (
            lambda: no.Backsolve(rtol=-1.0),
            ValueError,
            r"Backsolve\(rtol=\.\.\.\) must be a non-negative",
        ),
        (lambda: no.Backsolve(atol="1e-6"), ValueError, r"Backsolve\(atol=\.\.\.\)"),
        (
            lambda: no.Backsolve(seminorm=1),
            TypeError,
            r"Backsolve\(seminorm=\.\.\.\) must be a bool",
        ),
        (lambda: no.Backsolve(solver="no_such_method"), ValueError, "no_such_method"),
        (lambda: no.Checkpointed(max_checkpoints=1), ValueError, r"integer >= 2, got 1"),
        (lambda: no.Checkpointed(max_checkpoints=2.5), ValueError, r"integer >= 2, got 2\.5"),
        (
            lambda: no.solve(lambda t, y: -y, torch.ones(1), [0, 1], gradient="adjont"),
            ValueError,
            "unknown gradient method 'adjont'",
        ),
        (
            lambda: no.solve(lambda t, y: -y, torch.ones(1), [0, 1], gradient=3),
            TypeError,
            "gradient must be a name",
        ),
    ],
)
def test_gradient_configuration_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize(
    "name", ["direct", "backsolve", "adjoint", "checkpoint", "checkpointed", "Direct"]
)
def test_gradient_names(name):
    y0 = torch.tensor([1.0], dtype=DT, requires_grad=True)
    sol = no.solve(lambda t, y: -y, y0, [0.0, 1.0], gradient=name, rtol=1e-10, atol=1e-10)
    (g,) = torch.autograd.grad(sol.ys[-1].sum(), y0)
    assert float(g) == pytest.approx(0.36787944117144233, rel=1e-8)


def test_odeint_adjoint_fixed_step_adjoint_with_step_size():
    """torchdiffeq's adjoint_method='rk4' with adjoint_options=dict(step_size=...) after an
    adaptive forward: the backward takes fixed rk4 steps and approximates the continuous
    gradient d y(1)/d a = exp(a) for y' = a y."""

    class Decay(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(-0.8, dtype=DT))

        def forward(self, t, y):
            return self.a * y

    f = Decay()
    t = torch.tensor([0.0, 1.0], dtype=DT)
    y = no.odeint_adjoint(
        f, torch.ones(1, dtype=DT), t, adjoint_method="rk4", adjoint_options=dict(step_size=0.1)
    )
    y[-1].sum().backward()
    assert abs(float(f.a.grad) - math.exp(-0.8)) < 1e-5
