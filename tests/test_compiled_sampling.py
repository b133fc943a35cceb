"""solve(..., compile=True) repeated with fixed steps (a sampling loop): the second solve of the
same setup evaluates the first stage inside its first compiled call instead of eagerly, and
gives the values, NFE and statistics of the first."""

import math

import pytest
import torch

import neuralode
from neuralode import _loop


def oscillator(t, y):  # y'' = -y as a system; y(t) = (cos t, -sin t) from (1, 0)
    return torch.stack([y[..., 1], -y[..., 0]], -1)


@pytest.fixture
def eager_calls(monkeypatch):
    """How often the vector field is evaluated eagerly (through the engine's VectorField)."""
    calls = []
    original = _loop.VectorField.__call__

    def counted(self, t, y):
        calls.append(t)
        return original(self, t, y)

    monkeypatch.setattr(_loop.VectorField, "__call__", counted)
    return calls


@pytest.mark.parametrize("solver", ["euler", "rk4"])
def test_repeated_fixed_step_solve_evaluates_first_stage_inside(solver, eager_calls):
    y0 = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    kw = dict(solver=solver, dt=0.125, compile=True, dense_output=False)
    with torch.no_grad():
        first = neuralode.solve(oscillator, y0, t, **kw)
        n_first = len(eager_calls)
        second = neuralode.solve(oscillator, y0, t, **kw)
        n_second = len(eager_calls) - n_first
        eager = neuralode.solve(oscillator, y0, t, solver=solver, dt=0.125, dense_output=False)
    assert first.stats["compiled"] and second.stats["compiled"]
    assert n_first == 1  # the first solve evaluates f(t0, y0) eagerly (it checks func's output)
    assert n_second == 0  # the second solve none
    assert second.stats["nfe"] == first.stats["nfe"]
    torch.testing.assert_close(second.ys, first.ys, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(second.ys, eager.ys, rtol=1e-12, atol=1e-12)
    # Against the exact solution: Euler's global error ~ dt / 2, RK4's ~ dt^4 / 100.
    exact = torch.tensor([math.cos(1.0), -math.sin(1.0)], dtype=torch.float64)
    err = (second.ys[-1, 0] - exact).abs().max().item()
    assert err < (0.1 if solver == "euler" else 1e-5)


def test_first_solve_with_a_new_func_checks_its_output_eagerly(eager_calls):
    """A func solved before with the same setup goes inside; another func of the same setup
    is evaluated eagerly first (its output checked, with the engine's error message)."""
    y0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 0.5], dtype=torch.float64)
    kw = dict(solver="euler", dt=0.25, compile=True, dense_output=False)

    def wrong_shape(t, y):
        return y[..., :1]

    with torch.no_grad():
        neuralode.solve(oscillator, y0, t, **kw)
        neuralode.solve(oscillator, y0, t, **kw)
        assert len(eager_calls) == 1
        with pytest.raises(ValueError, match="derivative returned by func"):
            neuralode.solve(wrong_shape, y0, t, **kw)
