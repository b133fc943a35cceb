"""solve(..., compile=True) under autograd: Direct gradients through the compiled chunks.

One small MLP field, compiled once for the module (forward and backward graphs, 2 steps per
call: about a minute on 2 cores), compared with the eager engine.
"""

import pytest
import torch

import neuralode
import neuralode._compiled as compiled

F64 = torch.float64


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(0.5 * torch.randn(2, 16, generator=g, dtype=F64))
        self.w2 = torch.nn.Parameter(0.5 * torch.randn(16, 2, generator=g, dtype=F64))

    def forward(self, t, y):
        return torch.tanh(y @ self.w1) @ self.w2


FUNC = MLP()
Y0 = torch.tensor([[0.5, -0.3], [1.0, 0.2], [-0.4, 0.8]], dtype=F64)
T = torch.linspace(0.0, 1.0, 5, dtype=F64)


def _grads(compile):
    y0 = Y0.clone().requires_grad_()
    sol = neuralode.solve(FUNC, y0, T, compile=compile, rtol=1e-7, atol=1e-9, dense_output=False)
    loss = sol.ys.square().sum() + sol.ys[-1, :, 0].sum()
    return sol, torch.autograd.grad(loss, [y0, *FUNC.parameters()])


@pytest.fixture(scope="module")
def compiled_run():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiled, "STEPS_PER_CALL", 2)
        return _grads(True)


def test_direct_gradients_through_compiled_chunks_equal_eager(compiled_run):
    sol, got = compiled_run
    ref, want = _grads(False)
    assert sol.stats["compiled"] is True
    assert sol.stats["n_accepted"] == ref.stats["n_accepted"]  # the same steps
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gradient", ["reversible"])
def test_other_gradient_methods_are_refused_naming_the_fix(gradient):
    with pytest.raises(ValueError, match=r"gradient=Reversible .*use gradient='direct'"):
        neuralode.solve(FUNC, Y0, T, compile=True, gradient=gradient)
