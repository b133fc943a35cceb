"""A module that keeps the result of a solve with ``event=`` (``self.out = solve(self, ...,
event=...).ys``) must be freed by the garbage collector, as without events
(``test_gradients_cycles.py``). The event code slices and stacks the outputs of its inner solves
(and builds the event times and states from them), and those C++ nodes hid the inner outputs'
own holders of the runs: Checkpointed, Backsolve and Reversible leaked the module for every
kind of event. The event code now collects the inner solves' runs and holds them on its own
final outputs' nodes (``gradients._common.collect_runs`` / ``hold_outputs``)."""

import gc
import weakref

import pytest
import torch
from torch import nn

import neuralode
from test_gradients_cycles import D64, METHODS, M

CUSTOM = [mc for mc in METHODS if mc[0] != "direct"]
# whole-state terminal (0-d g), one terminal event per sample (g of shape (B,)), non-terminal
# (0-d under shared control; every sample its own under per-sample control): two events each
EVENTS = ["terminal", "terminal per sample", "non-terminal"]


def _first(y):
    if isinstance(y, torch.Tensor):
        return y
    return y["a"] if isinstance(y, dict) else y[0]


def _leaves(ys):
    if isinstance(ys, torch.Tensor):
        return [ys]
    return list(ys.values()) if isinstance(ys, dict) else list(ys)


def _event(which, control):
    # g depends on t and on the state (so the event time has a graph through the solve)
    if which == "terminal" and control == "shared":
        return neuralode.Event(lambda t, y: t - 0.7 + 0.01 * _first(y).sum())
    if which.startswith("terminal"):
        return neuralode.Event(lambda t, y: t - 0.7 + 0.01 * _first(y).sum(-1))
    if control == "shared":
        g = lambda t, y: torch.sin(6 * t) + 0.01 * _first(y).sum()  # noqa: E731
    else:
        g = lambda t, y: torch.sin(6 * t) + 0.01 * _first(y).sum(-1)  # noqa: E731
    return neuralode.Event(g, terminal=False)


def _y0(kind, requires_grad=False):
    a = torch.tensor([[1.0, -0.5], [0.3, 0.2]], dtype=D64, requires_grad=requires_grad)
    b = torch.tensor([[0.5, 0.1, -0.2], [0.0, 0.4, 0.3]], dtype=D64, requires_grad=requires_grad)
    if kind == "tensor":
        return a, [a]
    return ({"a": a, "b": b} if kind == "dict" else (a, b)), [a, b]


def _solve(m, y0, gradient, control, which, **kw):
    if gradient == "reversible" and "dt" not in kw:
        kw = dict(kw, solver="rk4", dt=0.02)
    t = torch.tensor([0.0, 0.5, 0.9, 1.2], dtype=D64)
    event = _event(which, control)
    return neuralode.solve(m, y0, t, event=event, gradient=gradient, batch_control=control, **kw)


def _total(sol):
    loss = sum(y.sum() for y in _leaves(sol.ys)) + sol.event_t.nan_to_num().sum()
    return loss + sum(y.nan_to_num().sum() for y in _leaves(sol.event_y))


def _cases():
    for gradient, control in METHODS:
        for which in EVENTS:
            if not (control == "per_sample" and which == "terminal"):  # (B,) there anyway
                yield gradient, control, which


@pytest.mark.parametrize("kind", ["tensor", "tuple"])  # (a dict state: the in-place test)
@pytest.mark.parametrize("gradient, control, which", list(_cases()))
@pytest.mark.parametrize("backward", [False, True])
def test_module_keeping_its_own_event_solution_is_collectable(
    kind, gradient, control, which, backward
):
    m = M(kind)
    sol = _solve(m, _y0(kind)[0], gradient, control, which)
    shape = {"terminal": (), "terminal per sample": (2,), "non-terminal": (2,)}[which]
    if which == "non-terminal" and control == "per_sample":
        shape = (2, 2)  # (K, B)
    assert sol.event_t.shape == shape and not torch.isnan(sol.event_t).any()  # all fired
    assert sol.event_t.grad_fn is not None
    m.out = (sol.ys, sol.event_t, sol.event_y)  # each alone leaked before
    if backward:
        _total(sol).backward()
        assert m.lin.weight.grad is not None and m.lin.weight.grad.abs().sum() > 0
    del sol
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("gradient, control, which", list(_cases()))
def test_event_solve_leaves_no_cyclic_garbage(gradient, control, which):
    # Reference counting alone frees a solve and its backward pass (no work for the cyclic
    # collector in a training loop): the holders, the collected runs and the segments' stats
    # make no reference cycle.
    m = M("tuple")

    def once():
        sol = _solve(m, _y0("tuple")[0], gradient, control, which)
        _total(sol).backward()

    once()
    gc.collect()
    gc.disable()
    try:
        before = gc.collect()
        once()
        found = gc.collect()
    finally:
        gc.enable()
    assert before == 0 and found == 0


@pytest.mark.parametrize("face", ["odeint_event", "odeint_event + odeint_adjoint", "odeint"])
@pytest.mark.parametrize("state", ["tensor", "tuple"])
@pytest.mark.parametrize("backward", [False, True])
def test_torchdiffeq_event_face_is_collectable(face, state, backward):
    class Func(nn.Module):  # torchdiffeq-style: the module keeps its event time and states
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2).to(D64)

        def forward(self, t, y):
            return (self.lin(y[0]), -0.5 * y[1]) if state == "tuple" else self.lin(y)

        def event_fn(self, t, y):
            return t - 0.7 + 0.01 * (y[0] if state == "tuple" else y).sum()

        def run(self, y0):
            t0 = torch.tensor(0.0, dtype=D64)
            if face == "odeint":
                t = torch.tensor([0.0, 1.0], dtype=D64)
                self.sol = neuralode.odeint(self, y0, t, event_fn=self.event_fn)
            else:
                iface = neuralode.odeint_adjoint if "adjoint" in face else neuralode.odeint
                self.sol = neuralode.odeint_event(
                    self, y0, t0, event_fn=self.event_fn, odeint_interface=iface
                )
            return self.sol

    f = Func()
    y0 = torch.ones(2, dtype=D64)
    if state == "tuple":
        y0 = (y0, torch.ones(1, dtype=D64))
    event_t, traj = f.run(y0)
    if backward:
        (event_t + sum(x[-1].sum() for x in _leaves(traj))).backward()
        assert f.lin.weight.grad is not None and f.lin.weight.grad.abs().sum() > 0
    del event_t, traj
    ref = weakref.ref(f)
    del f
    gc.collect()
    assert ref() is None


def test_event_solve_with_an_integral_is_collectable():
    m = M("tuple")
    sol = neuralode.solve(m, _y0("tuple")[0], torch.tensor([0.0, 1.0], dtype=D64),
                          event=_event("terminal", "shared"), gradient="checkpoint",
                          integral=lambda t, y: (y[0] ** 2).sum(-1))  # fmt: skip
    m.out = (sol.ys, sol.integral, sol.event_t, sol.event_integral)
    del sol
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


# ------------------------------------------------------------------- the gradients are unchanged
LOSSES = {
    "event times": lambda sol: (sol.event_t.nan_to_num() * (1 + sol.event_t.nan_to_num())).sum(),
    "event states and outputs": lambda sol: (
        sum((y.nan_to_num() ** 2).sum() for y in _leaves(sol.event_y))
        + sum((0.5 * y[1:]).sum() for y in _leaves(sol.ys))
    ),
}


def _grads(kind, gradient, control, which, **kw):
    """The gradients of each loss w.r.t. y0 and the parameters, from one solve."""
    torch.manual_seed(0)
    m = M(kind)
    y0, leaves = _y0(kind, requires_grad=True)
    sol = _solve(m, y0, gradient, control, which, **kw)
    losses = [loss(sol) for loss in LOSSES.values()]
    # Only the losses' graphs are left: they alone keep the solves' records alive for backward.
    del sol
    gc.collect()
    params = [*(m.lin.parameters() if kind == "tensor" else m.parameters())]  # (those func uses)
    return [
        torch.autograd.grad(loss, [*leaves, *params], retain_graph=i + 1 < len(losses))
        for i, loss in enumerate(losses)
    ]


@pytest.mark.parametrize("kind", ["tensor", "tuple"])
@pytest.mark.parametrize("gradient, control, which", [c for c in _cases() if c[0] != "direct"])
def test_event_gradients_equal_those_of_direct(kind, gradient, control, which):
    if gradient == "reversible":  # a different scheme: fixed steps, equal to the method's order
        kw, tol = dict(solver="rk4", dt=0.02), dict(rtol=1e-5, atol=1e-7)
    elif gradient == "checkpoint":  # the same steps replayed: equal to rounding
        kw, tol = dict(rtol=1e-9, atol=1e-9), dict(rtol=1e-9, atol=1e-11)
    else:  # backsolve: a separate backward solve, at tight tolerances
        kw, tol = dict(rtol=1e-11, atol=1e-11), dict(rtol=1e-6, atol=1e-8)
    ref = _grads(kind, "direct", control, which, **kw)
    got = _grads(kind, gradient, control, which, **kw)
    for name, g_ref, g in zip(LOSSES, ref, got):
        assert len(g) == len(g_ref)
        assert any(float(r.abs().max()) > 1e-3 for r in g_ref), name  # it moves with the inputs
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("control", ["shared", "per_sample"])
def test_event_outputs_are_not_views_and_may_be_modified_in_place(control):
    # The held outputs alias storage that no node saved: writing into them (here through
    # .detach(), unseen by autograd) leaves the gradients alone. A dict state, which the leak
    # matrix leaves out, and the module is freed afterwards.
    m = M("dict")
    y0, leaves = _y0("dict", requires_grad=True)
    sol = _solve(m, y0, "checkpoint", control, "non-terminal")
    outs = [*_leaves(sol.ys), sol.event_t, *_leaves(sol.event_y)]
    assert all(x._base is None for x in outs)
    loss = sol.event_t.sum() + sum(y[-1].sum() for y in _leaves(sol.ys))
    g_ref = torch.autograd.grad(loss, leaves, retain_graph=True)
    for x in outs:
        x.detach().mul_(0.0)  # leaves the recorded graph alone
    g = torch.autograd.grad(loss, leaves)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0)
    m.out = sol
    del sol, outs, loss, x  # (x: the last output)
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None
