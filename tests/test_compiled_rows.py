"""compile=True with per-row control: per-sample control, 2-D t, dense output, landings, t grads.

The compiled chunk (neuralode._compiled_step) is one masked per-row step: shared control is
one row, per-sample control one row per sample. Each case is compared with the eager driver
that is its reference (the per-row driver for per-sample control, the host-float driver for
shared control): the same values to tolerance, the same accepted/rejected counts (the
arithmetic is the same), the same gradients (Direct: autograd through the compiled chunks).

Compilation dominates the time (5-20 s per compiled version on 2 cores), so every compiled
solve is made once in a module-scoped fixture that several tests read, with one step unrolled
per call (the same step; a smaller graph).
"""

import pytest
import torch

import neuralode
import neuralode._compiled as compiled

F64 = torch.float64


class Field(torch.nn.Module):
    """A small time-dependent field; ``t`` is 0-d (shared control) or (B,) (per sample)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w1 = torch.nn.Parameter(0.6 * torch.randn(2, 8, generator=g, dtype=F64))
        self.w2 = torch.nn.Parameter(0.6 * torch.randn(8, 2, generator=g, dtype=F64))

    def forward(self, t, y):
        return torch.tanh(y @ self.w1 + t.reshape(-1, 1)) @ self.w2 - 0.3 * y


FIELD = Field()
Y0 = torch.tensor([[0.5, -0.3], [1.0, 0.2], [-0.4, 0.8]], dtype=F64)
TOL = dict(rtol=1e-7, atol=1e-9)
# One grid per sample: increasing, decreasing (from a later start), and one whose last values
# repeat (padding) more often than a step may pass outputs (set to 4 below), which a step of
# length zero writes.
T2 = torch.stack(
    [
        torch.linspace(0.0, 1.0, 11, dtype=F64),
        torch.linspace(0.5, -0.7, 11, dtype=F64),
        torch.tensor([0.0, 0.3, 0.6] + [0.9] * 8, dtype=F64),
    ]
)
T1 = torch.linspace(0.0, 1.2, 6, dtype=F64)


@pytest.fixture(scope="module", autouse=True)
def _one_step_per_call():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiled, "STEPS_PER_CALL", 1)
        yield


def _solve_with_grads(compile, t, **kw):
    y0 = Y0.clone().requires_grad_()
    sol = neuralode.solve(FIELD, y0, t, compile=compile, dense_output=False, **TOL, **kw)
    loss = sol.ys.square().sum() + sol.ys[-1, :, 0].sum()
    return sol, torch.autograd.grad(loss, [y0, *FIELD.parameters()])


@pytest.fixture(scope="module")
def rows_2d():
    """Per-sample control on a 2-D t under autograd: (compiled, eager) solutions and grads."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiled, "_OUT_WINDOW_ROWS", 4)
        return [_solve_with_grads(c, T2, batch_control="per_sample") for c in (True, False)]


def test_per_sample_2d_t_values_and_counts_equal_eager(rows_2d):
    (sol, _), (ref, _) = rows_2d
    assert sol.stats["compiled"] is True
    assert torch.equal(sol.stats["n_accepted"], ref.stats["n_accepted"])
    assert torch.equal(sol.stats["n_rejected"], ref.stats["n_rejected"])
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(sol.t_final, T2[:, -1])
    # Evaluations of func: one batched call per stage of every iteration (no compaction).
    assert sol.stats["n_iterations"] == ref.stats["n_iterations"]
    assert sol.stats["sample_evals"] == 3 * sol.stats["nfe"]  # (B = 3 rows in every call)
    assert 0 < sol.stats["wasted_sample_evals"] < sol.stats["sample_evals"]


def test_per_sample_direct_gradients_equal_eager(rows_2d):
    (_, got), (_, want) = rows_2d
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


@pytest.fixture(scope="module")
def rows_dense():
    """Per-sample control, 1-D t, dense output, no autograd: (compiled, eager)."""
    with torch.no_grad():
        return [
            neuralode.solve(
                FIELD, Y0, T1, compile=c, batch_control="per_sample", dense_output=True, **TOL
            )  # fmt: skip
            for c in (True, False)
        ]


def test_per_sample_dense_output_equals_eager(rows_dense):
    sol, ref = rows_dense
    assert sol.stats["compiled"] is True
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-11, atol=1e-12)
    # (The error estimate cancels heavily: summed in another order its last bits differ, and
    # so do the step sizes, relatively by up to about 1e-8.)
    for got, want in zip(sol.step_times, ref.step_times, strict=True):
        assert got == pytest.approx(want, rel=1e-6)
    q = torch.tensor([[0.05, 0.61, 1.2], [0.33, 0.9, 1.1], [0.0, 0.5, 1.0]], dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(sol.evaluate(q), ref.evaluate(q), rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(sol.evaluate(0.77), ref.evaluate(0.77), rtol=1e-11, atol=1e-12)


def test_per_sample_failures_reuse_the_compiled_code_and_match_eager(rows_dense):
    # max_steps is a tensor in the compiled code: the same compiled version serves this solve.
    kw = dict(batch_control="per_sample", dense_output=True, max_steps=5, **TOL)
    with torch.no_grad():
        with pytest.raises(neuralode.MaxStepsError, match=r"sample 0.*compiled stepping"):
            neuralode.solve(FIELD, Y0, T1, compile=True, **kw)
        sol = neuralode.solve(FIELD, Y0, T1, compile=True, throw=False, **kw)
        ref = neuralode.solve(FIELD, Y0, T1, throw=False, **kw)
    assert sol.stats["compiled"] is True and sol.status == ref.status == "max_steps"
    assert sol.stats["failed_samples"] == ref.stats["failed_samples"] == [0, 1, 2]
    torch.testing.assert_close(sol.t_final, ref.t_final, rtol=1e-8, atol=0.0)
    # Outputs before the failure agree, the ones after it are NaN in both.
    assert torch.equal(sol.ys.isnan(), ref.ys.isnan())
    torch.testing.assert_close(sol.ys.nan_to_num(), ref.ys.nan_to_num(), rtol=1e-8, atol=1e-10)


@pytest.fixture(scope="module")
def shared_2d():
    """Shared control (one step size for the batch) on a 2-D t, dense output: (compiled, eager)."""
    t = torch.stack([T2[0], torch.linspace(0.0, 0.8, 11, dtype=F64), T2[2]])
    with torch.no_grad():
        return t, [
            neuralode.solve(FIELD, Y0, t, compile=c, dense_output=True, **TOL)
            for c in (True, False)
        ]


def test_shared_control_2d_t_and_dense_output_equal_eager(shared_2d):
    t, (sol, ref) = shared_2d
    assert sol.stats["compiled"] is True
    assert (sol.stats["n_accepted"], sol.stats["n_rejected"]) == (
        ref.stats["n_accepted"],
        ref.stats["n_rejected"],
    )
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-10, atol=1e-12)
    q = torch.tensor([0.0, 0.123, 0.5, 0.999, 1.0], dtype=F64)
    with torch.no_grad():
        # The dense output reproduces the outputs (sample 0 at its own times).
        dense0 = sol.evaluate(t[0])[:, 0]
        torch.testing.assert_close(dense0, sol.ys[:, 0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sol.evaluate(q), ref.evaluate(q), rtol=1e-10, atol=1e-12)


def _grads(t, compile, gradient):
    y0 = Y0.clone().requires_grad_()
    sol = neuralode.solve(FIELD, y0, t, compile=compile, gradient=gradient, **TOL)
    loss = sol.ys.square().sum() + sol.ys[-1, :, 0].sum()
    return sol, torch.autograd.grad(loss, [y0, *FIELD.parameters()])


def test_checkpointed_and_backsolve_gradients_from_a_compiled_forward(shared_2d):
    """Shared control: the forward in compiled chunks (the same compiled version as the dense
    solve above: both record every step). Checkpointed replays each step eagerly from its
    compiled checkpoint: equal to eager Checkpointed and Direct to rounding. Backsolve solves
    the adjoint backward in compiled chunks too, with its own steps between the outputs: equal
    to eager Backsolve and to Direct within the tolerance."""
    t, _ = shared_2d
    direct = _grads(t, False, "direct")[1]
    sol, got = _grads(t, True, "checkpoint")
    assert sol.stats["compiled"] is True
    for other in (_grads(t, False, "checkpoint")[1], direct):
        for g, w in zip(got, other, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)
    sol, got = _grads(t, True, "backsolve")
    assert sol.stats["compiled"] is True and sol.stats["compiled_backward"] is True
    for g, w in zip(got, _grads(t, False, "backsolve")[1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    for g, w in zip(got, direct, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def jumpy(t, s):
    """A tuple state (a, b): a' = -a + 1 before t = 0.4, -a after (a discontinuity at 0.4),
    and b' = -b + 2 before, -b after (b = 2a when b0 = 2 a0)."""
    a, b = s
    step = (t < 0.4).to(a.dtype).reshape(-1, 1)
    return (-a + step, -b + 2.0 * step)


@pytest.mark.parametrize("batch_control", ["shared", "per_sample"])
def test_step_t_and_jump_t_landings_and_t_gradients_equal_eager(batch_control):
    """Landings on step_t and jump_t (per row) with a tuple state (the mixed norm per row);
    with shared control also the gradients with respect to a 1-D t (one compiled version
    serves both)."""
    ctrl = neuralode.PIController(rtol=1e-6, atol=1e-8, step_t=[0.25], jump_t=[0.4])
    a0 = torch.tensor([[1.0], [2.0]], dtype=F64)
    shared = batch_control == "shared"
    kw = dict(solver="bosh3", controller=ctrl, batch_control=batch_control, dense_output=True)

    def run(compile):
        t = torch.linspace(0.0, 1.0, 4, dtype=F64).requires_grad_(shared)
        sol = neuralode.solve(jumpy, (a0, 2.0 * a0), t, compile=compile, **kw)
        loss = sol.ys[0].square().sum() + sol.ys[1].sum()
        grad = torch.autograd.grad(loss, t)[0] if shared else None
        return sol, grad

    (sol, got), (ref, want) = run(True), run(False)
    assert sol.stats["compiled"] is True
    for x, w in zip(sol.ys, ref.ys, strict=True):
        torch.testing.assert_close(x, w, rtol=1e-12, atol=1e-14)
    n_acc, n_rej = sol.stats["n_accepted"], sol.stats["n_rejected"]
    assert torch.equal(torch.as_tensor(n_acc), torch.as_tensor(ref.stats["n_accepted"]))
    assert torch.equal(torch.as_tensor(n_rej), torch.as_tensor(ref.stats["n_rejected"]))
    times = sol.step_times if shared else sol.step_times[1]
    assert 0.25 in times and 0.4 in times  # landed exactly
    # Closed form: a = 1 + (a0 - 1) e^-t before 0.4, then decay; b = 2a.
    a04 = 1.0 + (a0 - 1.0) * torch.exp(torch.tensor(-0.4, dtype=F64))
    want_a = a04 * torch.exp(torch.tensor(-0.6, dtype=F64))
    torch.testing.assert_close(sol.ys[0][-1].detach(), want_a, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(sol.ys[1][-1].detach(), 2.0 * want_a, rtol=1e-5, atol=0.0)
    if shared:  # dL/dt_j = <dL/dy(t_j), f(t_j, y(t_j))>, as eagerly
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert float(got[-1]) != 0.0


def test_fixed_steps_per_sample_on_each_samples_grid():
    # ConstantStep per sample: each row on its own grid t0_b + k dt (rows start apart).
    t = torch.tensor([[0.0, 0.35], [0.1, 0.45]], dtype=F64)
    y0 = torch.tensor([[1.0], [1.0]], dtype=F64)
    coef = torch.tensor([0.0, -1.0], dtype=F64)  # f = c0 y^2 + c1 y (values read at each call)

    def f(t, y):
        return coef[0] * y * y + coef[1] * y

    kw = dict(solver="rk4", dt=0.1, batch_control="per_sample", dense_output=False)
    with torch.no_grad():
        sol = neuralode.solve(f, y0, t, compile=True, **kw)
        ref = neuralode.solve(f, y0, t, **kw)
    assert sol.stats["compiled"] is True
    assert torch.equal(sol.stats["n_accepted"], ref.stats["n_accepted"])  # 4 steps each
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-13, atol=0.0)
    # The same compiled code on y' = y^2: sample 0 (y0 = 30) overflows. Fixed steps make no
    # error test; the non-finite sample returned status "success" (as eagerly, until fixed).
    coef.copy_(torch.tensor([1.0, 0.0], dtype=F64))
    y0 = torch.tensor([[30.0], [-0.5]], dtype=F64)
    with torch.no_grad(), pytest.raises(neuralode.NonFiniteError, match=r"the state of sample 0"):
        neuralode.solve(f, y0, t, compile=True, **kw)
    with torch.no_grad():
        sol = neuralode.solve(f, y0, t, compile=True, throw=False, **kw)
    assert sol.stats["compiled"] is True
    assert sol.status == "nonfinite" and sol.stats["failed_samples"] == [0]
    exact = torch.tensor([-0.5 / (1 + 0.5 * 0.35)], dtype=F64)  # y0 / (1 - y0 t)
    torch.testing.assert_close(sol.ys[-1, 1], exact, rtol=1e-6, atol=0.0)


def test_nothing_to_integrate_per_sample_runs_eagerly_without_compiling():
    t = torch.tensor([[0.5, 0.5], [0.2, 0.2], [1.0, 1.0]], dtype=F64)
    with torch.no_grad():
        sol = neuralode.solve(FIELD, Y0, t, batch_control="per_sample", compile=True)
    assert sol.stats["compiled"] is False
    assert torch.equal(sol.ys, Y0.expand(2, 3, 2))


@pytest.mark.parametrize("time_dtype", [torch.float32, torch.float64])
def test_time_beside_on_tensors_equals_the_float_rule(time_dtype):
    # The compiled step's jump_t limits use the tensor form of the eager loop's rule.
    from neuralode.controllers.step_size import time_beside

    xs = [0.4, 1.0, -2.5, 0.1, 1e-3, 3.0000001]
    for toward in (10.0, -10.0):
        got = time_beside(torch.tensor(xs, dtype=F64), torch.tensor(toward, dtype=F64), time_dtype)
        want = [time_beside(x, toward, time_dtype) for x in xs]
        assert got.tolist() == want  # the same IEEE operations: exactly equal
        t_f = got.to(time_dtype)  # f sees a time different from x, on the side of `toward`
        assert bool(((t_f.double() - torch.tensor(xs, dtype=F64)) * toward > 0).all())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gradient="reversible"), "gradient=Reversible"),
        (dict(gradient=neuralode.Checkpointed(max_checkpoints=4)), "max_checkpoints"),
        # (a custom norm compiles: tests/test_compiled_custom_norm.py)
        (dict(event=neuralode.Event(lambda t, y: y[0, 0])), "event="),
    ],
)
def test_what_compile_still_refuses_raises_naming_it(kwargs, match):
    with pytest.raises(ValueError, match=match):
        neuralode.solve(FIELD, Y0, T1, compile=True, **kwargs)
