"""Review fixes: gradients of partial solves (throw=False), gradient methods with multistep
methods refused or supported up front, the initial step within [dt_min, dt_max], and strict
validation of controller and solve() arguments."""

from __future__ import annotations

import math

import pytest
import torch

import neuralode as no

F64 = torch.float64


# ------------------------------------------------------------- partial solves (throw=False)
def _blow_up(t, y):
    return 10 * y * y  # y = y0 / (1 - 10 y0 t): blows up at t = 1 / (10 y0)


def _exact_grad(y0, t, ok):
    """d/dy0 of the sum of the outputs reached (``ok``, (T, *y0.shape)) of y' = 10 y^2."""
    return sum(
        torch.where(ok[j], 1 / (1 - 10 * y0 * t[..., j, None]) ** 2, torch.zeros_like(y0))
        for j in range(t.shape[-1])
    )


GRADIENTS = ["direct", "checkpoint", "backsolve", "reversible"]


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_partial_solve_gradient_of_the_outputs_reached(gradient):
    # The solve fails near t = 1/3 (sample 0 blows up); the loss takes the outputs it reached.
    # Backsolve used to start its adjoint solve at the failure point (StepSizeUnderflowError in
    # backward) and Reversible reconstructed the states from there (NaN gradient).
    y0 = torch.tensor([[0.3, 0.2], [0.05, 0.02]], dtype=F64)
    t = torch.tensor([0.0, 0.2, 0.3, 1.0], dtype=F64)
    a = y0.clone().requires_grad_(True)
    s = no.solve(_blow_up, a, t, gradient=gradient, throw=False, rtol=1e-10, atol=1e-12)
    assert s.status == "dt_underflow"
    ok = ~torch.isnan(s.ys)
    assert ok[:3].all() and not ok[3].any()
    (g,) = torch.autograd.grad(s.ys[ok].sum(), a)
    exp = _exact_grad(y0, t, ok)
    assert torch.allclose(g, exp, rtol=1e-6, atol=0)
    # The outputs not reached carry no gradient (NaN constants, as under Direct).
    a2 = y0.clone().requires_grad_(True)
    s2 = no.solve(_blow_up, a2, t, gradient=gradient, throw=False, rtol=1e-10, atol=1e-12)
    (g2,) = torch.autograd.grad(torch.nan_to_num(s2.ys, nan=0.0).sum(), a2)
    assert torch.allclose(g2, exp, rtol=1e-6, atol=0)


def test_partial_backsolve_with_per_sample_output_grids():
    # A 2-D t under shared control: an output holds one sample's row, so the backward solve's
    # starting state (at the last output reached, t = 0.3) is solved for again.
    y0 = torch.tensor([[0.3, 0.2], [0.05, 0.02]], dtype=F64)
    t = torch.tensor([[0.0, 0.2, 0.3, 1.0], [0.0, 0.25, 0.5, 0.9]], dtype=F64)
    a = y0.clone().requires_grad_(True)
    s = no.solve(_blow_up, a, t, gradient="backsolve", throw=False, rtol=1e-10, atol=1e-12)
    ok = ~torch.isnan(s.ys)  # (T, B, M)
    assert ok[:, 0].tolist() == [[True] * 2] * 3 + [[False] * 2]
    assert ok[:, 1].tolist() == [[True] * 2] * 2 + [[False] * 2] * 2
    (g,) = torch.autograd.grad(torch.nan_to_num(s.ys, nan=0.0).sum(), a)
    exp = sum(
        torch.where(ok[j], 1 / (1 - 10 * y0 * t[:, j, None]) ** 2, torch.zeros_like(y0))
        for j in range(4)
    )
    assert torch.allclose(g, exp, rtol=1e-6, atol=0)


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_solve_failing_before_its_first_step_has_the_gradient_of_y0_only(gradient):
    # f is NaN past t0: no step is accepted. Only the output at t0 (y0 itself) was reached; the
    # custom-gradient methods used to count every output as one at t0 (gradient 3, not 1).
    def f(t, y):
        return y * torch.where(t > 0, torch.nan, 1.0).to(y.dtype)

    a = torch.tensor([[1.0, 2.0]], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    s = no.solve(f, a, t, gradient=gradient, throw=False)
    assert s.status != "success" and s.stats["n_accepted"] == 0
    (g,) = torch.autograd.grad(s.ys, a, torch.ones_like(s.ys))
    assert torch.allclose(g, torch.ones_like(a), rtol=1e-12, atol=0)


# ------------------------------------------------------------------- multistep methods
_A = torch.tensor([[-0.5, 1.0], [-1.0, -0.5]], dtype=F64)


def _linear(t, y):
    return y @ _A.T


def test_checkpoint_with_adams_is_refused_by_the_solve():
    y0 = torch.tensor([[1.0, 0.0]], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1.5, 4, dtype=F64)
    for gradient in ("checkpoint", no.Checkpointed(max_checkpoints=4)):
        with pytest.raises(ValueError, match=r"Checkpointed\(...\) recomputes single steps"):
            no.solve(_linear, y0, t, solver="implicit_adams", gradient=gradient)
    with pytest.raises(ValueError, match=r"'implicit_adams' cannot.*multistep"):
        no.solve(_linear, y0, t, solver="implicit_adams", gradient=no.Backsolve(outputs="replay"))


def test_backsolve_with_adams_and_many_outputs_inside_steps():
    # More outputs inside steps than steps: "auto" used to replay forward steps (RuntimeError
    # in backward); with a multistep method it stops at every output instead.
    y0 = torch.tensor([[1.0, 0.0], [4.0, 0.0]], dtype=F64)
    t = torch.linspace(0, 1.5, 400, dtype=F64)  # (about 180 steps)
    grads = {}
    for gradient in ("direct", "backsolve"):
        a = y0.clone().requires_grad_(True)
        s = no.solve(
            _linear, a, t, solver="implicit_adams", rtol=1e-8, atol=1e-10, gradient=gradient
        )
        (grads[gradient],) = torch.autograd.grad(s.ys.sum(), a)
        if gradient == "backsolve":
            assert s.stats["backsolve_outputs"] == "stop"
    exact = torch.linalg.matrix_exp(t[:, None, None] * _A).sum(0).sum(0)  # d sum / d y0
    assert torch.allclose(grads["direct"][0], exact, rtol=1e-6)
    assert torch.allclose(grads["backsolve"], grads["direct"], rtol=1e-6)


@pytest.mark.parametrize("gradient", ["backsolve", no.Backsolve(solver="dopri5")])
def test_backsolve_with_adams_and_a_terminal_event(gradient):
    g = 9.81

    def fall(t, y):
        return torch.stack([y[:, 1], torch.full_like(y[:, 1], -g)], dim=1)

    h = torch.tensor([1.0, 4.0, 2.0], dtype=F64)
    y0 = torch.stack([h, torch.zeros_like(h)], 1).requires_grad_(True)
    s = no.solve(
        fall, y0, torch.linspace(0, 1.5, 4, dtype=F64), solver="implicit_adams", rtol=1e-9,
        atol=1e-11, gradient=gradient, event=no.Event(lambda t, y: y[:, 0], direction=-1),
    )  # fmt: skip
    assert torch.allclose(s.event_t, torch.sqrt(2 * h / g), rtol=1e-8)
    (gr,) = torch.autograd.grad(s.event_t.sum(), y0)
    assert torch.allclose(gr[:, 0], 1 / torch.sqrt(2 * g * h), rtol=1e-6)


# ----------------------------------------------------------------- controller settings
@pytest.mark.parametrize("batch_control", ["shared", "per_sample"])
@pytest.mark.parametrize("dt0", [None, 0.01])
def test_initial_step_is_raised_to_dt_min(batch_control, dt0):
    # Hairer's guess (0.029) and dt0=0.01 lie below dt_min=0.05: the solve used to fail at t=0
    # after 0 step attempts. Steps of 0.05 pass the error test easily.
    y0 = torch.tensor([[1.0, 2.0]], dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    ctrl = no.PIController(dt_min=0.05, dt0=dt0)
    s = no.solve(lambda t, y: -0.5 * y, y0, t, controller=ctrl, batch_control=batch_control)
    assert s.status == "success"
    assert int(torch.as_tensor(s.stats["n_accepted"]).max()) <= 20  # every step >= 0.05
    assert float((s.ys[-1] - y0 * math.exp(-0.5)).abs().max()) < 1e-6


def test_initial_step_is_clamped_into_dt_min_dt_max():
    ctrl = no.PIController(dt_min=0.05, dt_max=0.1)
    y0 = torch.tensor([[1.0]], dtype=F64)

    def norm(*xs):
        return [float(x.abs().max()) for x in xs] if len(xs) > 1 else float(xs[0].abs().max())

    def f(t, y):
        return -0.5 * y

    k1 = f(0.0, y0)
    h = ctrl.initial_step(norm, f, 0.0, y0, k1, 1.0, 1.0, 5)
    assert 0.05 <= h <= 0.1
    assert no.PIController(dt0=0.01, dt_min=0.05).initial_step(None, f, 0, y0, k1, 1, 1, 5) == 0.05
    assert no.PIController(dt0=0.5, dt_max=0.1).initial_step(None, f, 0, y0, k1, 1, 1, 5) == 0.1


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(dt_max=0.0), r"dt_max must be > 0"),
        (dict(dt_min=math.inf), r"dt_min finite"),
        (dict(icoeff=0.0, pcoeff=0.0), r"icoeff must be > 0.*icoeff=0.0, pcoeff=0.0"),
        (dict(icoeff=-1.0), r"icoeff must be > 0"),
        (dict(icoeff=0.5, pcoeff=-0.6), r"icoeff \+ pcoeff must be > 0"),
        (dict(pcoeff=math.nan), r"pcoeff finite"),
    ],
)
def test_controller_settings_that_cannot_work_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        no.PIController(**kw)


# ------------------------------------------------------------------- solve() arguments
@pytest.mark.parametrize("batch_control", ["shared", "per_sample"])
def test_y0_given_as_numbers_is_a_type_error_in_both_drivers(batch_control):
    t = torch.linspace(0, 1, 3, dtype=F64)
    with pytest.raises(TypeError, match=r"y0\[0\] is list.*torch\.tensor\(y0"):
        no.solve(lambda t, y: -y, [[1.0, 0.5]], t, batch_control=batch_control)
    with pytest.raises(TypeError, match=r"y0 must be a tensor.*got float"):
        no.solve(lambda t, y: -y, 1.0, t, batch_control=batch_control)
    with pytest.raises(TypeError, match=r"y0\['b'\] is int"):
        no.solve(lambda t, y: y, {"a": torch.ones(1, 2), "b": 3}, t, batch_control=batch_control)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(dense_output="no"), TypeError, r"dense_output must be a bool or None, got 'no'"),
        (dict(dense_output=1), TypeError, r"dense_output must be a bool or None, got 1"),
        (dict(throw="no"), TypeError, r"throw must be a bool, got 'no'"),
        (dict(integral_in_error_norm="yes"), TypeError, r"integral_in_error_norm must be a bool"),
        (dict(max_steps=True), TypeError, r"max_steps must be a positive integer.*True \(bool\)"),
        (dict(max_steps=2.5), TypeError, r"max_steps must be a positive integer.*2.5 \(float\)"),
        (dict(max_steps=0), ValueError, r"max_steps must be a positive integer or None, got 0"),
    ],
)
def test_flag_and_count_arguments_are_validated(kw, exc, match):
    y0 = torch.ones(1, 2, dtype=F64)
    with pytest.raises(exc, match=match):
        no.solve(lambda t, y: -y, y0, torch.linspace(0, 1, 3, dtype=F64), **kw)


def test_numpy_integer_max_steps_is_accepted():
    np = pytest.importorskip("numpy")
    s = no.solve(
        lambda t, y: -y, torch.ones(1, 2, dtype=F64), torch.linspace(0, 1, 3, dtype=F64),
        max_steps=np.int64(1000),
    )  # fmt: skip
    assert s.status == "success"
