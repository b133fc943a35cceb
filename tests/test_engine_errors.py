"""Every user-facing error of the native face, triggered through the public API.

Goes through ``_solve.py``, ``_tree.py``, ``controllers/step_size.py``, ``solvers/__init__.py``,
``gradients/__init__.py``, ``solution.py`` and ``interpolation/dense.py`` raise by raise; tableau
validation errors are in ``test_engine_tableaux.py`` and failing solves in
``test_engine_failures.py``. Each case checks the exception type and that the message names the
argument, what was received and (where there is one) the fix.
"""

from __future__ import annotations

import math

import pytest
import torch

import neuralode
from neuralode import ConstantStep, PIController, StepToGrid

F64 = torch.float64
Y0 = torch.ones(2, dtype=F64)
T = torch.tensor([0.0, 1.0], dtype=F64)


def decay(t, y):
    return -y


def solve(func=decay, y0=Y0, t=T, **kw):
    return neuralode.solve(func, y0, t, **kw)


# --------------------------------------------------------------------------- solve() arguments
@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        (dict(func=3), TypeError, r"func must be callable as func\(t, y\), got int"),
        (dict(time_dtype=torch.float16), ValueError, r"time_dtype must be torch.float32 or torch.float64, got torch.float16"),
        (dict(max_steps=0), ValueError, r"max_steps must be a positive integer or None, got 0"),
        (dict(max_steps=2.5), TypeError, r"max_steps must be a positive integer or None, got 2.5"),
        (dict(throw="no"), TypeError, r"throw must be a bool, got 'no'"),
        (dict(event=lambda t, y: y), TypeError, r"event must be a neuralode.Event, got function"),
        (dict(solver="rk45"), ValueError, r"unknown solver 'rk45'; choose one of \['adaptive_heun', .*'tsit5'.*\] or pass a ButcherTableau"),
        (dict(solver=5), TypeError, r"solver must be a method name, a ButcherTableau or a method object .*got int"),
        (dict(gradient="adjoint2"), ValueError, r"unknown gradient method 'adjoint2'; choose 'direct', 'backsolve'"),
        (dict(gradient=3), TypeError, r"gradient must be a name or a gradient method object, got int"),
    ],
)  # fmt: skip
def test_invalid_solve_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        solve(**kw)


# --------------------------------------------------------------------------- output times
@pytest.mark.parametrize(
    ("t", "exc", "match"),
    [
        (torch.tensor([0.0, 1.0], dtype=torch.complex128), TypeError, r"t must be a real tensor of times, got dtype torch.complex128"),
        (torch.zeros(2, 2, 2, dtype=F64), ValueError, r"t must be 1-D \(T,\) or 2-D \(batch, T\) with T >= 1, got shape \(2, 2, 2\)"),
        (torch.zeros(0, dtype=F64), ValueError, r"t is empty; pass at least the initial time"),
        (torch.tensor([0.0, math.nan], dtype=F64), ValueError, r"t contains NaN or infinite values"),
        (torch.tensor([0.0, math.inf], dtype=F64), ValueError, r"t contains NaN or infinite values"),
        (torch.tensor([0.0, 1.0, 0.5], dtype=F64), ValueError, r"t must be strictly increasing or strictly decreasing; got \[0.0, 1.0, 0.5\]"),
        (torch.tensor([0.0, 1.0, 1.0], dtype=F64), ValueError, r"t must be strictly increasing or strictly decreasing"),
        (torch.arange(20, dtype=F64).flip(0).roll(1), ValueError, r"strictly decreasing; got \[0.0, 19.0, .*\.\.\.$"),
    ],
)  # fmt: skip
def test_invalid_output_times(t, exc, match):
    with pytest.raises(exc, match=match):
        solve(t=t)


def test_times_given_as_a_list_are_accepted():
    sol = solve(t=[0.0, 0.5, 1.0])
    assert sol.ys.shape == (3, 2) and sol.ys.dtype == F64
    exact = torch.exp(-torch.tensor([0.0, 0.5, 1.0], dtype=F64))[:, None].expand(3, 2)
    torch.testing.assert_close(sol.ys, exact, rtol=1e-6, atol=1e-8)


YB = torch.ones(3, 2, dtype=F64)


@pytest.mark.parametrize(
    ("t", "y0", "match"),
    [
        (torch.tensor([[0.0, 1.0]] * 2, dtype=F64), YB, r"t has shape \(2, 2\) \(batch, T\) but y0's batch dimension is 3; a 2-D t needs one row of output times per sample"),
        (torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.5, 1.0]], dtype=F64), YB, r"every row of a 2-D t must start at the same initial time .* got starts \[0.0, 0.0, 0.5\].*batch_control=.per_sample."),
        (torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.0, 1.0]], dtype=F64), YB, r"each row of a 2-D t must be monotone, all in the same direction"),
        (torch.tensor([[0.0, 1.0, 0.5], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]], dtype=F64), YB, r"each row of a 2-D t must be monotone"),
        (torch.tensor([[0.0, 1.0]] * 3, dtype=F64), (YB, torch.ones(4, 1, dtype=F64)), r"with a 2-D t \(one output grid per sample\) every component of y0 needs the same leading batch dimension; got shapes \[\(3, 2\), \(4, 1\)\]"),
        (torch.tensor([[0.0, 1.0]] * 3, dtype=F64), (YB, torch.tensor(1.0, dtype=F64)), r"every component of y0 needs the same leading batch dimension"),
    ],
)  # fmt: skip
def test_invalid_per_sample_grids(t, y0, match):
    f = decay if isinstance(y0, torch.Tensor) else (lambda t, s: tuple(-x for x in s))
    with pytest.raises(ValueError, match=match):
        solve(func=f, y0=y0, t=t)


def test_gradient_with_respect_to_a_per_sample_t_is_refused():
    t = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 0.5]], dtype=F64, requires_grad=True)
    with pytest.raises(
        ValueError,
        match=r"gradients with respect to a 2-D \(per-sample\) t are not supported with "
        r"batch_control='shared'; use batch_control='per_sample' \(which supports them\), pass "
        r"t.detach\(\)",
    ):
        solve(y0=YB, t=t)
    solve(y0=YB, t=t.detach())  # the suggested fixes work
    ys = solve(y0=YB, t=t, batch_control="per_sample").ys
    g = torch.autograd.grad(ys.sum(), t)[0]  # y = exp(-(t - t0)), two components of 1
    e = 2 * torch.exp(-t.detach()[:, 1])
    torch.testing.assert_close(g, torch.stack([e, -e], 1), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- initial state
@pytest.mark.parametrize(
    ("y0", "exc", "match"),
    [
        (1.0, TypeError, r"y0 must be a tensor or a tuple/dict of tensors, got float; wrap numbers with torch.tensor"),
        ((), ValueError, r"y0 is an empty tuple; pass at least one tensor"),
        ({}, ValueError, r"y0 is an empty dict; pass at least one tensor"),
        ((Y0, 2.0), TypeError, r"y0\[1\] is float, expected a tensor"),
        ({"a": Y0, "b": [1.0]}, TypeError, r"y0\['b'\] is list, expected a tensor"),
        (torch.ones(2, dtype=torch.int64), TypeError, r"y0 has dtype torch.int64; the state must be floating point or complex"),
        ((Y0, torch.ones(2, dtype=torch.int32)), TypeError, r"y0\[1\] has dtype torch.int32; the state must be floating point"),
        ((Y0, torch.ones(2, dtype=torch.float32)), TypeError, r"the components of y0 have different dtypes \['torch.float32', 'torch.float64'\]; cast them to one dtype"),
        ((Y0, torch.ones(2, dtype=F64, device="meta")), TypeError, r"the components of y0 lie on different devices \['cpu', 'meta'\]"),
    ],
)  # fmt: skip
def test_invalid_initial_state(y0, exc, match):
    with pytest.raises(exc, match=match):
        solve(y0=y0)


# --------------------------------------------------------------------------- what func returns
@pytest.mark.parametrize(
    ("y0", "func", "exc", "match"),
    [
        (Y0, lambda t, y: [1.0, 2.0], TypeError, r"the derivative returned by func at t=0 is list, expected a tensor of shape \(2,\) like y0"),
        (Y0, lambda t, y: torch.ones(3, dtype=F64), ValueError, r"the derivative returned by func at t=0 has shape \(3,\) but the state has shape \(2,\); func must return dy/dt with exactly the state's shape \(no broadcasting\)"),
        (Y0, lambda t, y: torch.ones(1, 2, dtype=F64), ValueError, r"has shape \(1, 2\) but the state has shape \(2,\)"),
        (Y0, lambda t, y: -y.float(), TypeError, r"the derivative returned by func at t=0 has dtype torch.float32 but the state has dtype torch.float64; make func return the state's dtype \(cast parameters with module.to\(dtype\)\)"),
        ((Y0, Y0), lambda t, s: s[0], TypeError, r"the derivative returned by func at t=0 must be a tuple of 2 tensors like y0, got Tensor$"),
        ((Y0, Y0), lambda t, s: (s[0],), TypeError, r"must be a tuple of 2 tensors like y0, got tuple of length 1"),
        ((Y0, Y0), lambda t, s: (s[0], 1.0), TypeError, r"component 1 of the derivative returned by func at t=0 is float, expected a tensor"),
        ((Y0, Y0), lambda t, s: (s[0], torch.ones(3, dtype=F64)), ValueError, r"component 1 of the derivative returned by func at t=0 has shape \(3,\)"),
        ({"x": Y0}, lambda t, s: {"y": s["x"]}, TypeError, r"the derivative returned by func at t=0 must be a dict with keys \['x'\], got \['y'\]"),
        ({"x": Y0}, lambda t, s: s["x"], TypeError, r"must be a dict with keys \['x'\], got Tensor"),
        ({"x": Y0}, lambda t, s: {"x": s["x"].float()}, TypeError, r"component 'x' of the derivative returned by func at t=0 has dtype torch.float32"),
    ],
)  # fmt: skip
def test_invalid_derivative_from_func(y0, func, exc, match):
    with pytest.raises(exc, match=match):
        solve(func=func, y0=y0)


def test_derivative_errors_say_when_they_happen():
    def f(t, y):  # wrong shape only after the first step
        return -y if float(t) < 0.5 else torch.ones(3, dtype=F64)

    with pytest.raises(ValueError, match=r"returned by func at t=0\.[5-9]\d* has shape \(3,\)"):
        solve(func=f, solver="rk4", dt=0.25)


# --------------------------------------------------------------------------- controller choice
@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        (dict(controller=PIController(), rtol=1e-3), ValueError, r"pass rtol inside the controller, not next to controller=\.\.\. \(e\.g\. PIController\(rtol=\.\.\., atol=\.\.\.\) or ConstantStep\(dt\)\)"),
        (dict(controller=ConstantStep(0.1), atol=1e-3, dt=0.1), ValueError, r"pass atol, dt inside the controller"),
        (dict(controller="pi"), TypeError, r"controller must be a Controller \(PIController, .*got str"),
        (dict(solver="rk4", controller=PIController()), ValueError, r"solver 'rk4' has no embedded error estimate, so it cannot be used with an adaptive controller; use ConstantStep\(dt\) or StepToGrid\(grid\)"),
        (dict(solver="rk4", rtol=1e-3), ValueError, r"solver 'rk4' is a fixed-step method \(no error estimate\): pass dt=\.\.\. or controller=ConstantStep\(dt\) / StepToGrid\(grid\)"),
        (dict(solver="euler"), ValueError, r"solver 'euler' is a fixed-step method"),
        (dict(dt=0.1, rtol=1e-3), ValueError, r"rtol/atol have no effect with a fixed step dt; pass either dt or rtol/atol"),
        (dict(dt=-0.1), ValueError, r"ConstantStep\(dt=\.\.\.\) needs a positive finite step size, got -0\.1"),
    ],
)  # fmt: skip
def test_invalid_controller_choice(kw, exc, match):
    with pytest.raises(exc, match=match):
        solve(**kw)


# --------------------------------------------------------------------------- tolerances
@pytest.mark.parametrize(
    ("y0", "func", "ctrl", "match"),
    [
        (Y0, decay, lambda: PIController(rtol=torch.tensor([1e-3, -1.0])), r"rtol must be finite and non-negative"),
        (Y0, decay, lambda: PIController(atol=torch.tensor([1e-3, math.nan], dtype=F64)), r"atol must be finite and non-negative, got tensor\(\[0.0010, +nan\]"),
        (Y0, decay, lambda: PIController(atol=torch.tensor([1e-3, math.inf], dtype=F64)), r"atol must be finite and non-negative, got tensor\(\[0.0010, +inf\]"),
        (Y0, decay, lambda: PIController(rtol=torch.ones(3) * 1e-3), r"rtol of shape \(3,\) does not broadcast to the state shape \(2,\)"),
        ((Y0, Y0), lambda t, s: s, lambda: PIController(rtol=(1e-3, 1e-3, 1e-3)), r"rtol for a tuple state must be a number or a tuple of 2 numbers/tensors \(one per component\)"),
        ((Y0, Y0), lambda t, s: s, lambda: PIController(atol=torch.ones(2) * 1e-3), r"atol for a tuple state must be a number or a tuple of 2"),
        ({"x": Y0}, lambda t, s: s, lambda: PIController(rtol=(1e-3,)), r"rtol for a dict state must be a number or a dict with keys \['x'\]"),
    ],
)  # fmt: skip
def test_invalid_tolerances(y0, func, ctrl, match):
    with pytest.raises(ValueError, match=match):
        solve(func=func, y0=y0, controller=ctrl())


@pytest.mark.parametrize("name", ["rtol", "atol"])
@pytest.mark.parametrize("value", [-1e-6, math.nan, (1e-3, -1e-3)])
def test_negative_or_nan_tolerances_are_rejected_by_the_controller(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be finite and non-negative, got"):
        PIController(**{name: value})
    if not isinstance(value, tuple):
        with pytest.raises(ValueError, match=rf"{name} must be finite and non-negative"):
            solve(**{name: value})


# --------------------------------------------------------------------------- controller settings
@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: PIController(safety=0.0), ValueError, r"safety must lie in \(0, 1\], got 0\.0"),
        (lambda: PIController(safety=1.5), ValueError, r"safety must lie in \(0, 1\], got 1\.5"),
        (lambda: PIController(ifactor=0.5), ValueError, r"ifactor must be >= 1, got 0\.5"),
        (lambda: PIController(dfactor=0.0), ValueError, r"dfactor must lie in \(0, 1\], got 0\.0"),
        (lambda: PIController(dfactor=2.0), ValueError, r"dfactor must lie in \(0, 1\], got 2\.0"),
        (lambda: PIController(dt0=0.0), ValueError, r"dt0 must be a positive finite step size, got 0\.0"),
        (lambda: PIController(dt0=math.inf), ValueError, r"dt0 must be a positive finite step size, got inf"),
        (lambda: PIController(dt_min=1.0, dt_max=0.5), ValueError, r"need 0 <= dt_min <= dt_max, got dt_min=1\.0, dt_max=0\.5"),
        (lambda: PIController(dt_min=-1.0), ValueError, r"need 0 <= dt_min <= dt_max"),
        (lambda: PIController(step_t=torch.zeros(2, 2)), ValueError, r"step_t must be 1-D, got a tensor of shape \(2, 2\)"),
        (lambda: PIController(jump_t=5.0), TypeError, r"jump_t must be a sequence of times, got 5\.0"),
        (lambda: PIController(step_t=["a"]), TypeError, r"step_t must be a sequence of times, got \['a'\]"),
        (lambda: PIController(step_t=[1.0, math.nan]), ValueError, r"step_t contains a non-finite time: \[1\.0, nan\]"),
        (lambda: ConstantStep(0.1, jump_t=[math.inf]), ValueError, r"jump_t contains a non-finite time"),
        (lambda: ConstantStep(0.0), ValueError, r"ConstantStep\(dt=\.\.\.\) needs a positive finite step size, got 0\.0"),
        (lambda: ConstantStep(math.nan), ValueError, r"needs a positive finite step size, got nan"),
        (lambda: ConstantStep("0.1"), ValueError, r"needs a positive finite step size, got '0\.1'"),
        (lambda: StepToGrid([0.0]), ValueError, r"StepToGrid\(grid=\.\.\.\) needs at least two points, got 1"),
        (lambda: StepToGrid([0.0, 1.0, 0.5]), ValueError, r"StepToGrid\(grid=\.\.\.\) must be strictly increasing or strictly decreasing"),
        (lambda: StepToGrid([0.0, 1.0, 1.0]), ValueError, r"must be strictly increasing or strictly decreasing"),
        (lambda: StepToGrid([0.0, 1.0], jump_t=[math.nan]), ValueError, r"jump_t contains a non-finite time"),
    ],
)  # fmt: skip
def test_invalid_controller_settings(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_constant_step_accepts_a_tensor_step():
    assert ConstantStep(torch.tensor(0.25)).dt == 0.25


# --------------------------------------------------------------------------- Solution
def test_step_times_and_evaluate_need_dense_output():
    sol = solve(dense_output=False)
    with pytest.raises(ValueError, match=r"step_times needs solve\(\.\.\., dense_output=True\)"):
        _ = sol.step_times
    with pytest.raises(
        ValueError,
        match=r"this Solution has no dense output; solve with dense_output=True to evaluate at arbitrary times",
    ):
        sol.evaluate(0.5)


@pytest.mark.parametrize(
    ("t", "tq", "match"),
    [
        (T, 1.5, r"cannot evaluate the dense output at t=1\.5: outside the solved interval \[0\.0, 1\.0\] \(no extrapolation\)"),
        (T, torch.tensor([0.5, -0.1], dtype=F64), r"at t=-0\.1: outside the solved interval \[0\.0, 1\.0\]"),
        (T.flip(0), 1.01, r"at t=1\.01: outside the solved interval \[0\.0, 1\.0\]"),
    ],
)  # fmt: skip
def test_evaluate_outside_the_interval(t, tq, match):
    sol = solve(t=t)
    with pytest.raises(ValueError, match=match):
        sol.evaluate(tq)


def test_per_sample_evaluate_needs_one_row_per_sample():
    sol = solve(y0=YB, t=torch.tensor([[0.0, 1.0]] * 3, dtype=F64))
    with pytest.raises(
        ValueError, match=r"per-sample query t has 2 rows but the solve has batch 3"
    ):
        sol.evaluate(torch.full((2, 1), 0.5, dtype=F64))
