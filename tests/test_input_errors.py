"""Error messages added after a fresh-eyes review: each user mistake gets a clear error."""

import pytest
import torch

import neuralode
from neuralode import Event, StepToGrid

F64 = torch.float64
T = torch.linspace(0.0, 1.0, 3, dtype=F64)


def decay(t, y):
    return -y


def test_step_to_grid_must_cover_the_interval():
    with pytest.raises(ValueError, match=r"the grid must cover the whole interval"):
        neuralode.solve(
            decay, torch.ones(1, dtype=F64), T, solver="rk4", controller=StepToGrid([0, 0.1])
        )


def test_zero_tolerances_are_rejected_up_front():
    with pytest.raises(ValueError, match="rtol and atol are both zero"):
        neuralode.solve(decay, torch.ones(2, dtype=F64), T, rtol=0, atol=0)


def test_pure_relative_tolerance_at_a_zero_state_is_solved():
    sol = neuralode.solve(lambda t, y: torch.ones_like(y), torch.zeros(3, dtype=F64), T, atol=0)
    torch.testing.assert_close(sol.ys[-1], torch.ones(3, dtype=F64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_state_is_rejected(dtype):
    with pytest.raises(TypeError, match="half precision"):
        neuralode.solve(decay, torch.ones(3, dtype=dtype), T)


def test_empty_state_is_rejected():
    with pytest.raises(ValueError, match="has no elements"):
        neuralode.solve(decay, torch.ones(0), T)


def test_odeint_event_needs_two_times():
    with pytest.raises(ValueError, match="t must hold 2 times"):
        neuralode.odeint(decay, torch.ones(1, dtype=F64), T, event_fn=lambda t, y: y[0] - 0.5)


def test_event_that_never_fires_ends_with_max_steps():
    with pytest.raises(neuralode.MaxStepsError):
        neuralode.odeint(
            decay,
            torch.ones(1, dtype=F64),
            torch.tensor([0.0, 1.0], dtype=F64),
            event_fn=lambda t, y: y[0] - 2.0,
            options=dict(max_num_steps=500),
        )


def test_non_differentiable_event_function_explains_itself():
    y0 = torch.ones(1, dtype=F64, requires_grad=True)
    ev = Event(lambda t, y: torch.tensor(float(y[0].detach()) - 0.5, dtype=F64))
    with pytest.raises(RuntimeError, match="event function is not differentiable"):
        neuralode.solve(decay, y0, torch.tensor([0.0, 2.0], dtype=F64), event=ev)


@pytest.mark.parametrize("gradient", ["backsolve", "checkpoint"])
def test_detached_dense_output_warns_when_recording_gradients(gradient):
    y0 = torch.ones(1, dtype=F64, requires_grad=True)
    sol = neuralode.solve(decay, y0, T, gradient=gradient, dense_output=True)
    with pytest.warns(UserWarning, match="detached values"):
        v = sol.evaluate(torch.tensor([0.3], dtype=F64))
    assert not v.requires_grad
    with torch.no_grad():
        sol.evaluate(torch.tensor([0.3], dtype=F64))  # no warning without gradient recording


def test_model_dtype_mismatch_is_a_clear_error():
    from neuralode.models import MLPVectorField, NeuralODE

    with pytest.raises(TypeError, match="model's parameters are torch.float32"):
        NeuralODE(MLPVectorField(2))(torch.randn(3, 2, dtype=F64), torch.linspace(0, 1, 3))


def test_csv_without_data_rows(tmp_path):
    from neuralode.data import load_csv

    p = tmp_path / "empty.csv"
    p.write_text("id,time,variable,value\n")
    with pytest.raises(ValueError, match="no data rows"):
        load_csv(p)


def test_available_lists_every_kind():
    from neuralode.solvers import available

    assert {"dopri5", "kvaerno5", "implicit_adams"} <= set(available("all"))
    assert "kvaerno5" in available("implicit") and "dopri5" not in available("implicit")
    with pytest.raises(ValueError, match="kind must be"):
        available("stiff")
