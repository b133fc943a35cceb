"""An output kept on the module that made it (``self.out = solve(self, ...)``) must not keep
the module alive: the custom-gradient Functions return their outputs in the state's shape, so
no view node (a C++ autograd node the garbage collector cannot traverse) hides the cycle
output -> node -> ctx -> run -> func -> output. Checkpointed and Reversible leaked it."""

import gc
import weakref

import pytest
import torch
from torch import nn

import neuralode

D64 = torch.float64


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2).to(D64)

    def forward(self, t, y):
        return self.lin(y)


@pytest.mark.parametrize("gradient", ["direct", "checkpoint", "backsolve", "reversible"])
@pytest.mark.parametrize("backward", [False, True])
def test_module_keeping_its_own_output_is_collectable(gradient, backward):
    m = M()
    y0 = torch.ones(3, 2, dtype=D64)
    m.out = neuralode.solve(m, y0, torch.tensor([0.0, 0.5, 1.0], dtype=D64), gradient=gradient).ys
    assert m.out.shape == (3, 3, 2)
    if backward:
        m.out[-1].sum().backward()
        assert m.lin.weight.grad is not None
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("gradient", ["checkpoint", "reversible"])
def test_outputs_in_the_state_shape_give_the_same_gradients(gradient):
    # The output is the Function's own (reshaped in place, not a view); its gradient arrives in
    # that shape and is flattened in the backward pass: compare with Direct.
    grads = []
    for g in ("direct", gradient):
        torch.manual_seed(0)
        m = M()
        y0 = torch.tensor([[1.0, -0.5], [0.3, 0.2]], dtype=D64, requires_grad=True)
        ys = neuralode.solve(m, y0, torch.tensor([0.0, 0.4, 1.0], dtype=D64), gradient=g,
                             solver="rk4", dt=0.05).ys  # fmt: skip
        ys[1:].pow(2).sum().backward()
        grads.append((y0.grad, m.lin.weight.grad))
    if gradient == "reversible":  # a different scheme: equal to the order of the method
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    else:
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
