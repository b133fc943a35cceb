"""solve(..., compile=True) with PIController(norm=...): the compiled step takes the user's norm
exactly as the eager drivers do (shared control: the whole batch's scaled error in y0's
structure; per-sample control: each sample's alone, vmapped).

Each test compiles one graph (20-90 s on 2 cores): a max norm on a tensor state and a
seminorm-like norm on a tuple state (shared control, under autograd), a max norm under
per-sample control. Compiled results are compared against the eager engine with the same
norm (float64): the same accepted/rejected step counts, values to 1e-10, Direct gradients;
and each norm changes the step counts against the default norm (so a compiled solve that
ignored the norm would fail).
"""

import dataclasses

import pytest
import torch

import neuralode
import neuralode._compiled as compiled
from neuralode import PIController
from neuralode._compiled_norm import compiled_norm
from neuralode._tree import flatten_state
from neuralode.solvers import get_tableau

F64 = torch.float64
T = torch.linspace(0.0, 3.0, 4, dtype=F64)
TOL = dict(rtol=1e-6, atol=1e-8)


@pytest.fixture(scope="module", autouse=True)
def _one_step_per_call():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiled, "STEPS_PER_CALL", 1)  # (a smaller graph: shorter compilation)
        yield


class VdP(torch.nn.Module):
    """Van der Pol with a learnable stiffness ``mu``: a tensor state (B, 2) or a tuple (x, v)."""

    def __init__(self):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.tensor(2.0, dtype=F64))

    def forward(self, t, y):
        x, v = (y[:, :1], y[:, 1:]) if isinstance(y, torch.Tensor) else y
        dv = self.mu * (1 - x**2) * v - x
        return torch.cat([v, dv], 1) if isinstance(y, torch.Tensor) else (v, dv)


Y0 = torch.tensor([[2.0, 0.0], [0.5, 0.3], [1.0, -1.0]], dtype=F64)


def max_norm(e):
    return e.abs().max()


def first_rms(e):  # a seminorm: only the first component of the tuple state counts
    return e[0].pow(2).mean().sqrt()


def _solve(field, state, norm, compile, **kw):
    """The solution and the gradients of a loss w.r.t. the initial state and ``mu``."""
    leaves = [c.clone().requires_grad_() for c in (state if isinstance(state, tuple) else [state])]
    y0 = tuple(leaves) if isinstance(state, tuple) else leaves[0]
    ctrl = PIController(**TOL) if norm is None else PIController(norm=norm, **TOL)
    sol = neuralode.solve(field, y0, T, controller=ctrl, compile=compile, **kw)
    ys = torch.cat(list(sol.ys), -1) if isinstance(sol.ys, tuple) else sol.ys
    loss = ys.square().sum() + ys[-1, :, 0].sum()
    return sol, ys, torch.autograd.grad(loss, [*leaves, field.mu])


def _steps(sol):
    return sol.stats["n_accepted"], sol.stats["n_rejected"]


@pytest.mark.parametrize(
    ("norm", "tuple_state"), [(max_norm, False), (first_rms, True)], ids=["max", "seminorm"]
)
def test_shared_custom_norm_compiled_matches_eager(norm, tuple_state):
    field = VdP()
    state = (Y0[:, :1], Y0[:, 1:]) if tuple_state else Y0
    got, ys, grads = _solve(field, state, norm, compile=True)
    want, ys_e, grads_e = _solve(field, state, norm, compile=False)
    default, _, _ = _solve(field, state, None, compile=False)
    assert got.stats["compiled"] is True
    assert _steps(got) == _steps(want)
    assert _steps(want) != _steps(default)  # the norm matters: ignoring it would fail
    torch.testing.assert_close(ys, ys_e, rtol=1e-10, atol=1e-10)
    for g, g_e in zip(grads, grads_e):
        torch.testing.assert_close(g, g_e, rtol=1e-8, atol=1e-10)
    # The compiled code is cached under this norm (part of the key: another norm never gets
    # this graph), and a second solve reuses it.
    keys = [key for ids, key in compiled._compiled if ids == (id(field),)]  # (this field's)
    assert keys
    assert any(k[0].norm is not None and k[0].norm.norm is norm for k in keys)
    assert not any(k[0].norm is not None and k[0].norm.norm is not norm for k in keys)
    again, ys2, _ = _solve(field, state, norm, compile=True)
    assert _steps(again) == _steps(want)
    torch.testing.assert_close(ys2, ys, rtol=1e-12, atol=1e-12)


def test_two_norms_never_share_compiled_constants():
    """The chunk's constants (the compiled code's cache key) hold the norm by identity: two
    norm objects, even with the same formula, never compare equal."""
    spec, _ = flatten_state(Y0, batched=False)
    C = compiled._consts(get_tableau("dopri5"), PIController(**TOL), F64, 1, spec, False,
                         rows=False, pick=False, record=False, n_out=1)  # fmt: skip
    same = (compiled_norm(C, max_norm, spec, False), compiled_norm(C, max_norm, spec, False))
    assert same[0] == same[1] and hash(same[0]) == hash(same[1])
    assert same[0] != compiled_norm(C, lambda e: e.abs().max(), spec, False)
    assert same[0] != compiled_norm(C, max_norm, spec, True)
    assert same[0] != C and compiled_norm(C, None, spec, False) == C

    @dataclasses.dataclass  # compares by value and does not hash
    class Weighted:
        w: float

        def __call__(self, e):
            return self.w * e.abs().max()

    a, b = (compiled_norm(C, Weighted(2.0), spec, False) for _ in range(2))
    assert a != b and a == a


def test_per_sample_custom_norm_compiled_matches_eager():
    """Each sample's norm is of that sample alone (RowUserNorm, vmapped inside the graph)."""
    field = VdP()
    kw = dict(batch_control="per_sample")
    got, ys, grads = _solve(field, Y0, max_norm, compile=True, **kw)
    want, ys_e, grads_e = _solve(field, Y0, max_norm, compile=False, **kw)
    default, _, _ = _solve(field, Y0, None, compile=False, **kw)
    assert got.stats["compiled"] is True
    for a, b in zip(_steps(got), _steps(want)):
        assert a.tolist() == b.tolist()
    assert want.stats["n_accepted"].tolist() != default.stats["n_accepted"].tolist()
    torch.testing.assert_close(ys, ys_e, rtol=1e-10, atol=1e-10)
    for g, g_e in zip(grads, grads_e):
        torch.testing.assert_close(g, g_e, rtol=1e-8, atol=1e-10)


def test_custom_norm_with_what_compile_still_refuses_names_only_that():
    ctrl = PIController(norm=max_norm, **TOL)
    with pytest.raises(ValueError, match=r"does not support solver 'kvaerno5'") as err:
        neuralode.solve(VdP(), Y0, T, controller=ctrl, solver="kvaerno5", compile=True)
    assert "norm" not in str(err.value)


def test_backsolve_norm_compiled_backward_matches_eager():
    """Backsolve(norm=...) on the augmented tuple (y, adj_y, adj_mu): the compiled backward
    solve takes it (stats["compiled_backward"]) and its gradients are the eager ones with the
    same norm (to 1e-10), not the default norm's (which differ by ~1e-7 here)."""

    def aug_max(e):
        return torch.stack([c.abs().max() for c in e]).max()

    field = VdP()

    def grads(compile, norm):
        y0 = Y0.clone().requires_grad_()
        grad = neuralode.Backsolve(norm=norm, rtol=1e-8, atol=1e-10)
        sol = neuralode.solve(field, y0, T, compile=compile, gradient=grad, **TOL)
        return sol, torch.autograd.grad(sol.ys.square().sum(), [y0, field.mu])

    got, g = grads(True, aug_max)
    want, g_e = grads(False, aug_max)
    default, g_d = grads(False, None)
    assert got.stats["compiled_backward"] is True
    assert want.stats["nfe_backward"] != default.stats["nfe_backward"]  # the norm matters
    for a, b, c in zip(g, g_e, g_d):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        assert (b - c).abs().max() > 1e-8


def test_untraceable_norm_raises_naming_it():
    """A norm torch.compile cannot trace (a Python branch on a value) fails the compilation
    with a message naming the norm (compile=False runs it)."""

    def branchy(e):
        m = e.abs().max()
        return m if m > 0.5 else 2 * m

    ctrl = PIController(norm=branchy, **TOL)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"a custom error norm if given, must"):
        neuralode.solve(VdP(), Y0, T, controller=ctrl, compile=True)
