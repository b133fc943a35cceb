"""compile=True: a repeated short solve evaluates f(t0, y0) and its initial step in the call.

When the last solve of the same setup and func fitted in one compiled call (a training step),
the next one computes the first stage and Hairer's initial step size inside that call
(``neuralode._compiled_start``) instead of eagerly: the values, gradients, step counts and NFE
stay the eager engine's, the start compiles once (no recompilation on later solves), and a
func whose Python state changed is still caught. A small float64 field, 2 steps per call (a
minute or two of compilation on 2 cores).
"""

import warnings

import pytest
import torch

import neuralode
import neuralode._compiled as compiled
from neuralode import PIController
from test_compiled_lengths import Linear

F64 = torch.float64


# The compiled-lengths tests' field: an nn.Module with a Python attribute (`scale`) whose
# change invalidates the compiled code.
Field = Linear


Y0 = torch.tensor([[0.5, -0.3], [1.0, 0.2], [-0.4, 0.8]], dtype=F64)
T = torch.tensor([0.0, 0.05, 0.2], dtype=F64)  # 2 steps at 1e-5


@pytest.fixture
def spy(monkeypatch):
    """2 steps per call; records each call's start (a Start or None) and each compilation."""
    monkeypatch.setattr(compiled, "STEPS_PER_CALL", 2)
    starts, compiles = [], []
    run_chunks, compile_call = compiled._run_chunks, compiled._compile_call

    def spy_run(*args, **kw):
        starts.append(kw.get("start"))
        return run_chunks(*args, **kw)

    def spy_compile(entry, args):
        compiles.append(len(args))
        return compile_call(entry, args)

    monkeypatch.setattr(compiled, "_run_chunks", spy_run)
    monkeypatch.setattr(compiled, "_compile_call", spy_compile)
    return starts, compiles


def _step(func, compile, **kw):
    func.zero_grad()
    y0 = Y0.clone().requires_grad_()
    kw = kw or dict(rtol=1e-5, atol=1e-5)
    sol = neuralode.solve(func, y0, T, compile=compile, dense_output=False, **kw)
    (sol.ys.square().sum() + sol.ys[-1, :, 0].sum()).backward()
    return sol, [y0.grad.clone()] + [p.grad.clone() for p in func.parameters()]


def _same(sol, grads, ref, ref_grads):
    assert sol.stats["compiled"] is True
    for key in ("n_accepted", "n_rejected", "nfe"):
        assert sol.stats[key] == ref.stats[key], key
    # The initial step's norms are summed in another order: the step sizes (and so the
    # results) agree to rounding, not bit for bit.
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads, ref_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_repeated_short_solves_start_in_the_call_and_match_eager(spy):
    starts, compiles = spy
    func = Field()
    ref, ref_grads = _step(func, False)
    assert ref.stats["n_steps"] == 2 and ref.stats["nfe"] == 2 + 2 * 6  # one call of 2 steps
    results = [_step(func, True) for _ in range(3)]
    # The first solve starts eagerly (its eager call of f checks func's output); the later
    # ones start in the call, compiled once: 2 compilations in all, no recompilation.
    assert [s is not None for s in starts] == [False, True, True]
    assert compiles == [4, 5]  # (chunk(f, C, s, k), then chunk_from_start(f, C, s, k, S))
    for sol, grads in results:
        _same(sol, grads, ref, ref_grads)

    # A Python attribute func reads changes: the start's guards fail, the solve runs eagerly.
    try:
        func.scale = 1.5
        with pytest.warns(RuntimeWarning, match="no longer matches"):
            changed, changed_grads = _step(func, True)
        want, want_grads = _step(func, False)
    finally:
        func.scale = 1.0
    assert changed.stats["compiled"] is False
    torch.testing.assert_close(changed.ys, want.ys, rtol=1e-14, atol=0.0)
    for g, w in zip(changed_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-14, atol=0.0)


def test_changed_attribute_is_caught_before_the_start_compiles(spy):
    starts, compiles = spy
    func = Field()
    _step(func, True)  # (the plain chunk: compiled, or from the on-disk cache)
    try:
        func.scale = 1.5
        with pytest.warns(RuntimeWarning, match="no longer matches.*2 steps"):
            changed, _ = _step(func, True)
        want, _ = _step(func, False)
    finally:
        func.scale = 1.0
    assert [s is not None for s in starts] == [False, True]
    assert compiles == [4]  # the start was not compiled for the changed func
    assert changed.stats["compiled"] is False
    torch.testing.assert_close(changed.ys, want.ys, rtol=1e-14, atol=0.0)


def test_longer_solves_keep_the_eager_start(spy):
    starts, _ = spy
    func = Field()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)  # more steps than one call of 2 takes
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # (no mismatch warning either)
        sols = [neuralode.solve(func, Y0, t, compile=True, rtol=1e-5, atol=1e-5) for _ in "ab"]
        ref = neuralode.solve(func, Y0, t, rtol=1e-5, atol=1e-5)
    assert ref.stats["n_steps"] > 2
    assert starts == [None, None]
    for sol in sols:
        assert sol.stats["nfe"] == ref.stats["nfe"]
        torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-12, atol=1e-12)


def test_given_first_step_size_counts_no_initial_evaluation(spy):
    starts, _ = spy
    func = Field()
    ctrl = PIController(rtol=1e-5, atol=1e-5, dt0=0.05)
    ref, ref_grads = _step(func, False, controller=ctrl)
    results = [_step(func, True, controller=ctrl) for _ in range(2)]
    assert [s is not None for s in starts] == [False, True]
    assert ref.stats["nfe"] == 1 + ref.stats["n_steps"] * 6  # f(t0, y0), then the stages
    for sol, grads in results:
        _same(sol, grads, ref, ref_grads)
