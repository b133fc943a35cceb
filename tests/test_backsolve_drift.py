"""Backsolve measures how far the state solved backward drifts from the forward's values where
it is put back (``stats["backsolve_drift"]``, in forward tolerances) and warns when a running
cost (``integral=``) is evaluated on a drifted state (a reviewer's contracting problem: the
gradient was 1e15 relative off without a word)."""

import warnings

import pytest
import torch

import neuralode

F64 = torch.float64


class _Field(torch.nn.Module):
    """dy/dt = -k y + tanh(W y) + k b cos t: contracting at rate ~k."""

    def __init__(self, k):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(torch.randn(4, 4, generator=g, dtype=F64))
        self.k = torch.nn.Parameter(torch.tensor(k, dtype=F64))
        self.b = torch.nn.Parameter(torch.tensor([3.0, 0.0, 0.0, 0.0], dtype=F64))

    def forward(self, t, y):
        c = torch.cos(t).reshape(-1, 1)  # (t is (A,) under per-sample control, 0-d otherwise)
        return -self.k * y + torch.tanh(y @ self.W.T) + self.k * self.b * c


Y0 = torch.tensor([[1.0, -0.5, 0.3, 2.0], [0.2, 0.1, -1.0, 0.5]], dtype=F64)


def _grads(gradient, k, n_out, integral, batch_control="shared"):
    f = _Field(k)
    kw = {"integral": lambda t, y: (y * y).sum(-1)} if integral else {}
    t = torch.linspace(0, 4, n_out, dtype=F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol = neuralode.solve(f, Y0, t, gradient=gradient, rtol=1e-9, atol=1e-11,
                              batch_control=batch_control, **kw)  # fmt: skip
        loss = sol.ys.sum() + (0.3 * sol.integral.sum() if integral else 0.0)
        grads = torch.autograd.grad(loss, [f.k, f.W])
    drifted = [w for w in caught if "drifted" in str(w.message)]
    return grads, sol.stats, drifted


def _rel(a, b):
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))


@pytest.mark.parametrize("batch_control", ["shared", "per_sample"])
def test_running_cost_on_a_drifted_state_warns(batch_control):
    ref, _, _ = _grads("direct", 50.0, 6, True, batch_control)
    got, stats, drifted = _grads(neuralode.Backsolve(outputs="stop"), 50.0, 6, True, batch_control)
    assert stats["backsolve_drift"] > 1e10
    assert len(drifted) == 1 and issubclass(drifted[0].category, RuntimeWarning)
    assert "output times" in str(drifted[0].message)
    assert _rel(got, ref) > 1e-2  # (why it warns: the gradient is off)


@pytest.mark.parametrize("batch_control", ["shared", "per_sample"])
def test_output_times_close_enough_keep_it_quiet_and_right(batch_control):
    # The remedy the warning names: outputs 0.1 apart put y back before it drifts far.
    ref, _, _ = _grads("direct", 50.0, 41, True, batch_control)
    got, stats, drifted = _grads(neuralode.Backsolve(outputs="stop"), 50.0, 41, True, batch_control)
    assert stats["backsolve_drift"] < 1e4 and not drifted
    assert _rel(got, ref) < 1e-5


def test_no_running_cost_no_warning_and_gradients_hold():
    # Without a running cost the adjoint decays where y solved backward grows: the drift is
    # recorded, the gradient stays at the tolerance, nothing is said.
    ref, _, _ = _grads("direct", 50.0, 6, False)
    got, stats, drifted = _grads(neuralode.Backsolve(outputs="stop"), 50.0, 6, False)
    assert stats["backsolve_drift"] > 1e10 and not drifted
    assert _rel(got, ref) < 1e-4


def test_fixed_steps_have_no_tolerance_to_measure_the_drift_in():
    # (CI found it: rk4 with dt and integral= warned of a drift of 5.7e301 "tolerances" with
    # tolerances zero.)
    f = _Field(2.0)
    t = torch.linspace(0, 1, 3, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = neuralode.solve(f, Y0, t, gradient=neuralode.Backsolve(outputs="stop"),
                              solver="rk4", dt=0.1, integral=lambda t, y: y.square().sum(-1))  # fmt: skip
        (sol.ys.sum() + sol.integral.sum()).backward()
    assert "backsolve_drift" not in sol.stats
