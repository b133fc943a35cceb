"""Per-sample step control: ``neuralode.solve(..., batch_control="per_sample")``.

Each sample of the batch takes its own steps, so its result does not depend on the rest of the
batch; finished samples stop costing evaluations; rows may start at different times.
"""

from __future__ import annotations

import math

import pytest
import torch

import neuralode
from neuralode import MaxStepsError, NonFiniteError, PIController, StepSizeUnderflowError

F64 = torch.float64
PS = dict(batch_control="per_sample")


def solve(func, y0, t, **kw):
    return neuralode.solve(func, y0, t, batch_control="per_sample", **kw)


def pendulum(t, y):
    return torch.stack([y[:, 1], -torch.sin(y[:, 0])], dim=1)


def gaussian_decay(t, y):
    """y' = -t y (time-dependent: t is (A,), one time per row): y = y0 exp(-(t^2 - t0^2) / 2)."""
    return -t[:, None] * y


def gaussian_exact(y0, t0, t):
    return y0 * torch.exp(-(t**2 - t0**2) / 2)


def mlp(d: int = 2, hidden: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(hidden, d, generator=gen, dtype=F64) * 1.5 / math.sqrt(d)
    b1 = torch.randn(hidden, generator=gen, dtype=F64) * 0.5
    w2 = torch.randn(d, hidden, generator=gen, dtype=F64) * 1.5 / math.sqrt(hidden)

    def f(t, y):
        return torch.tanh(y @ w1.T + b1) @ w2.T

    return f


# --------------------------------------------------------------------------- batch composition
def test_a_sample_gives_the_same_result_alone_and_inside_any_batch():
    y0 = torch.tensor([[0.3, 0.0], [2.9, 0.5], [0.01, -0.02], [1.5, 1.0], [-2.0, 3.0]], dtype=F64)
    spans = torch.tensor([2.0, 30.0, 0.1, 7.0, 12.0], dtype=F64)
    t = spans[:, None] * torch.linspace(0, 1, 6, dtype=F64)
    kw = dict(rtol=1e-7, atol=1e-9)
    batch = solve(pendulum, y0, t, **kw)
    for b in range(5):
        alone = solve(pendulum, y0[b : b + 1], t[b : b + 1], **kw)
        torch.testing.assert_close(alone.ys[:, 0], batch.ys[:, b], rtol=0, atol=1e-12)
        assert int(alone.stats["n_accepted"][0]) == int(batch.stats["n_accepted"][b])
        assert int(alone.stats["n_rejected"][0]) == int(batch.stats["n_rejected"][b])
    # Another composition: sample 0 with copies of the hardest sample.
    mixed = solve(pendulum, y0[[1, 0, 1]], t[[1, 0, 1]], **kw)
    torch.testing.assert_close(mixed.ys[:, 1], batch.ys[:, 0], rtol=0, atol=1e-12)
    # The samples took very different numbers of steps (the point of per-sample control).
    n = batch.stats["n_accepted"]
    assert int(n.max()) > 5 * int(n.min())


def test_a_batch_of_one_takes_the_same_steps_as_the_shared_loop():
    y0 = torch.tensor([[1.2, -0.4]], dtype=F64)
    t = torch.linspace(0, 5, 9, dtype=F64)
    for kw in (dict(rtol=1e-6, atol=1e-8), dict(controller=PIController(pcoeff=0.2, icoeff=0.65))):
        per = solve(pendulum, y0, t, **kw)
        shared = neuralode.solve(pendulum, y0, t, **kw)
        assert per.stats["nfe"] == shared.stats["nfe"]
        assert int(per.stats["n_accepted"][0]) == shared.stats["n_accepted"]
        torch.testing.assert_close(per.ys, shared.ys, rtol=0, atol=1e-12)
        # The error estimate cancels heavily (b - b_hat), so a different summation order of the
        # stages moves it, and the step sizes, in the ninth digit or so.
        assert per.step_times[0] == pytest.approx(shared.step_times, rel=1e-6)


# --------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("solver", ["dopri5", "tsit5", "bosh3", "dopri8", "fehlberg2"])
def test_rows_with_different_start_times_and_directions_match_the_closed_form(solver):
    y0 = torch.tensor([[1.0], [2.0], [-3.0], [0.5]], dtype=F64)
    t = torch.tensor(
        [[0.0, 0.3, 0.5, 1.0], [1.0, 1.5, 2.5, 3.0], [2.0, 1.7, 1.5, 1.0], [-1.0, -0.5, 0.0, 2.0]],
        dtype=F64,
    )
    sol = solve(gaussian_decay, y0, t, solver=solver, rtol=1e-9, atol=1e-12)
    assert sol.ys.shape == (4, 4, 1)
    exact = gaussian_exact(y0[:, 0], t[:, 0], t.T)  # (T, B)
    tol = 1e-6 if solver in ("bosh3", "fehlberg2") else 1e-8
    torch.testing.assert_close(sol.ys[..., 0], exact, rtol=tol, atol=0)
    torch.testing.assert_close(sol.t_final, t[:, -1], rtol=0, atol=0)
    # Dense output: per-sample queries (B, Q) and times shared by the batch.
    tq = torch.tensor([[0.1, 0.9], [1.2, 2.9], [1.9, 1.1], [-0.7, 1.5]], dtype=F64)
    torch.testing.assert_close(
        sol.evaluate(tq)[..., 0], gaussian_exact(y0[:, 0], t[:, 0], tq.T), rtol=tol, atol=0
    )
    shared_q = sol.evaluate(torch.tensor([1.0], dtype=F64))  # inside every row's interval
    torch.testing.assert_close(
        shared_q[0, :, 0],
        gaussian_exact(y0[:, 0], t[:, 0], torch.ones(4, dtype=F64)),
        rtol=tol,
        atol=0,
    )


def test_func_sees_only_unfinished_rows_and_times_inside_each_samples_interval():
    seen = []
    spans = torch.tensor([0.2, 0.5, 1.0, 2.0, 4.0, 8.0], dtype=F64)
    starts = torch.tensor([0.0, 1.0, -2.0, 0.5, 3.0, -1.0], dtype=F64)
    t = starts[:, None] + spans[:, None] * torch.linspace(0, 1, 5, dtype=F64)
    # Component 1 carries the sample's index (zero derivative), so func can check its interval.
    y0 = torch.stack([torch.ones(6, dtype=F64), torch.arange(6, dtype=F64)], dim=1)

    def f(tt, y):
        b = y[:, 1].long()
        seen.append(y.shape[0])
        assert tt.shape == (y.shape[0],) and tt.dtype == F64
        assert bool((tt >= starts[b]).all()) and bool((tt <= starts[b] + spans[b]).all())
        return torch.stack([-y[:, 0] * torch.cos(tt), torch.zeros_like(tt)], dim=1)

    sol = solve(f, y0, t, rtol=1e-8, atol=1e-10)
    exact = torch.exp(-(torch.sin(t.T) - torch.sin(starts)))
    torch.testing.assert_close(sol.ys[..., 0], exact, rtol=1e-6, atol=0)
    assert max(seen) == 6 and min(seen) == 1  # the working set shrank to the last sample
    assert sol.stats["sample_evals"] == sum(seen)
    assert sol.stats["nfe"] == len(seen)


def test_zero_length_rows_return_the_initial_state():
    y0 = torch.tensor([[1.0], [2.0], [3.0]], dtype=F64)
    t = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, 1.0], [2.0, 2.0, 2.0]], dtype=F64)
    sol = solve(lambda t, y: -y, y0, t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sol.ys[:, 0, 0], torch.ones(3, dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(sol.ys[:, 2, 0], torch.full((3,), 3.0, dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(sol.ys[:, 1, 0], 2 * torch.exp(-t[1]), rtol=1e-9, atol=0)
    assert sol.stats["n_accepted"].tolist()[0] == 0 and sol.step_times[0] == [0.0]
    torch.testing.assert_close(sol.evaluate(torch.tensor([[0.0], [0.25], [2.0]]))[0, :, 0],
                               torch.tensor([1.0, 2 * math.exp(-0.25), 3.0], dtype=F64))  # fmt: skip


def test_a_1d_t_is_shared_and_every_sample_is_controlled_separately():
    y0 = torch.tensor([[1.0], [100.0]], dtype=F64)
    t = torch.linspace(0, 2, 5, dtype=F64)
    sol = solve(gaussian_decay, y0, t, rtol=1e-9, atol=1e-12)
    assert sol.ys.shape == (5, 2, 1)
    torch.testing.assert_close(
        sol.ys[..., 0], gaussian_exact(y0[:, 0], 0.0, t[:, None]), rtol=1e-8, atol=0
    )
    assert isinstance(sol.stats["n_accepted"], torch.Tensor) and sol.stats["n_accepted"].shape == (
        2,
    )


def test_tuple_and_dict_states_and_per_component_tolerances():
    y = torch.tensor([[1.0, 0.0], [0.2, 1.0]], dtype=F64)
    tensor = solve(pendulum, y, torch.linspace(0, 3, 4, dtype=F64), rtol=1e-8, atol=1e-10)

    def f_tuple(t, s):
        q, p = s
        return p, -torch.sin(q)

    tup = solve(f_tuple, (y[:, :1], y[:, 1:]), torch.linspace(0, 3, 4, dtype=F64), rtol=1e-8,
                atol=1e-10)  # fmt: skip
    # The mixed norm is the max over components, so both components are controlled: at least
    # as accurate as the single-tensor RMS.
    torch.testing.assert_close(torch.cat(tup.ys, dim=-1), tensor.ys, rtol=0, atol=1e-7)

    def f_dict(t, s):
        return {"q": s["p"], "p": -torch.sin(s["q"])}

    dct = solve(f_dict, {"q": y[:, :1], "p": y[:, 1:]}, torch.linspace(0, 3, 4, dtype=F64),
                rtol=1e-8, atol={"q": 1e-10, "p": torch.tensor([[1e-10], [1e-10]], dtype=F64)})  # fmt: skip
    torch.testing.assert_close(torch.cat([dct.ys["q"], dct.ys["p"]], dim=-1), torch.cat(tup.ys, -1),
                               rtol=0, atol=1e-12)  # fmt: skip


def test_float32_state_and_float32_time():
    y0 = torch.tensor([[1.0], [2.0]], dtype=torch.float32)
    t = torch.tensor([[0.0, 1.0], [0.5, 2.0]], dtype=torch.float32)
    dtypes = set()

    def f(tt, y):
        dtypes.add(tt.dtype)
        return -tt[:, None] * y

    sol = solve(f, y0, t, time_dtype=torch.float32, rtol=1e-5, atol=1e-7)
    assert sol.ys.dtype == torch.float32 and dtypes == {torch.float32}
    exact = gaussian_exact(y0[:, 0].double(), t[:, 0].double(), t.T.double())
    torch.testing.assert_close(sol.ys[..., 0].double(), exact, rtol=1e-4, atol=0)


# --------------------------------------------------------------------------- wasted work
def test_finished_samples_cost_at_most_a_tenth_of_the_evaluations():
    f = mlp()
    gen = torch.Generator().manual_seed(1)
    B = 96
    y0 = torch.randn(B, 2, generator=gen, dtype=F64)
    spans = torch.exp(torch.linspace(math.log(0.05), math.log(5.0), B, dtype=F64))
    t = spans[:, None] * torch.linspace(0, 1, 6, dtype=F64)
    sol = solve(f, y0, t, rtol=1e-6, atol=1e-6, dense_output=False)
    st = sol.stats
    n = st["n_accepted"]
    assert int(n.max()) >= 8 * int(n.min())  # very different step counts
    assert st["wasted_sample_evals"] <= 0.1 * st["sample_evals"]
    assert st["wasted_share"] == st["wasted_sample_evals"] / st["sample_evals"]
    assert st["sample_evals"] < 0.5 * B * st["nfe"]  # against evaluating every sample each time
    assert st["n_compactions"] > 0
    # The outputs are still right: against a tight shared-step solve of the same batch.
    ref = neuralode.solve(f, y0, t, rtol=1e-11, atol=1e-11, dense_output=False)
    torch.testing.assert_close(sol.ys, ref.ys, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- gradients
def test_direct_gradients_match_the_closed_form_and_finite_differences():
    theta = torch.tensor(0.7, dtype=F64, requires_grad=True)
    y0 = torch.tensor([[1.0], [2.0], [0.5]], dtype=F64, requires_grad=True)
    t = torch.tensor([[0.0, 0.5, 1.0], [1.0, 2.0, 4.0], [0.0, 0.1, 0.2]], dtype=F64)

    def loss_of(th, y):
        sol = solve(lambda tt, s: -th * s, y, t, rtol=1e-10, atol=1e-12)
        return (sol.ys**2 * torch.arange(1, 4, dtype=F64)[:, None, None]).sum()

    g_theta, g_y0 = torch.autograd.grad(loss_of(theta, y0), (theta, y0))
    # Closed form: y = y0 exp(-theta (t - t0)).
    dt = (t - t[:, :1]).T[:, :, None]
    w = torch.arange(1, 4, dtype=F64)[:, None, None]
    ex = y0.detach() * torch.exp(-theta.detach() * dt)
    torch.testing.assert_close(g_theta, (w * 2 * ex * ex * -dt).sum(), rtol=1e-7, atol=0)
    torch.testing.assert_close(g_y0, (w * 2 * ex * ex / y0.detach()).sum(0), rtol=1e-7, atol=0)
    eps = 1e-6
    with torch.no_grad():
        fd = (loss_of(theta + eps, y0) - loss_of(theta - eps, y0)) / (2 * eps)
    assert float(g_theta) == pytest.approx(float(fd), rel=1e-6)


def test_gradients_of_a_sample_do_not_depend_on_the_batch():
    f = mlp(hidden=16, seed=3)
    y0 = torch.tensor([[0.5, -1.0], [2.0, 0.3], [-0.7, 0.1]], dtype=F64, requires_grad=True)
    t = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.1, 0.2], [1.0, 4.0, 9.0]], dtype=F64)
    g_batch = torch.autograd.grad(solve(f, y0, t).ys[:, 0].sum(), y0)[0]
    y00 = y0[:1].detach().requires_grad_()
    g_alone = torch.autograd.grad(solve(f, y00, t[:1]).ys.sum(), y00)[0]
    torch.testing.assert_close(g_batch[0], g_alone[0], rtol=0, atol=1e-12)
    assert bool((g_batch[1:] == 0).all())


# --------------------------------------------------------------------------- failing samples
def _blowup(t, y):
    return y**2  # y(0) = 1: a singularity at t = 1


def test_a_blowing_up_sample_is_named_and_the_others_finish_with_throw_false():
    y0 = torch.tensor([[0.1], [1.0], [0.2]], dtype=F64)
    t = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    with pytest.raises(
        StepSizeUnderflowError, match=r"step size underflow for sample 1 at t=(0\.99|1\.000)"
    ):
        solve(_blowup, y0, t)
    sol = solve(_blowup, y0, t, throw=False, rtol=1e-8, atol=1e-10)
    assert sol.status == "dt_underflow" and sol.stats["failed_samples"] == [1]
    assert "failed samples: [1]" in sol.message and "blow up" in sol.message
    assert abs(float(sol.t_final[1]) - 1.0) < 1e-3 and float(sol.t_final[0]) == 2.0
    assert bool(torch.isnan(sol.ys[2, 1]).all()) and float(sol.ys[1, 1, 0]) == pytest.approx(2.0)
    torch.testing.assert_close(sol.ys[:, [0, 2], 0], y0[[0, 2], 0] / (1 - y0[[0, 2], 0] * t[:, None]),
                               rtol=1e-7, atol=0)  # fmt: skip


def test_max_steps_is_per_sample_and_names_the_sample():
    y0 = torch.ones(3, 1, dtype=F64)
    t = torch.tensor([[0.0, 0.1], [0.0, 0.2], [0.0, 50.0]], dtype=F64)
    f = lambda t, y: torch.cos(3 * t[:, None]) * y  # noqa: E731
    with pytest.raises(
        MaxStepsError,
        match=r"sample 2 at t=.* after 12 step attempts of this sample: reached max_steps=12",
    ) as ei:
        solve(f, y0, t, max_steps=12)  # fmt: skip
    assert ei.value.step == 12
    sol = solve(f, y0, t, max_steps=12, throw=False)
    assert sol.status == "max_steps" and sol.stats["failed_samples"] == [2]
    assert sol.success is False and bool(torch.isfinite(sol.ys[:, :2]).all())


def test_non_finite_values_of_one_sample_raise_non_finite_naming_it():
    def f(t, y):
        return torch.where(y > 1.5, torch.nan, -y + 0.0 * t[:, None])

    y0 = torch.tensor([[1.0], [2.0]], dtype=F64)
    with pytest.raises(NonFiniteError, match=r"sample 1 at t=0 .*non-finite"):
        solve(f, y0, torch.tensor([0.0, 1.0], dtype=F64))

    # Each sample carries the time past which func returns NaN (y[:, 1], constant); only one
    # sample ever meets it (the other's lies past t = 1), so the sample named does not depend
    # on which of two failing samples runs out of step attempts first on this machine. Each
    # index in turn, and the other sample finished or not.
    def g(t, y):
        d = torch.cat([-y[:, :1], torch.zeros_like(y[:, 1:])], 1)
        return torch.where(t[:, None] > y[:, 1:], torch.nan, d)

    for bad, thresholds in ((0, [0.5, 2.0]), (1, [2.0, 0.5])):
        y0 = torch.tensor([[1.0, thresholds[0]], [2.0, thresholds[1]]], dtype=F64)
        match = rf"sample {bad} at t=0\.[45].*every trial step"
        with pytest.raises(NonFiniteError, match=match) as info:
            solve(g, y0, torch.tensor([0.0, 1.0], dtype=F64))
        assert 0.5 - 1e-9 < info.value.t <= 0.5


# --------------------------------------------------------------------------- unsupported options
Y0 = torch.ones(2, 1, dtype=F64)
T = torch.tensor([0.0, 1.0], dtype=F64)


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        (dict(batch_control="per-row"), ValueError, r"batch_control must be 'shared' or 'per_sample', got 'per-row'"),
        (dict(solver="rk4", **PS), ValueError, r"solver 'rk4' is a fixed-step method \(no error estimate\): pass dt=..."),
        (dict(solver="radauIIA5", dt=0.1, **PS), ValueError, r"batch_control='per_sample' does not run the fully implicit method 'radauIIA5'"),
        (dict(rtol=1e-3, controller=PIController(), **PS), ValueError, r"pass rtol inside the controller"),
        (dict(y0=torch.tensor(1.0, dtype=F64), **PS), ValueError, r"needs a state whose components share a non-empty leading batch dimension B .*got shapes \[\(\)\]"),
        (dict(y0=(torch.ones(2, 1), torch.ones(3, 1)), **PS), ValueError, r"share a non-empty leading batch dimension .*\[\(2, 1\), \(3, 1\)\]"),
        (dict(y0=torch.ones(0, 1), **PS), ValueError, r"non-empty leading batch dimension"),
        (dict(t=torch.zeros(3, 2, dtype=F64), **PS), ValueError, r"t has shape \(3, 2\) \(batch, T\) but y0's batch dimension is 2"),
        (dict(t=torch.tensor([[0.0, 1.0, 0.5], [0.0, 1.0, 2.0]], dtype=F64), **PS), ValueError, r"each row of a 2-D t must be monotone .*rows \[0\] are not"),
        (dict(t=torch.tensor([0.0, 1.0, 1.0], dtype=F64), **PS), ValueError, r"a 1-D t must be strictly increasing or strictly decreasing"),
        (dict(t=torch.zeros(1, 1, 1, dtype=F64), **PS), ValueError, r"t must be 1-D \(T,\) or 2-D \(batch, T\) with T >= 1, got shape \(1, 1, 1\)"),
        (dict(t=torch.zeros(2, 0, dtype=F64), **PS), ValueError, r"with T >= 1, got shape \(2, 0\)"),
        (dict(t=torch.tensor([0.0, math.nan], dtype=F64), **PS), ValueError, r"t contains NaN or infinite values"),
        (dict(t=torch.tensor([0, 1j]), **PS), TypeError, r"t must be a real tensor of times, got dtype torch.complex64"),
        (dict(func=lambda t, y: y[:1], **PS), ValueError, r"the derivative returned by func has shape \(1, 1\) but the state has shape \(2, 1\)"),
    ],
)  # fmt: skip
def test_unsupported_combinations_and_bad_inputs_raise(kw, exc, match):
    args = dict(func=lambda t, y: -y, y0=Y0, t=T)
    args.update(kw)
    with pytest.raises(exc, match=match):
        neuralode.solve(args.pop("func"), args.pop("y0"), args.pop("t"), **args)


def test_dense_output_outside_a_samples_interval_raises_naming_the_sample():
    t = torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=F64)
    sol = solve(lambda t, y: -y, Y0, t)
    assert sol.evaluate(torch.tensor([[0.5], [1.5]], dtype=F64)).shape == (1, 2, 1)
    with pytest.raises(
        ValueError,
        match=r"dense output of sample 0 at t=1\.5: outside its solved interval \[0\.0, 1\.0\]",
    ):
        sol.evaluate(torch.tensor([1.5], dtype=F64))  # fmt: skip
    no_dense = solve(lambda t, y: -y, Y0, t, dense_output=False)
    with pytest.raises(ValueError, match="has no dense output"):
        no_dense.evaluate(torch.tensor([0.5], dtype=F64))


def test_fixed_steps_that_become_non_finite_fail_that_sample():
    # y' = y^2 blows up at t = 1 / y0 for y0 > 0: with fixed rk4 steps sample 2 (y0 = 30)
    # overflows within three steps. Fixed steps make no error test, so this returned NaN with
    # status "success"; now the sample fails at its first non-finite step, as the shared driver
    # fails the solve.
    y0 = torch.tensor([[-0.5], [-0.5], [30.0], [-0.25]], dtype=torch.float64)
    t = torch.linspace(0.0, 2.5, 6, dtype=torch.float64)
    kw = dict(solver="rk4", dt=0.1, batch_control="per_sample")
    with pytest.raises(neuralode.NonFiniteError, match=r"the state of sample 2 became non-finite"):
        neuralode.solve(lambda t, y: y * y, y0, t, **kw)
    sol = neuralode.solve(lambda t, y: y * y, y0, t, throw=False, **kw)
    assert sol.status == "nonfinite"
    assert sol.stats["failed_samples"] == [2]
    assert bool(torch.isfinite(sol.t_final).all()) and float(sol.t_final[2]) < 0.5
    torch.testing.assert_close(sol.t_final[[0, 1, 3]], torch.full((3,), 2.5, dtype=torch.float64))
    assert bool(torch.isnan(sol.ys[1:, 2]).all())  # outputs after the failure
    exact = y0[[0, 1, 3]].T / (1 - y0[[0, 1, 3]].T * t[:, None])  # y0 / (1 - y0 t)
    torch.testing.assert_close(sol.ys[:, [0, 1, 3], 0], exact, rtol=1e-6, atol=0)
