"""solve(..., compile=True, gradient=Backsolve(...)): the backward (adjoint) solve compiled too.

The augmented system (state, adjoint, parameter integral) runs in compiled chunks with its
vector-Jacobian products traced (torch.func.vjp of func's module); the gradients must equal
the eager backsolve adjoint's (to the solve's tolerance: with adaptive steps the compiled
backward solve chooses its own steps between the outputs instead of following the forward's)
and Direct's (to the adjoint's accuracy). One small MLP module, 2 steps per compiled call:
each solver compiles its forward and backward chunks once (10-30 s each on 2 cores).
"""

import pytest
import torch

import neuralode
import neuralode._compiled as compiled

F64 = torch.float64


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w1 = torch.nn.Parameter(0.5 * torch.randn(2, 16, generator=g, dtype=F64))
        self.b1 = torch.nn.Parameter(0.1 * torch.randn(16, generator=g, dtype=F64))
        self.w2 = torch.nn.Parameter(0.5 * torch.randn(16, 2, generator=g, dtype=F64))

    def forward(self, t, y):
        return torch.tanh(y @ self.w1 + self.b1) @ self.w2 + 0.1 * t


FUNC = MLP()
Y0 = torch.tensor([[0.5, -0.3], [1.0, 0.2], [-0.4, 0.8]], dtype=F64)
T = torch.linspace(0.0, 1.0, 5, dtype=F64)
TOL = dict(rtol=1e-8, atol=1e-10)


@pytest.fixture(autouse=True)
def _short_calls(monkeypatch):
    monkeypatch.setattr(compiled, "STEPS_PER_CALL", 2)


def _grads(func, t, compile, gradient, params=None, **kw):
    y0 = Y0.clone().requires_grad_()
    sol = neuralode.solve(func, y0, t, compile=compile, gradient=gradient, dense_output=False,
                          **kw)  # fmt: skip
    w = torch.linspace(0.5, 1.5, sol.ys.numel(), dtype=F64).view(sol.ys.shape)
    loss = (w * sol.ys).square().sum()
    params = list(func.parameters()) if params is None else params
    return sol, torch.autograd.grad(loss, [y0, *params])


def _close(got, want, rtol, atol):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    ("solver", "kw", "t"),
    [
        ("dopri5", TOL, T),
        ("tsit5", dict(TOL, gradient=neuralode.Backsolve(seminorm=True)), T),
        # a 2-D t: each sample's own output times (the adjoint jumps of one sample each)
        ("bosh3", TOL, torch.stack([T, 0.9 * T, 1.1 * T])),
        ("rk4", dict(dt=0.125), T),
    ],
)
def test_compiled_backsolve_equals_eager_backsolve_and_direct(solver, kw, t):
    kw = dict(kw)
    gradient = kw.pop("gradient", neuralode.Backsolve())
    sol, got = _grads(FUNC, t, True, gradient, solver=solver, **kw)
    assert sol.stats["compiled"] is True and sol.stats["compiled_backward"] is True
    assert sol.stats["backsolve_outputs"] == "stop"
    eager_gradient = neuralode.Backsolve(seminorm=gradient.seminorm, outputs="stop")
    ref, want = _grads(FUNC, t, False, eager_gradient, solver=solver, **kw)
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-10, atol=1e-12)
    if solver == "rk4":  # the same steps backward (the forward's grid): equal to rounding
        _close(got, want, rtol=1e-10, atol=1e-12)
    else:  # its own steps between the outputs: equal to the tolerance
        _close(got, want, rtol=1e-6, atol=1e-7)
    _, direct = _grads(FUNC, t, False, "direct", solver=solver, **kw)
    _close(got, direct, rtol=1e-3 if solver == "rk4" else 1e-5, atol=1e-6)


def test_compiled_backsolve_with_outputs_replay_compiles_the_segments():
    # Outputs inside the forward steps, added by eager replays of those steps; the segments
    # between them compiled.
    kw = dict(solver="rk4", dt=0.3)
    sol, got = _grads(FUNC, T, True, neuralode.Backsolve(outputs="replay"), **kw)
    assert sol.stats["compiled_backward"] is True
    assert sol.stats["backsolve_outputs"] == "replay"
    _, want = _grads(FUNC, T, False, neuralode.Backsolve(outputs="replay"), **kw)
    _close(got, want, rtol=1e-10, atol=1e-12)


def test_params_that_func_cannot_take_as_inputs_leave_the_backward_solve_eager():
    # A plain function's captured tensor cannot be made an input of the traced field: the
    # backward solve runs on the eager driver (stats say so), with the same gradients.
    w = torch.tensor([[-0.5, 1.0], [-1.0, -0.3]], dtype=F64, requires_grad=True)

    def f(t, y):
        return torch.tanh(y @ w)

    gradient = neuralode.Backsolve(params=[w], outputs="stop")
    kw = dict(solver="rk4", dt=0.1)
    sol, got = _grads(f, T, True, gradient, params=[w], **kw)
    assert sol.stats["compiled"] is True and sol.stats["compiled_backward"] is False
    _, want = _grads(f, T, False, gradient, params=[w], **kw)
    _close(got, want, rtol=1e-10, atol=1e-12)


class TupleField(torch.nn.Module):
    """A tuple state ``(a (B, 2), b (B, 1))`` (the traced field unflattens it per component)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.w = torch.nn.Parameter(0.5 * torch.randn(2, 2, generator=g, dtype=F64))

    def forward(self, t, s):
        a, b = s
        return (torch.tanh(a @ self.w) - b, a[:, :1] * b)


def test_tuple_state_backward_in_time_equals_eager_backsolve():
    func = TupleField()
    t = torch.linspace(1.0, 0.0, 5, dtype=F64)  # integrated backward: the adjoint runs forward

    def grads(compile):
        a0, b0 = Y0.clone().requires_grad_(), Y0[:, :1].clone().requires_grad_()
        gradient = neuralode.Backsolve(outputs="stop")
        sol = neuralode.solve(func, (a0, b0), t, compile=compile, gradient=gradient,
                              solver="rk4", dt=0.125, dense_output=False)  # fmt: skip
        loss = sol.ys[0].square().sum() + sol.ys[1].sum()
        return sol, torch.autograd.grad(loss, [a0, b0, func.w])

    sol, got = grads(True)
    assert sol.stats["compiled_backward"] is True
    _close(got, grads(False)[1], rtol=1e-10, atol=1e-12)


class Aliased(torch.nn.Module):
    """The MLP held under two names (``self.mlp`` and ``self.again[0]``), as ``integral=``'s
    wrapper holds func: torch.compile (2.13) cannot trace functional_call of such a module."""

    def __init__(self):
        super().__init__()
        self.mlp = MLP()
        self.again = torch.nn.ModuleList([self.mlp])

    def forward(self, t, y):
        return self.mlp(t, y)


@pytest.mark.parametrize("case", ["aliased submodule", "integral="])
def test_a_module_holding_a_submodule_twice_leaves_the_backward_solve_eager(case):
    # It raised "torch.compile could not compile the solve" in the backward pass (found by a
    # reviewer); now the backward solve runs eagerly, with eager Backsolve's gradients.
    func = Aliased() if case == "aliased submodule" else MLP()
    kw = dict(solver="rk4", dt=0.1)
    if case == "integral=":
        kw["integral"] = lambda t, y: y.square().sum(-1)
    gradient = neuralode.Backsolve(outputs="stop")
    sol, got = _grads(func, T, True, gradient, **kw)
    assert sol.stats["compiled"] is True and sol.stats["compiled_backward"] is False
    _, want = _grads(func, T, False, gradient, **kw)
    _close(got, want, rtol=1e-10, atol=1e-12)
