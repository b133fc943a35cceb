"""The torchdiffeq face's autograd graph where code written for torchdiffeq walks it."""

import gc
import weakref

import torch

import neuralode


class _Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(-0.5, dtype=torch.float64))

    def forward(self, t, x):
        return tuple(self.k * xi for xi in x)


def _tuple_state():
    return (
        torch.tensor(1.0, dtype=torch.float64, requires_grad=True),
        torch.tensor([[0.5, 0.5], [0.1, 0.1]], dtype=torch.float64, requires_grad=True),
    )


def test_tuple_state_adjoint_options_two_nodes_up_as_torchdiffeq():
    # torchdiffeq's own norm tests reach adjoint_options this way for a tuple state (leaf <-
    # view <- slice <- adjoint) and replace the norm there: the replaced norm must be used.
    func, x0 = _Field(), _tuple_state()
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    xs = neuralode.odeint_adjoint(func, x0, t, adjoint_options={})
    options = xs[0].grad_fn.next_functions[0][0].next_functions[0][0].adjoint_options
    default = options["norm"]
    called = []

    def spy(tensor):
        called.append(True)
        return default(tensor)

    options["norm"] = spy
    (xs[0].sum() + xs[1].sum()).backward()
    assert called
    # d/dk of sum_i x_i(1) = sum_i x_i(0) * exp(k): x(1) = x0 exp(k)
    want = (1.0 + 1.2) * torch.exp(torch.tensor(-0.5, dtype=torch.float64))
    torch.testing.assert_close(func.k.grad, want, rtol=1e-6, atol=0.0)


def test_module_keeping_its_tuple_adjoint_output_is_collectable():
    func = _Field()
    func.out = neuralode.odeint_adjoint(func, _tuple_state(), torch.tensor([0.0, 1.0]).double())
    ref = weakref.ref(func)
    del func
    gc.collect()
    assert ref() is None
