"""State structures, dtypes, directions and per-sample output grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import neuralode
from neuralode import PIController

F64 = torch.float64


def _decay(t, y):
    """y' = -(1 + sin t) y: y(t) = y0 exp(-(t - cos t + 1))."""
    return -y * (1 + torch.sin(t)).to(y.dtype)


def _decay_exact(y0, t):
    return y0 * torch.exp(-(t - torch.cos(t) + 1))


# --------------------------------------------------------------------------- per-sample grids
Y0 = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 0.1]], dtype=F64)
GRIDS = torch.tensor(
    [[0.0, 0.5, 1.0, 2.0], [0.0, 0.3, 3.0, 3.0], [0.0, 1.5, 1.7, 2.5]], dtype=F64
)  # row 1 is padded by repeating its last time


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_per_sample_grids_match_solving_each_sample_alone(sign):
    t = sign * GRIDS
    tol = dict(rtol=1e-10, atol=1e-12)
    sol = neuralode.solve(_decay, Y0, t, **tol)
    assert sol.ys.shape == (4, 3, 2)  # (T, B, ...)
    for b in range(3):
        row = t[b]
        alone = neuralode.solve(_decay, Y0[b], torch.unique_consecutive(row), **tol)
        expected = alone.ys[torch.searchsorted(torch.unique_consecutive(sign * row), sign * row)]
        torch.testing.assert_close(sol.ys[:, b], expected, rtol=0, atol=1e-8)
        torch.testing.assert_close(
            sol.ys[:, b], _decay_exact(Y0[b], row[:, None]), rtol=0, atol=1e-8
        )
    # Padding: a repeated last time repeats the value exactly.
    torch.testing.assert_close(sol.ys[3, 1], sol.ys[2, 1], rtol=0, atol=0)
    assert sol.t_final == pytest.approx(sign * 3.0, abs=0)  # the longest row


def test_per_sample_grids_reorder_outputs_back_to_the_caller_layout():
    """Outputs are computed in time order across samples; each lands in its own (j, b) slot."""
    t = torch.tensor([[0.0, 2.0, 2.5], [0.0, 0.1, 0.2]], dtype=F64)
    y0 = torch.tensor([[1.0], [1.0]], dtype=F64)
    sol = neuralode.solve(_decay, y0, t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sol.ys[..., 0], _decay_exact(1.0, t).T, rtol=0, atol=1e-9)


def test_per_sample_dense_output_queries():
    sol = neuralode.solve(_decay, Y0, GRIDS, rtol=1e-10, atol=1e-12)
    tq = torch.tensor([[0.25, 1.9], [2.9, 0.05], [1.0, 2.4]], dtype=F64)
    vals = sol.evaluate(tq)
    assert vals.shape == (2, 3, 2)  # (Q, B, ...)
    torch.testing.assert_close(vals, _decay_exact(Y0[None], tq.T[..., None]), rtol=0, atol=1e-8)


def test_per_sample_tuple_state():
    y0 = (Y0, Y0[:, :1] * 2)
    sol = neuralode.solve(
        lambda t, s: (_decay(t, s[0]), _decay(t, s[1])), y0, GRIDS, rtol=1e-10, atol=1e-12
    )
    assert sol.ys[0].shape == (4, 3, 2) and sol.ys[1].shape == (4, 3, 1)
    torch.testing.assert_close(sol.ys[1][..., 0], 2 * sol.ys[0][..., 0], rtol=0, atol=1e-8)


# --------------------------------------------------------------------------- structures
def test_tuple_state_harmonic_oscillator():
    t = torch.linspace(0, 3, 7, dtype=F64)
    sol = neuralode.solve(
        lambda t, s: (s[1], -s[0]),
        (torch.tensor([1.0], dtype=F64), torch.tensor([0.0], dtype=F64)),
        t,
        rtol=1e-10,
        atol=1e-12,
    )
    assert isinstance(sol.ys, tuple) and [y.shape for y in sol.ys] == [(7, 1), (7, 1)]
    torch.testing.assert_close(sol.ys[0][:, 0], torch.cos(t), rtol=0, atol=1e-8)
    torch.testing.assert_close(sol.ys[1][:, 0], -torch.sin(t), rtol=0, atol=1e-8)


def test_dict_state_keeps_keys_and_shapes():
    t = torch.linspace(0, 3, 4, dtype=F64)
    y0 = {"x": torch.ones(2, 3, dtype=F64), "v": torch.zeros(2, 3, dtype=F64)}
    sol = neuralode.solve(lambda t, s: {"v": -s["x"], "x": s["v"]}, y0, t, rtol=1e-10, atol=1e-12)
    assert set(sol.ys) == {"x", "v"}
    assert sol.ys["x"].shape == (4, 2, 3) and sol.ys["v"].shape == (4, 2, 3)
    torch.testing.assert_close(
        sol.ys["x"], torch.cos(t)[:, None, None].expand(4, 2, 3), rtol=0, atol=1e-8
    )
    torch.testing.assert_close(sol.evaluate(1.5)["v"], -math.sin(1.5) * torch.ones(2, 3, dtype=F64))


def test_mixed_norm_controls_each_component_separately():
    """Max over components of each component's RMS: a one-scalar component among 99 idle ones is
    controlled exactly as if it were alone, where a flat RMS over all 100 would dilute its error
    by sqrt(100) and take fewer steps."""
    idle = torch.zeros(99, dtype=F64)
    b0 = torch.tensor([2.0], dtype=F64)
    t = torch.tensor([0.0, 5.0], dtype=F64)

    def vdp1(t, y):  # y' = 2 cos(2t) y(1 - y/4): a scalar problem with some structure
        return 2 * torch.cos(2 * t) * y * (1 - y / 4)

    kw = dict(rtol=1e-6, atol=1e-8)
    alone = neuralode.solve(vdp1, b0, t, **kw)
    as_tuple = neuralode.solve(
        lambda t, s: (torch.zeros_like(s[0]), vdp1(t, s[1])), (idle, b0), t, **kw
    )
    flat = neuralode.solve(
        lambda t, y: torch.cat([torch.zeros(99, dtype=F64), vdp1(t, y[99:])]),
        torch.cat([idle, b0]),
        t,
        **kw,
    )
    # The same steps; their times agree to rounding only (the tuple's norm reduces over other
    # tensors, with other vector kernels, than the scalar's).
    for key in ("n_accepted", "n_rejected", "nfe"):
        assert as_tuple.stats[key] == alone.stats[key], key
    np.testing.assert_allclose(as_tuple.step_times, alone.step_times, rtol=1e-12, atol=0)
    assert flat.stats["nfe"] < 0.8 * alone.stats["nfe"]


@pytest.mark.parametrize(
    ("dtype", "rtol", "bound"), [(torch.complex128, 1e-10, 1e-8), (torch.complex64, 1e-5, 1e-4)]
)
def test_complex_state(dtype, rtol, bound):
    t = torch.linspace(0, 5, 6, dtype=F64)
    sol = neuralode.solve(
        lambda t, y: 1j * y, torch.ones(2, dtype=dtype), t, rtol=rtol, atol=rtol / 100
    )
    assert sol.ys.dtype == dtype
    err = (sol.ys[:, 0].to(torch.complex128) - torch.exp(1j * t)).abs().max()
    assert float(err) <= bound
    assert float((sol.ys.abs() - 1).abs().max()) <= bound  # |y| = 1: the modulus enters the norm


def test_float32_state_keeps_its_dtype():
    seen = []

    def f(t, y):
        seen.append(t.dtype)
        return -y * torch.cos(t).to(y.dtype)

    t = torch.linspace(0, 2, 5, dtype=F64)
    sol = neuralode.solve(f, torch.ones(3, dtype=torch.float32), t, rtol=1e-6, atol=1e-8)
    assert sol.ys.dtype == torch.float32
    err = (sol.ys[:, 0].double() - torch.exp(-torch.sin(t))).abs().max()
    assert float(err) <= 1e-5
    assert set(seen) == {torch.float64}  # time stays double by default
    seen.clear()
    sol32 = neuralode.solve(
        f, torch.ones(3, dtype=torch.float32), t, rtol=1e-6, atol=1e-8, time_dtype=torch.float32
    )
    assert set(seen) == {torch.float32} and sol32.ys.dtype == torch.float32


@pytest.mark.parametrize("solver", ["dopri5", "tsit5", "dopri8", "bosh3"])
def test_decreasing_time_integrates_backward(solver):
    t = torch.linspace(2.0, -1.0, 7, dtype=F64)
    y0 = torch.tensor([math.exp(math.sin(2.0))], dtype=F64)
    sol = neuralode.solve(
        lambda t, y: y * torch.cos(t), y0, t, solver=solver, rtol=1e-10, atol=1e-12
    )
    st = sol.step_times
    assert st[0] == 2.0 and st[-1] == -1.0 and all(b < a for a, b in zip(st, st[1:]))
    torch.testing.assert_close(sol.ys[:, 0], torch.exp(torch.sin(t)), rtol=0, atol=1e-7)
    tq = torch.tensor([1.234, -0.5], dtype=F64)
    torch.testing.assert_close(sol.evaluate(tq)[:, 0], torch.exp(torch.sin(tq)), rtol=0, atol=1e-7)


def test_scalar_shaped_state():
    t = torch.linspace(0, 1, 3, dtype=F64)
    sol = neuralode.solve(lambda t, y: -y, torch.tensor(1.0, dtype=F64), t, rtol=1e-10, atol=1e-12)
    assert sol.ys.shape == (3,)
    torch.testing.assert_close(sol.ys, torch.exp(-t), rtol=0, atol=1e-9)


def test_single_output_time_returns_y0():
    y0 = torch.tensor([1.0, 2.0], dtype=F64)
    sol = neuralode.solve(lambda t, y: -y, y0, torch.tensor([0.5], dtype=F64))
    assert sol.ys.shape == (1, 2) and torch.equal(sol.ys[0], y0)
    assert sol.stats["n_accepted"] == 0


def test_integer_times_are_accepted():
    sol = neuralode.solve(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0, 1, 2]))
    torch.testing.assert_close(
        sol.ys[:, 0], torch.exp(-torch.tensor([0.0, 1.0, 2.0], dtype=F64)), rtol=1e-6, atol=0
    )


# --------------------------------------------------------------------------- tolerances
def _two_speeds(t, y):
    """Decoupled: component 0 oscillates fast (1 + sin 8t), component 1 decays slowly."""
    return torch.stack([8.0 * torch.cos(8.0 * t), -y[1]])


def test_uniform_tolerance_tensor_equals_the_scalar():
    y0 = torch.tensor([1.0, 1.0], dtype=F64)
    t = torch.tensor([0.0, 3.0], dtype=F64)
    scalar = neuralode.solve(_two_speeds, y0, t, rtol=1e-6, atol=1e-8)
    tensor = neuralode.solve(
        _two_speeds,
        y0,
        t,
        controller=PIController(
            rtol=torch.full((2,), 1e-6, dtype=F64), atol=torch.full((2,), 1e-8, dtype=F64)
        ),
    )
    assert tensor.stats == scalar.stats
    np.testing.assert_allclose(tensor.step_times, scalar.step_times, rtol=1e-13, atol=0)


def test_per_component_tolerances_weight_the_error_norm():
    y0 = torch.tensor([1.0, 1.0], dtype=F64)
    t = torch.tensor([0.0, 3.0], dtype=F64)

    def run(r0, r1):
        ctrl = PIController(
            rtol=torch.tensor([r0, r1], dtype=F64), atol=torch.tensor([r0, r1], dtype=F64) / 100
        )
        return neuralode.solve(_two_speeds, y0, t, controller=ctrl)

    loose, tight = run(1e-3, 1e-3), run(1e-9, 1e-9)
    tight_fast, tight_slow = run(1e-9, 1e-3), run(1e-3, 1e-9)
    # The fast component decides the steps: tightening only it costs nearly as much as
    # tightening both, tightening only the slow one much less.
    assert tight_fast.stats["nfe"] >= 0.5 * tight.stats["nfe"]
    assert tight_slow.stats["nfe"] < 0.5 * tight_fast.stats["nfe"]
    assert loose.stats["nfe"] < tight_slow.stats["nfe"]
    exact_slow = math.exp(-3.0)
    assert abs(float(tight_slow.ys[-1, 1]) - exact_slow) < 1e-7


def test_per_component_tolerances_for_tuple_and_dict_states():
    t = torch.tensor([0.0, 2.0], dtype=F64)
    a, b = torch.ones(3, dtype=F64), torch.ones(1, dtype=F64)
    f_t = lambda t, s: (-s[0], -s[1])  # noqa: E731
    tup = neuralode.solve(
        f_t, (a, b), t, controller=PIController(rtol=(1e-3, 1e-10), atol=(1e-5, 1e-12))
    )
    assert abs(float(tup.ys[1][-1, 0]) - math.exp(-2.0)) < 1e-8
    f_d = lambda t, s: {"a": -s["a"], "b": -s["b"]}  # noqa: E731
    dic = neuralode.solve(
        f_d,
        {"a": a, "b": b},
        t,
        controller=PIController(rtol={"a": 1e-3, "b": 1e-10}, atol={"a": 1e-5, "b": 1e-12}),
    )
    assert dic.step_times == tup.step_times


def test_tolerance_tensor_broadcasts_over_leading_dimensions():
    y0 = torch.ones(3, 2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    rtol = torch.tensor([1e-6, 1e-6], dtype=F64)  # (2,) against the state's (3, 2)
    a = neuralode.solve(lambda t, y: -y, y0, t, controller=PIController(rtol=rtol, atol=1e-8))
    b = neuralode.solve(lambda t, y: -y, y0, t, rtol=1e-6, atol=1e-8)
    assert a.stats == b.stats
    np.testing.assert_allclose(a.step_times, b.step_times, rtol=1e-13, atol=0)
