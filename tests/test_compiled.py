"""solve(..., compile=True): compiled chunks of adaptive steps against the eager engine.

Each distinct (vector field, method, controller settings, dtype, shape, number of outputs)
compiles once (10-40 s on 2 cores), so the tests share compiled code where they can: one
process runs the whole file (tests/conftest.py; the first compilation in a process also pays
for loading Inductor), and the fields and grids marked "shared" below serve several tests with
the same field, settings and number of outputs. The tests of the chunk logic (steps masked
inside a chunk after the end or max_steps) unroll 2 steps per call instead of 8; the others 1
(a smaller graph, shorter compilation, the same step: the output window is a step's).
"""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import neuralode
import neuralode._compiled as compiled


@pytest.fixture(autouse=True)
def _two_steps_per_call(monkeypatch):
    monkeypatch.setattr(compiled, "STEPS_PER_CALL", 2)


@pytest.fixture
def one_step_per_call(monkeypatch):
    monkeypatch.setattr(compiled, "STEPS_PER_CALL", 1)


def lorenz(t, u):
    x, y, z = u.unbind(-1)
    return torch.stack([10.0 * (y - x), x * (28.0 - z) - y, x * y - (8.0 / 3.0) * z], -1)


def blow_up(t, y):  # y' = y^2, y(0) = 1: y = 1 / (1 - t), singular at t = 1
    return y * y


def decay(t, y):  # y' = -y (second component stays exactly 0 when it starts there)
    return -y


class Decay(torch.nn.Module):
    """y' = -scale k y: ``k`` in a buffer (changing it, to NaN say, reuses the compiled code),
    ``scale`` a Python number (changing it invalidates the compiled code)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("k", torch.ones(1, dtype=torch.float64))
        self.scale = 1.0

    def forward(self, t, y):
        return -self.scale * self.k * y


DECAY = Decay()
# Shared: one compiled version (DECAY, dopri5, DT_CTRL, (2,) float64, 2 outputs) for the NaN,
# changed-attribute, dt_min and error-message tests.
DT_CTRL = neuralode.PIController(rtol=1e-3, atol=1e-3, dt0=0.3, dt_min=0.2, dt_max=0.3)
T01 = torch.tensor([0.0, 1.0], dtype=torch.float64)


Y0 = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
T31 = torch.linspace(0.0, 3.0, 31, dtype=torch.float64)  # shared: Lorenz with 31 outputs


def _eager(func, y0, t, **kw):
    return neuralode.solve(func, y0, t, dense_output=False, **kw)


def test_lorenz_matches_eager_step_for_step():
    t = T31
    with torch.no_grad():
        sol = neuralode.solve(lorenz, Y0, t, rtol=1e-8, atol=1e-8, compile=True)
        ref = _eager(lorenz, Y0, t, rtol=1e-8, atol=1e-8)
    # The same arithmetic: the same steps, outputs equal up to rounding (chaos amplifies the
    # last bits over t = 3 only mildly).
    assert sol.stats["n_accepted"] == ref.stats["n_accepted"]
    assert sol.stats["n_rejected"] == ref.stats["n_rejected"]
    assert sol.stats["nfe"] == ref.stats["nfe"]
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-10, atol=1e-10)
    assert sol.status == "success" and sol.t_final == 3.0
    assert not sol.ys.requires_grad


def test_decreasing_time_and_many_outputs_per_step(one_step_per_call):
    # 201 output times on [0, 0.4] at a loose tolerance: far more than the 8 outputs a step may
    # pass, so steps land on every 8th output. Backwards in time from t = 0.4 as well.
    t = torch.linspace(0.0, 0.4, 201, dtype=torch.float64)
    ref = solve_ivp(
        lambda s, u: lorenz(s, torch.from_numpy(u)).numpy(),
        (0.0, 0.4),
        Y0.numpy(),
        method="DOP853",
        rtol=1e-12,
        atol=1e-12,
        t_eval=t.numpy(),
    ).y.T
    with torch.no_grad():
        sol = neuralode.solve(lorenz, Y0, t, rtol=1e-5, atol=1e-5, compile=True)
        back = neuralode.solve(lorenz, sol.ys[-1], t.flip(0), rtol=1e-9, atol=1e-9, compile=True)
    err = np.abs(sol.ys.numpy() - ref).max()
    assert err < 1e-3, err
    assert sol.stats["n_accepted"] >= 200 // 8  # landed at least on every 8th output
    assert torch.equal(sol.ys[0], Y0)
    # Backwards in time (integrated in negated time inside) agrees with the eager engine.
    with torch.no_grad():
        back_ref = _eager(lorenz, sol.ys[-1], t.flip(0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(back.ys, back_ref.ys, rtol=1e-6, atol=1e-6)
    assert back.t_final == 0.0


def test_max_steps_raises_and_partial_solution():
    t = T31 * (10.0 / 3.0)  # 31 outputs: test_lorenz_matches_eager_step_for_step's code
    with torch.no_grad(), pytest.raises(neuralode.MaxStepsError, match="max_steps=5"):
        neuralode.solve(lorenz, Y0, t, rtol=1e-8, atol=1e-8, max_steps=5, compile=True)
    with torch.no_grad():
        sol = neuralode.solve(
            lorenz, Y0, t, rtol=1e-8, atol=1e-8, max_steps=5, compile=True, throw=False
        )
    assert sol.status == "max_steps"
    assert sol.stats["n_accepted"] + sol.stats["n_rejected"] == 5
    assert 0.0 < sol.t_final < 10.0 and torch.isnan(sol.ys[-1]).all()


def test_singularity_reports_step_size_underflow_near_t1(one_step_per_call):
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    y0 = torch.ones(1, dtype=torch.float64)
    with torch.no_grad(), pytest.raises(neuralode.StepSizeUnderflowError) as info:
        neuralode.solve(blow_up, y0, t, rtol=1e-6, atol=1e-6, compile=True)
    assert math.isclose(info.value.t, 1.0, abs_tol=1e-3)
    assert "compiled stepping" in str(info.value)


def test_module_vector_field_float32_batch(one_step_per_call):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, y):
            return self.net(y)

    func = Field()
    y0 = torch.randn(5, 2)
    t = torch.linspace(2.0, 0.0, 7)  # decreasing: tsit5 in negated time (dopri5: below)
    with torch.no_grad():
        sol = neuralode.solve(func, y0, t, solver="tsit5", rtol=1e-5, atol=1e-5, compile=True)
        ref = _eager(func, y0, t, solver="tsit5", rtol=1e-5, atol=1e-5)
    assert sol.ys.dtype == torch.float32 and sol.ys.shape == (7, 5, 2)
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(solver="kvaerno5"), "explicit Runge-Kutta method"),
        (dict(gradient="reversible"), "gradient=Reversible"),
        # (a custom norm compiles: tests/test_compiled_custom_norm.py)
    ],
)
def test_unsupported_combinations_raise_before_compiling(kwargs, match):
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y0 = torch.ones(2, 3, dtype=torch.float64)
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        neuralode.solve(lambda t, y: -y, y0, t, compile=True, **kwargs)


def test_unsupported_states_and_grad_mode_raise():
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y0 = torch.ones(3, dtype=torch.float64)
    # (Tuple/dict states and grad mode work: tests/test_driver_matrix.py,
    # tests/test_compiled_gradients.py.)
    # (Grad mode and gradients w.r.t. t work: tests/test_compiled_rows.py.)
    with pytest.raises(TypeError, match="compile must be a bool"):
        neuralode.solve(lambda t, y: -y, y0, t, compile="yes")


@pytest.mark.parametrize("solver, tol", [("dopri8", 1e-9), ("fehlberg2", 1e-5)])
def test_methods_with_dense_stages(solver, tol, one_step_per_call):
    # fehlberg2's continuous extension uses f at the step end (computed anyway); DOP853's needs
    # three more stages, so compiled steps land on every output time instead.
    t = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    with torch.no_grad():
        ref = _eager(lorenz, Y0, t, solver="dopri8", rtol=1e-12, atol=1e-12).ys
        sol = neuralode.solve(lorenz, Y0, t, solver=solver, rtol=tol, atol=tol, compile=True)
        eager = _eager(lorenz, Y0, t, solver=solver, rtol=tol, atol=tol)
    err, err_eager = (float((x - ref).abs().max()) for x in (sol.ys, eager.ys))
    assert err <= 3 * err_eager + 1e-12, (err, err_eager)
    if solver == "dopri8":
        assert sol.stats["n_accepted"] >= 10  # one step end per output time at least
    else:
        torch.testing.assert_close(sol.ys, eager.ys, rtol=1e-9, atol=1e-9)


def test_decreasing_time_matches_the_eager_engine_exactly(one_step_per_call):
    # The first stage is f(t0, y0) in the user's time; the compiled steps run in negated time.
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    for solver in ("dopri5",):  # tsit5 backward: test_module_vector_field_float32_batch
        with torch.no_grad():
            sol = neuralode.solve(decay, y0, t, solver=solver, rtol=1e-6, atol=0.0, compile=True)
            ref = _eager(decay, y0, t, solver=solver, rtol=1e-6, atol=0.0)
        assert sol.stats["n_accepted"] == ref.stats["n_accepted"]
        assert sol.stats["n_rejected"] == ref.stats["n_rejected"] == 0
        torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-12, atol=0.0)
        assert abs(float(sol.ys[-1, 0]) / math.e - 1) < 1e-5
        assert float(sol.ys[-1, 1]) == 0.0  # atol = 0 with a zero component: no 0/0


def test_nan_from_func_raises_nonfinite_error(one_step_per_call):
    y0 = torch.ones(2, dtype=torch.float64)
    match = r"compiled stepping.*non-finite"  # raised by the compiled steps, not the eager ones
    DECAY.k.fill_(math.nan)
    try:
        with torch.no_grad(), pytest.raises(neuralode.NonFiniteError, match=match):
            neuralode.solve(DECAY, y0, T01, controller=DT_CTRL, compile=True)
    finally:
        DECAY.k.fill_(1.0)


def test_changed_python_attribute_runs_eagerly_with_a_warning(one_step_per_call):
    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    try:
        with torch.no_grad():
            first = neuralode.solve(DECAY, y0, T01, controller=DT_CTRL, compile=True)
            assert first.stats["compiled"] is True
            DECAY.scale = 2.0
            with pytest.warns(RuntimeWarning, match="no longer matches"):
                second = neuralode.solve(DECAY, y0, T01, controller=DT_CTRL, compile=True)
            ref = _eager(DECAY, y0, T01, controller=DT_CTRL)
    finally:
        DECAY.scale = 1.0  # the compiled code matches again for the other tests
    assert second.stats["compiled"] is False
    torch.testing.assert_close(second.ys, ref.ys, rtol=1e-14, atol=0.0)  # the eager engine's
    torch.testing.assert_close(second.ys[-1], y0 * math.exp(-2.0), rtol=1e-3, atol=0.0)


def test_dt_min_applies_to_the_proposed_step_not_the_last_piece(one_step_per_call):
    # dt_max = 0.3 on [0, 1] leaves a last piece of 0.1 < dt_min = 0.2: the eager loop accepts
    # it (dt_min bounds the controller's proposal), so must the compiled one.
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    with torch.no_grad():
        sol = neuralode.solve(DECAY, y0, T01, controller=DT_CTRL, compile=True)
        ref = _eager(DECAY, y0, T01, controller=DT_CTRL)
    assert sol.stats["compiled"] is True and sol.stats["n_accepted"] == 4
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-12, atol=0.0)


def test_single_output_time_and_gradient_methods():
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    with torch.no_grad():
        sol = neuralode.solve(decay, y0, torch.tensor([0.5]), compile=True)
        assert torch.equal(sol.ys[0], y0) and sol.stats["compiled"] is False
        with pytest.raises(ValueError, match="gradient=Reversible"):
            neuralode.solve(
                decay, y0, torch.tensor([0.0, 1.0]), gradient="reversible", compile=True
            )


def test_error_messages_name_what_is_unsupported(one_step_per_call):
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    with torch.no_grad():
        sol = neuralode.solve(DECAY, y0, T01, controller=DT_CTRL, compile=True)
        assert sol.stats["compiled"] is True
        with pytest.raises(
            ValueError, match=r"compile=True\), which keeps no dense output unless asked"
        ):
            sol.evaluate(torch.tensor([0.5]))
