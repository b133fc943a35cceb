"""The torchdiffeq face under patterns found in real projects written for torchdiffeq 0.2.5.

Each test reproduces, in a few lines of our own, a usage seen when running published
torchdiffeq code (latent ODEs, augmented neural ODEs, FFJORD, neural CDEs, torchdiffeq's own
examples) against neuralode through a ``torchdiffeq`` shim; the expected behaviour is
torchdiffeq 0.2.5's, checked against closed forms where a value is involved.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import neuralode
from neuralode import _compat_hooks, odeint, odeint_adjoint, odeint_event
from neuralode._compat_args import translate

D64 = torch.float64


class _Decay(nn.Module):
    """dy/dt = -k y, with only accept/reject step callbacks (no ``callback_step``)."""

    def __init__(self, k=1.5):
        super().__init__()
        self.k = k
        self.accepted, self.rejected = [], []

    def forward(self, t, y):
        return -self.k * y

    def callback_accept_step(self, t0, y0, dt):
        self.accepted.append((float(t0), float(dt)))

    def callback_reject_step(self, t0, y0, dt):
        self.rejected.append((float(t0), float(dt)))


@pytest.mark.parametrize("solver", [odeint, odeint_adjoint])
def test_accept_and_reject_callbacks_alone_are_called(solver):
    """A func that records its accepted steps, but defines no callback_step (as code that logs
    step sizes does): torchdiffeq calls the accept and reject callbacks on their own."""
    f = _Decay()
    y0 = torch.tensor([1.0, 2.0], dtype=D64)
    t = torch.tensor([0.0, 4.0], dtype=D64)
    ys = solver(f, y0, t, rtol=1e-8, atol=1e-10, options=dict(first_step=3.0))
    assert len(f.accepted) >= 5
    assert len(f.rejected) >= 1  # a first step of 3.0 at this tolerance is rejected
    # the accepted steps follow each other from 0 and cover [0, 4] (torchdiffeq's last step may
    # end past 4 and interpolate; neuralode's ends on 4)
    assert f.accepted[0][0] == 0.0
    assert f.accepted[-1][0] < 4.0 <= sum(dt for _, dt in f.accepted) * (1 + 1e-12)
    for (t0, dt), (t1, _) in zip(f.accepted, f.accepted[1:]):
        assert t1 == pytest.approx(t0 + dt, rel=1e-12)
    torch.testing.assert_close(ys[-1], y0 * math.exp(-1.5 * 4.0), rtol=1e-6, atol=0)


class _RejectsOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.rejected = []

    def forward(self, t, y):
        return -1.5 * y

    def callback_reject_step(self, t0, y0, dt):
        assert isinstance(t0, torch.Tensor) and isinstance(dt, torch.Tensor)
        self.rejected.append((float(t0), float(dt)))


def test_reject_callback_alone_is_called():
    f = _RejectsOnly()
    y0 = torch.tensor([1.0], dtype=D64)
    t = torch.tensor([0.0, 4.0], dtype=D64)
    odeint(f, y0, t, rtol=1e-8, atol=1e-10, options=dict(first_step=3.0))
    assert len(f.rejected) >= 1
    assert f.rejected[0] == (0.0, 3.0)  # the first attempt, rejected


# --------------------------------------------------------------- events that reach zero and stay
def _fall(t, y):
    return torch.full_like(y, -0.1)


def _horizon_event(t, y):
    """torchdiffeq's learn_physics example: a real event (y = 0, at t = 10 here), and a
    terminal time made by returning zero past a horizon (1.5)."""
    if t > 1.5:
        return torch.zeros_like(t)
    return y.sum()


def _clamped_event(t, y):
    """Continuous, and zero for every t >= 1.5."""
    return torch.clamp(1.5 - t, min=0.0) * torch.ones_like(y.sum())


@pytest.mark.parametrize("event_fn", [_horizon_event, _clamped_event])
@pytest.mark.parametrize("t0_shape", [(), (1,)])
def test_event_is_where_g_first_reaches_zero_and_stays(event_fn, t0_shape):
    """An event function that becomes exactly zero and stays zero fires where it first gets
    there (torchdiffeq: 1.5 to its tolerance), not at whichever later time a check point or a
    step end happened to sample a zero."""
    y0 = torch.tensor([1.0], dtype=D64)
    t0 = torch.zeros(t0_shape, dtype=D64)
    t_ev, sol = odeint_event(_fall, y0, t0, event_fn=event_fn, rtol=1e-8, atol=1e-8)
    assert float(t_ev) == pytest.approx(1.5, abs=1e-7)
    torch.testing.assert_close(sol[-1], torch.tensor([0.85], dtype=D64), rtol=0, atol=1e-7)


def test_event_that_reaches_zero_exactly_at_a_step_end_is_located():
    """g = t - 1 with steps that land on t = 1 exactly (fixed step 0.25): the zero at the step end
    is the event."""
    y0 = torch.tensor([1.0], dtype=D64)
    t_ev, sol = odeint_event(
        _fall,
        y0,
        torch.tensor(0.0, dtype=D64),
        event_fn=lambda t, y: (1.0 - t) * torch.ones_like(y.sum()),
        method="rk4",
        options=dict(step_size=0.25),
    )
    assert float(t_ev) == pytest.approx(1.0, abs=1e-8)  # torchdiffeq: 5e-10 off
    torch.testing.assert_close(sol[-1], torch.tensor([0.9], dtype=D64), rtol=0, atol=1e-9)


def test_constant_event_value_warns_once_in_a_training_loop():
    """torchdiffeq's learn_physics example: the horizon event (g = zeros_like(t)) fires in every
    iteration while the state requires grad; the zero-gradient warning is shown once per call
    site under Python's default filter, not once per iteration."""
    k = torch.tensor(0.1, dtype=D64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for horizon in (1.5, 1.6, 1.7):

            def event_fn(t, y, horizon=horizon):
                if t > horizon:
                    return torch.zeros_like(t)
                return y.sum()

            t_ev, _ = odeint_event(
                lambda t, y: -k * torch.ones_like(y),
                torch.tensor([1.0], dtype=D64),
                torch.tensor(0.0, dtype=D64),
                event_fn=event_fn,
                rtol=1e-8,
                atol=1e-8,
            )
            assert float(t_ev) == pytest.approx(horizon, abs=1e-7)
    msgs = [str(w.message) for w in caught if "does not depend on" in str(w.message)]
    assert len(msgs) == 1


# ============ found running ffjord, latent_ode and augmented-neural-odes unchanged
# A damped rotation: y(t) = y0 @ expm(A t)^T for a batch of row states.
_A = torch.tensor([[-0.3, 1.0], [-1.0, -0.3]], dtype=torch.float64)


def _exact(y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(T, *y0.shape) in float64."""
    return torch.stack([y0.double() @ torch.linalg.matrix_exp(_A * float(s)).T for s in t.double()])


def _linear(dtype):
    A = _A.to(dtype)
    return lambda t, y: y @ A.T


# ------------------------------------------------------------------ 1. Adams on the output grid
@pytest.mark.parametrize("method", ["fixed_adams", "implicit_adams", "explicit_adams"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adams_output_times_on_the_step_grid(method, dtype):
    """Output times from linspace lie on the step_size grid up to rounding; merged with the grid
    without de-duplication they left steps of 1e-9 (float32) or 4e-16 (float64) that broke
    the variable-step Adams formulas (fixed_adams: 3e-1 / 6.5e-3 on ffjord's field)."""
    t = torch.linspace(0, 5, 51, dtype=dtype)
    y0 = torch.tensor([[1.0, 0.0], [0.3, -0.7]], dtype=dtype)
    with torch.no_grad():
        ys = odeint(_linear(dtype), y0, t, method=method, options=dict(step_size=0.1))
    err = float((ys.double() - _exact(y0, t)).abs().max())
    # Order 4 (explicit: 3) with h = 0.1 over [0, 5]: 4e-6 (5e-5) in either dtype; before the
    # fix 1.4e-3 (2.2e-2) in float64 and 9e-2 (0.46) in float32.
    bound = 2e-4 if method == "explicit_adams" else 2e-5
    assert err < bound, (method, dtype, err)


@pytest.mark.parametrize("method", ["fixed_adams", "rk4", "implicit_euler"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_translated_grid_has_no_sliver_steps(method, dtype):
    """The grid lands on every output time (Adams) or step_t, once: 50 steps of 0.1."""
    t = torch.linspace(0, 5, 51, dtype=dtype)
    y0 = torch.zeros(2, dtype=dtype)
    opts = dict(step_size=0.1) if method == "fixed_adams" else dict(step_size=0.1, step_t=t)
    kw, _ = translate(None, y0, t, 1e-7, 1e-9, method, opts)
    grid = np.array(kw["controller"].grid)
    steps = np.diff(grid)
    assert len(steps) == 50 and steps.min() > 0.0999 and steps.max() < 0.1001, steps.min()
    # The grid lands on the output times themselves (in double), not on i * 0.1.
    assert set(t.double().tolist()) <= set(grid.tolist())


def test_step_t_as_tensor_on_the_grid_costs_no_extra_steps():
    """torchdiffeq takes step_t as a tensor (it raised here); float32 step_t on the rk4 grid
    took 90 steps instead of 50 (sliver steps next to every landing)."""
    t = torch.linspace(0, 5, 51)
    nfe = [0]

    def f(s, y):
        nfe[0] += 1
        return y @ _A.float().T

    y0 = torch.tensor([[1.0, 0.0]])
    for step_t in (t, t.tolist()):
        nfe[0] = 0
        ys = odeint(f, y0, t, method="rk4", options=dict(step_size=0.1, step_t=step_t))
        assert nfe[0] == 200  # 50 steps of Kutta's 3/8 rule (4 stages, not FSAL)
        assert float((ys.double() - _exact(y0, t)).abs().max()) < 1e-5


def test_merge_keeps_grid_points_away_from_the_landings():
    """Only points within the tolerance are merged: a landing between grid points adds one."""
    from neuralode._compat_grid import merged_grid

    assert merged_grid([0.0, 0.1, 0.2, 0.3], [0.0, 0.15, 0.3], 1e-9) == [0.0, 0.1, 0.15, 0.2, 0.3]
    assert merged_grid([0.0, 0.1, 0.2], [0.0, 0.1 + 1e-12, 0.2], 1e-9) == [0.0, 0.1 + 1e-12, 0.2]


# ---------------------------------------------------------- 2. non-contiguous derivatives
def _transposed(t, y):  # (A @ y.T).T: a non-contiguous (B, 2) derivative
    return (_A @ y.T).T


_T = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
_Y0 = torch.tensor([[1.0, 0.0], [0.3, -0.7], [0.2, 0.5]], dtype=torch.float64)


def _grad_exact() -> torch.Tensor:
    """d sum(y(1)) / d y0 = 1 @ expm(A)^T^T, one row per sample."""
    return torch.ones_like(_Y0) @ torch.linalg.matrix_exp(_A).T.T


@pytest.mark.parametrize(
    "run",
    [
        lambda y0: odeint(_transposed, y0, _T, rtol=1e-10, atol=1e-10),
        lambda y0: odeint(_transposed, y0, _T, method="rk4", options=dict(step_size=0.01)),
        lambda y0: odeint_adjoint(_transposed, y0, _T, rtol=1e-10, atol=1e-10, adjoint_params=()),
        lambda y0: (
            neuralode.solve(
                _transposed, y0, _T, rtol=1e-10, atol=1e-10, batch_control="per_sample"
            ).ys
        ),
        lambda y0: (
            neuralode.solve(
                _transposed, y0, _T, rtol=1e-10, atol=1e-10, gradient=neuralode.Checkpointed()
            ).ys
        ),
        lambda y0: neuralode.solve(_transposed, y0, _T, solver="rk4", dt=0.01).ys,
    ],
    ids=["odeint", "odeint-rk4", "odeint_adjoint", "per_sample", "checkpointed", "solve-rk4"],
)
def test_non_contiguous_derivative(run):
    """A derivative that is not contiguous crashed (``view size is not compatible``)."""
    y0 = _Y0.clone().requires_grad_()
    ys = run(y0)
    torch.testing.assert_close(ys, _exact(_Y0, _T), rtol=1e-7, atol=1e-8)
    ys[-1].sum().backward()
    torch.testing.assert_close(y0.grad, _grad_exact(), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("iface", [odeint, odeint_adjoint])
def test_channels_last_conv_field(iface):
    """ANODE's ConvODEFunc in channels_last memory format: same solution as contiguous."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 2, 3, padding=1).double()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)

    def field(t, y):
        return 0.3 * torch.tanh(conv(y))

    kw = dict(rtol=1e-9, atol=1e-9)
    if iface is odeint_adjoint:
        kw["adjoint_params"] = tuple(conv.parameters())
    ref = iface(field, x, _T, **kw)
    conv.to(memory_format=torch.channels_last)
    got = iface(field, x.to(memory_format=torch.channels_last), _T, **kw)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-9)


# ------------------------------------------------------ 3. euler on a fine output grid
def test_fixed_step_on_a_fine_output_grid_does_not_warn():
    """latent_ode's ODE-RNN encoder: euler without step_size on linspace(t_prev, t_i, n)."""
    y0 = torch.tensor([[1.0, 0.0]])
    t = torch.linspace(1.0, 0.9, 6)  # backward, 5 steps of 0.02
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ys = odeint(_linear(torch.float32), y0, t, method="euler")
    # Euler's result exactly: (I - 0.02 A)^5 y0 (a step of -0.02 five times).
    M = torch.eye(2, dtype=torch.float64) - 0.02 * _A
    expected = y0.double() @ torch.linalg.matrix_power(M, 5).T
    torch.testing.assert_close(ys[-1].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "t", [[0.0, 5.0], [0.0, 1.0, 2.0, 5.0], [0.0, 0.01, 0.02, 0.03, 0.04, 5.0]]
)
def test_fixed_step_on_a_coarse_output_grid_warns(t):
    """A few output times, or one large gap among fine ones, still warn."""
    with pytest.warns(UserWarning, match="step_size"):
        odeint(lambda s, y: -y, torch.ones(1), torch.tensor(t), method="rk4")


# ------------------------------------------------------ 4. derivative of another dtype
def _k():
    return torch.from_numpy(np.array([0.5, 1.0, 2.0]))  # float64, as numpy arrays come


@pytest.mark.parametrize("iface", ["odeint", "odeint_adjoint", "odeint_event"])
def test_derivative_of_another_dtype_is_cast_with_one_warning(iface, monkeypatch):
    monkeypatch.setattr(_compat_hooks, "_WARNED_CASTS", set())
    k = _k()
    f = lambda t, y: -k * y  # noqa: E731  float32 state * float64 -> float64 derivative
    y0 = torch.ones(4, 3)
    t = torch.tensor([0.0, 1.0])
    with pytest.warns(UserWarning, match=r"torch\.float64 for a state of dtype torch\.float32"):
        if iface == "odeint":
            y1 = odeint(f, y0, t, rtol=1e-6, atol=1e-8)[-1]
        elif iface == "odeint_adjoint":
            y1 = odeint_adjoint(f, y0, t, rtol=1e-6, atol=1e-8, adjoint_params=())[-1]
        else:  # until the first component reaches exp(-0.5 * 0.8)
            te, traj = odeint_event(
                f, y0, 0.0, event_fn=lambda t, y: y[0, 0] - math.exp(-0.4), rtol=1e-6, atol=1e-8
            )
            assert float(te) == pytest.approx(0.8, abs=1e-5)
            y1 = traj[-1]
    assert y1.dtype == torch.float32
    T = 0.8 if iface == "odeint_event" else 1.0
    expected = torch.exp(-k * T).float().expand(4, 3)
    torch.testing.assert_close(y1, expected, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():  # once per pair of dtypes
        warnings.simplefilter("error")
        odeint(f, y0, t)


def test_native_solve_still_raises_on_another_dtype():
    k = _k()
    with pytest.raises(TypeError, match="has dtype torch.float64 but the state has dtype"):
        neuralode.solve(lambda t, y: -k * y, torch.ones(4, 3), torch.tensor([0.0, 1.0]))
