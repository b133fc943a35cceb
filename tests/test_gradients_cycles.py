"""An output kept on the module that made it (``self.out = solve(self, ...)``, as torchdiffeq-
style code does) must not keep the module alive. Any C++ autograd node after a custom-gradient
Function (the view that splits flat outputs into a tuple/dict state's leaves, a reshape, the
t-gradient correction), or a Function with several outputs, hides the cycle output -> node ->
ctx -> run -> func -> output from the garbage collector: Checkpointed, Backsolve and Reversible
leaked the module for tuple and dict states, 2-D t, t requiring grad and per-sample control.
The Functions now hold their run weakly and every leaf of the result is the only output of its
own node holding the run (``gradients._common.structured_outputs``)."""

import gc
import weakref

import pytest
import torch
from torch import nn

import neuralode

D64 = torch.float64
# every gradient method under every batch control that supports it
METHODS = [
    ("direct", "shared"),
    ("checkpoint", "shared"),
    ("backsolve", "shared"),
    ("reversible", "shared"),
    ("direct", "per_sample"),
    ("checkpoint", "per_sample"),
    ("backsolve", "per_sample"),
]


class M(nn.Module):
    """A vector field for a tensor, tuple or dict state ``(a: (B, 2), b: (B, 3))``."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(2, 2).to(D64)
        self.lin3 = nn.Linear(3, 3).to(D64)

    def forward(self, t, y):
        if self.kind == "tensor":
            return self.lin(y)
        a, b = (y["a"], y["b"]) if self.kind == "dict" else y
        da, db = self.lin(a) * b[..., :1], torch.tanh(self.lin3(b)) - 0.2 * a[..., :1]
        return {"a": da, "b": db} if self.kind == "dict" else (da, db)


def _y0(kind, requires_grad=False):
    a = torch.tensor([[1.0, -0.5], [0.3, 0.2]], dtype=D64, requires_grad=requires_grad)
    b = torch.tensor([[0.5, 0.1, -0.2], [0.0, 0.4, 0.3]], dtype=D64, requires_grad=requires_grad)
    if kind == "tensor":
        return a, [a]
    return ({"a": a, "b": b} if kind == "dict" else (a, b)), [a, b]


def _leaves(ys):
    if isinstance(ys, torch.Tensor):
        return [ys]
    return list(ys.values()) if isinstance(ys, dict) else list(ys)


def _freed_after_keeping_own_output(kind, gradient, control, backward, t=None):
    m = M(kind)
    if t is None:
        t = torch.tensor([0.0, 0.5, 1.0], dtype=D64)
    m.out = neuralode.solve(m, _y0(kind)[0], t, gradient=gradient, batch_control=control).ys
    if backward:
        loss = sum(y[-1].sum() for y in _leaves(m.out))
        loss.backward()
        assert m.lin.weight.grad is not None and m.lin.weight.grad.abs().sum() > 0
        del loss
    ref = weakref.ref(m)
    del m
    gc.collect()
    return ref() is None


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict"])
@pytest.mark.parametrize("gradient, control", METHODS)
@pytest.mark.parametrize("backward", [False, True])
def test_module_keeping_its_own_output_is_collectable(kind, gradient, control, backward):
    assert _freed_after_keeping_own_output(kind, gradient, control, backward)


@pytest.mark.parametrize("gradient, control", METHODS)
@pytest.mark.parametrize("times", ["2-D t", "t requiring grad"])
def test_collectable_with_per_sample_grids_and_time_gradients(gradient, control, times):
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D64)
    if times == "2-D t":
        t = torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.3, 0.8]], dtype=D64)
    else:
        t.requires_grad_()
    assert _freed_after_keeping_own_output("tuple", gradient, control, True, t=t)


@pytest.mark.parametrize("backward", [False, True])
def test_odeint_adjoint_tuple_state_is_collectable(backward):
    class Func(nn.Module):  # torchdiffeq-style: the module keeps its own solution
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2).to(D64)

        def forward(self, t, y):
            return self.lin(y[0]), -0.5 * y[1]

        def run(self, y0, t):
            self.sol = neuralode.odeint_adjoint(self, y0, t)
            return self.sol

    f = Func()
    y0 = (torch.ones(2, dtype=D64), torch.ones(1, dtype=D64))
    xs, zs = f.run(y0, torch.tensor([0.0, 0.5, 1.0], dtype=D64))
    if backward:
        (xs[-1].sum() + zs[-1].sum()).backward()
        assert f.lin.weight.grad is not None
    del xs, zs
    ref = weakref.ref(f)
    del f
    gc.collect()
    assert ref() is None


# ------------------------------------------------------------------- the gradients are unchanged
def _grads(kind, gradient, control, loss_of, **kw):
    torch.manual_seed(0)
    m = M(kind)
    y0, leaves = _y0(kind, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=D64)
    ys = neuralode.solve(m, y0, t, gradient=gradient, batch_control=control, **kw).ys
    params = m.lin.parameters() if kind == "tensor" else m.parameters()  # (those func uses)
    return torch.autograd.grad(loss_of(_leaves(ys)), [*leaves, *params])


LOSSES = {
    "every leaf": lambda ys: sum((y[1:] * (1 + y[1:])).sum() for y in ys),
    "first leaf only": lambda ys: ys[0][-1].pow(2).sum(),  # the other leaves get no gradient
    "last leaf only": lambda ys: ys[-1][1:].sum(),
}


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict"])
@pytest.mark.parametrize("gradient, control", [mc for mc in METHODS if mc[0] != "direct"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_structured_outputs_give_the_gradients_of_direct(kind, gradient, control, loss):
    # Each leaf's gradient reaches the flat outputs through its own node (zeros elsewhere):
    # compare with Direct, for a loss on every leaf and on a single one.
    if gradient == "reversible":  # a different scheme: fixed steps, equal to the method's order
        kw, tol = dict(solver="rk4", dt=0.02), dict(rtol=1e-5, atol=1e-7)
    elif gradient == "checkpoint":  # the same steps replayed: equal to rounding
        kw, tol = dict(rtol=1e-9, atol=1e-9), dict(rtol=1e-10, atol=1e-12)
    else:  # backsolve: a separate backward solve, at tight tolerances
        kw, tol = dict(rtol=1e-11, atol=1e-11), dict(rtol=1e-6, atol=1e-8)
    ref = _grads(kind, "direct", control, LOSSES[loss], **kw)
    got = _grads(kind, gradient, control, LOSSES[loss], **kw)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("gradient", ["checkpoint", "reversible"])
def test_gradients_of_gradients_through_dict_outputs(gradient):
    # create_graph=True: the leaves' own backward is differentiable (a gradient penalty).
    def penalty(g):
        torch.manual_seed(0)
        m = M("dict")
        y0, leaves = _y0("dict", requires_grad=True)
        ys = neuralode.solve(m, y0, torch.tensor([0.0, 1.0], dtype=D64), gradient=g,
                             solver="rk4", dt=0.05).ys  # fmt: skip
        loss = ys["a"][-1].pow(2).sum() + ys["b"][-1].sum()
        ga, gb = torch.autograd.grad(loss, leaves, create_graph=True)
        return torch.autograd.grad(ga.pow(2).sum() + gb.pow(2).sum(), [*m.parameters()])

    tol = dict(rtol=1e-10, atol=1e-12) if gradient == "checkpoint" else dict(rtol=1e-4, atol=1e-6)
    for a, b in zip(penalty(gradient), penalty("direct")):
        torch.testing.assert_close(a, b, **tol)


def test_outputs_are_not_views_and_hold_the_graph_alive():
    # The leaves alias the flat outputs (no copy) without being autograd views, so that they
    # may be modified in place; the solve lives as long as any leaf's graph does.
    m = M("tuple")
    y0, leaves = _y0("tuple", requires_grad=True)
    xs, zs = neuralode.solve(m, y0, torch.tensor([0.0, 1.0], dtype=D64), gradient="backsolve").ys
    assert xs._base is None and zs._base is None
    assert xs.shape == (2, 2, 2) and zs.shape == (2, 2, 3)
    loss = zs[-1].sum()
    del xs, zs, m
    gc.collect()
    g = torch.autograd.grad(loss, leaves)
    assert all(torch.isfinite(x).all() for x in g)


@pytest.mark.parametrize("gradient, control", [mc for mc in METHODS if mc[0] != "direct"])
@pytest.mark.parametrize("compile", [False, True])
def test_outputs_modified_in_place_leave_the_inputs_alone(gradient, control, compile):
    # The leaves alias only storage of their own: writing into them changes neither y0 nor the
    # outputs of the next solve (compiled stepping writes its outputs into a buffer of its own).
    if compile and (gradient == "reversible" or control == "per_sample"):
        pytest.skip("compiled stepping runs Checkpointed/Backsolve under shared control only")
    m = M("tuple")
    y0, leaves = _y0("tuple")
    t = torch.tensor([0.0, 1.0], dtype=D64)
    kw = dict(gradient=gradient, batch_control=control, compile=compile, solver="rk4", dt=0.1)
    first = neuralode.solve(m, y0, t, **kw).ys
    for y in first:
        y.mul_(0.0).add_(7.0)
    second = neuralode.solve(m, y0, t, **kw).ys
    for x, y in zip(leaves, second):
        assert torch.equal(y[0], x)  # the output at t0 is y0, and y0 is unchanged
    assert all((y == 7.0).all() for y in first)
